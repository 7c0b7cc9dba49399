"""Which ONNX Runtime session settings help: model-only images/s per member for each variant.

Uses the cached, checked exports of a bundle (exported on first use, as `dermscore run` does), so run
it after `python benchmarks/random_weights_bundle.py /tmp/bench-bundle`:

    python benchmarks/onnx_session_options.py /tmp/bench-bundle [images-per-measurement]

The chosen settings live in ``dermscore.onnx_backend.session_options``; this script measures each
against them, one change at a time, on the same prepared batch (each member alone on every physical
core), then the ensemble three ways, in alternating rounds: members one after the other on every core;
side by side on a share of the cores each, one thread per member with its whole batch; and
``dermscore.infer.Predictor`` itself, where the same threads share the members' half-batches.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def variants(ort: Any, cores: int) -> dict[str, dict[str, Any]]:
    """Name -> changes to the chosen options (attributes, or 'config' entries, or 'batch')."""
    return {
        "chosen (physical cores, sequential, all optimisations, batch 8)": {},
        "batch 1": {"batch": 1},
        "batch 16": {"batch": 16},
        "1 intra-op thread": {"intra_op_num_threads": 1},
        f"{2 * cores} intra-op threads": {"intra_op_num_threads": 2 * cores},
        "parallel execution": {"execution_mode": ort.ExecutionMode.ORT_PARALLEL, "inter_op_num_threads": cores},
        "basic optimisations only": {"graph_optimization_level": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC},
        "no spinning": {"config": {"session.intra_op.allow_spinning": "0"}},
    }


def measure(path: Path, size: tuple[int, int], changes: dict[str, Any], images: int) -> float:
    import onnxruntime as ort

    from dermscore.onnx_backend import physical_cores, session_options

    options = session_options(physical_cores())
    for key, value in changes.items():
        if key == "config":
            for entry, setting in value.items():
                options.add_session_config_entry(entry, setting)
        elif key != "batch":
            setattr(options, key, value)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    batch = changes.get("batch", 8)
    x = np.random.default_rng(0).uniform(-1, 1, (batch, *size, 3)).astype(np.float32)
    name = session.get_inputs()[0].name
    session.run(None, {name: x})  # warm-up
    runs = max(1, images // batch)
    start = time.perf_counter()
    for _ in range(runs):
        session.run(None, {name: x})
    return runs * batch / (time.perf_counter() - start)


def main(bundle_path: Path, images: int) -> None:
    import onnxruntime as ort

    from dermscore.bundle import load_bundle
    from dermscore.infer import load_member
    from dermscore.onnx_backend import cached_export, physical_cores
    from dermscore.runtime import Runtime

    bundle = load_bundle(bundle_path)
    paths = {m.name: cached_export(bundle, m, lambda m: load_member(bundle.member_path(m), Runtime()))
             for m in bundle.members}
    print(f"onnxruntime {ort.__version__}, {physical_cores()} physical cores, {images} images per measurement")
    print("variant".ljust(64) + "".join(m.name.rjust(14) for m in bundle.members) + "   (images/s)")
    for label, changes in variants(ort, physical_cores()).items():
        rates = [measure(paths[m.name], m.input_size, changes, images) for m in bundle.members]
        print(label.ljust(64) + "".join(f"{r:14.2f}" for r in rates), flush=True)
    for _ in range(3):  # alternated: the machine's pace drifts
        for mode in ENSEMBLE_MODES:
            print(f"{('ensemble, ' + mode).ljust(64)}{ensemble_rate(bundle, paths, mode, images):14.2f}"
                  "   (ensemble images/s)", flush=True)


ENSEMBLE_MODES = ("one after the other", "side by side, whole batches", "Predictor (side by side, half-batches)")


def ensemble_rate(bundle: Any, paths: dict[str, Path], mode: str, images: int) -> float:
    """Ensemble images/s at batch 8 for one of ``ENSEMBLE_MODES``."""
    from concurrent.futures import ThreadPoolExecutor

    from dermscore.infer import Predictor
    from dermscore.onnx_backend import OnnxModel, physical_cores
    from dermscore.runtime import Runtime

    rng = np.random.default_rng(0)
    batch = {m.name: rng.uniform(-1, 1, (8, *m.input_size, 3)).astype(np.float32) for m in bundle.members}
    runs = max(1, images // 8)
    if mode.startswith("Predictor"):
        predictor = Predictor(bundle, 8, Runtime(backend="onnx"))
        predictor(batch)  # warm-up
        start = time.perf_counter()
        for _ in range(runs):
            predictor(batch)
        return runs * 8 / (time.perf_counter() - start)
    side_by_side = mode.startswith("side by side")
    threads = max(1, physical_cores() // len(bundle.members)) if side_by_side else physical_cores()
    models = {m.name: OnnxModel(paths[m.name], threads) for m in bundle.members}

    def run(name: str) -> np.ndarray:
        return models[name].predict_on_batch(batch[name])

    with ThreadPoolExecutor(len(models)) as pool:
        list(pool.map(run, models))  # warm-up
        start = time.perf_counter()
        for _ in range(runs):
            if side_by_side:
                list(pool.map(run, models))
            else:
                for name in models:
                    run(name)
        return runs * 8 / (time.perf_counter() - start)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/bench-bundle"), int(sys.argv[2]) if len(sys.argv) > 2 else 32)
