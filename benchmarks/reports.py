"""Time writing the reports (CSV + XLSX) for N synthetic images, and optionally render report.xlsx.

    python benchmarks/reports.py --images 20000 --out /tmp/report-bench [--render]

Rows are made by the real ``image_row`` from random member probabilities, three images per lesion, so
lesion aggregation and the workbook see realistic shapes. ``--render`` converts the workbook to PDF with
LibreOffice (``soffice``) and, when poppler's ``pdftoppm`` is present, to one PNG per page to look at.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from dermscore.aggregate import image_row
from dermscore.bundle import CLASS_CODES, DEFAULT_MALIGNANT, Bundle, Member
from dermscore.records import ImageRef, Scored
from dermscore.report.run_info import RunInfo
from dermscore.report.write import write_reports


def synthetic_bundle() -> Bundle:
    members = tuple(Member(name, "synthetic", f"{name}.keras", "0" * 64, (299, 299), mode, "bilinear", 0.5)
                    for name, mode in (("inceptionv3", "inception"), ("densenet201", "densenet")))
    return Bundle(Path("synthetic"), "synthetic", "0", CLASS_CODES, DEFAULT_MALIGNANT, members, "benchmark")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--render", action="store_true")
    args = parser.parse_args()
    bundle, rng = synthetic_bundle(), np.random.default_rng(0)
    started = time.perf_counter()
    rows = []
    for i in range(args.images):
        ref = ImageRef(f"/data/clinic/img_{i:06d}.jpg", "0" * 64, lesion_id=f"L{i // 3:06d}")
        probabilities = {m.name: rng.dirichlet(np.full(len(CLASS_CODES), 0.3)) for m in bundle.members}
        rows.append(image_row(Scored(ref, probabilities), bundle))
    aggregated = time.perf_counter()
    now = datetime.now(timezone.utc)
    info = RunInfo(started=now, finished=now, command_line="benchmarks/reports.py", inputs=["/data/clinic"])
    folder = write_reports(args.out, bundle, rows, [], info, overwrite=True)
    written = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{args.images} images: image rows {aggregated - started:.1f} s, reports {written - aggregated:.1f} s, "
          f"peak RSS {peak:.0f} MiB, report.xlsx {(folder / 'report.xlsx').stat().st_size / 1e6:.1f} MB")
    if args.render:
        render(folder / "report.xlsx")


def render(workbook: Path) -> None:
    if shutil.which("soffice") is None:
        raise SystemExit("soffice (LibreOffice) is not installed: apt-get install libreoffice-calc")
    subprocess.run(["soffice", "--headless", "--convert-to", "pdf", "--outdir", str(workbook.parent), str(workbook)],
                   check=True, capture_output=True, timeout=600)
    pdf = workbook.with_suffix(".pdf")
    if shutil.which("pdftoppm"):
        subprocess.run(["pdftoppm", "-r", "80", "-png", str(pdf), str(workbook.parent / "page")], check=True)
    print(f"rendered {pdf}")


if __name__ == "__main__":
    main()
