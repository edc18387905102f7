"""Pictures for the report: matplotlib figures and arrays -> PNG bytes (no HTML here)."""

from __future__ import annotations

import io

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
