"""``python -m training``: the Typer interface (issue #17: one command-line style with dermscore)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from training import cli

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("step", sorted(cli.STEPS))
def test_every_command_has_help_with_an_example(step: str) -> None:
    result = subprocess.run([sys.executable, "-m", "training", step, "--help"], cwd=REPO, capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # Rich wraps lines
    assert f"Example: python -m training {step}" in text
    assert "--data" in text and "--work" in text and "--threads" in text


def test_parse_gives_the_settings_the_steps_read() -> None:
    args = cli.parse(["train", "--member", "densenet201", "--input-size", "96x128", "--no-dihedral",
                      "--time-budget", "7", "--preset", "shift-cpu"])
    assert args.step == "train" and args.members == ("densenet201",) and args.input_size == (96, 128)
    assert args.dihedral is False and args.time_budget == 7.0 and args.preset == "shift-cpu"
    assert args.metadata == cli.DEFAULT_DATA / "HAM10000_metadata.csv" and args.float16 is True
    assert args.command == "python -m training train --member densenet201 --input-size 96x128 --no-dihedral " \
                           "--time-budget 7 --preset shift-cpu"
    assert cli.parse(["all"]).members == cli.MEMBERS
    assert cli.parse(["calibrate"]).backend == "auto" and cli.parse(["calibrate", "--backend", "keras"]).backend == "keras"


@pytest.mark.parametrize("argv, message", [
    (["train", "--member", "resnet"], "'resnet' is not one of inceptionv3, densenet201"),
    (["train", "--preset", "fast"], "'fast' is not one of cpu"),
    (["train", "--input-size", "150"], "expected HEIGHTxWIDTH"),
    (["calibrate", "--backend", "tflite"], "'tflite' is not one of auto, keras, onnx"),
    (["fit"], "No such command"),
])
def test_bad_options_exit_2_with_the_reason(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(argv) == 2
    assert message in " ".join(capsys.readouterr().err.split())
