"""Job files (`dermscore run --config job.toml`): parsing, checking, and command-line overrides."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from conftest import SMALL_200
from dermscore.aggregate import Thresholds
from dermscore.cli import app
from dermscore.config import load_job
from dermscore.errors import UsageError
from dermscore.run import RunOptions


def job(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "jobs" / "nightly.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_a_job_file_sets_run_options_with_paths_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "jobs" / "bundle").mkdir(parents=True)
    path = job(tmp_path, """
inputs = ["incoming", "/data/archive.zip"]
out = "../reports"
model = "bundle"            # a folder beside the job file
batch-size = 8
wait = 30
report = "new"
skip_failed = true
log_json = "logs/run.jsonl"

[thresholds]
malignant = 0.4
""")
    values = load_job(path, RunOptions)
    jobs = (tmp_path / "jobs").resolve()
    assert values == {
        "inputs": [jobs / "incoming", Path("/data/archive.zip")],
        "out": jobs / "../reports",
        "model": jobs / "bundle",
        "batch_size": 8,
        "wait": 30.0,
        "report": "new",
        "skip_failed": True,
        "log_json": jobs / "logs/run.jsonl",
        "thresholds": Thresholds(malignant=0.4),
    }
    assert isinstance(values["wait"], float)


def test_a_model_that_is_no_folder_beside_the_file_is_a_bundle_name(tmp_path: Path) -> None:
    assert load_job(job(tmp_path, 'model = "ham10000-ensemble"'), RunOptions) == {"model": "ham10000-ensemble"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("skip_faild = true", "unknown key 'skip_faild'"),
        ("[thresholds]\nmalignent = 0.3", "unknown key 'thresholds.malignent'"),
        ('batch_size = "8"', "'batch_size' has the wrong type: got '8', expected an integer"),
        ("batch_size = true", "'batch_size' has the wrong type"),
        ('inputs = "incoming"', "'inputs' must be a list"),
        ("thresholds = 0.3", "'thresholds' must be a table"),
        ("[thresholds]\nmalignant = 1.5", "--malignant-threshold must be a probability"),
        ("batch_size = 8\nbatch-size = 4", "given twice"),
        ("out = ", "not a valid UTF-8 TOML file"),
    ],
)
def test_mistakes_in_a_job_file_are_usage_errors_naming_the_file_and_key(
    tmp_path: Path, text: str, message: str
) -> None:
    path = job(tmp_path, text)
    with pytest.raises(UsageError) as caught:
        load_job(path, RunOptions)
    assert message in str(caught.value)
    assert str(path) in str(caught.value) or "threshold" in message


def test_a_missing_job_file_says_which(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot read the job file"):
        load_job(tmp_path / "absent.toml", RunOptions)


def test_the_cli_reports_an_unknown_key_with_exit_code_2(tmp_path: Path) -> None:
    path = job(tmp_path, 'inputs = ["x"]\ncolour = "blue"\n')
    result = CliRunner().invoke(app, ["run", "--config", str(path)])
    assert result.exit_code == 2
    assert "unknown key 'colour'" in result.output and str(path) in result.output


def test_command_line_options_override_the_job_file(small_bundle: Path, tmp_path: Path) -> None:
    images = tmp_path / "jobs" / "incoming"
    images.mkdir(parents=True)
    for source in sorted((SMALL_200 / "images").glob("*.jpg"))[:3]:
        shutil.copy(source, images / source.name)
    path = job(tmp_path, f"""
inputs = ["incoming"]
out = "from-job"
model = "{small_bundle}"
batch_size = 2
quiet = true

[thresholds]
malignant = 0.0
review = 0.0
""")
    result = CliRunner().invoke(app, ["run", "--config", str(path), "--out", str(tmp_path / "from-cli"),
                                      "--review-threshold", "1.0"])
    assert result.exit_code == 0, result.output
    assert result.output == ""  # quiet = true from the job file
    assert not (tmp_path / "jobs" / "from-job").exists()
    assert (tmp_path / "from-cli" / "ledger.sqlite").is_file()
    table = pd.read_csv(tmp_path / "from-cli" / "images.csv")
    assert sorted(Path(s).name for s in table["source"]) == sorted(p.name for p in images.iterdir())
    # malignant 0.0 from the job file flags every image; review 1.0 from the command line flags every image
    assert all(flags.split(";") == ["malignant", "review"] for flags in table["flags"])


def test_the_example_job_file_is_valid(tmp_path: Path) -> None:
    from conftest import REPO

    values = load_job(REPO / "examples" / "job.toml", RunOptions)
    assert values["inputs"] == [Path("/srv/dermscore/incoming")]
    assert values.get("thresholds", Thresholds()) == Thresholds()  # the example leaves thresholds to the bundle
    RunOptions(**values).selection()  # every key is a real option
