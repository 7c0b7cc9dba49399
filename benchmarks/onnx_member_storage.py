"""ONNX Runtime session creation time and peak memory for ONNX member files (docs/packaging.md).

Compares a member as the backend's cache holds it (float32 initializers) with the one ``python -m
training onnx`` ships (float16 storage cast back at load), each in a fresh process, alternating, so the
float16 variant's constant folding at session creation is measured, not assumed.

    python benchmarks/onnx_member_storage.py --rounds 3 float32=CACHE/x.onnx float16=models/.../x.onnx
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import resource, sys, time
import onnxruntime
from dermscore.onnx_backend import OnnxModel
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
OnnxModel(sys.argv[1], 1)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(seconds, before / 1024, peak / 1024)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="LABEL=PATH of an ONNX file")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for round_ in range(args.rounds):
        for spec in args.files:
            label, path = spec.split("=", 1)
            done = subprocess.run([sys.executable, "-c", CHILD, path], capture_output=True, text=True, check=True)
            seconds, base, peak = (float(v) for v in done.stdout.split())
            print(json.dumps({"round": round_, "variant": label, "file": path, "session_seconds": round(seconds, 2),
                              "rss_after_import_mib": round(base), "peak_rss_mib": round(peak)}), flush=True)


if __name__ == "__main__":
    main()
