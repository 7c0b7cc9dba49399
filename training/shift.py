"""Device-shift checks: figures per image source, and on a copy of the test split that imitates another dermoscope.

HAM10000 comes from four sources (``HAM10000_sources.csv``) with their own devices and class mixes
(MoleMax images are almost all nevi), so a model can score well overall by recognising the camera.
Per-source balanced accuracy and melanoma-vs-nevus AUC *within* a source take that shortcut away.
The transformed copy changes what another dermoscope changes (white balance, tone curve, vignetting,
optics blur, resolution, JPEG compression) with parameters drawn per image from stated ranges, seeded
by image id, so every run and every bundle is scored on the same shifted files.
"""

from __future__ import annotations

import csv
import io
import json
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from dermscore.bundle import CLASS_CODES
from training.metrics import balanced_accuracy, evaluate

SOURCES_FILE = "HAM10000_sources.csv"
UNKNOWN_SOURCE = "unknown"
MIN_PER_CLASS = 5  # fewer melanomas or nevi than this in a source: no AUC (it would be noise)
MEL, NV = CLASS_CODES.index("mel"), CLASS_CODES.index("nv")


def read_sources(path: Path) -> dict[str, str]:
    """image_id -> source (the ``dataset`` field of the later HAM10000 metadata release)."""
    with open(path, newline="", encoding="utf-8") as handle:
        return {row["image_id"].strip(): row["dataset"].strip() for row in csv.DictReader(handle)}


def sources_of(image_ids: Sequence[str], sources: Mapping[str, str]) -> np.ndarray:
    return np.array([sources.get(i, UNKNOWN_SOURCE) for i in image_ids], dtype=object)


@dataclass(frozen=True)
class DeviceShift:
    """Ranges the imitated dermoscope's settings are drawn from (uniform, per image).

    Chosen to span what differs between dermoscopes and clinics without hiding the lesion: a white
    balance off by up to 20% per channel, a tone curve between gamma 0.75 and 1.33, corners up to 40%
    darker (contact-plate optics), a Gaussian blur up to 1.2 pixels of the stored image, a sensor with
    40-100% of the linear resolution, and JPEG quality 35-90.
    """

    white_balance: tuple[float, float] = (0.8, 1.2)  # gain on red and on blue, green fixed
    gamma: tuple[float, float] = (0.75, 1.33)
    vignetting: tuple[float, float] = (0.0, 0.4)  # brightness lost in the corners
    blur_sigma: tuple[float, float] = (0.0, 1.2)  # pixels of the stored image
    resolution: tuple[float, float] = (0.4, 1.0)  # linear scale of the saved image
    jpeg_quality: tuple[int, int] = (35, 90)
    seed: int = 2026

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def draw(self, image_id: str) -> dict[str, float]:
        """This image's settings: depend only on the seed and the image id (not on order or batch)."""
        rng = np.random.default_rng([self.seed, zlib.crc32(image_id.encode())])
        return {
            "gain_red": float(rng.uniform(*self.white_balance)),
            "gain_blue": float(rng.uniform(*self.white_balance)),
            "gamma": float(np.exp(rng.uniform(np.log(self.gamma[0]), np.log(self.gamma[1])))),
            "vignetting": float(rng.uniform(*self.vignetting)),
            "blur_sigma": float(rng.uniform(*self.blur_sigma)),
            "resolution": float(rng.uniform(*self.resolution)),
            "jpeg_quality": int(rng.integers(self.jpeg_quality[0], self.jpeg_quality[1] + 1)),
        }


def imitate_device(rgb: np.ndarray, settings: Mapping[str, float]) -> bytes:
    """The JPEG file another dermoscope could have produced of ``rgb`` (uint8, H x W x 3).

    Order as in a camera: optics (vignetting, blur), then the sensor's white balance and tone curve, then
    the output resolution and the JPEG encoder.
    """
    height, width = rgb.shape[:2]
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    radius2 = ((y - (height - 1) / 2) / (height / 2)) ** 2 + ((x - (width - 1) / 2) / (width / 2)) ** 2
    falloff = 1.0 - settings["vignetting"] * radius2 / 2.0  # corners (radius^2 = 2) lose the full amount
    image = rgb.astype(np.float32) * falloff[..., None]
    if settings["blur_sigma"] > 0:
        image = np.asarray(
            Image.fromarray(np.clip(image, 0, 255).round().astype(np.uint8)).filter(
                ImageFilter.GaussianBlur(settings["blur_sigma"])
            ),
            dtype=np.float32,
        )
    image = image * np.array([settings["gain_red"], 1.0, settings["gain_blue"]], dtype=np.float32)
    image = 255.0 * (np.clip(image, 0, 255) / 255.0) ** settings["gamma"]
    out = Image.fromarray(np.clip(image, 0, 255).round().astype(np.uint8))
    size = (max(round(width * settings["resolution"]), 1), max(round(height * settings["resolution"]), 1))
    out = out.resize(size, Image.Resampling.BILINEAR, reducing_gap=None) if size != (width, height) else out
    buffer = io.BytesIO()
    out.save(buffer, format="JPEG", quality=settings["jpeg_quality"])
    return buffer.getvalue()


def write_shifted_copy(images: Mapping[str, Path], folder: Path, shift: DeviceShift) -> dict[str, Path]:
    """image_id -> shifted JPEG in ``folder`` (written once; the settings of each image beside them)."""
    folder.mkdir(parents=True, exist_ok=True)
    settings_path = folder / "settings.json"
    out: dict[str, Path] = {}
    settings: dict[str, dict] = {}
    for image_id, path in images.items():
        target = folder / f"{image_id}.jpg"
        settings[image_id] = shift.draw(image_id)
        if not target.is_file():
            with Image.open(path) as image:
                data = imitate_device(np.asarray(image.convert("RGB")), settings[image_id])
            tmp = target.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(target)
        out[image_id] = target
    settings_path.write_text(json.dumps({"ranges": shift.to_json(), "images": settings}, indent=1))
    return out


def shifted_folder(work: Path, shift: DeviceShift) -> Path:
    """Where the shifted copy lives: one folder per seed and ranges, so a change of either never mixes files."""
    key = zlib.crc32(json.dumps(shift.to_json(), sort_keys=True).encode())
    return Path(work) / "device_shift" / f"seed{shift.seed}_{key:08x}"


def mel_vs_nv_auc(y: np.ndarray, probs: np.ndarray) -> dict:
    """AUC of the melanoma probability among the images that are melanoma or nevus, with their counts.

    n/a (None) when either class has fewer than MIN_PER_CLASS images: an AUC from three melanomas says
    nothing, and saying so beats a number.
    """
    from sklearn.metrics import roc_auc_score  # noqa: PLC0415

    y = np.asarray(y)
    keep = (y == MEL) | (y == NV)
    mel, nv = int((y == MEL).sum()), int((y == NV).sum())
    auc = None
    if mel >= MIN_PER_CLASS and nv >= MIN_PER_CLASS:
        auc = round(float(roc_auc_score(y[keep] == MEL, probs[keep, MEL])), 4)
    return {"mel_vs_nv_auc": auc, "mel": mel, "nv": nv}


def per_source(y: np.ndarray, probs: np.ndarray, sources: np.ndarray) -> dict[str, dict]:
    """Balanced accuracy (over the classes present in the source) and melanoma-vs-nevus AUC, per source."""
    y, sources = np.asarray(y), np.asarray(sources)
    result = {}
    for source in sorted(set(sources)):
        mask = sources == source
        counts = np.bincount(y[mask], minlength=len(CLASS_CODES))
        result[source] = {
            "n": int(mask.sum()),
            "class_counts": {c: int(n) for c, n in zip(CLASS_CODES, counts)},
            "balanced_accuracy": round(balanced_accuracy(y[mask], probs[mask].argmax(1)), 4),
            **mel_vs_nv_auc(y[mask], probs[mask]),
        }
    return result


HEADLINE = ("accuracy", "balanced_accuracy", "melanoma_sensitivity_at_90_specificity")


def shift_report(
    plain: Mapping[str, np.ndarray], shifted: Mapping[str, np.ndarray], y: np.ndarray, sources: np.ndarray,
    shift: DeviceShift,
) -> dict:
    """Per model (members and ensemble): plain and shifted headline figures with the drop, and per source."""
    models = {}
    for name, probs in plain.items():
        before, after = evaluate(y, probs), evaluate(y, shifted[name])
        figures = {}
        for key in HEADLINE:
            figures[key] = {"plain": before[key], "shifted": after[key], "drop": round(before[key] - after[key], 4)}
        auc_plain, auc_shifted = mel_vs_nv_auc(y, probs), mel_vs_nv_auc(y, shifted[name])
        figures["mel_vs_nv_auc"] = {
            "plain": auc_plain["mel_vs_nv_auc"],
            "shifted": auc_shifted["mel_vs_nv_auc"],
            "drop": round(auc_plain["mel_vs_nv_auc"] - auc_shifted["mel_vs_nv_auc"], 4)
            if auc_plain["mel_vs_nv_auc"] is not None
            else None,
        }
        models[name] = {
            "device_shift": figures,
            "per_source": per_source(y, probs, sources),
            "per_source_shifted": per_source(y, shifted[name], sources),
        }
    return {
        "n": int(len(y)),
        "sources": {s: int((np.asarray(sources) == s).sum()) for s in sorted(set(sources))},
        "device_shift_ranges": shift.to_json(),
        "models": models,
    }


def held_out_report(y: np.ndarray, probs: np.ndarray, source: str) -> dict:
    """A member trained without ``source``, scored on every image of it: a real device and clinic shift."""
    result = evaluate(y, probs)
    return {
        "source": source,
        "n": int(len(y)),
        "balanced_accuracy": result["balanced_accuracy"],
        "accuracy": result["accuracy"],
        **mel_vs_nv_auc(y, probs),
    }
