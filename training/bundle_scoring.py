"""Score a shipped bundle on its own held-out images through dermscore's pipeline, with cached results.

For figures of a bundle as users get them (its float16 members, its TTA, its colour constancy, dermscore's
decoding and preprocessing) rather than of the training work folder's float32 checkpoints: the test
images are read from the bundle's ``split.csv`` and go through ``dermscore.infer.score`` unchanged.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from dermscore.aggregate import ensemble
from dermscore.bundle import Bundle
from dermscore.discover import file_source
from dermscore.errors import BundleError
from dermscore.records import Failure
from training.data import IMAGE_SUFFIXES, image_folders

CHUNK = 128  # images scored between cache writes, so a killed run keeps what it has done


def bundle_split(bundle: Bundle, data: Path, side: str = "test") -> tuple[list[str], np.ndarray, dict[str, Path]]:
    """The bundle's ``side`` images from its ``split.csv``: ids, labels (class indices) and files under ``data``."""
    path = bundle.path / "split.csv"
    if not path.is_file():
        raise BundleError(f"{path}: bundle {bundle.name} has no split.csv, so its held-out images are unknown.")
    with open(path, newline="", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if r["split"] == side]
    files = {
        p.stem: p for folder in image_folders(Path(data)) for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
    }
    missing = [r["image_id"] for r in rows if r["image_id"] not in files]
    if missing:
        raise BundleError(
            f"{data}: {len(missing)} of the bundle's {side} images are not there (first: {missing[0]}); "
            "point --data at the HAM10000 copy the bundle was trained from."
        )
    ids = [r["image_id"] for r in rows]
    labels = np.array([bundle.classes.index(r["dx"]) for r in rows], dtype=np.int64)
    return ids, labels, {i: files[i] for i in ids}


def score_files(bundle: Bundle, files: Mapping[str, Path], cache: Path) -> dict[str, np.ndarray]:
    """Per-member and ensemble probabilities (N, classes) for ``files`` in their order, cached in ``cache``.

    The cache is keyed by the bundle's identity and the file list, and grows chunk by chunk, so a rerun
    after a kill continues; any failed image is an error (held-out figures over a silently smaller set
    would mislead).
    """
    from dermscore.infer import Predictor, score  # noqa: PLC0415 (loads Keras)

    ids = list(files)
    key = hashlib.sha256((bundle.identity + "\n" + "\n".join(f"{i}={files[i]}" for i in ids)).encode()).hexdigest()[:16]
    stored = _load(cache, key)
    done = len(stored.get("ids", []))
    predictor = None
    while done < len(ids):
        predictor = predictor or Predictor(bundle)
        chunk = ids[done : done + CHUNK]
        rows: dict[str, list[np.ndarray]] = {m.name: [] for m in bundle.members}
        for result in score([file_source(files[i]) for i in chunk], predictor):
            if isinstance(result, Failure):
                raise BundleError(f"{result.location}: could not be scored ({result.stage}: {result.reason}).")
            for name, probs in result.member_probabilities.items():
                rows[name].append(probs)
        for name, probs in rows.items():
            stored[name] = np.concatenate([stored.get(name, np.zeros((0, len(bundle.classes)))), np.stack(probs)])
        stored["ids"] = np.array(ids[: done + len(chunk)])
        done += len(chunk)
        _save(cache, key, stored)
        print(f"  scored {done}/{len(ids)} images with {bundle.name}", flush=True)
    members = {m.name: stored[m.name] for m in bundle.members}
    return {**members, "ensemble": ensemble(members, bundle)}


def _load(cache: Path, key: str) -> dict[str, np.ndarray]:
    if not cache.is_file():
        return {}
    with np.load(cache, allow_pickle=False) as data:
        return {k: data[k] for k in data.files if k != "key"} if str(data["key"]) == key else {}


def _save(cache: Path, key: str, stored: dict[str, np.ndarray]) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.stem + ".tmp.npz")
    np.savez(tmp, key=np.array(key), **stored)
    tmp.replace(cache)
