"""Compute settings: clear GPU errors, mixed precision's measured effect, and the benchmark command."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import openpyxl
import pytest
from typer.testing import CliRunner

from conftest import image_array
from dermscore.bundle import load_bundle
from dermscore.cli import app
from dermscore.infer import Predictor
from dermscore.preprocess import prepare
from dermscore.runtime import Runtime


def test_asking_for_a_gpu_without_one_fails_clearly(small_bundle: Path, sample_images: list[Path], tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "dermscore.cli", "run", str(sample_images[0]), "--model", str(small_bundle),
         "--out", str(tmp_path / "r"), "--device", "gpu"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert "--device gpu was asked for" in done.stderr and "--device cpu" in done.stderr
    assert not (tmp_path / "r" / "images.csv").exists()


def test_mixed_precision_stays_close_to_float32(small_bundle: Path) -> None:
    bundle = load_bundle(small_bundle)
    inputs = [prepare(image_array(i), bundle.members) for i in range(4)]
    batch = {m.name: np.stack([x[m.name] for x in inputs]) for m in bundle.members}
    full = Predictor(bundle, 4, Runtime(precision="float32"))(batch)
    half = Predictor(bundle, 4, Runtime(precision="float16"))
    assert half.models["inceptionv3"].layers[-1].dtype_policy.name == "mixed_float16"
    out = half(batch)
    for name in full:
        assert np.abs(out[name] - full[name]).max() < 2e-3
        np.testing.assert_allclose(out[name].sum(axis=1), 1.0, atol=2e-3)


def test_bench_prints_every_figure_for_each_backend(
    small_bundle: Path, sample_images: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DERMSCORE_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(
        app, ["bench", str(sample_images[0].parent), "--model", str(small_bundle), "--images", "8", "--naive-images", "2",
              "--backend", "keras", "--backend", "onnx", "--rounds", "2"]
    )
    assert result.exit_code == 0, result.output
    assert "2 rounds per backend (medians below)" in result.output
    assert re.search(r"device +CPU: \S.*, \d+ logical cores", result.output)  # which processor gave the figures
    # Every rate comes with the range over its rounds, and every share with the ceiling of its own round.
    assert len(re.findall(r"images/s \(\d+% of ceiling, .*rounds \d+\.\d\d-\d+\.\d\d\)", result.output)) == 4
    for label in ("matmul ceiling", "naive predict loop", "time to first result", "peak RSS after keras",
                  "model-only (keras, float32)", "end-to-end (keras, float32)",
                  "model-only (onnx, float32)", "end-to-end (onnx, float32)"):
        assert label in result.output
    diff = re.search(r"onnx, float32 vs keras float32 +max \|probability difference\| (\S+)", result.output)
    assert diff and float(diff.group(1)) <= 1e-4, result.output


def test_jax_backend_names_its_device_and_refuses_a_missing_gpu(
    small_bundle: Path, sample_images: list[Path], tmp_path: Path
) -> None:
    """Under KERAS_BACKEND=jax the device comes from JAX itself (on this GPU-less machine: the CPU)."""
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    command = [sys.executable, "-m", "dermscore.cli", "run", str(sample_images[0]), "--model", str(small_bundle),
               "--out", str(tmp_path / "r")]
    refused = subprocess.run([*command, "--device", "gpu"], capture_output=True, text=True, timeout=300, env=env)
    assert refused.returncode == 2, refused.stderr
    assert "--device gpu was asked for but JAX runs on cpu" in refused.stderr
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    sheet = openpyxl.load_workbook(tmp_path / "r" / "report.xlsx")["Run"]
    run_sheet = {row[0]: row[1] for row in sheet.iter_rows(values_only=True)}
    assert run_sheet["Device"].startswith("CPU:"), run_sheet["Device"]
    assert run_sheet["Inference"].endswith("(jax backend)"), run_sheet["Inference"]


def test_decode_threads_stay_two_on_cpu_and_up_to_eight_on_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU two decoding threads were the limit (168 of 1,086 images/s) and 14 were worse than 6-10
    (the GIL); on a CPU more would steal the members' cores."""
    from dermscore.runtime import decode_workers

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert (decode_workers("cpu"), decode_workers("gpu")) == (2, 8)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert decode_workers("gpu") == 4
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert decode_workers("gpu") == 2
