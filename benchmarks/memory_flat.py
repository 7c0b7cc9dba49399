"""Peak RSS of `dermscore run` over 1,000 and 10,000 inputs: memory must stay flat in the input count.

Inputs are symbolic links cycling over the real 200x150 HAM10000 images; the bundle is the small test
CNN, because the pipeline's growth (not the model's fixed size) is what is measured, and a small model
makes any growth stand out more. Each run is its own process, after a warm-up run that fills the
ONNX export cache; its peak RSS comes from getrusage.

    python benchmarks/memory_flat.py [--counts 1000 10000]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from itertools import cycle, islice
from pathlib import Path

from dermscore.onnx_backend import CACHE_ENV

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO.parent / "shared" / "data" / "ham10000-200x150" / "images"


def peak_rss_of_run(count: int, bundle: Path, work: Path) -> tuple[float, float]:
    folder = work / f"in-{count}"
    folder.mkdir()
    for i, image in enumerate(islice(cycle(sorted(IMAGES.glob("*.jpg"))), count)):
        (folder / f"{i:06d}.jpg").symlink_to(image)
    script = (
        "import resource, sys; from dermscore.cli import app; "
        "sys.argv = ['dermscore', 'run', sys.argv[1], '--model', sys.argv[2], '--out', sys.argv[3], '--no-progress']\n"
        "try:\n    app()\nexcept SystemExit as e:\n    code = e.code\n"
        "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\nsys.exit(code)"
    )
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", script, str(folder), str(bundle), str(work / f"out-{count}")],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, CACHE_ENV: str(work / "cache")})  # not the user's cache
    seconds = time.perf_counter() - start
    peak_kb = int(next(line for line in out.stdout.splitlines() if line.startswith("PEAK")).split()[1])
    return peak_kb / 1024, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1000, 10000])
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import SMALL_MEMBERS, make_bundle

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle = make_bundle(work / "bundle", SMALL_MEMBERS)
        # A first run exports the members for ONNX Runtime (and loads TensorFlow to do it); a warm-up run
        # takes that cost, so the measured runs differ in their input count alone.
        peak_rss_of_run(8, bundle, work)
        results = {count: peak_rss_of_run(count, bundle, work) for count in args.counts}
    base = results[args.counts[0]][0]
    print(f"{'inputs':>8}  {'peak RSS MB':>11}  {'vs first':>8}  {'seconds':>7}")
    for count, (mb, seconds) in results.items():
        print(f"{count:>8}  {mb:>11.0f}  {mb / base - 1:>+8.1%}  {seconds:>7.0f}")


if __name__ == "__main__":
    main()
