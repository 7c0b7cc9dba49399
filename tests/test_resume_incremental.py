"""Nightly runs over a growing folder: only new or changed inputs are scored, failures per the options."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from conftest import SMALL_200

SOURCE_IMAGES = sorted((SMALL_200 / "images").glob("*.jpg"))[:12]


@pytest.fixture()
def job(tmp_path: Path, small_bundle: Path) -> "Job":
    return Job(tmp_path, small_bundle)


class Job:
    """One input folder and one output folder (with its ledger), run again and again like a cron job."""

    def __init__(self, root: Path, bundle: Path) -> None:
        self.inputs = root / "incoming"
        self.inputs.mkdir()
        self.out = root / "out"
        self.bundle = bundle
        self.log = root / "log.jsonl"

    def add(self, *images: Path) -> None:
        for image in images:
            shutil.copy(image, self.inputs / image.name)

    def run(self, *options: str, expect: int = 0) -> dict:
        from dermscore.cli import app

        result = CliRunner().invoke(app, ["run", str(self.inputs), "--model", str(self.bundle), "--out",
                                          str(self.out), "--batch-size", "4", "--overwrite", "--log-json",
                                          str(self.log), *options])
        assert result.exit_code == expect, result.output
        lines = [json.loads(line) for line in self.log.read_text().splitlines()]
        last = max(i for i, e in enumerate(lines) if e["event"] == "run_start")
        return {e["event"]: e for e in lines[last:]}  # this run's events by kind

    def images(self) -> pd.DataFrame:
        table = pd.read_csv(self.out / "images.csv")
        assert not table["source"].duplicated().any()
        return table.set_index("source")

    def errors(self) -> list[str]:
        return [Path(s).name for s in pd.read_csv(self.out / "errors.csv")["source"]]


def names(table: pd.DataFrame) -> list[str]:
    return sorted(Path(s).name for s in table.index)


def test_a_second_run_scores_only_the_added_files_and_reports_all_or_new(job: Job) -> None:
    job.add(*SOURCE_IMAGES[:6])
    first = job.run()
    assert (first["run_start"]["pending"], first["run_end"]["scored"]) == (6, 6)
    before = job.images()

    job.add(*SOURCE_IMAGES[6:9])
    second = job.run()
    assert second["run_start"]["skipped"] == 6 and second["run_end"]["scored"] == 3
    after = job.images()
    assert names(after) == sorted(p.name for p in SOURCE_IMAGES[:9])
    pd.testing.assert_frame_equal(after.loc[before.index], before)  # earlier rows regenerated unchanged

    job.add(*SOURCE_IMAGES[9:])
    third = job.run("--report", "new")
    assert third["run_end"]["scored"] == 3
    assert names(job.images()) == sorted(p.name for p in SOURCE_IMAGES[9:])

    idle = job.run("--report", "new")  # nothing new since the last finished run
    assert idle["run_start"]["pending"] == 0 and idle["run_end"]["reported"] == 0
    assert job.images().empty
    job.run()  # --report all (the default) again covers everything
    assert len(job.images()) == len(SOURCE_IMAGES)


def test_a_changed_file_is_rescored_and_its_old_row_replaced(job: Job) -> None:
    job.add(*SOURCE_IMAGES[:4])
    job.run()
    before = job.images()
    changed = job.inputs / SOURCE_IMAGES[0].name
    shutil.copy(SOURCE_IMAGES[10], changed)  # same name, other content
    events = job.run()
    assert events["run_start"]["pending"] == 1 and events["run_end"]["scored"] == 1
    after = job.images()
    assert names(after) == names(before)
    assert after.loc[str(changed), "sha256"] != before.loc[str(changed), "sha256"]
    assert after.loc[str(changed), "mel"] != before.loc[str(changed), "mel"]
    unchanged = [s for s in before.index if s != str(changed)]
    pd.testing.assert_frame_equal(after.loc[unchanged], before.loc[unchanged])


def test_failed_inputs_are_retried_unless_skipped_and_retry_failed_takes_only_them(job: Job) -> None:
    job.add(*SOURCE_IMAGES[:3])
    broken = job.inputs / "broken.jpg"
    broken.write_bytes(SOURCE_IMAGES[3].read_bytes()[:300])
    assert job.run(expect=3)["run_end"]["failed"] == 1
    assert job.errors() == ["broken.jpg"]

    retried = job.run(expect=3)  # default: a failure is tried again, and fails again
    assert retried["run_start"]["pending"] == 1 and retried["run_end"]["failed"] == 1

    skipped = job.run("--skip-failed")  # exit 0: nothing failed in this run
    assert skipped["run_start"]["pending"] == 0
    assert job.errors() == ["broken.jpg"]  # still listed: the report covers everything so far

    job.add(SOURCE_IMAGES[4])
    shutil.copy(SOURCE_IMAGES[3], broken)  # repaired
    only_failed = job.run("--retry-failed")
    assert only_failed["run_start"]["pending"] == 1 and only_failed["run_end"]["scored"] == 1
    assert job.errors() == []
    assert "broken.jpg" in names(job.images()) and SOURCE_IMAGES[4].name not in names(job.images())


def test_rescore_scores_everything_again_without_duplicating_rows(job: Job) -> None:
    job.add(*SOURCE_IMAGES[:5])
    job.run()
    before = job.images()
    events = job.run("--rescore")
    assert events["run_start"]["pending"] == 5 and events["run_end"]["scored"] == 5
    pd.testing.assert_frame_equal(job.images(), before, atol=1e-6)


def test_only_one_of_the_selection_switches_may_be_given(job: Job) -> None:
    from dermscore.cli import app

    job.add(SOURCE_IMAGES[0])
    result = CliRunner().invoke(app, ["run", str(job.inputs), "--out", str(job.out), "--rescore", "--retry-failed"])
    assert result.exit_code == 2
    assert "choose at most one of --rescore, --retry-failed" in result.output


def test_the_json_log_records_each_batch_and_failure(job: Job) -> None:
    job.add(*SOURCE_IMAGES[:9])
    (job.inputs / "empty.jpg").write_bytes(b"")
    job.run(expect=3)
    lines = [json.loads(line) for line in job.log.read_text().splitlines()]
    kinds = [e["event"] for e in lines]
    assert kinds[0] == "run_start" and kinds[-1] == "run_end"
    commits = [e for e in lines if e["event"] == "batch_commit"]
    assert sum(e["images"] for e in commits) == 9 and sum(e["failed"] for e in commits) == 1
    assert len(commits) == 3  # 10 results in batches of 4
    failure = next(e for e in lines if e["event"] == "input_failed")
    assert failure["source"].endswith("empty.jpg") and failure["stage"] == "read"
    assert lines[-1]["status"] == "done" and lines[-1]["run_id"] == lines[0]["run_id"]
