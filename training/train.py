"""Train one ensemble member: sampling, augmentation, schedule, early stopping and resumable checkpoints.

Why these choices (measured on CPU from scratch, see MODEL_CARD): deep nets at high resolution barely
learn in a CPU budget, so members train at low resolution; a warm-up then cosine-decayed learning
rate and label smoothing keep from-scratch training stable; damped class-balanced sampling (class
frequency ** power) fights the nv majority without the wild swings full inverse-frequency weights
caused. Each epoch writes a checkpoint (model, optimizer state, epoch, early-stopping state), so a
killed run continues where it stopped when started again.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import keras
import numpy as np

from dermscore.bundle import CLASS_CODES, ColourConstancy
from dermscore.preprocess import correct_colour, normalize
from training.augment import CUSTOM_OBJECTS, ColourJitter, Prepare, build_augmenter, compile_on_jax
from training.metrics import balanced_accuracy
from training.models import ARCHITECTURES, Head, build_classifier, set_backbone_trainable

HISTORY_FIELDS = (
    "epoch",
    "phase",
    "loss",
    "accuracy",
    "val_loss",
    "val_accuracy",
    "val_balanced_accuracy",
    "learning_rate",
    "seconds",
)


@dataclass
class TrainConfig:
    """Everything that determines a member's training run (recorded in the bundle's provenance)."""

    member: str
    input_size: tuple[int, int]
    init: str = "none"
    warm_start: str | None = None  # a trained classifier .keras to continue from (any input size: progressive resizing)
    head: Head = field(default_factory=Head)
    batch_size: int = 32
    epochs: int = 30
    steps_per_epoch: int | None = None  # None: one pass over the training split's size
    learning_rate: float = 1e-3
    warmup_epochs: float = 1.0
    min_learning_rate_ratio: float = 0.01
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    sampling_power: float = 0.5  # 1: natural frequencies, 0: every class equally often
    class_weight_power: float = 0.0  # extra loss weights (1 / sampled frequency) ** power
    head_epochs: int = 0  # phase 1 (backbone frozen) length; only meaningful with pretrained weights
    head_learning_rate: float = 1e-3
    finetune_layers: int | None = None  # phase 2: None = whole backbone, N = last N backbone layers
    patience: int = 8
    rotation: float = 0.5
    zoom: float = 0.1
    colour: float = 0.2
    seed: int = 42
    mixed_precision: bool = False
    run_eagerly: bool = False  # for smoke runs of a few steps, where graph compilation dominates
    time_budget: float | None = None  # seconds; the main phase's epoch count is fitted to it (``epochs`` is the cap)
    checkpoint_interval: float = 0.0  # seconds between resumable checkpoints; 0: after every epoch
    loader_workers: int = 1  # threads preparing batches (a GPU outruns one)
    # The generalising recipe (issue #15). Every default is the recipe of the members shipped before it, so
    # an older config.json loads as what it was; the presets below switch them on.
    colour_constancy_p: float | None = None  # Shades of Gray with this Minkowski p (exported as colour_constancy)
    dihedral: bool = False  # the transpose that, with the flips, gives all 8 rotations/flips
    crop_scale: float = 0.0  # random resized crop: smallest area fraction (0: none)
    white_balance: float = 0.0  # per-channel gain range +-, before the colour constancy
    gamma: float = 0.0  # gamma log-uniform in [1 / (1 + g), 1 + g]
    blur: float = 0.0  # Gaussian sigma (pixels) of the strongest blur, blended in per image
    ema_momentum: float | None = None  # exponential moving average of the weights (validated and saved)
    exclude_source: str | None = None  # a HAM10000 source left out of training and validation

    @property
    def preprocessing(self) -> str:
        return ARCHITECTURES[self.member].preprocessing

    @property
    def constancy(self) -> ColourConstancy | None:
        """The colour constancy the member is trained with and that export writes into the manifest."""
        return ColourConstancy("shades_of_gray", float(self.colour_constancy_p)) if self.colour_constancy_p else None

    def to_json(self) -> dict:
        data = asdict(self)
        data["input_size"] = list(self.input_size)
        return data

    @classmethod
    def from_json(cls, data: dict) -> TrainConfig:
        data = dict(data)
        data["input_size"] = tuple(data["input_size"])
        data["head"] = Head(**data["head"])
        return cls(**data)


# Settings for this project's CPU-only, from-scratch bundle (see MODEL_CARD for the measurements).
CPU_PRESETS = {
    "inceptionv3": TrainConfig(member="inceptionv3", input_size=(75, 100), epochs=7, steps_per_epoch=100),
    "densenet201": TrainConfig(member="densenet201", input_size=(48, 64), epochs=5, steps_per_epoch=100),
}
# For a GPU without ImageNet weights: from scratch at the data's own 150x200, long schedules fitted to a time
# budget, checkpoints every two minutes (a GPU epoch takes seconds). The shipped InceptionV3 is such a run.
SCRATCH_GPU_PRESETS = {
    member: TrainConfig(
        member=member, input_size=(150, 200), batch_size=64, epochs=200, learning_rate=1.5e-3, patience=200,
        mixed_precision=True, checkpoint_interval=120.0, loader_workers=8,
    )
    for member in ("inceptionv3", "densenet201")
}
# The generalising recipe of issue #15 on a GPU: both members at 150x200, Shades of Gray, all 8 rotations/flips,
# random resized crops, white balance / gamma / blur before the constancy, EMA of the weights.
SHIFT_RECIPE = dict(
    colour_constancy_p=6.0, dihedral=True, crop_scale=0.5, rotation=0.125, zoom=0.0, white_balance=0.2, gamma=0.3,
    blur=1.0, ema_momentum=0.995,
)
SHIFT_GPU_PRESETS = {member: replace(config, **SHIFT_RECIPE) for member, config in SCRATCH_GPU_PRESETS.items()}
# The same recipe on this project's CPU: DenseNet201 at 96x128 is what a CPU reaches in hours, not days.
SHIFT_CPU_PRESETS = {
    "inceptionv3": replace(CPU_PRESETS["inceptionv3"], **{**SHIFT_RECIPE, "ema_momentum": 0.99}),
    "densenet201": replace(CPU_PRESETS["densenet201"], **{**SHIFT_RECIPE, "ema_momentum": 0.99}, input_size=(96, 128)),
}
# For a GPU with internet: ImageNet initialisation, the study's resolution, head then full fine-tuning.
GPU_PRESETS = {
    member: TrainConfig(
        member=member, input_size=size, init="imagenet", epochs=30, learning_rate=1e-4, head_epochs=3,
        mixed_precision=True,
    )
    for member, size in (("inceptionv3", (299, 299)), ("densenet201", (224, 224)))
}


def sampling_prior(labels: np.ndarray, power: float) -> np.ndarray:
    """Class frequencies a member sees in training when class c is drawn in proportion to count_c ** power."""
    counts = np.bincount(labels, minlength=len(CLASS_CODES)).astype(np.float64)
    sampled = np.where(counts > 0, counts**power, 0.0)
    return sampled / sampled.sum()


def class_weights(prior: np.ndarray, power: float) -> np.ndarray:
    """Loss weights (1 / (K * prior)) ** power for the classes present; 0 for absent ones."""
    safe = np.maximum(prior, 1e-12)
    return np.where(prior > 0, (1.0 / (len(prior) * safe)) ** power, 0.0)


def training_prior(config: TrainConfig, labels: np.ndarray) -> np.ndarray:
    """The class prior a member effectively learned: sampling frequencies times loss weights."""
    prior = sampling_prior(labels, config.sampling_power)
    effective = prior * class_weights(prior, config.class_weight_power)
    return effective / effective.sum()


class Batches(keras.utils.PyDataset):
    """Image batches from the uint8 cache: prepared as dermscore prepares them (colour constancy, then the
    member's normalisation), or with ``preprocessing`` None as float32 pixels for the trainer, whose graph
    augments and then prepares them (``training.augment.Prepare``).

    With ``sampling_power`` set, each epoch draws a fresh sample (seeded by seed and epoch, so a resumed
    run sees the same sequence) in which class c appears in proportion to count_c ** power.
    Without it, the given indices are served in order (validation, prediction).
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        indices: np.ndarray,
        batch_size: int,
        preprocessing: str | None,
        sampling_power: float | None = None,
        steps: int | None = None,
        class_weight_power: float = 0.0,
        seed: int = 0,
        workers: int = 1,
        constancy: ColourConstancy | None = None,
    ) -> None:
        # Threads, not processes: numpy releases the GIL, and the epoch's draw (set by the callback before
        # Keras starts the epoch's workers) stays in one object.
        super().__init__(workers=workers, use_multiprocessing=False)
        self.images, self.labels, self.indices = images, labels, np.asarray(indices)
        self.batch_size, self.preprocessing, self.constancy = batch_size, preprocessing, constancy
        self.sampling_power, self.seed, self.epoch = sampling_power, seed, 0
        self.steps = epoch_steps(steps, batch_size, len(self.indices))
        self._order = self._draw()
        freq = sampling_prior(labels[self.indices], sampling_power if sampling_power is not None else 1.0)
        self.class_weights = class_weights(freq, class_weight_power).astype(np.float32) if class_weight_power else None

    def _draw(self) -> np.ndarray:
        if self.sampling_power is None:
            return self.indices
        labels = self.labels[self.indices]
        counts = np.bincount(labels, minlength=len(CLASS_CODES)).astype(np.float64)
        p = counts[labels] ** (self.sampling_power - 1.0)
        rng = np.random.default_rng([self.seed, self.epoch])
        return rng.choice(self.indices, size=self.steps * self.batch_size, replace=True, p=p / p.sum())

    def prepare(self, pixels: np.ndarray) -> np.ndarray:
        """dermscore's preparation of resized images (``prepare`` after its resize), on a batch."""
        return normalize(correct_colour(pixels, self.constancy), self.preprocessing)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            self._order = self._draw()

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int):
        rows = np.sort(self._order[i * self.batch_size : (i + 1) * self.batch_size])  # sorted: faster mmap reads
        pixels = self.images[rows]
        x = pixels.astype(np.float32) if self.preprocessing is None else self.prepare(pixels)
        y = np.eye(len(CLASS_CODES), dtype=np.float32)[self.labels[rows]]
        if self.class_weights is None:
            return x, y
        return x, y, self.class_weights[self.labels[rows]]


EAGER_PREDICT_LIMIT = 256


def predict(
    model: keras.Model,
    images: np.ndarray,
    indices: np.ndarray,
    preprocessing: str,
    constancy: ColourConstancy | None = None,
    batch_size: int = 64,
):
    """Softmax probabilities (N, 7) of a classifier for ``images[indices]``, prepared as dermscore prepares them.

    Up to EAGER_PREDICT_LIMIT images are run eagerly: compiling a prediction graph of a 200-layer
    network costs more than a few eager batches.
    """
    labels = np.zeros(len(images), dtype=np.int64)
    data = Batches(images, labels, indices, batch_size, preprocessing, constancy=constancy)
    if len(indices) > EAGER_PREDICT_LIMIT:
        return np.asarray(model.predict(data, verbose=0), dtype=np.float64)
    batches = [keras.ops.convert_to_numpy(model(data[i][0], training=False)) for i in range(len(data))]
    return np.concatenate(batches).astype(np.float64) if batches else np.zeros((0, len(CLASS_CODES)))


def epoch_steps(steps_per_epoch: int | None, batch_size: int, train_images: int) -> int:
    """Steps in one epoch: the configured count, else one pass over the training side."""
    return steps_per_epoch or math.ceil(train_images / batch_size)


def epoch_learning_rate(peak: float, epoch: int, epochs: int, warmup_epochs: float, floor_ratio: float) -> float:
    """Linear warm-up over the first ceil(warmup_epochs) epochs, then cosine decay to floor_ratio * peak.

    Set once per epoch by the training callback rather than compiled into the train step, so a run can
    still fit its number of epochs to a time budget after it has started (the first two epochs do not
    depend on the total).
    """
    warm = min(math.ceil(warmup_epochs), max(epochs - 1, 0))
    if epoch < warm:
        return peak * (epoch + 1) / (warm + 1)
    progress = min((epoch - warm) / max(epochs - 1 - warm, 1), 1.0)
    return peak * (floor_ratio + (1.0 - floor_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def fitted_epochs(
    epoch_ends: list[float], begun: float, budget: float, now: float, epochs_done: int, cap: int
) -> int | None:
    """The phase's epoch count under a time budget (seconds since ``begun``), or None while too early.

    Decided once a quarter of the budget has passed and three epochs have ended, so members sharing a
    GPU are measured when all of them are training; the pace excludes the first epoch (which pays for
    compilation) and has 5% to spare. Until then the cosine runs towards ``cap`` (nearly flat).
    """
    if len(epoch_ends) < 3 or now - begun < budget / 4:
        return None
    pace = (epoch_ends[-1] - epoch_ends[0]) / (len(epoch_ends) - 1) * 1.05
    return min(cap, epochs_done + max(int((begun + budget - now) // pace), 0))


@contextmanager
def averaged_weights(model: keras.Model) -> Iterator[None]:
    """Inside: the model holds its optimizer's moving averages (``use_ema``); after: its own weights again.

    Keras swaps the averages in only when ``fit`` ends; validating and keeping the best epoch's weights
    need them every epoch. Without EMA this does nothing.
    """
    optimizer = model.optimizer
    if optimizer is None or not optimizer.use_ema:
        yield
        return
    variables = model.trainable_variables
    current = [keras.ops.convert_to_numpy(v) for v in variables]
    optimizer.finalize_variable_values(variables)
    try:
        yield
    finally:
        for variable, value in zip(variables, current):
            variable.assign(value)


class _Checkpoint(keras.callbacks.Callback):
    """Per epoch: learning rate, validation balanced accuracy, history row, best classifier, checkpoint, stop."""

    def __init__(
        self,
        run: MemberRun,
        train_data: Batches,
        val_labels: np.ndarray,
        phase: tuple[str, int, int],
        peak: float,
        state: dict,
        stop_at: float | None,
    ):
        super().__init__()
        self.run, self.train_data, self.val_labels, self.state = run, train_data, val_labels, state
        (self.phase, self.first, self.end), self.peak = phase, peak
        self.stop_at, self.started = stop_at, 0.0
        self.begun = self.last_saved = time.time()
        self.epoch_ends: list[float] = []
        self.best_weights: list[np.ndarray] | None = None

    def on_epoch_begin(self, epoch, logs=None):
        cfg = self.run.config
        self.train_data.set_epoch(epoch)
        self.model.optimizer.learning_rate = epoch_learning_rate(
            self.peak, epoch - self.first, self.end - self.first, cfg.warmup_epochs, cfg.min_learning_rate_ratio
        )
        self.started = time.time()

    def on_train_batch_end(self, batch, logs=None):
        if (batch + 1) % 10 == 0 and time.time() - self.started > 60:  # progress for long CPU epochs
            print(f"  step {batch + 1}: {(time.time() - self.started) / (batch + 1):.2f} s/step", flush=True)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        run, state = self.run, self.state
        cfg = run.config
        with averaged_weights(self.model):  # with EMA: the averaged weights are the ones validated and kept
            classifier = run.classifier(self.model)
            # The classifier alone on numpy-prepared images: validation takes scoring's path, not the trainer's.
            probs = predict(classifier, run.images, run.val_indices, cfg.preprocessing, cfg.constancy)
            score = balanced_accuracy(self.val_labels, probs.argmax(1))
            if score > state["best"]:
                self.best_weights = classifier.get_weights()
        row = {
            "epoch": epoch + 1,
            "phase": self.phase,
            "loss": round(float(logs.get("loss", np.nan)), 5),
            "accuracy": round(float(logs.get("accuracy", np.nan)), 5),
            "val_loss": round(float(-np.mean(np.log(probs[np.arange(len(probs)), self.val_labels] + 1e-12))), 5),
            "val_accuracy": round(float(np.mean(probs.argmax(1) == self.val_labels)), 5),
            "val_balanced_accuracy": round(score, 5),
            "learning_rate": float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)),
            "seconds": round(time.time() - self.started, 1),
        }
        run.append_history(row)
        print(json.dumps(row), flush=True)
        if score > state["best"]:
            state.update(best=score, best_epoch=epoch + 1, wait=0)
        else:
            state["wait"] += 1
        state["epoch"] = epoch + 1
        self.epoch_ends.append(time.time())
        self._fit_to_budget()
        early = state["wait"] >= run.config.patience
        deadline = bool(self.stop_at) and time.time() + row["seconds"] > self.stop_at
        last = early or deadline or epoch + 1 >= self.end
        if last or time.time() - self.last_saved >= run.config.checkpoint_interval:
            self._persist()
        if early:
            print(f"early stop: no val balanced accuracy gain for {state['wait']} epochs", flush=True)
            state["stopped"] = True
            run.save_state(state)
        elif deadline:
            # Not marked as stopped: running the command again without the deadline continues the schedule.
            print("deadline: another epoch would end after --stop-at; stopping with the best checkpoint", flush=True)
            state["deadline_stopped"] = True
        self.model.stop_training = last

    def _fit_to_budget(self) -> None:
        budget = self.run.config.time_budget
        if not budget or self.phase != "train" or "fitted_end" in self.state:
            return
        end = fitted_epochs(self.epoch_ends, self.begun, budget, time.time(), self.state["epoch"], self.end)
        if end is not None:
            self.end = self.state["fitted_end"] = end
            print(f"time budget {budget:.0f} s: {end} epochs in this phase", flush=True)

    def _persist(self) -> None:
        """Best classifier (kept in memory since the last save), then the resumable checkpoint and state."""
        classifier = self.run.classifier(self.model)
        if self.best_weights is not None:
            current = classifier.get_weights()
            classifier.set_weights(self.best_weights)
            classifier.save(self.run.folder / "best.keras")
            classifier.set_weights(current)
            self.best_weights = None
        self.run.save_checkpoint(self.model, self.state)
        self.last_saved = time.time()


@dataclass
class MemberRun:
    """A member's working folder: config, history, checkpoints and the best classifier."""

    folder: Path
    config: TrainConfig
    images: np.ndarray
    labels: np.ndarray
    train_indices: np.ndarray
    val_indices: np.ndarray

    @property
    def state_path(self) -> Path:
        return self.folder / "state.json"

    def load_state(self) -> dict:
        if self.state_path.is_file():
            return json.loads(self.state_path.read_text())
        return {"epoch": 0, "best": -1.0, "best_epoch": 0, "wait": 0, "stopped": False, "checkpoint": None}

    def save_state(self, state: dict) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.state_path)

    def save_checkpoint(self, model: keras.Model, state: dict) -> None:
        """Write the new checkpoint file first, then the state that points to it, then drop the old one.

        A kill at any moment leaves a state file naming a complete checkpoint.
        """
        old = state.get("checkpoint")
        name = f"checkpoint_epoch{state['epoch']:03d}.keras"
        model.save(self.folder / name)
        state["checkpoint"] = name
        self.save_state(state)
        if old and old != name:
            (self.folder / old).unlink(missing_ok=True)

    def append_history(self, row: dict) -> None:
        path = self.folder / "history.csv"
        new = not path.is_file()
        with open(path, "a", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=HISTORY_FIELDS)
            if new:
                writer.writeheader()
            writer.writerow(row)

    def truncate_history(self, epochs: int) -> None:
        """Drop history rows of an epoch that was logged but not checkpointed before a kill (it reruns)."""
        path = self.folder / "history.csv"
        if path.is_file():
            with open(path, newline="", encoding="utf-8") as handle:
                rows = [r for r in csv.DictReader(handle) if int(r["epoch"]) <= epochs]
            path.unlink()
            for row in rows:
                self.append_history(row)

    def classifier(self, model: keras.Model) -> keras.Model:
        return model.get_layer(self.config.member)

    def _trainer(self) -> keras.Model:
        cfg = self.config
        classifier = build_classifier(cfg.member, cfg.input_size, cfg.init, cfg.head, cfg.seed)
        if cfg.warm_start:
            # Convolution and dense weights do not depend on the input size, so a member trained at a lower
            # resolution (or for fewer epochs) continues here with a fresh schedule.
            classifier.set_weights(keras.models.load_model(cfg.warm_start, compile=False).get_weights())
        # Pixels in, as the cache holds them: augmentation, then dermscore's preparation, then the older jitter.
        inputs = keras.Input((*cfg.input_size, 3), name="image")
        x = build_augmenter(
            cfg.rotation, cfg.zoom, cfg.seed, cfg.dihedral, cfg.crop_scale, cfg.white_balance, cfg.gamma, cfg.blur
        )(inputs)
        x = Prepare(cfg.preprocessing, cfg.colour_constancy_p, name="prepare")(x)
        if cfg.colour:
            x = ColourJitter(cfg.colour / 2, cfg.colour, cfg.colour, seed=cfg.seed + 3, name="colour_jitter")(x)
        return keras.Model(inputs, classifier(x), name="trainer")

    def _compile(self, model: keras.Model) -> None:
        """A fresh optimizer; its learning rate is set each epoch by the callback (``epoch_learning_rate``)."""
        cfg = self.config
        compile_on_jax(model)
        model.compile(
            optimizer=keras.optimizers.AdamW(
                cfg.learning_rate,
                weight_decay=cfg.weight_decay,
                use_ema=cfg.ema_momentum is not None,
                ema_momentum=cfg.ema_momentum or 0.99,
            ),
            loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing),
            metrics=["accuracy"],
            run_eagerly=cfg.run_eagerly,
        )

    def phases(self) -> list[tuple[str, int, int]]:
        """(name, first epoch, end epoch): an optional frozen-backbone head phase, then the main phase."""
        cfg = self.config
        head = cfg.head_epochs if cfg.init != "none" else 0
        return ([("head", 0, head)] if head else []) + [("train", head, cfg.epochs)]

    def fit(self, stop_at: float | None = None) -> dict:
        """Train (or continue training) and return the final state; the best classifier is best.keras.

        ``stop_at`` (a Unix time) ends training after the last epoch that can finish before it, for runs
        that share a machine with a hard deadline; the schedule is not stretched, so figures stay
        reproducible for a run that is not cut.
        """
        cfg = self.config
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "config.json").write_text(json.dumps(cfg.to_json(), indent=1))
        keras.utils.set_random_seed(cfg.seed)
        if cfg.mixed_precision:
            keras.mixed_precision.set_global_policy("mixed_float16")
        state = self.load_state()
        steps = epoch_steps(cfg.steps_per_epoch, cfg.batch_size, len(self.train_indices))
        train_data = Batches(
            self.images,
            self.labels,
            self.train_indices,
            cfg.batch_size,
            None,  # pixels: the trainer augments, then prepares them in its graph
            sampling_power=cfg.sampling_power,
            steps=steps,
            class_weight_power=cfg.class_weight_power,
            seed=cfg.seed,
            workers=cfg.loader_workers,
        )
        val_labels = self.labels[self.val_indices]
        model = None
        if state["checkpoint"]:
            print(f"resuming after epoch {state['epoch']} from {state['checkpoint']}", flush=True)
            self.truncate_history(state["epoch"])
            model = keras.models.load_model(self.folder / state["checkpoint"], custom_objects=CUSTOM_OBJECTS)
            if "prepare" not in {layer.name for layer in model.layers}:
                raise RuntimeError(
                    f"{self.folder / state['checkpoint']}: a trainer from before pixel-space augmentation (it takes "
                    "normalised images); it cannot be continued by this version. Start the run in a new --work folder."
                )
            compile_on_jax(model)
        for phase, first, end in self.phases():
            end = state.get("fitted_end", end) if phase == "train" else end
            if state.get("stopped") or state["epoch"] >= end:
                continue
            if model is None:
                model = self._trainer()
            if state["epoch"] == first or model.optimizer is None:
                # A new phase: set what trains and start a fresh optimizer for it.
                if cfg.init != "none":
                    set_backbone_trainable(
                        self.classifier(model), False if phase == "head" else (cfg.finetune_layers or True)
                    )
                self._compile(model)
            peak = cfg.head_learning_rate if phase == "head" else cfg.learning_rate
            callback = _Checkpoint(self, train_data, val_labels, (phase, first, end), peak, state, stop_at)
            model.fit(train_data, epochs=end, initial_epoch=state["epoch"], callbacks=[callback], verbose=2)
            if state.get("deadline_stopped"):
                break
        return state


def resume_config(folder: Path, config: TrainConfig) -> TrainConfig:
    """A resumed run keeps the config it started with, so a checkpoint is never continued differently."""
    path = folder / "config.json"
    if (folder / "state.json").is_file() and path.is_file():
        saved = TrainConfig.from_json(json.loads(path.read_text()))
        if saved != config:
            print(f"resuming {folder}: using the saved config, not the new options", flush=True)
        return saved
    return config


def with_overrides(config: TrainConfig, **overrides) -> TrainConfig:
    """Preset plus command-line options (None means: keep the preset's value)."""
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})
