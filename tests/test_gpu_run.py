"""training/gpu_run.sh on the CPU (SMOKE=1: tiny inputs, two steps): DenseNet201 first, InceptionV3 and the
held-out-source run beside it, float16 weights in parts grouped to fit the device tool's transfer limits, and
training/gpu_unpack.sh reassembling them here with their sha256 checked. The GPU session must not be the first
to run this script."""

from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

import pytest

from test_training_shift import _data_subset

REPO = Path(__file__).resolve().parents[1]
MEMBERS = ("densenet201", "inceptionv3", "inceptionv3-without-rosendahl")


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gpu_run")
    data = _data_subset(root / "data", per_class=3)
    work, out = root / "w", root / "out"
    env = dict(os.environ, SMOKE="1", KERAS_BACKEND="tensorflow", DATA=str(data), W=str(work), OUT=str(out),
               PART_SIZE="12m", LIMIT="1", PYTHONPATH=str(REPO))  # LIMIT 1: no time left for the GPU-side extras
    done = subprocess.run(["bash", "training/gpu_run.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    groups = {1: out}
    for group in (2, 3):
        groups[group] = root / f"out{group}"
        fetch = subprocess.run(["bash", "training/gpu_run.sh", "fetch", str(group)], cwd=REPO,
                               env=dict(env, OUT=str(groups[group])), capture_output=True, text=True, timeout=60)
        assert fetch.returncode == 0, fetch.stdout + fetch.stderr
    back = root / "back"
    unpack = subprocess.run(["bash", "training/gpu_unpack.sh", str(back), *map(str, groups.values())], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert unpack.returncode == 0, unpack.stdout + unpack.stderr
    return {"work": work, "back": back, "log": done.stdout, "unpack": unpack.stdout, **{f"g{k}": v for k, v in groups.items()}}


def test_each_call_brings_back_at_most_8_files_of_16_mb(gpu_run: dict[str, Path]) -> None:
    for group in ("g1", "g2", "g3"):
        files = list(gpu_run[group].iterdir())
        assert 0 < len(files) <= 8
        assert all(f.stat().st_size <= 16 * 2**20 for f in files)
        assert sum(f.stat().st_size for f in files) <= 64 * 2**20
    assert {f.name for f in gpu_run["g1"].iterdir()} >= {"meta.tgz", "SHA256SUMS", "densenet201.keras.part000"}
    assert all(f.name.startswith("inceptionv3.keras.part") for f in gpu_run["g2"].iterdir())


def test_densenet_compiles_alone_before_the_others_start(gpu_run: dict[str, Path]) -> None:
    log = gpu_run["log"]
    assert log.index("start densenet201") < log.index("densenet201 first epoch") < log.index("start inceptionv3 ")
    assert "start inceptionv3-without-rosendahl" in log


def test_weights_come_back_whole_with_the_runs_files(gpu_run: dict[str, Path]) -> None:
    import keras

    assert gpu_run["unpack"].count(": OK") == 3  # sha256 of every reassembled file checked
    for member in MEMBERS:
        folder = gpu_run["back"] / "members" / member
        model = keras.models.load_model(folder / "best.keras", compile=False)
        trained = keras.models.load_model(gpu_run["work"] / "members" / member / "best.keras", compile=False)
        assert all(abs(a - b).max() < 1e-2 for a, b in zip(model.get_weights(), trained.get_weights()))  # float16
        with open(folder / "history.csv", newline="", encoding="utf-8") as handle:
            assert len(list(csv.DictReader(handle))) == 1
        assert json.loads((folder / "config.json").read_text())["colour_constancy_p"] == 6.0
    held_out = json.loads((gpu_run["back"] / "members" / MEMBERS[2] / "config.json").read_text())
    assert held_out["exclude_source"] == "rosendahl" and held_out["dihedral"] is True
