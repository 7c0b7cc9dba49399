"""Quiet by default: a real `dermscore run` process prints no TensorFlow, absl, oneDNN or CUDA start-up
lines; with --verbose it shows them at TensorFlow's own log level; native errors still come through."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from processes import finish, start_cli

LIBRARY_LINE = re.compile(r"absl|onednn|cuda|tensorflow|tf2onnx|^[IWE]\d{4} ", re.IGNORECASE | re.MULTILINE)


def run_process(small_bundle: Path, image: Path, tmp_path: Path, *extra: str) -> tuple[int, str]:
    """`dermscore run` on one real image with Keras, so TensorFlow starts in the process."""
    stderr = tmp_path / "stderr.txt"
    args = ["run", str(image), "--model", str(small_bundle), "--out", str(tmp_path / "out"), "--backend", "keras", *extra]
    code, _ = finish(start_cli(args, stderr))
    return code, stderr.read_text()


def test_a_normal_run_prints_no_library_start_up_lines(
    small_bundle: Path, sample_images: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    code, stderr = run_process(small_bundle, sample_images[0], tmp_path)
    assert code == 0, stderr
    assert not LIBRARY_LINE.search(stderr), stderr


def test_verbose_shows_them_at_tensorflows_own_level(
    small_bundle: Path, sample_images: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    code, stderr = run_process(small_bundle, sample_images[0], tmp_path, "--verbose")
    assert code == 0, stderr
    assert "absl::InitializeLog" in stderr and "oneDNN" in stderr
    # An INFO line TensorFlow logs only below TF_CPP_MIN_LOG_LEVEL 1 (our quiet default is 3): this
    # TensorFlow build leaves out instructions these CPUs have (AVX-512, AMX on CI's Xeons).
    assert "cpu_feature_guard" in stderr


def test_native_errors_and_python_output_still_come_through(tmp_path: Path) -> None:
    """Chatter written to fd 2 (as C++ code does) is dropped with its continuation lines; an error
    record written just before the process exits and Python's own stderr are kept."""
    script = (
        "import os, sys\n"
        "from dermscore import native_logs\n"
        "native_logs.apply(False)\n"
        "os.write(2, b'WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n')\n"
        "os.write(2, b'I0000 00:00:1795780737.530690   18355 cpu_feature_guard.cc:227] optimized.\\n')\n"
        "os.write(2, b'To enable the following instructions: AVX2, in other operations, rebuild.\\n')\n"
        "os.write(2, b'E0000 00:00:1795780737.530690   18355 bfc_allocator.cc:1] out of memory\\n')\n"
        "print('from python', file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    lines = done.stderr.splitlines()
    assert sorted(lines) == sorted(["E0000 00:00:1795780737.530690   18355 bfc_allocator.cc:1] out of memory",
                                    "from python"])
