"""Real `dermscore` processes for tests that pause, signal or watch a run (see dermscore.ledger.pause_point)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dermscore.ledger import PAUSE_ENV


def start_cli(args: list[str], stderr: Path, pause: str | None = None, **env: str) -> subprocess.Popen:
    """`dermscore ARGS` in a new process, stderr appended to the file ``stderr`` (so a test can watch it)."""
    environment = {**os.environ, **env}
    environment.pop(PAUSE_ENV, None)
    if pause:
        environment[PAUSE_ENV] = pause
    command = [sys.executable, "-c", "from dermscore.cli import main; main()", *args]
    with open(stderr, "a") as handle:
        return subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=handle, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    stdout, _ = proc.communicate(timeout=timeout)
    return proc.returncode, stdout


def wait_until_paused(proc: subprocess.Popen, stderr: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "dermscore: paused at" in stderr.read_text():
            return
        if proc.poll() is not None:
            pytest.fail(f"run exited ({proc.returncode}) before its pause point:\n{stderr.read_text()}")
        time.sleep(0.1)
    proc.kill()
    pytest.fail("run never reached its pause point")


def backend_in_a_fresh_process(bundle: Path, prelude: str = "") -> list[str]:
    """[backend, tensorflow imported?, keras imported?] of a CPU Predictor loaded in a new process.

    ``prelude`` runs first (e.g. making the exporters unimportable). Proves what a run loads, which an
    in-process test cannot: the test process has long imported TensorFlow.
    """
    code = (f"import sys; {prelude}from dermscore.bundle import load_bundle; from dermscore.infer import Predictor; "
            "from dermscore.runtime import Runtime; "
            "p = Predictor(load_bundle(sys.argv[1]), 2, Runtime(device='cpu')); "
            "print(p.backend, 'tensorflow' in sys.modules, 'keras' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, str(bundle)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()
