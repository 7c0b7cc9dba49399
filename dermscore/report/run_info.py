"""What produced a report: versions, device, command line, inputs, times and thresholds (the Run sheet)."""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from datetime import datetime

from dermscore import __version__
from dermscore.aggregate import Thresholds

DISCLAIMER = "Results are decision support for research, not a diagnosis."


@dataclass
class RunInfo:
    """Provenance of one run; the ledger can store it and regenerate the same workbook later."""

    started: datetime
    finished: datetime
    command_line: str
    inputs: list[str]
    thresholds: Thresholds = field(default_factory=Thresholds)
    device: str = "unknown"
    tensorflow_version: str = "unknown"
    keras_version: str = "unknown"
    tool_version: str = __version__
    lesion_maps: list[str] = field(default_factory=list)  # "metadata: path/to/file.csv"
    pseudonymized: bool = False

    @property
    def seconds(self) -> float:
        return max((self.finished - self.started).total_seconds(), 0.0)


def environment() -> dict[str, str]:
    """Device and framework versions; call after the model is loaded (TensorFlow is imported by then)."""
    import keras
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        names = [tf.config.experimental.get_device_details(g).get("device_name", g.name) for g in gpus]
        device = "GPU: " + ", ".join(names)
    else:
        device = f"CPU ({platform.machine() or 'unknown architecture'})"
    return {"device": device, "tensorflow_version": tf.__version__, "keras_version": keras.__version__}
