"""Throughput benchmark: how close scoring comes to what this machine can do, in one process and run.

Reports model-only and end-to-end images/s (for each backend asked for), the naive per-image
``predict`` loop of the original study, the ensemble's share of the measured float32 matmul ceiling,
peak RSS, time to first result and each setting's probability change against Keras float32, so a
throughput claim always comes with the machine's own ceiling and its accuracy beside it.

Shared machines drift: on our 2-core VMs the ceiling read anywhere from 88 to 151 GFLOP/s (EPYC) and
323 to 405 (Xeon) within minutes. So the figures come in rounds, each a ceiling measurement followed at
once by model-only and end-to-end runs; a share is taken within its round, and the table gives medians.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import cycle, islice
from pathlib import Path
from typing import Any

import numpy as np

from dermscore.bundle import Bundle, load_bundle
from dermscore.discover import file_source
from dermscore.feed import Feed, open_feed
from dermscore.infer import Predictor, load_member, score
from dermscore.preprocess import prepare, stack_inputs
from dermscore.records import Failure
from dermscore.runtime import Runtime, configure, default_batch_size, device_description


@dataclass
class BenchReport:
    rows: list[tuple[str, str]]

    def table(self) -> str:
        width = max(len(k) for k, _ in self.rows)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in self.rows)


@dataclass(frozen=True)
class Round:
    ceiling: float  # GFLOP/s, measured just before this round's runs
    model_only: float  # images/s
    end_to_end: float  # images/s
    decode: float  # images/s decoded and preprocessed by the feed alone, no members


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best-of float32 GEMM rate with numpy: the practical ceiling for convolution-heavy inference."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def model_flops(model: Any) -> float:
    """Forward FLOPs per image from the convolution and dense layers (2 per multiply-add)."""
    import keras

    total = 0.0
    for layer in _all_layers(model):
        if isinstance(layer, keras.layers.Conv2D):
            out_h, out_w, out_c = layer.output.shape[1:4]
            kh, kw = layer.kernel_size
            in_c = layer.input.shape[-1]
            total += 2.0 * out_h * out_w * out_c * kh * kw * in_c / layer.groups
        elif isinstance(layer, keras.layers.Dense):
            total += 2.0 * layer.input.shape[-1] * layer.units
    return total


def ensemble_flops(bundle: Bundle, models: dict[str, Any]) -> tuple[float, int]:
    """Forward FLOPs per image for the whole ensemble, and the views each member scores per image.

    A member exported with flip test-time augmentation runs its network on four views of each image,
    which a per-layer count cannot see (the network is one nested layer called on a 4x batch).
    """
    views = 4 if bundle.provenance.get("ensemble", {}).get("tta") else 1
    return views * sum(model_flops(models[m.name]) for m in bundle.members), views


def _all_layers(model: Any) -> list[Any]:
    layers = []
    for layer in model.layers:
        layers.extend(_all_layers(layer) if hasattr(layer, "layers") else [layer])
    return layers


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def seconds_since_process_start() -> float:
    """Wall time since this process was created (Linux /proc), so start-up and imports are counted."""
    ticks = os.sysconf("SC_CLK_TCK")
    started = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / ticks
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - started


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_bench(
    images: Sequence[Path], model: str | Path | None, batch_size: int | None, n_images: int, naive_images: int,
    runtimes: Sequence[Runtime], rounds: int = 3, feed: str = "auto", decode_workers: int | None = None,
    scaling: bool = True,
) -> BenchReport:
    """Every figure for each runtime (backend) in turn, in this one process, on the same images.

    The naive loop and the FLOP count always use the Keras models: the loop is the original study's
    baseline, whatever backend is being measured. ``feed`` and ``decode_workers`` are the local engine's
    (``dermscore.feed``); one feed serves every round, so worker start-up is not timed. ``scaling`` adds the
    decode rate of each feed with 1, 2, 4, 8... workers and all cores.
    """
    bundle = load_bundle(model)
    device = configure(runtimes[0])
    batch_size = batch_size or default_batch_size(device)
    paths = list(islice(cycle(images), n_images))

    from dermscore.decode import decode_source

    prepared = [
        prepare(decode_source(file_source(p))[0].rgb, bundle.members, bundle.colour_constancy) for p in paths[:batch_size]
    ]
    batch = stack_inputs(prepared, bundle.members)
    rows: list[tuple[str, str]] = []
    measured: list[tuple[str, list[Round]]] = []
    predictors: list[Predictor] = []
    with open_feed(bundle, batch_size, device, feed, decode_workers) as feeder:
        for runtime in runtimes:
            predictor = Predictor(bundle, batch_size, runtime)
            predictors.append(predictor)
            label = _label(predictor)
            next(r for r in score([file_source(paths[0])], predictor, feed=feeder) if not isinstance(r, Failure))
            if len(predictors) == 1:
                first = seconds_since_process_start()
                rows.append(("time to first result", f"{first:.1f} s from process start "
                             f"({label}: imports, load, verify, export if not cached, start the feed, first batch)"))
            measured.append((label, _rounds(predictor, batch, paths, rounds, feeder)))
            rows.append((f"peak RSS after {label}", f"{peak_rss_mb():.0f} MB"))
    if scaling:
        rows += decode_scaling(bundle, batch_size, device, paths)

    keras_models = next((p.models for p in predictors if p.backend == "keras"), None) or {
        m.name: load_member(bundle.member_path(m), runtimes[0]) for m in bundle.members}

    def naive(count: int) -> None:
        for p in paths[:count]:
            inputs = prepare(decode_source(file_source(p))[0].rgb, bundle.members, bundle.colour_constancy)
            for member in bundle.members:
                keras_models[member.name].predict(inputs[member.name][None], verbose=0)

    naive(1)  # warm-up, so the loop is not charged for building predict's function
    naive_rate = naive_images / _timed(lambda: naive(naive_images))
    flops, views = ensemble_flops(bundle, keras_models)
    ceilings = [r.ceiling for _, all_rounds in measured for r in all_rounds]
    ceiling = _median(ceilings)
    on_cpu = device == "cpu"
    table = [
        ("device", device_description(device)),
        ("bundle", f"{bundle.name} {bundle.version}: "
                   + ", ".join(f"{m.architecture} {m.input_size[0]}x{m.input_size[1]}" for m in bundle.members)),
        ("images, batch size", f"{n_images} ({len(images)} distinct files), batch {batch_size}, "
                               f"{rounds} round{'s' if rounds > 1 else ''} per backend (medians below)"),
        ("feed", f"{_feed_label(feeder)} (--feed {feed})"),
        ("ensemble GFLOPs / image", f"{flops / 1e9:.2f}" + (f" ({views} flipped views per member)" if views > 1 else "")),
        # numpy's GEMM runs on the CPU: a GPU's share of it would mean nothing, so it is only shown.
        ("matmul ceiling" if on_cpu else "CPU matmul ceiling (not the GPU's)",
         f"{ceiling:.0f} GFLOP/s -> {ceiling * 1e9 / flops:.2f} images/s for this ensemble "
         f"({min(ceilings):.0f}-{max(ceilings):.0f} over the rounds"
         + ("; each share below is against its own round's)" if on_cpu else ")")),
    ]
    for label, all_rounds in measured:
        model_only = [r.model_only for r in all_rounds]
        e2e = [r.end_to_end for r in all_rounds]
        share = {kind: _median([getattr(r, kind) * flops / (r.ceiling * 1e9) for r in all_rounds])
                 for kind in ("model_only", "end_to_end")}
        of_model = _median([r.end_to_end / r.model_only for r in all_rounds])
        decode = [r.decode for r in all_rounds]
        table += [
            (f"decode + preprocess only ({label} run)",
             f"{_median(decode):.2f} images/s, {_feed_label(feeder)} (rounds {_spread(decode)})"),
            (f"model-only ({label})", f"{_median(model_only):.2f} images/s ("
             + (f"{share['model_only']:.0%} of ceiling, " if on_cpu else "") + f"rounds {_spread(model_only)})"),
            (f"end-to-end ({label})", f"{_median(e2e):.2f} images/s ("
             + (f"{share['end_to_end']:.0%} of ceiling, " if on_cpu else "")
             + f"{of_model:.0%} of model-only, {_median(e2e) / naive_rate:.1f}x naive, rounds {_spread(e2e)})"),
        ]
    table.append(("naive predict loop (keras)", f"{naive_rate:.2f} images/s"))
    return BenchReport(table + rows + _differences(predictors, batch))


def _median(values: list[float]) -> float:
    return float(np.median(values))


def _spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}"


def _label(predictor: Predictor) -> str:
    runtime = predictor.runtime
    return f"{predictor.backend}, {runtime.precision}" + (", xla" if runtime.xla else "")


def _rounds(
    predictor: Predictor, batch: dict[str, np.ndarray], paths: Sequence[Path], rounds: int, feed: Feed
) -> list[Round]:
    """Per round: the matmul ceiling, model-only images/s on one prepared batch, end-to-end from the files,
    and the feed's decode rate on its own."""
    predictor(batch)  # warm-up: compile at the fixed batch shape
    batches = max(1, len(paths) // predictor.batch_size)
    count = 0

    def end_to_end() -> None:
        nonlocal count
        count = sum(1 for r in score([file_source(p) for p in paths], predictor, feed=feed)
                    if not isinstance(r, Failure))

    measured = []
    for _ in range(rounds):
        ceiling = matmul_gflops()
        model_only = batches * predictor.batch_size / _timed(lambda: [predictor(batch) for _ in range(batches)])
        rate = len(paths) / _timed(end_to_end)
        if count != len(paths):
            raise RuntimeError(f"benchmark images failed to score: {len(paths) - count} of {len(paths)}")
        measured.append(Round(ceiling, model_only, rate, decode_rate(feed, paths)))
    return measured


def decode_rate(feed: Feed, paths: Sequence[Path]) -> float:
    """Images/s the feed decodes and preprocesses into batches with no members to wait for."""
    decoded = 0

    def drain() -> None:
        nonlocal decoded
        decoded = sum(batch.rows for batch in feed.batches(file_source(p) for p in paths))

    seconds = _timed(drain)
    if decoded != len(paths):
        raise RuntimeError(f"benchmark images failed to decode: {len(paths) - decoded} of {len(paths)}")
    return decoded / seconds


def scaling_counts(cores: int) -> list[int]:
    """1, 2, 4, 8, ... up to the host's cores, and all of them."""
    counts = [n for n in (1, 2, 4, 8, 16, 32, 64) if n < cores]
    return counts + [cores]


def decode_scaling(bundle: Bundle, batch_size: int, device: str, paths: Sequence[Path]) -> list[tuple[str, str]]:
    """Each feed's decode rate with 1, 2, 4, 8... workers and all cores: processes should scale with the
    cores, threads stop where the GIL does. Each feed is warmed up (workers started) before it is timed."""
    rows = []
    cores = os.cpu_count() or 1
    for count in scaling_counts(cores):
        rates = []
        for kind in ("process", "thread"):
            with open_feed(bundle, batch_size, device, kind, count) as feeder:
                decode_rate(feeder, paths[:batch_size])
                rates.append(f"{kind} {decode_rate(feeder, paths):.1f}")
        rows.append((f"decode scaling, {count} worker{'s' if count > 1 else ''}"
                     + (" (all cores)" if count == cores else ""), ", ".join(rates) + " images/s"))
    return rows


def _feed_label(feed: Feed) -> str:
    return f"{feed.workers} decoding {'processes' if feed.kind == 'process' else 'threads'}"


def _differences(predictors: Sequence[Predictor], batch: dict[str, np.ndarray]) -> list[tuple[str, str]]:
    """Each measured setting's largest probability change against Keras float32 (the reference)."""
    def is_reference(p: Predictor) -> bool:
        return p.backend == "keras" and p.runtime.precision == "float32" and not p.runtime.xla

    others = [p for p in predictors if not is_reference(p)]
    if not others:
        return []
    first = predictors[0]
    reference = next((p for p in predictors if is_reference(p)), None) or Predictor(
        first.bundle, first.batch_size, replace(first.runtime, precision="float32", xla=False, backend="keras"))
    expected = reference(batch)
    rows = []
    for p in others:
        got = p(batch)
        diff = max(float(np.abs(got[m] - expected[m]).max()) for m in expected)
        rows.append((f"{_label(p)} vs keras float32", f"max |probability difference| {diff:.2e}"))
    return rows
