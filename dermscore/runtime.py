"""Compute settings for inference: device, backend, precision, XLA — applied once, before Keras loads.

TensorFlow reads several of these only at import time (oneDNN, visible GPUs), so ``configure`` must
run before the first ``import keras``; ``dermscore.infer.load_keras`` does that for every code path.
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dermscore.errors import UsageError

DEVICES = ("auto", "cpu", "gpu")
PRECISIONS = ("float32", "float16", "bfloat16")
BACKENDS = ("auto", "keras", "onnx")
# Measured (docs/throughput.md): on our 2-core CPUs per-image speed is flat from batch 8
# up, and small batches keep the latency to the first result low. On an H200 the reference ensemble
# scored end-to-end 339 images/s at batch 32, 458-480 at 64 and 486-508 at 128; 64 takes most of the
# gain while leaving room on cards with less memory.
DEFAULT_BATCH = {"cpu": 8, "gpu": 64}


@dataclass(frozen=True)
class Runtime:
    device: str = "auto"
    precision: str = "float32"
    xla: bool = False
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise UsageError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}.")
        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}.")
        if self.backend not in BACKENDS:
            raise UsageError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}.")


_applied: dict[str, str] = {}


def configure(runtime: Runtime) -> str:
    """Pick the device before TensorFlow loads and return the one used ('cpu' or 'gpu').

    Only the device is process-wide (TensorFlow fixes it at import); precision and XLA are applied
    per model by ``dermscore.infer.load_member``, so one process can compare them.
    """
    if _applied:
        if runtime.device not in ("auto", _applied["device"]):
            raise UsageError(
                f"this process already runs on {_applied['device']}; start a new process for --device {runtime.device}."
            )
        return _applied["device"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # oneDNN kernels are off by default on CPUs without AVX-512 but were faster on our AVX2 machine.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    if runtime.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = "-1"
    _applied["device"] = _select_device(runtime.device)
    return _applied["device"]


def _select_device(requested: str) -> str:
    if keras_backend() == "jax":
        return _select_jax_device(requested)
    if keras_backend() != "tensorflow":
        return "gpu" if requested == "gpu" else "cpu"  # other backends pick their device themselves
    if requested == "cpu" or (requested == "auto" and not _gpu_driver_present()):
        # Not importing TensorFlow to learn what is already known spares the ONNX backend with a cached
        # export 4 s and ~800 MB: TensorFlow then never loads at all.
        return "cpu"
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)  # share the card with other jobs
    if requested == "gpu" and not gpus:
        raise UsageError(
            "--device gpu was asked for but TensorFlow sees no GPU. Install the CUDA build "
            "(`pip install 'dermscore[gpu]'`), check `nvidia-smi`, or run with --device cpu."
        )
    return "gpu" if gpus else "cpu"


def _select_jax_device(requested: str) -> str:
    """JAX takes a GPU whenever its CUDA plugin finds one, so ask it, rather than labelling a GPU run 'cpu'."""
    # JAX's counterpart of TensorFlow's memory growth: allocate as needed instead of 75% of the card.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if requested == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    on_gpu = jax.default_backend() in ("gpu", "cuda", "rocm")
    if requested == "gpu" and not on_gpu:
        raise UsageError(
            f"--device gpu was asked for but JAX runs on {jax.default_backend()}. Install JAX's CUDA build "
            "(`pip install 'jax[cuda12]'`), check `nvidia-smi`, or run with --device cpu."
        )
    return "gpu" if on_gpu else "cpu"


def resolve_backend(runtime: Runtime, device: str, exports: bool = True) -> str:
    """'keras' or 'onnx' for a run on ``device``; ``exports`` False when the bundle ships its ONNX members.

    ``auto`` takes ONNX Runtime where it is the faster path we measured and checked: CPU, float32, no
    XLA, with the ``onnx`` extra installed; everything else (GPUs, mixed precision, XLA) stays on Keras.
    ``onnx`` asked for where it cannot run is a usage error rather than a silent switch.
    """
    from dermscore.onnx_backend import missing_packages

    if runtime.backend == "keras":
        return "keras"
    problems = [
        *([f"it runs on the CPU only, and this run is on the {device.upper()}"] if device != "cpu" else []),
        *([f"it exports float32 models only, not --precision {runtime.precision}"]
          if runtime.precision != "float32" else []),
        *(["it cannot be combined with --xla"] if runtime.xla else []),
        *([f"it exports through TensorFlow, not KERAS_BACKEND={keras_backend()}"]
          if keras_backend() != "tensorflow" else []),
    ]
    if runtime.backend == "auto":
        return "keras" if problems or missing_packages(exports) else "onnx"
    missing = missing_packages(exports)
    if missing:
        problems.append(f"{', '.join(missing)} cannot be imported; install them with `pip install 'dermscore[onnx]'`")
    if problems:
        raise UsageError("--backend onnx: " + "; ".join(problems) + ". Or run with --backend keras.")
    return "onnx"


def _gpu_driver_present() -> bool:
    """Whether TensorFlow could see a GPU at all: on Linux only through the NVIDIA (CUDA), AMD (ROCm)
    or WSL2 (dxg) kernel drivers, whose device files are cheap to look for. Elsewhere assume it could."""
    if not sys.platform.startswith("linux"):
        return True
    return any(Path("/dev").glob("nvidia[0-9]*")) or Path("/dev/kfd").exists() or Path("/dev/dxg").exists()


def keras_backend() -> str:
    return os.environ.get("KERAS_BACKEND", "tensorflow")


def default_batch_size(device: str) -> int:
    return DEFAULT_BATCH[device]


def decode_workers(device: str) -> int:
    """Threads that decode and resize while the members run.

    On a CPU the members need the cores, and two threads kept end-to-end at 91-100% of model-only on our
    2-core machines. On a GPU the host's cores are otherwise idle, but the threads share the GIL. An
    H200 host (16 cores) scored the reference ensemble on the 600x450 sample at about 1,100 images/s
    model-only. End-to-end it reached 168 images/s with 2 threads and 282 with 14. With 4, 6, 8, 10 and
    12 threads, once preparing an image cost less, it reached 324, 452, 489, 424 and 397.
    """
    return 2 if device == "cpu" else max(2, min(8, (os.cpu_count() or 2) - 2))


def device_description(device: str) -> str:
    """Human-readable device for the Run sheet and benchmark table."""
    if device == "gpu" and keras_backend() == "tensorflow":
        import tensorflow as tf

        names = [tf.config.experimental.get_device_details(g).get("device_name", g.name)
                 for g in tf.config.list_physical_devices("GPU")]
        return "GPU: " + ", ".join(names)
    if device == "gpu" and keras_backend() == "jax":
        import jax

        return "GPU: " + ", ".join(d.device_kind for d in jax.devices())
    return f"CPU: {cpu_model()}, {os.cpu_count()} logical cores"


def cpu_model() -> str:
    """The processor's name (Linux), so a figure from one of our changing machines says which it was."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine() or "unknown model"


def with_precision(config: Any, precision: str) -> Any:
    """A saved model's config with every layer's dtype policy set to ``precision`` (mixed or float32).

    Saved .keras files pin each layer's policy, so the global policy does not reach loaded models.
    """
    policy = "float32" if precision == "float32" else f"mixed_{precision}"
    if isinstance(config, dict):
        if config.get("class_name") == "DTypePolicy":
            return {**config, "config": {**config["config"], "name": policy}}
        return {k: with_precision(v, precision) for k, v in config.items()}
    if isinstance(config, list):
        return [with_precision(v, precision) for v in config]
    return config
