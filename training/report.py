"""Figures and tables: confusion matrices, learning curves and EDA distributions (CSV + PNG).

matplotlib runs with the non-interactive Agg backend so this works on headless machines.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dermscore.bundle import CLASS_CODES  # noqa: E402
from training.data import Record  # noqa: E402


def confusion_figure(matrix: np.ndarray, title: str, stem: Path) -> tuple[Path, Path]:
    """Write ``stem.csv`` (counts, rows = true class) and ``stem.png`` (row-normalised, counts annotated)."""
    matrix = np.asarray(matrix)
    csv_path, png_path = stem.with_suffix(".csv"), stem.with_suffix(".png")
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["true\\predicted", *CLASS_CODES])
        for code, row in zip(CLASS_CODES, matrix):
            writer.writerow([code, *row.tolist()])
    rates = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(CLASS_CODES)):
        for j in range(len(CLASS_CODES)):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(CLASS_CODES)), CLASS_CODES)
    ax.set_yticks(range(len(CLASS_CODES)), CLASS_CODES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (colour: row-normalised recall)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return csv_path, png_path


def learning_curves(histories: dict[str, Path], png_path: Path) -> Path:
    """Training loss and validation balanced accuracy per epoch for each member."""
    fig, (loss_ax, score_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for member, path in histories.items():
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        epochs = [int(r["epoch"]) for r in rows]
        loss_ax.plot(epochs, [float(r["loss"]) for r in rows], label=f"{member} train")
        loss_ax.plot(epochs, [float(r["val_loss"]) for r in rows], "--", label=f"{member} val")
        score_ax.plot(epochs, [float(r["val_balanced_accuracy"]) for r in rows], marker="o", label=member)
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="loss (train: label-smoothed, resampled)")
    score_ax.set(xlabel="epoch", ylabel="balanced accuracy", title="validation balanced accuracy", ylim=(0, 1))
    loss_ax.legend()
    score_ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


def _age_band(age: str) -> str:
    if not age:
        return "unknown"
    low = int(float(age)) // 10 * 10
    return f"{low:02d}-{low + 9:02d}"


def distributions(records: list[Record], folder: Path) -> dict[str, dict[str, int]]:
    """Class, age band, sex and body-site counts of the indexed images, as CSV tables and bar charts."""
    folder.mkdir(parents=True, exist_ok=True)
    tables = {
        "class": Counter(r.dx for r in records),
        "age": Counter(_age_band(r.age) for r in records),
        "sex": Counter(r.sex or "unknown" for r in records),
        "localization": Counter(r.localization or "unknown" for r in records),
    }
    result = {}
    for name, counts in tables.items():
        keys = sorted(counts) if name == "age" else [k for k, _ in counts.most_common()]
        with open(folder / f"{name}.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow([name, "images", "fraction"])
            for key in keys:
                writer.writerow([key, counts[key], round(counts[key] / len(records), 4)])
        fig, ax = plt.subplots(figsize=(max(5, 0.45 * len(keys)), 3.5))
        ax.bar(keys, [counts[k] for k in keys])
        ax.set_title(f"{name} ({len(records)} images)")
        ax.tick_params(axis="x", rotation=60)
        fig.tight_layout()
        fig.savefig(folder / f"{name}.png", dpi=100)
        plt.close(fig)
        result[name] = {k: counts[k] for k in keys}
    by_class = Counter((r.dx, r.sex or "unknown") for r in records)
    with open(folder / "class_by_sex.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        sexes = sorted({s for _, s in by_class})
        writer.writerow(["class", *sexes])
        for code in CLASS_CODES:
            writer.writerow([code, *(by_class[(code, s)] for s in sexes)])
    return result
