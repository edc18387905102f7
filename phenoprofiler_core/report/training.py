"""Training curves of every model trained in the run (model/<name>/history.csv)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DataError
from .content import (
    Figure,
    Heading,
    Paragraph,
    blocks,
    bold,
    code,
    error_note,
    missing,
    note,
    table_from_frame,
    text,
)
from .figures import fig_to_png, plt
from .readers import external_sets

# Sets that are not trained here, so they have no model/<name>/history.csv.
BASELINE_SETS = ("classic", "untrained", "imagenet")
LOSS_COLUMNS = ("loss", "mse", "ce", "contrastive")


def read_history(path: Path) -> pd.DataFrame:
    history = pd.read_csv(path)
    if history.empty:
        raise DataError("the file has no rows")
    if "epoch" not in history.columns:
        raise DataError(f"no 'epoch' column (has {list(history.columns)})")
    for column in ("epoch", *LOSS_COLUMNS):
        if column in history.columns:
            history[column] = pd.to_numeric(history[column], errors="coerce")
    return history


def training_figure(history: pd.DataFrame, name: str) -> bytes:
    history = history.copy()
    if "stage" not in history.columns:
        history["stage"] = 1
    if "split" not in history.columns:
        history["split"] = "train"
    # Stage 2 restarts its epoch count; lay the stages end to end on one axis.
    stages = list(pd.unique(history["stage"]))
    offset, x = 0, pd.Series(np.nan, index=history.index)
    boundaries = []
    for stage in stages:
        mask = history["stage"] == stage
        epochs = history.loc[mask, "epoch"]
        x[mask] = epochs - epochs.min() + offset + 1
        offset += int(epochs.max() - epochs.min() + 1)
        boundaries.append(offset + 0.5)
    history["_x"] = x
    columns = [c for c in LOSS_COLUMNS if c in history.columns and history[c].notna().any()]
    fig, axes = plt().subplots(1, len(columns), figsize=(3.0 * len(columns) + 0.6, 2.9), squeeze=False)
    styles = {"train": "-", "val": "--", "valid": "--", "validation": "--", "test": ":"}
    for ax, column in zip(axes[0], columns):
        for split, part in history.groupby("split", sort=False):
            part = part.sort_values("_x")
            ax.plot(
                part["_x"], part[column], styles.get(str(split), "-."), marker="o", ms=3, label=str(split)
            )
        for b in boundaries[:-1]:
            ax.axvline(b, color="grey", lw=0.8, ls=":")
        ax.set_title(column, fontsize=10)
        ax.set_xlabel("epoch (stages end to end)", fontsize=8)
        ax.tick_params(labelsize=7)
        positive = history[column].dropna()
        if len(positive) and (positive > 0).all() and positive.max() / positive.min() > 50:
            ax.set_yscale("log")  # the 100×MSE term spans decades early in training
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"model {name}", fontsize=10)
    return fig_to_png(fig)


def training_blocks(results: Path, sets: Sequence[str]):
    model_dir = results / "model"
    histories = sorted(model_dir.glob("*/history.csv")) if model_dir.is_dir() else []
    external = external_sets(results, sets)
    trained = [s for s in sets if s not in BASELINE_SETS and s not in external]
    parts = []
    for path in histories:
        name = path.parent.name
        try:
            history = read_history(path)
            png = training_figure(history, name)
        except Exception as exc:
            parts.append(error_note(path, exc))
            continue
        final = (
            history.groupby(["stage", "split"], sort=False).tail(1)
            if {"stage", "split"} <= set(history.columns)
            else history.tail(1)
        )
        final = final[[c for c in ("stage", "split", "epoch", *LOSS_COLUMNS) if c in final.columns]]
        parts += [
            Heading(f"Model {name}"),
            Figure(
                png,
                f"training curves of {name}",
                text(
                    "Losses per epoch of ",
                    bold(name),
                    " from ",
                    code(path.relative_to(results)),
                    "; dotted vertical line = start of the next training stage (stage 1 regression only, "
                    "stage 2 regression + classification + contrastive). Loss = 1·contrastive + 100·MSE + 0.1·CE.",
                ),
            ),
            Paragraph(text("Last epoch of each stage and split:")),
            table_from_frame(final.reset_index(drop=True), number_format="{:.4g}"),
        ]
    for name in trained:
        if not (model_dir / name / "history.csv").is_file():
            parts.append(missing(f"training history of feature set {name}", model_dir / name / "history.csv"))
    if not parts:
        parts.append(
            note(
                "No model was trained in this run (only baseline or external feature sets "
                f"{', '.join(sets) or '–'}), so there are no training curves."
            )
        )
    return blocks(parts)
