"""What produced a report: versions, device, command line, inputs, times and thresholds (the Run sheet)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from datetime import datetime
from importlib import metadata

from dermscore import __version__
from dermscore.aggregate import Thresholds
from dermscore.onnx_backend import PROBE_TOLERANCE
from dermscore.runtime import device_description, keras_backend

DISCLAIMER = "Results are decision support for research, not a diagnosis."


@dataclass
class RunInfo:
    """Provenance of one run; the ledger can store it and regenerate the same workbook later."""

    started: datetime
    finished: datetime
    command_line: str
    inputs: list[str]
    thresholds: Thresholds = field(default_factory=Thresholds)  # as the run applied them (``for_bundle``)
    threshold_sources: dict[str, str] = field(default_factory=dict)  # name -> "run", "bundle" or "default"
    device: str = "unknown"
    inference: str = "unknown"  # which runtime computed the probabilities (ONNX Runtime or Keras)
    tensorflow_version: str = "unknown"
    keras_version: str = "unknown"
    tool_version: str = __version__
    lesion_maps: list[str] = field(default_factory=list)  # "metadata: path/to/file.csv"
    pseudonymized: bool = False
    ledger: str = ""  # the run ledger's absolute path, so `dermscore review import` finds it from the report

    @property
    def seconds(self) -> float:
        return max((self.finished - self.started).total_seconds(), 0.0)


def environment(device: str, engine: str = "local", backend: str = "") -> dict[str, str]:
    """Device, inference runtime and framework versions for the Run sheet, without importing TensorFlow
    when the run did not.

    ``device`` is 'cpu' or 'gpu' as chosen by ``dermscore.runtime``, or '' when the run scored nothing new
    (its reports then come from the ledger alone); ``backend`` is the one the local engine ended up using
    ('onnx' or 'keras'), '' where it is not known here (nothing scored, or Ray workers chose).
    """
    if not device:
        described = "none: this run scored no new images"
    elif engine == "local":
        described = device_description(device)
    else:
        described = f"{engine} workers ({device})"
    inference = {
        "onnx": f"ONNX Runtime {_version('onnxruntime')} (members exported from Keras, checked within "
        f"{PROBE_TOLERANCE:g})",
        "keras": f"Keras {_version('keras')} ({keras_backend()} backend)",
    }.get(backend, "not recorded" if device else "none")
    return {
        "device": described,
        "inference": inference,
        "tensorflow_version": _version("tensorflow"),
        "keras_version": _version("keras"),
    }


def _version(package: str) -> str:
    module = sys.modules.get(package)
    if module is not None:
        return str(getattr(module, "__version__", "unknown"))
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"
