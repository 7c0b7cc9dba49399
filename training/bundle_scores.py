"""A bundle's split images scored by dermscore itself: per-member probabilities and features, cached.

Why through ``dermscore.infer.score`` (discover's file sources, decode, preprocess, the Predictor): the
calibration, operating points and OOD statistics fitted from these outputs then describe exactly what
dermscore computes, on the backend it uses. Scoring the shipped members on a 2-core CPU takes tens of
minutes, so each split is cached in ``--work`` in chunks (a killed run resumes where it stopped) under a
key made of the member weight hashes and the feature views: a bundle with new weights is rescored, a new
calibration or detector is not.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from dermscore.bundle import Bundle
from dermscore.discover import file_source
from dermscore.infer import Predictor, bounded_map, decode_and_prepare
from dermscore.preprocess import stack_inputs
from dermscore.records import Failure
from dermscore.runtime import Runtime, decode_workers
from training.data import image_folders

CHUNK = 256


def split_rows(bundle: Bundle) -> list[dict[str, str]]:
    """The bundle's ``split.csv`` rows (image_id, lesion_id, dx, split), in file order."""
    path = bundle.path / str(bundle.provenance.get("split", {}).get("file", "split.csv"))
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def image_paths(data: Path, image_ids: Sequence[str]) -> list[Path]:
    """Each image id's file in the data folder (any of its image folders, .jpg or .png)."""
    found = {p.stem: p for folder in image_folders(data) for p in folder.iterdir() if p.is_file()}
    missing = [i for i in image_ids if i not in found]
    if missing:
        raise FileNotFoundError(f"{data}: {len(missing)} images of the split are missing, e.g. {missing[:3]}")
    return [found[i] for i in image_ids]


def cache_folder(bundle: Bundle, views: str, work: Path) -> Path:
    """Where this bundle's scores live: keyed by what shapes them (weights, views), not by the version."""
    key = json.dumps({"weights": bundle.weight_hashes, "views": views}, sort_keys=True)
    return work / "bundle-scores" / hashlib.sha256(key.encode()).hexdigest()[:16]


def score_images(
    predictor: Callable[[], Predictor], paths: Sequence[Path], cache: Path, log: Callable[[str], None] = print
) -> dict[str, np.ndarray]:
    """``member -> probabilities`` and ``member/features -> features`` for ``paths``, in order.

    Scored in chunks of ``CHUNK`` images, each saved to ``cache`` as it finishes; chunks already there are
    read back; ``predictor`` is called (to load the members) only for a chunk that is not cached. An image
    that fails to decode stops the step: every split image must be scored.
    """
    cache.mkdir(parents=True, exist_ok=True)
    parts = []
    for start in range(0, len(paths), CHUNK):
        chunk = list(paths[start:start + CHUNK])
        file = cache / f"{start:06d}-{len(chunk)}.npz"
        names = np.array([p.name for p in chunk])
        if file.is_file():
            with np.load(file) as stored:
                if np.array_equal(stored["names"], names):
                    parts.append({k: stored[k] for k in stored.files if k != "names"})
                    continue
        t0 = time.time()
        part = _score_chunk(predictor(), chunk)
        np.savez(file, names=names, **part)
        parts.append(part)
        log(f"{cache.name}: {start + len(chunk)}/{len(paths)} images ({len(chunk) / (time.time() - t0):.1f}/s)")
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def _score_chunk(predictor: Predictor, paths: list[Path]) -> dict[str, np.ndarray]:
    """The local engine's decode and preprocessing threads feeding the Predictor, keeping its raw outputs."""
    bundle = predictor.bundle
    workers = decode_workers(predictor.device)
    prepared = []
    for result in bounded_map(lambda p: decode_and_prepare(file_source(p), bundle), paths, workers, 4 * workers):
        if isinstance(result, Failure):
            raise RuntimeError(f"{result.location}: {result.reason}")
        prepared.extend(inputs for _, inputs in result)
    outputs = [
        predictor(stack_inputs(prepared[i:i + predictor.batch_size], bundle.members))
        for i in range(0, len(prepared), predictor.batch_size)
    ]
    return {key: np.concatenate([o[key] for o in outputs]) for key in outputs[0]}


class Scorer:
    """One bundle's members (loaded on first need, once) scoring named image lists into one cache folder.

    ``backend`` is dermscore's (``auto``, ``keras``, ``onnx``; ``--backend`` of ``python -m training``). ``auto``
    scores as a CPU run of dermscore does: with ONNX Runtime, after exporting each member the bundle does not ship
    as ONNX (30-50 s per full-size member on 2 cores, about 80 s for the pipeline test's two small real ones).
    ``keras`` skips that export where it costs more than it saves: a small split, a bundle scored once, a machine
    where the export is not wanted. The cache stays keyed by weights and views: the two backends agree within
    1e-4, the check every ONNX export passes.
    """

    def __init__(
        self, bundle: Bundle, views: str, work: Path, log: Callable[[str], None] = print, backend: str = "auto"
    ) -> None:
        self.bundle, self.views, self.log, self.backend = bundle, views, log, backend
        self.folder = cache_folder(bundle, views, work)

    @functools.cached_property
    def predictor(self) -> Predictor:
        return Predictor(self.bundle, feature_views=self.views, runtime=Runtime(backend=self.backend))

    def __call__(self, name: str, paths: Sequence[Path]) -> dict[str, np.ndarray]:
        return score_images(lambda: self.predictor, paths, self.folder / name, self.log)


def score_splits(scorer: Scorer, data: Path, train_limit: int | None, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Validation, test and (a seeded random subset of ``train_limit``) training images of the bundle's split,
    scored in that order; each side's dict also holds ``labels`` (class indices) and ``image_ids``."""
    bundle = scorer.bundle
    rows = split_rows(bundle)
    out = {}
    for side in ("val", "test", "train"):
        chosen = [r for r in rows if r["split"] == side]
        if side == "train" and train_limit is not None and train_limit < len(chosen):
            keep = np.sort(np.random.default_rng(seed).choice(len(chosen), train_limit, replace=False))
            chosen = [chosen[i] for i in keep]
        ids = [r["image_id"] for r in chosen]
        scores = scorer(side, image_paths(data, ids))
        scores["labels"] = np.array([bundle.classes.index(r["dx"]) for r in chosen])
        scores["image_ids"] = np.array(ids)
        out[side] = scores
    return out
