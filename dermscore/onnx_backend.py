"""ONNX Runtime CPU backend: each member exported from Keras once, cached, and checked against Keras.

Why: on our 2-core AVX2 CPU, ONNX Runtime ran the reference ensemble at 77% of the machine's float32
matmul ceiling where TensorFlow's ``predict_on_batch`` reached 63%, with outputs within 2e-8 of Keras,
a tenth of the start-up time and half the memory (docs/throughput.md). Export (tf2onnx, through Keras'
``model.export(format="onnx")``) takes 30-50 s per full-size member, so it happens lazily on first use
and the file is cached, keyed by the member's weight sha256 and every tool version that shapes the
graph or its numerics. A fresh export is used only after it matches Keras within ``PROBE_TOLERANCE``
on a probe batch; a cached one is used only while its own sha256 matches the note written beside it.
A bundle that ships its members' ONNX files (``python -m training onnx``, hashed in the manifest and
verified by ``load_bundle``) is used as it is: no export, no cache, no TensorFlow on the user's machine.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from dermscore.bundle import Bundle, Member, sha256_file
from dermscore.errors import BundleError
from dermscore.features import output_list
from dermscore.preprocess import prepare
from dermscore.report.files import atomic_path

CACHE_ENV = "DERMSCORE_CACHE"
PROBE_TOLERANCE = 1e-4  # the bar for any backend against the Keras reference
PROBE_IMAGES = 4
OPSET = 17
# Bump when the export or check below changes, so caches written by older code are not reused.
EXPORT_FORMAT = 1
REQUIRED = ("onnxruntime", "tf2onnx", "onnx")
KEYED_VERSIONS = ("tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime")


def missing_packages(exports: bool = True) -> list[str]:
    """The packages this backend needs that are not importable here (found without importing them:
    tf2onnx alone takes seconds to import, and a cached export never needs it). Without ``exports`` (a
    bundle that ships every member's ONNX graph) ONNX Runtime alone is needed."""
    return [name for name in (REQUIRED if exports else REQUIRED[:1]) if importlib.util.find_spec(name) is None]


def needs_export(bundle: Bundle, feature_views: str | None) -> bool:
    """Whether some member of ``bundle`` lacks a shipped ONNX graph with the outputs this run needs."""
    outputs = outputs_of(feature_views)
    return any(m.onnx is None or m.onnx.outputs != outputs for m in bundle.members)


def cache_dir() -> Path:
    """``$DERMSCORE_CACHE``, else ``$XDG_CACHE_HOME/dermscore``, else ``~/.cache/dermscore``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dermscore"


def physical_cores() -> int:
    """Physical cores this process may use: SMT siblings share one core's FMA units, so threads beyond
    the physical cores only contend (and a thread per logical core starves the decoding threads)."""
    cores: set[tuple[str, str]] = set()
    try:
        for block in Path("/proc/cpuinfo").read_text().split("\n\n"):
            fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
            fields = {k.strip(): v.strip() for k, v in fields.items()}
            if "core id" in fields:
                cores.add((fields.get("physical id", "0"), fields["core id"]))
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(len(cores) or usable, usable))


def session_options(threads: int) -> Any:
    """``threads`` intra-op threads, sequential execution, every graph optimisation: each other choice
    measured slower on our CPU (``benchmarks/onnx_session_options.py``)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


class OnnxModel:
    """One exported member in an ONNX Runtime session, with the slice of Keras' API the Predictor uses."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        self.path = path
        self.session = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
        (model_input,) = self.session.get_inputs()
        self.input_name = model_input.name
        self.input_shape = tuple(d if isinstance(d, int) else None for d in model_input.shape)

    def predict_on_batch(self, x: np.ndarray) -> np.ndarray | list[np.ndarray]:
        """Probabilities; ``[probabilities, features]`` for a member exported with its features."""
        outputs = self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})
        return outputs[0] if len(outputs) == 1 else outputs


def load_onnx_members(
    bundle: Bundle, load_keras: Callable[[Member], Any], feature_views: str | None = None
) -> dict[str, OnnxModel]:
    """Every member as an ONNX Runtime session, exporting (with ``load_keras``) those not cached yet.

    The Predictor runs the members side by side, so each session gets its share of the physical cores:
    on our 2-core EPYC two single-threaded sessions at once scored 5.6-6.4 ensemble images/s against
    4.9-5.7 for one after the other on both cores, faster in each of four alternating pairs, and on a
    2-core Xeon 13.9-14.5 against 13.4-14.0 (``benchmarks/onnx_session_options.py``); part of each
    member's time (DenseNet201's concatenations) does not spread over threads.
    """
    threads = max(1, physical_cores() // len(bundle.members))
    outputs = outputs_of(feature_views)
    return {m.name: OnnxModel(member_onnx(bundle, m, load_keras, outputs), threads) for m in bundle.members}


def outputs_of(feature_views: str | None) -> str:
    """What a member's ONNX graph returns: its probabilities, and its features when an OOD detector reads them."""
    return "probabilities" if feature_views is None else f"probabilities+features:{feature_views}"


def member_onnx(bundle: Bundle, member: Member, load_keras: Callable[[Member], Any], outputs: str) -> Path:
    """The bundle's own ONNX file for ``member`` when it ships one with these outputs (already verified by
    ``load_bundle``), else the cached export (user-trained bundles, or features the bundle's file lacks)."""
    if member.onnx is not None and member.onnx.outputs == outputs:
        return bundle.path / member.onnx.file
    return cached_export(bundle, member, load_keras, outputs)


def cache_key(member: Member, outputs: str = "probabilities") -> str:
    """The member's weights, its outputs, and every version that shapes the exported graph or its numerics.

    A bundle without an OOD detector keys exactly as before, so its existing cache is reused.
    """
    shape = {"format": EXPORT_FORMAT, "opset": OPSET, **tool_versions()}
    if outputs != "probabilities":
        shape["outputs"] = outputs
    versions = json.dumps(shape, sort_keys=True)
    return f"{member.sha256[:32]}-{hashlib.sha256(versions.encode()).hexdigest()[:12]}"


def tool_versions() -> dict[str, str]:
    return {name: metadata.version(name) for name in KEYED_VERSIONS}


def cached_export(
    bundle: Bundle, member: Member, load_keras: Callable[[Member], Any], outputs: str = "probabilities"
) -> Path:
    """The checked ONNX file for ``member``: the cached one if intact, else a fresh export.

    ``feature_views`` (see ``Predictor``) exports the two-output member ``load_keras`` returns, cached
    under its own key. Concurrent runs take a per-member lock, so one exports while the others wait and then reuse it.
    """
    folder = cache_dir() / "onnx"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BundleError(
            f"cannot create the ONNX cache folder {folder} ({exc.strerror or exc}); set {CACHE_ENV} to a "
            "writable folder or run with --backend keras."
        ) from exc
    key = cache_key(member, outputs)
    path, note_path = folder / f"{key}.onnx", folder / f"{key}.json"
    with _locked(folder / f"{key}.lock"):
        if _intact(path, note_path):
            return path
        note = export_and_check(load_keras(member), bundle, member, path)
        with atomic_path(note_path) as tmp:
            tmp.write_text(json.dumps(note, indent=2) + "\n", encoding="utf-8")
    return path


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the descriptor closes
        yield


def _intact(path: Path, note_path: Path) -> bool:
    """A cached export counts only with its note and an unchanged sha256 (a torn or edited file is rebuilt)."""
    try:
        note = json.loads(note_path.read_text(encoding="utf-8"))
        return path.is_file() and note.get("onnx_sha256") == sha256_file(path)
    except (OSError, ValueError):
        return False


def export_and_check(model: Any, bundle: Bundle, member: Member, path: Path) -> dict[str, Any]:
    """Export ``model`` to ``path`` (atomically), refusing it unless it matches Keras on a probe batch.

    The one export path: the cache here and the bundle's shipped files (``training/onnx_members.py``)."""
    import tensorflow as tf

    probe = np.stack([prepare(image, (member,))[member.name] for image in probe_images()])
    expected = output_list(model.predict_on_batch(probe))
    where = f"{bundle.member_path(member)} (member '{member.name}' of {bundle.name})"
    with atomic_path(path) as tmp:
        try:
            signature = [tf.TensorSpec((None, *member.input_size, 3), tf.float32, name="image")]
            with warnings.catch_warnings():  # numpy-2 notices from Keras' tf2onnx shims, one per constant
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                model.export(str(tmp), format="onnx", verbose=False, input_signature=signature, opset_version=OPSET)
            got = output_list(OnnxModel(tmp, physical_cores()).predict_on_batch(probe))
        except Exception as exc:  # tf2onnx raises whatever its converters raise; name it and move on
            raise BundleError(f"{where}: the ONNX export failed ({type(exc).__name__}: {exc}). "
                              "Run with --backend keras.") from exc
        diff = difference(got, expected)
        if not diff <= PROBE_TOLERANCE:
            raise BundleError(
                f"{where}: the ONNX export differs from Keras by {diff:.2e} on a probe batch (more than "
                f"{PROBE_TOLERANCE:g}); refusing to score with it. Run with --backend keras."
            )
        onnx_sha256 = sha256_file(tmp)
    return {
        "bundle": bundle.name, "member": member.name, "weights_sha256": member.sha256,
        "onnx_sha256": onnx_sha256, "opset": OPSET, "versions": tool_versions(),
        "probe_images": PROBE_IMAGES, "max_abs_diff_vs_keras": diff,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def difference(got: list[np.ndarray], expected: list[np.ndarray]) -> float:
    """Largest difference over a model's outputs. Features are not bounded like probabilities: they are
    held to the tolerance relative to their size."""
    return max(float(np.abs(g - e).max() / max(1.0, np.abs(e).max())) for g, e in zip(got, expected, strict=True))


def probe_images() -> list[np.ndarray]:
    """Fixed random RGB images: every pixel value occurs, so the whole preprocessed range is exercised."""
    rng = np.random.default_rng(20260101)
    return [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(PROBE_IMAGES)]
