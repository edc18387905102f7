"""Pictures for the report: matplotlib figures and arrays -> PNG bytes (no HTML here)."""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence

import numpy as np
import pandas as pd


def plt():
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on cluster nodes
    import matplotlib.pyplot as pyplot

    return pyplot


def fig_to_png(fig) -> bytes:
    buffer = io.BytesIO()
    # metadata Software=None: matplotlib otherwise stamps its web address into the PNG.
    fig.savefig(buffer, format="png", dpi=96, bbox_inches="tight", metadata={"Software": None})
    plt().close(fig)
    return buffer.getvalue()


def array_to_png(image: np.ndarray) -> bytes:
    """Encode an (H, W) or (H, W, 3) float image in [0, 1] as PNG without matplotlib (crisper)."""
    from PIL import Image

    data = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(data).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def categorical_colors(labels: pd.Series, max_entries: int):
    """Colour per label: the most frequent ``max_entries`` get distinct colours, the rest grey."""
    counts = labels.value_counts()
    top = list(counts.index[:max_entries])
    cmap = plt().get_cmap("tab20" if len(top) > 10 else "tab10")
    palette = {label: cmap(i % cmap.N) for i, label in enumerate(top)}
    other = (0.75, 0.75, 0.75, 1.0)
    colours = [palette.get(label, other) for label in labels]
    n_other = int(counts.iloc[max_entries:].sum()) if len(counts) > max_entries else 0
    return colours, palette, n_other


def _value_label(value: float, number_format: str) -> str:
    if np.isnan(value):
        return "n/a"
    if np.isinf(value):
        return "∞" if value > 0 else "−∞"
    return number_format.format(value)


def bar_panel(
    ax,
    labels: list[str],
    values,
    *,
    title: str,
    why_empty: str | None = None,
    number_format: str = "{:.3g}",
    value_labels: Sequence[str] | None = None,
    horizontal: bool = False,
) -> None:
    """Bars that never look empty: every bar carries its value as text.

    A 0 is a bar of height 0 labelled "0" (so "zero" is not mistaken for "missing"); NaN is a
    label "n/a" without a bar; ±∞ is an arrow-headed bar to the edge of the axes labelled ∞.  A
    panel without a single number shows ``why_empty`` in words instead of empty axes.
    ``value_labels`` replaces the formatted numbers (e.g. "3 of 40").
    """
    values = np.asarray(values, dtype=float)
    ax.set_title(title, fontsize=8)
    if not len(values) or np.isnan(values).all():
        ax.set_axis_off()
        ax.text(
            0.5,
            0.5,
            "\n".join(textwrap.wrap(f"n/a: {why_empty or 'no value'}", 34)),
            ha="center",
            va="center",
            fontsize=7,
            color="#6b5300",
            transform=ax.transAxes,
            bbox={"boxstyle": "round", "facecolor": "#fff8e1", "edgecolor": "#f0b429"},
        )
        return
    finite = values[np.isfinite(values)]
    top = max(float(finite.max()) if len(finite) else 0.0, 0.0)
    bottom = min(float(finite.min()) if len(finite) else 0.0, 0.0)
    span = (top - bottom) or 1.0
    # Infinite values get a bar to just past the largest finite one: visibly "off the scale".
    drawn = np.where(np.isposinf(values), top + 0.25 * span, values)
    drawn = np.where(np.isneginf(values), bottom - 0.25 * span, drawn)
    drawn = np.nan_to_num(drawn, nan=0.0)
    colours = plt().get_cmap("tab10")
    positions = np.arange(len(values))
    bar = ax.barh if horizontal else ax.bar
    bar(positions, drawn, color=[colours(i % 10) for i in range(len(values))])
    # The zero line makes a bar of height 0 visible as a bar (with its "0" above it).
    (ax.axvline if horizontal else ax.axhline)(0.0, color="#444444", linewidth=0.8)
    if value_labels is None:
        value_labels = [_value_label(value, number_format) for value in values]
    for position, height, label in zip(positions, drawn, value_labels):
        outward = height < 0
        if horizontal:
            ax.annotate(
                label,
                (height, position),
                xytext=(-3 if outward else 3, 0),
                textcoords="offset points",
                ha="right" if outward else "left",
                va="center",
                fontsize=7,
            )
        else:
            ax.annotate(
                label,
                (position, height),
                xytext=(0, -3 if outward else 3),
                textcoords="offset points",
                ha="center",
                va="top" if outward else "bottom",
                fontsize=7,
            )
    low = min(drawn.min(), 0.0) - (0.18 * span if bottom < 0 or np.isneginf(values).any() else 0.0)
    # all zeros: a 0-1 axis, so the zero bars read as "0 of a scale", not as a squashed plot
    high = 1.0 if not drawn.any() else max(drawn.max(), 0.0) + 0.18 * span
    (ax.set_xlim if horizontal else ax.set_ylim)(low, high)
    ticks = ax.set_yticks if horizontal else ax.set_xticks
    if horizontal:
        ticks(positions, labels, fontsize=7)
        ax.invert_yaxis()  # first label on top, as in the table
        ax.tick_params(axis="x", labelsize=7)
    else:
        ticks(positions, labels, rotation=30, ha="right", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
