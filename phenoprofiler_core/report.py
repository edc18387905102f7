"""The benchmark report: one self-contained HTML page per dataset.

``results/<dataset>/report.html`` is what a scientist opens to judge the profiles: dataset summary,
QC pictures, training curves, the metrics of every feature set side by side, mAP per treatment,
UMAPs of well profiles and per-rule runtimes.  The page must open on an offline machine and be
mailable as one file, so every picture is an embedded base64 PNG and the CSS/JS are inline.

Every input is optional: a section whose files are missing says so in a short note instead of
failing, because a report on a half-finished run (or a run without a trained model) is still
useful.  A file that exists but cannot be read is shown as a visible error note in its section,
never silently skipped.
"""

from __future__ import annotations

import argparse
import base64
import datetime as _dt
import html
import io
import logging
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import ConfigError, DataError, PhenoProfilerError
from .io import write_text

log = logging.getLogger(__name__)

# Sets that are not trained here, so they have no model/<name>/history.csv.
BASELINE_SETS = ("classic", "untrained", "imagenet")


@dataclass(frozen=True)
class ReportOptions:
    """Knobs of the report (config section ``report``)."""

    title: str | None = None
    umap_neighbors: int = 15
    umap_min_dist: float = 0.1
    # UMAP's k-NN graph needs n_neighbors < n; below this many wells PCA is the honest choice.
    umap_min_wells: int = 15
    example_treatments: int = 24
    table_rows: int = 50
    legend_entries: int = 20
    seed: int = 0


# ============================================================================ small HTML helpers


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _note(text: str) -> str:
    return f'<p class="note">{text}</p>'


def _caption(text: str) -> str:
    return f'<p class="caption">{text}</p>'


def _missing(what: str, path: Path | str) -> str:
    return _note(f"Not available: {_esc(what)} (looked for <code>{_esc(path)}</code>).")


def _error_note(path: Path | str, exc: BaseException) -> str:
    # Visible in the page (not only in the log), so a broken input is never mistaken for "fine".
    return (
        f'<p class="note error">Could not read <code>{_esc(path)}</code>: '
        f"{_esc(type(exc).__name__)}: {_esc(exc)}</p>"
    )


def _png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _img(png: bytes, alt: str, css_class: str = "") -> str:
    cls = f' class="{css_class}"' if css_class else ""
    return f'<img{cls} src="{_png_data_uri(png)}" alt="{_esc(alt)}">'


def _figure(png: bytes, alt: str, caption: str) -> str:
    return f"<figure>{_img(png, alt)}<figcaption>{caption}</figcaption></figure>"


def _fig_to_png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    # metadata Software=None: matplotlib otherwise stamps its web address into the PNG.
    fig.savefig(buffer, format="png", dpi=96, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def _array_to_png(image: np.ndarray) -> bytes:
    """Encode an (H, W) or (H, W, 3) float image in [0, 1] as PNG without matplotlib (crisper)."""
    from PIL import Image

    data = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(data).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _table(df: pd.DataFrame, *, index: bool = False, float_format: str = "{:.3f}") -> str:
    """An escaped HTML table; numbers right-aligned and formatted."""

    def cell(value) -> str:
        if isinstance(value, (float, np.floating)):
            if not np.isfinite(value):
                return '<td class="num na">–</td>'
            return f'<td class="num">{float_format.format(value)}</td>'
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            return f'<td class="num">{value:,}</td>'
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return '<td class="na">–</td>'
        return f"<td>{_esc(value)}</td>"

    head = "".join(f"<th>{_esc(c)}</th>" for c in ([df.index.name or ""] if index else []) + list(df.columns))
    rows = []
    for idx, row in df.iterrows():
        lead = f"<th>{_esc(idx)}</th>" if index else ""
        rows.append("<tr>" + lead + "".join(cell(v) for v in row.tolist()) + "</tr>")
    return f'<div class="table-wrap"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


def _section(section_id: str, heading: str, body: str) -> str:
    return f'<section id="{section_id}">\n<h2>{_esc(heading)}</h2>\n{body}\n</section>'


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on cluster nodes
    import matplotlib.pyplot as plt

    return plt


# ============================================================================ readers


def _read_parquet(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path)


def _feature_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if not str(c).startswith("Metadata_")]


def _channels_from_manifest(manifest: pd.DataFrame | None) -> list[str]:
    if manifest is None:
        return []
    return [c[len("Path_") :] for c in manifest.columns if str(c).startswith("Path_")]


_WELL_A01 = re.compile(r"^([A-Za-z]{1,2})0*(\d{1,3})$")
_WELL_RC = re.compile(r"^[rR]0*(\d{1,3})[cC]0*(\d{1,3})$")


def _well_position(well: str) -> tuple[int, int] | None:
    """(row, column), 0-based, from 'A01'/'P24'/'AF48' or 'r01c01'; None when unrecognised."""
    well = str(well).strip()
    match = _WELL_A01.match(well)
    if match:
        letters, col = match.groups()
        row = 0
        for ch in letters.upper():
            row = row * 26 + (ord(ch) - ord("A") + 1)
        return row - 1, int(col) - 1
    match = _WELL_RC.match(well)
    if match:
        return int(match.group(1)) - 1, int(match.group(2)) - 1
    return None


def _plate_shape(max_row: int, max_col: int) -> tuple[int, int]:
    """Snap to a standard plate format so empty edge wells still show as empty."""
    for rows, cols in ((8, 12), (16, 24), (32, 48)):
        if max_row < rows and max_col < cols:
            return rows, cols
    return max_row + 1, max_col + 1


def _row_label(row: int) -> str:
    label = ""
    row += 1
    while row:
        row, rem = divmod(row - 1, 26)
        label = chr(ord("A") + rem) + label
    return label


def _categorical_colors(labels: pd.Series, max_entries: int):
    """Colour per label: the most frequent ``max_entries`` get distinct colours, the rest grey."""
    plt = _plt()
    counts = labels.value_counts()
    top = list(counts.index[:max_entries])
    cmap = plt.get_cmap("tab20" if len(top) > 10 else "tab10")
    palette = {label: cmap(i % cmap.N) for i, label in enumerate(top)}
    other = (0.75, 0.75, 0.75, 1.0)
    colours = [palette.get(label, other) for label in labels]
    n_other = int(counts.iloc[max_entries:].sum()) if len(counts) > max_entries else 0
    return colours, palette, n_other


# ============================================================================ sections


def section_summary(results: Path, manifest: pd.DataFrame | None, sets: Sequence[str]) -> str:
    path = results / "manifest.parquet"
    if manifest is None:
        return _section("summary", "Dataset summary", _missing("the site manifest", path))
    needed = {"Metadata_Plate", "Metadata_Well"}
    if not needed <= set(manifest.columns):
        raise DataError(f"{path}: needs columns {sorted(needed)}; has {list(manifest.columns)[:12]}")
    wells = manifest[["Metadata_Plate", "Metadata_Well"]].drop_duplicates()
    channels = _channels_from_manifest(manifest)
    pert = manifest.get("Metadata_pert_type", pd.Series("trt", index=manifest.index)).astype(str)
    treatment = manifest.get("Metadata_Treatment", pd.Series("", index=manifest.index)).astype(str)
    is_control = pert.isin(["negcon", "poscon"])
    moa = manifest.get("Metadata_moa", pd.Series("", index=manifest.index)).fillna("").astype(str)
    moa_labels = sorted(
        {label.strip() for value in moa.unique() for label in value.split("|") if label.strip()}
    )

    facts = [
        ("Plates", f"{manifest['Metadata_Plate'].nunique():,}"),
        ("Wells", f"{len(wells):,}"),
        ("Sites (images per channel)", f"{len(manifest):,}"),
        ("Treatments (excluding controls)", f"{treatment[~is_control].nunique():,}"),
        ("MoA labels", f"{len(moa_labels):,}" if moa_labels else "none annotated"),
        ("Channels (canonical order)", ", ".join(channels) if channels else "–"),
        ("Feature sets compared", ", ".join(sets) if sets else "–"),
    ]
    body = ['<table class="facts"><tbody>']
    body += [f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in facts]
    body.append("</tbody></table>")

    if is_control.any():
        ctrl = manifest[is_control].assign(control_type=pert[is_control], treatment=treatment[is_control])
        ctrl_table = (
            ctrl.groupby(["control_type", "treatment"])
            .apply(
                lambda g: pd.Series(
                    {"wells": len(g[["Metadata_Plate", "Metadata_Well"]].drop_duplicates()), "sites": len(g)}
                ),
                include_groups=False,
            )
            .reset_index()
            .rename(columns={"control_type": "control type"})
        )
        body.append("<h3>Controls</h3>" + _table(ctrl_table))
    else:
        body.append(_note("No control wells are marked in <code>Metadata_pert_type</code> (negcon/poscon)."))

    per_plate = (
        manifest.assign(_pert=pert)
        .groupby("Metadata_Plate")
        .agg(
            wells=("Metadata_Well", "nunique"),
            sites=("Metadata_Well", "size"),
            negcon_sites=("_pert", lambda s: int((s == "negcon").sum())),
        )
        .reset_index()
        .rename(columns={"Metadata_Plate": "plate", "negcon_sites": "negative-control sites"})
    )
    body.append("<h3>Plates</h3>" + _table(per_plate))
    body.append(f'<p class="caption">From <code>{_esc(path.relative_to(results))}</code>.</p>')
    return _section("summary", "Dataset summary", "\n".join(body))


def _illumination_qc(results: Path, plates: list[str]) -> str:
    illum_dir = results / "illum"
    pictures = []
    candidates = sorted(illum_dir.glob("*/qc.png")) if illum_dir.is_dir() else []
    if plates:
        by_plate = {p.parent.name: p for p in candidates}
        candidates = [by_plate[p] for p in plates if p in by_plate] + [
            p for p in candidates if p.parent.name not in set(plates)
        ]
    for path in candidates:
        try:
            png = path.read_bytes()
            if not png.startswith(b"\x89PNG"):
                raise DataError("not a PNG file")
        except (OSError, DataError) as exc:
            pictures.append(_error_note(path, exc))
            continue
        pictures.append(
            _figure(
                png,
                f"illumination functions, plate {path.parent.name}",
                f"Illumination functions of plate <b>{_esc(path.parent.name)}</b> "
                f"(<code>{_esc(path.relative_to(results))}</code>).",
            )
        )
    if not pictures:
        return _missing("illumination QC pictures", illum_dir / "<plate>" / "qc.png")
    return f'<div class="gallery">{"".join(pictures)}</div>'


def _to_unit(tile: np.ndarray) -> np.ndarray:
    """Tiles may be stored as scaled integers (config tiles.dtype); bring them back to [0, 1]."""
    tile = np.asarray(tile)
    if tile.dtype.kind in "ui":
        return tile.astype(np.float32) / float(np.iinfo(tile.dtype).max)
    return tile.astype(np.float32)


def _stretch(channel: np.ndarray) -> np.ndarray:
    """Per-channel 1–99.5 % contrast stretch so dim stains are visible in the thumbnail."""
    lo, hi = np.percentile(channel, [1.0, 99.5])
    if hi <= lo:
        return np.zeros_like(channel)
    return np.clip((channel - lo) / (hi - lo), 0.0, 1.0)


def _thumbnail(tile: np.ndarray, size: int = 192) -> np.ndarray:
    """Shrink (C, S, S) by block averaging (no aliasing of bright nuclei)."""
    factor = max(1, tile.shape[-1] // size)
    c, h, w = tile.shape
    h2, w2 = (h // factor) * factor, (w // factor) * factor
    return tile[:, :h2, :w2].reshape(c, h2 // factor, factor, w2 // factor, factor).mean(axis=(2, 4))


def _composite(tile: np.ndarray) -> np.ndarray:
    """RGB picture of a (C, H, W) tile: blue = channel 1, green = channel 2, red = channel 3.

    Blue for the first channel because the canonical order starts with DNA, and nuclei are shown
    blue in Cell Painting figures; with fewer than 3 channels the missing colours stay dark.
    """
    rgb = np.zeros(tile.shape[1:] + (3,), dtype=np.float32)
    for i, colour in zip(range(min(3, tile.shape[0])), (2, 1, 0)):
        rgb[..., colour] = _stretch(tile[i])
    if tile.shape[0] == 1:  # a single stain reads better as grey than as blue on black
        rgb[:] = rgb[..., 2:3]
    return rgb


def _example_tiles(results: Path, plates: list[str], channels: list[str], options: ReportOptions) -> str:
    tiles_dir = results / "tiles"
    tile_files = sorted(tiles_dir.glob("*.npy")) if tiles_dir.is_dir() else []
    if plates:
        order = {p: i for i, p in enumerate(plates)}
        tile_files.sort(key=lambda p: (order.get(p.stem, len(order)), p.stem))
    if not tile_files:
        return _missing("site tiles", tiles_dir / "<plate>.npy")

    # One example site per treatment: the first site of the treatment, plate by plate.  Controls
    # first, so the reader has a reference to compare the treatments against.
    examples: dict[str, tuple[Path, int, str]] = {}
    notes = []
    for npy in tile_files:
        index_path = npy.with_suffix(".sites.parquet")
        if not index_path.is_file():
            notes.append(_missing(f"tile index of plate {npy.stem}", index_path))
            continue
        try:
            sites = _read_parquet(index_path)
        except Exception as exc:
            notes.append(_error_note(index_path, exc))
            continue
        if "Metadata_Treatment" not in sites.columns:
            notes.append(
                _note(f"<code>{_esc(index_path)}</code> has no <code>Metadata_Treatment</code> column.")
            )
            continue
        pert = sites.get("Metadata_pert_type", pd.Series("trt", index=sites.index)).astype(str)
        for position, (treatment, kind) in enumerate(zip(sites["Metadata_Treatment"].astype(str), pert)):
            examples.setdefault(treatment, (npy, position, kind))
    if not examples:
        return "\n".join(notes) or _missing("site tiles", tiles_dir / "<plate>.npy")

    rank = {"negcon": 0, "poscon": 1}
    chosen = sorted(examples.items(), key=lambda kv: (rank.get(kv[1][2], 2), kv[0]))
    shown = chosen[: options.example_treatments]
    arrays: dict[Path, np.ndarray] = {}
    cards = []
    first_tile = None
    for treatment, (npy, position, kind) in shown:
        try:
            if npy not in arrays:
                arrays[npy] = np.load(npy, mmap_mode="r")  # memory-mapped: only the used tiles are read
            array = arrays[npy]
            if array.ndim != 4 or position >= array.shape[0]:
                raise DataError(
                    f"expected (N_sites, C, S, S) with > {position} rows, got shape {array.shape}"
                )
            tile = _thumbnail(_to_unit(array[position]))
        except Exception as exc:
            notes.append(_error_note(npy, exc))
            continue
        if first_tile is None:
            first_tile = (treatment, npy.stem, tile)
        badge = f' <span class="badge">{_esc(kind)}</span>' if kind in rank else ""
        cards.append(
            f'<div class="tile">{_img(_array_to_png(_composite(tile)), f"example site of {treatment}")}'
            f"<div>{_esc(treatment)}{badge}</div></div>"
        )
    n_channels = first_tile[2].shape[0] if first_tile else 0
    names = channels if len(channels) == n_channels else [f"channel {i + 1}" for i in range(n_channels)]
    colour_key = ", ".join(f"{c} = {n}" for c, n in zip(("blue", "green", "red"), names[:3]))
    parts = [f'<div class="tiles">{"".join(cards)}</div>']
    caption = (
        f"One site per treatment (the first one imaged), illumination-corrected tile as the model "
        f"sees it, contrast-stretched per channel: {_esc(colour_key)}."
    )
    if len(chosen) > len(shown):
        caption += f" Showing {len(shown)} of {len(chosen)} treatments (controls first, then by name)."
    parts.append(f'<p class="caption">{caption}</p>')
    if first_tile is not None and n_channels > 1:
        treatment, plate, tile = first_tile
        strip = np.concatenate(
            [np.pad(_stretch(ch), ((0, 0), (0, 4)), constant_values=1.0) for ch in tile], axis=1
        )[:, :-4]
        parts.append(
            _figure(
                _array_to_png(strip),
                f"all channels of one site of {treatment}",
                f"All channels of the same site of <b>{_esc(treatment)}</b> (plate "
                f"{_esc(plate)}), left to right: {_esc(', '.join(names))}.",
            )
        )
    return "\n".join(notes + parts)


def _count_column(df: pd.DataFrame) -> str | None:
    if "Count_Nuclei" in df.columns:
        return "Count_Nuclei"
    counts = [c for c in df.columns if str(c).startswith("Count_")]
    return counts[0] if counts else None


def _cell_count_heatmaps(results: Path, plates: list[str]) -> str:
    classic_dir = results / "features" / "classic"
    files = sorted(classic_dir.glob("*.parquet")) if classic_dir.is_dir() else []
    if plates:
        order = {p: i for i, p in enumerate(plates)}
        files.sort(key=lambda p: (order.get(p.stem, len(order)), p.stem))
    if not files:
        return _missing("classic features with cell counts", classic_dir / "<plate>.parquet")
    plt = _plt()
    parts, figures = [], []
    for path in files:
        try:
            import pyarrow.parquet as pq

            schema_names = pq.read_schema(path).names
            column = _count_column(pd.DataFrame(columns=schema_names))
            if column is None:
                parts.append(
                    _note(
                        f"No <code>Count_*</code> column in <code>{_esc(path.relative_to(results))}</code>; "
                        "cell counts not shown for this plate."
                    )
                )
                continue
            # Read only the columns needed: classic feature tables have thousands of columns.
            df = pd.read_parquet(path, columns=["Metadata_Well", column])
        except Exception as exc:
            parts.append(_error_note(path, exc))
            continue
        per_well = df.groupby("Metadata_Well")[column].sum()
        n_sites = df.groupby("Metadata_Well").size()
        positions = {w: _well_position(w) for w in per_well.index}
        if any(p is None for p in positions.values()):
            bad = [w for w, p in positions.items() if p is None][:3]
            parts.append(
                _note(
                    f"Plate {_esc(path.stem)}: well names such as {_esc(bad)} are not "
                    "A01/r01c01-style, so no plate map; summary only: "
                    f"median {per_well.median():.0f} cells per well."
                )
            )
            continue
        rows, cols = _plate_shape(
            max(p[0] for p in positions.values()), max(p[1] for p in positions.values())
        )
        grid = np.full((rows, cols), np.nan)
        for well, (r, c) in positions.items():
            grid[r, c] = per_well[well]
        # Sized so two 96-well plates fit side by side; 384/1536-well plates get wider.
        width = min(11.0, 1.4 + 0.27 * cols)
        fig, ax = plt.subplots(figsize=(width, 0.8 + 0.26 * rows))
        image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", aspect="equal")
        ax.set_facecolor("#e6e6e6")
        step = 1 if cols <= 24 else 2
        ax.set_xticks(range(0, cols, step), [str(c + 1) for c in range(0, cols, step)], fontsize=7)
        ax.set_yticks(range(0, rows, step), [_row_label(r) for r in range(0, rows, step)], fontsize=7)
        ax.set_title(f"Plate {path.stem}: {column} per well", fontsize=10)
        fig.colorbar(image, ax=ax, fraction=0.03, pad=0.02, label="cells per well")
        caption = (
            f"Cells per well on plate <b>{_esc(path.stem)}</b>: <code>{_esc(column)}</code> summed over "
            f"the well's sites ({int(n_sites.min())}–{int(n_sites.max())} sites per well); grey = no data. "
            f"Median {per_well.median():.0f}, range {per_well.min():.0f}–{per_well.max():.0f}. "
            "Edge effects or empty wells show up as patterns here."
        )
        figures.append(_figure(_fig_to_png(fig), f"cell counts plate {path.stem}", caption))
    return "\n".join(parts) + (f'<div class="gallery">{"".join(figures)}</div>' if figures else "")


def section_qc(results: Path, manifest: pd.DataFrame | None, options: ReportOptions) -> str:
    plates = [] if manifest is None else [str(p) for p in pd.unique(manifest["Metadata_Plate"])]
    channels = _channels_from_manifest(manifest)
    body = [
        "<h3>Illumination correction</h3>",
        _guard(lambda: _illumination_qc(results, plates), results / "illum"),
        "<h3>Example sites per treatment</h3>",
        _guard(lambda: _example_tiles(results, plates, channels, options), results / "tiles"),
        "<h3>Cell counts per well</h3>",
        _guard(lambda: _cell_count_heatmaps(results, plates), results / "features" / "classic"),
    ]
    return _section("qc", "Quality control", "\n".join(body))


_LOSS_COLUMNS = ("loss", "mse", "ce", "contrastive")


def _training_figure(history: pd.DataFrame, name: str) -> bytes:
    plt = _plt()
    history = history.copy()
    for column in ("epoch", *_LOSS_COLUMNS):
        if column in history.columns:
            history[column] = pd.to_numeric(history[column], errors="coerce")
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
    columns = [c for c in _LOSS_COLUMNS if c in history.columns and history[c].notna().any()]
    fig, axes = plt.subplots(1, len(columns), figsize=(3.0 * len(columns) + 0.6, 2.9), squeeze=False)
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
    return _fig_to_png(fig)


def section_training(results: Path, sets: Sequence[str]) -> str:
    model_dir = results / "model"
    histories = sorted(model_dir.glob("*/history.csv")) if model_dir.is_dir() else []
    trained = [s for s in sets if s not in BASELINE_SETS]
    parts = []
    for path in histories:
        name = path.parent.name
        try:
            history = pd.read_csv(path)
            if history.empty:
                raise DataError("the file has no rows")
            if "epoch" not in history.columns:
                raise DataError(f"no 'epoch' column (has {list(history.columns)})")
            png = _training_figure(history, name)
        except Exception as exc:
            parts.append(_error_note(path, exc))
            continue
        final = (
            history.groupby(["stage", "split"], sort=False).tail(1)
            if {"stage", "split"} <= set(history.columns)
            else history.tail(1)
        )
        final = final[[c for c in ("stage", "split", "epoch", *_LOSS_COLUMNS) if c in final.columns]]
        parts.append(f"<h3>Model {_esc(name)}</h3>")
        parts.append(
            _figure(
                png,
                f"training curves of {name}",
                f"Losses per epoch of <b>{_esc(name)}</b> from <code>{_esc(path.relative_to(results))}</code>; "
                "dotted vertical line = start of the next training stage (stage 1 regression only, "
                "stage 2 regression + classification + contrastive). Loss = 1·contrastive + 100·MSE + 0.1·CE.",
            )
        )
        parts.append(
            "<p>Last epoch of each stage and split:</p>"
            + _table(final.reset_index(drop=True), float_format="{:.4g}")
        )
    for name in trained:
        if not (model_dir / name / "history.csv").is_file():
            parts.append(
                _missing(f"training history of feature set {name}", model_dir / name / "history.csv")
            )
    if not parts:
        parts.append(
            _note(
                "No model was trained in this run (only baseline feature sets "
                f"{_esc(', '.join(sets) or '–')}), so there are no training curves."
            )
        )
    return _section("training", "Training curves", "\n".join(parts))


def _ordered_sets(found: Sequence[str], requested: Sequence[str]) -> list[str]:
    found = [str(s) for s in found]
    return [s for s in requested if s in found] + [s for s in found if s not in requested]


def section_metrics(results: Path, sets: Sequence[str]) -> str:
    path = results / "eval" / "summary.parquet"
    if not path.is_file():
        return _section("metrics", "Metrics", _missing("the metrics summary", path))
    summary = _read_parquet(path)
    missing = {"set", "metric", "value"} - set(summary.columns)
    if missing:
        raise DataError(
            f"{path}: missing columns {sorted(missing)}; expected one row per (set, metric) "
            f"with columns set, metric, value (has {list(summary.columns)})"
        )
    summary = summary.copy()
    summary["value"] = pd.to_numeric(summary["value"], errors="coerce")
    # 'variant' tells the published flavours apart (e.g. map_interpolated vs map_ap); keep it
    # visible in the row name instead of silently averaging the two.
    row = summary["metric"].astype(str)
    if "variant" in summary.columns:
        variant = summary["variant"].astype("string").fillna("")
        row = row.where(variant == "", row + " (" + variant + ")")
    summary["_row"] = row
    duplicated = summary.duplicated(["_row", "set"], keep="first")
    table = summary.pivot_table(index="_row", columns="set", values="value", aggfunc="first", sort=False)
    table = table[_ordered_sets(table.columns, sets)]
    table.index.name = "metric"
    table.columns.name = None
    if "description" in summary.columns:
        # evaluate writes what each number measures; a reader needs that more than the code name.
        described = summary.dropna(subset=["description"]).groupby("_row", sort=False)["description"].first()
        table["what it measures"] = described.reindex(table.index).fillna("").astype(str)
    parts = [_table(table, index=True)]
    if duplicated.any():
        # Several values for one (set, metric, variant): say so rather than pick one silently.
        pairs = summary.loc[duplicated, ["set", "_row"]].drop_duplicates().head(5)
        listed = ", ".join(f"{a}/{b}" for a, b in zip(pairs["set"], pairs["_row"]))
        parts.append(
            f'<p class="note error">{int(duplicated.sum())} duplicate (set, metric, variant) rows in '
            f"<code>{_esc(path)}</code> (e.g. {_esc(listed)}); the table shows the first of each.</p>"
        )
    absent = [s for s in sets if s not in table.columns]
    if absent:
        parts.append(
            _note(f"No metrics for feature set(s) {_esc(', '.join(absent))} in <code>{_esc(path)}</code>.")
        )
    parts.append(
        _caption(
            "Feature sets side by side, evaluated on the same wells (one row per metric and variant, "
            "from <code>eval/summary.parquet</code>). mAP: copairs mean average precision (activity = "
            "replicates vs. negative controls; consistency = treatments sharing an MoA). FoE: folds of "
            "enrichment in the top 1 % most similar treatments. Recall@k: share of same-MoA treatments "
            "among the top k %. Cosine similarity throughout."
        )
    )
    chart = _metrics_chart(table)
    if chart is not None:
        parts.append(_figure(chart, "metrics bar chart", "The same metrics as bars, one panel per metric."))
    return _section("metrics", "Metrics", "\n".join(parts))


def _metrics_chart(table: pd.DataFrame) -> bytes | None:
    table = table.drop(columns=["what it measures"], errors="ignore").dropna(how="all")
    if table.empty or table.shape[1] == 0:
        return None
    plt = _plt()
    table = table.iloc[:16]
    n = len(table)
    cols = min(4, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.3 * rows), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, (metric, values) in zip(axes.flat, table.iterrows()):
        ax.bar(
            range(len(values)),
            values.to_numpy(dtype=float),
            color=[colours(i % 10) for i in range(len(values))],
        )
        ax.set_xticks(range(len(values)), list(values.index), rotation=30, ha="right", fontsize=7)
        ax.set_title(str(metric), fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    return _fig_to_png(fig)


def _find_column(
    df: pd.DataFrame, *candidates: str, contains: str | None = None, exclude: str | None = None
) -> str | None:
    for name in candidates:
        if name in df.columns:
            return name
    if contains is not None:
        for name in df.columns:
            lower = str(name).lower()
            if contains in lower and (exclude is None or exclude not in lower):
                return name
    return None


def _read_activity(path: Path) -> pd.DataFrame:
    """Normalise one map_activity table to treatment / map / p / significant columns."""
    df = _read_parquet(path)
    treatment = _find_column(df, "Metadata_Treatment", contains="treatment")
    ap = _find_column(df, "mean_average_precision", contains="average_precision")
    if treatment is None or ap is None:
        raise DataError(
            f"{path}: expected a treatment column (e.g. Metadata_Treatment) and a column "
            f"containing 'average_precision'; has {list(df.columns)}"
        )
    p_value = _find_column(df, "corrected_p_value", contains="corrected_p", exclude="below")
    below = _find_column(df, "below_corrected_p", contains="below")
    label = df[treatment].astype(str)
    if "Metadata_TreatmentId" in df.columns and treatment != "Metadata_TreatmentId":
        # One display name can cover several treatment ids (e.g. doses of one compound): keep
        # them apart by appending the id, instead of averaging different treatments together.
        ids = df["Metadata_TreatmentId"].astype(str)
        shared = label.groupby(label).transform(lambda names: ids[names.index].nunique() > 1)
        label = label.where(~shared, label + " [" + ids + "]")
    out = pd.DataFrame({"treatment": label, "map": pd.to_numeric(df[ap], errors="coerce")})
    out["p"] = pd.to_numeric(df[p_value], errors="coerce") if p_value else np.nan
    if below is not None:
        out["significant"] = df[below].astype(bool)
    elif p_value is not None:
        out["significant"] = out["p"] < 0.05
    else:
        out["significant"] = pd.NA
    # copairs can give one row per treatment and plate grouping; one value per treatment here.
    return (
        out.groupby("treatment", sort=False)
        .agg(map=("map", "mean"), p=("p", "min"), significant=("significant", "max"))
        .reset_index()
    )


def section_map(results: Path, sets: Sequence[str], options: ReportOptions) -> str:
    per_set: dict[str, pd.DataFrame] = {}
    notes = []
    for name in sets:
        path = results / "eval" / name / "map_activity.parquet"
        if not path.is_file():
            notes.append(_missing(f"mAP per treatment for {name}", path))
            continue
        try:
            per_set[name] = _read_activity(path)
        except Exception as exc:
            notes.append(_error_note(path, exc))
    if not per_set:
        return _section("map", "mAP per treatment (phenotypic activity)", "\n".join(notes))

    summary_rows = []
    for name, df in per_set.items():
        known = df["significant"].dropna()
        summary_rows.append(
            {
                "feature set": name,
                "treatments": len(df),
                "mean mAP": float(df["map"].mean()),
                "fraction retrieved (corrected p < 0.05)": float(known.astype(bool).mean())
                if len(known)
                else np.nan,
            }
        )
    parts = ["<h3>Per feature set</h3>", _table(pd.DataFrame(summary_rows))]

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    for name, df in per_set.items():
        values = np.sort(df["map"].dropna().to_numpy())[::-1]
        ax.plot(np.arange(1, len(values) + 1), values, marker="o", ms=3, label=name)
    ax.set_xlabel("treatments ranked by mAP", fontsize=9)
    ax.set_ylabel("mAP (activity)", fontsize=9)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    parts.append(
        _figure(
            _fig_to_png(fig),
            "mAP per treatment, ranked",
            "mAP of each treatment's replicate wells against negative-control wells, sorted; "
            "a curve further up and to the right = more treatments distinguishable from controls.",
        )
    )

    merged = None
    for name, df in per_set.items():
        column = df.set_index("treatment")[["map", "significant"]].rename(
            columns={"map": name, "significant": f"_sig_{name}"}
        )
        merged = column if merged is None else merged.join(column, how="outer")
    merged["_mean"] = merged[list(per_set)].mean(axis=1)
    merged = merged.sort_values("_mean", ascending=False)
    shown = merged.head(options.table_rows)
    head = "<th>treatment</th>" + "".join(f"<th>{_esc(n)}</th>" for n in per_set)
    rows = []
    for treatment, row in shown.iterrows():
        cells = []
        for name in per_set:
            value = row[name]
            if pd.isna(value):
                cells.append('<td class="num na">–</td>')
                continue
            significant = row[f"_sig_{name}"]
            mark = ' class="num sig"' if (not pd.isna(significant) and bool(significant)) else ' class="num"'
            cells.append(f"<td{mark}>{value:.3f}</td>")
        rows.append(f"<tr><td>{_esc(treatment)}</td>{''.join(cells)}</tr>")
    parts.append("<h3>Per treatment</h3>")
    parts.append(
        f'<div class="table-wrap"><table class="map"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )
    caption = (
        "mAP per treatment (rows sorted by mean mAP over feature sets); "
        '<span class="sig">shaded</span> = retrieved, i.e. BH-corrected p &lt; 0.05.'
    )
    if len(merged) > len(shown):
        caption += f" Showing the top {len(shown)} of {len(merged)} treatments."
    parts.append(f'<p class="caption">{caption}</p>')
    return _section("map", "mAP per treatment (phenotypic activity)", "\n".join(notes + parts))


def _embed_2d(features: np.ndarray, options: ReportOptions) -> tuple[np.ndarray, str]:
    n = features.shape[0]
    if n >= options.umap_min_wells:
        import umap

        neighbors = min(options.umap_neighbors, n - 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "n_jobs overridden by random_state" etc.
            reducer = umap.UMAP(
                n_neighbors=neighbors,
                min_dist=options.umap_min_dist,
                metric="cosine",
                random_state=options.seed,
                init="spectral" if n > neighbors + 2 else "random",
            )
            coords = reducer.fit_transform(features)
        return coords, f"UMAP (cosine, n_neighbors={neighbors}, min_dist={options.umap_min_dist})"
    from sklearn.decomposition import PCA

    coords = PCA(n_components=2, random_state=options.seed).fit_transform(features)
    return coords, (
        f"PCA, first two components — only {n} wells, fewer than {options.umap_min_wells}, "
        "too few for a meaningful UMAP neighbourhood graph"
    )


def _umap_for_set(results: Path, name: str, options: ReportOptions) -> str:
    path = results / "profiles" / name / "normalized.parquet"
    if not path.is_file():
        return _missing(f"normalized well profiles of {name}", path)
    df = _read_parquet(path)
    features = df[_feature_columns(df)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    # Normalisation can leave all-NaN (constant) features; they carry no information.
    keep = np.isfinite(features).any(axis=0)
    features = np.nan_to_num(features[:, keep])
    features = features[:, features.std(axis=0) > 0]
    if features.shape[0] < 3 or features.shape[1] < 2:
        return _note(
            f"{_esc(name)}: only {features.shape[0]} wells × {features.shape[1]} informative "
            f"features in <code>{_esc(path)}</code>; nothing to embed."
        )
    coords, method = _embed_2d(features, options)
    treatment = df.get("Metadata_Treatment", pd.Series("?", index=df.index)).astype(str)
    moa = df.get("Metadata_moa", pd.Series("", index=df.index)).fillna("").astype(str)
    by_moa = (moa != "").any()
    # Controls have no MoA: label them by treatment so they stay recognisable.
    colour_by = moa.where(moa != "", treatment) if by_moa else treatment
    plate = df.get("Metadata_Plate", pd.Series("?", index=df.index)).astype(str)

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, labels, title in (
        (axes[0], colour_by, "MoA (controls: treatment)" if by_moa else "treatment"),
        (axes[1], plate, "plate"),
    ):
        colours, palette, n_other = _categorical_colors(labels, options.legend_entries)
        ax.scatter(coords[:, 0], coords[:, 1], c=colours, s=22, edgecolors="white", linewidths=0.4)
        handles = [
            plt.Line2D([], [], ls="", marker="o", color=c, label=name[:40]) for name, c in palette.items()
        ]
        if n_other:
            handles.append(
                plt.Line2D(
                    [], [], ls="", marker="o", color=(0.75, 0.75, 0.75), label=f"other ({n_other} wells)"
                )
            )
        ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
        ax.set_title(f"{name}: coloured by {title}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    caption = (
        f"<b>{_esc(name)}</b>: {len(df)} well profiles from <code>{_esc(path.relative_to(results))}</code>, "
        f"{features.shape[1]} informative features, embedded with {_esc(method)}. Replicate wells of "
        "an active treatment should cluster together and away from the controls; clustering by plate "
        "instead signals a batch effect."
    )
    return _figure(_fig_to_png(fig), f"2-D embedding of {name}", caption)


def section_umap(results: Path, sets: Sequence[str], options: ReportOptions) -> str:
    parts = []
    for name in sets:
        parts.append(f"<h3>{_esc(name)}</h3>")
        parts.append(
            _guard(
                lambda name=name: _umap_for_set(results, name, options),
                results / "profiles" / name / "normalized.parquet",
            )
        )
    if not parts:
        parts.append(_note("No feature sets were named."))
    return _section("umap", "Well profiles in 2-D (UMAP)", "\n".join(parts))


def _hms(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def section_runtimes(results: Path) -> str:
    bench_dir = results / "benchmarks"
    files = sorted(bench_dir.rglob("*.tsv")) if bench_dir.is_dir() else []
    if not files:
        return _section(
            "runtimes", "Runtimes", _missing("Snakemake benchmark files", bench_dir / "<rule>" / "*.tsv")
        )
    rows, notes = [], []
    for path in files:
        try:
            bench = pd.read_csv(path, sep="\t")
            if "s" not in bench.columns:
                raise DataError(f"no 's' column (has {list(bench.columns)})")
        except Exception as exc:
            notes.append(_error_note(path, exc))
            continue
        rule = path.relative_to(bench_dir).parts[0]
        rule = rule[:-4] if rule.endswith(".tsv") else rule  # a benchmark file directly under benchmarks/
        # Snakemake writes "-" (or NA) where it could not measure; treat as missing, not 0.
        seconds = pd.to_numeric(bench["s"], errors="coerce")
        rss = pd.to_numeric(bench.get("max_rss", pd.Series(dtype=float)), errors="coerce")
        cpu = pd.to_numeric(bench.get("cpu_time", pd.Series(dtype=float)), errors="coerce")
        # With `benchmark: repeat(...)` a file holds several runs; their mean is the job's time.
        rows.append({"rule": rule, "s": seconds.mean(), "max_rss": rss.max(), "cpu": cpu.mean()})
    if not rows:
        return _section("runtimes", "Runtimes", "\n".join(notes))
    jobs = pd.DataFrame(rows)
    per_rule = jobs.groupby("rule").agg(
        jobs=("s", "size"),
        total_s=("s", "sum"),
        longest_s=("s", "max"),
        cpu_s=("cpu", "sum"),
        peak_rss_mb=("max_rss", "max"),
    )
    per_rule = per_rule.sort_values("total_s", ascending=False)
    table = pd.DataFrame(
        {
            "rule": per_rule.index,
            "jobs": per_rule["jobs"].astype(int).to_numpy(),
            "wall time (sum)": [_hms(s) for s in per_rule["total_s"]],
            "seconds (sum)": per_rule["total_s"].to_numpy(),
            "longest job (s)": per_rule["longest_s"].to_numpy(),
            "CPU seconds": per_rule["cpu_s"].to_numpy(),
            "peak memory (MB)": per_rule["peak_rss_mb"].to_numpy(),
        }
    )
    parts = notes + [_table(table, float_format="{:,.1f}")]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 0.5 + 0.32 * len(per_rule)))
    ax.barh(per_rule.index[::-1], per_rule["total_s"].to_numpy()[::-1], color="#4c78a8")
    ax.set_xlabel("wall-clock seconds, summed over jobs", fontsize=9)
    ax.tick_params(labelsize=8)
    parts.append(
        _figure(
            _fig_to_png(fig),
            "runtime per rule",
            f"Wall-clock time per rule from {len(jobs)} Snakemake benchmark files under "
            "<code>benchmarks/</code>; jobs that ran in parallel are summed, so the total is the "
            "compute spent, not the elapsed time.",
        )
    )
    return _section("runtimes", "Runtimes", "\n".join(parts))


# ============================================================================ assembly

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;color:#1d2330;background:#f6f7f9;line-height:1.45}
header{background:#1f3b57;color:#fff;padding:18px 32px}
header h1{margin:0 0 4px;font-size:1.6em}
header p{margin:0;opacity:.85;font-size:.9em}
header code{background:rgba(255,255,255,.15);color:#fff}
nav{padding:8px 32px;background:#e4e9ef;font-size:.92em}
nav a{margin-right:16px;color:#1f3b57;text-decoration:none}
main{max-width:1200px;margin:0 auto;padding:8px 24px 40px}
section{background:#fff;border:1px solid #dde2e8;border-radius:6px;margin:18px 0;padding:6px 22px 16px}
h2{border-bottom:2px solid #1f3b57;padding-bottom:4px;color:#1f3b57}
h3{margin-bottom:6px;color:#2c4a6a}
table{border-collapse:collapse;font-size:.88em;margin:6px 0}
th,td{border:1px solid #d5dbe2;padding:3px 9px;text-align:left}
thead th{background:#eef2f6}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.na{color:#999;text-align:center}
td.sig,span.sig{background:#d8f0d2}
table.facts th{background:#eef2f6;width:16em}
.table-wrap{overflow-x:auto;max-height:640px;overflow-y:auto}
figure{margin:12px 0}
.gallery{display:flex;flex-wrap:wrap;gap:4px 24px;align-items:flex-start}
.gallery figure{max-width:560px}
figure img{max-width:100%;height:auto;border:1px solid #e3e6ea}
figcaption,.caption{font-size:.85em;color:#4a5565;margin-top:4px}
.note{background:#fff8e1;border-left:4px solid #f0b429;padding:5px 10px;font-size:.9em}
.note.error{background:#fdecea;border-left-color:#d64545}
.tiles{display:flex;flex-wrap:wrap;gap:10px}
.tile{width:164px;font-size:.78em;text-align:center;word-break:break-word}
.tile img{width:160px;height:160px;image-rendering:auto;border:1px solid #ccc}
.badge{background:#1f3b57;color:#fff;border-radius:3px;padding:0 4px;font-size:.85em}
code{font-size:.92em;background:#f1f3f5;padding:0 3px}
footer{font-size:.8em;color:#777;text-align:center;padding:12px}
"""

# Inline, no external script: replaces a picture the browser could not decode by a visible
# message (a truncated file would otherwise show as an empty box), and records the count on
# <body data-images-ok="decoded/total"> so automated checks can read it from the DOM.
_JS = """
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img'), ok = 0;
  imgs.forEach(function (img) {
    if (img.complete && img.naturalWidth > 0) { ok += 1; return; }
    var p = document.createElement('p');
    p.className = 'note error';
    p.textContent = 'This picture could not be displayed: ' + img.alt;
    img.replaceWith(p);
  });
  document.body.setAttribute('data-images-ok', ok + '/' + imgs.length);
});
"""

SECTIONS = (
    ("summary", "Dataset"),
    ("qc", "QC"),
    ("training", "Training"),
    ("metrics", "Metrics"),
    ("map", "mAP per treatment"),
    ("umap", "UMAP"),
    ("runtimes", "Runtimes"),
)


def _guard(
    build: Callable[[], str], path: Path | str | None = None, section: tuple[str, str] | None = None
) -> str:
    """Run one part of the report; a broken input becomes a visible note, not a failed report.

    A half-written or malformed upstream file should not cost the reader every other section,
    but it must not vanish either: the note names the file and the error.
    """
    try:
        return build()
    except (PhenoProfilerError, OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("report: %s: %s", path or (section and section[0]), exc)
        note = _error_note(path or "input", exc)
        return _section(*section, note) if section else note


def build_report(
    results_dir: str | Path, *, sets: Sequence[str] | None = None, options: ReportOptions = ReportOptions()
) -> str:
    """Return the report of ``results_dir`` (``results/<dataset>``) as one HTML string."""
    results = Path(results_dir)
    if not results.is_dir():
        raise DataError(f"results folder {results} does not exist")
    for key, value, minimum in (
        ("umap_neighbors", options.umap_neighbors, 2),
        ("umap_min_wells", options.umap_min_wells, 3),
        ("example_treatments", options.example_treatments, 0),
        ("table_rows", options.table_rows, 1),
    ):
        if value < minimum:
            raise ConfigError(f"report.{key} must be ≥ {minimum}, got {value}")
    if options.umap_min_dist < 0:
        raise ConfigError(f"report.umap_min_dist must be ≥ 0, got {options.umap_min_dist}")
    manifest_path = results / "manifest.parquet"
    manifest = None
    manifest_error = ""
    if manifest_path.is_file():
        try:
            manifest = _read_parquet(manifest_path)
            if "Metadata_Plate" not in manifest.columns:
                raise DataError(f"{manifest_path}: no Metadata_Plate column")
        except Exception as exc:
            manifest, manifest_error = None, _error_note(manifest_path, exc)
    if sets is None or len(sets) == 0:
        sets = _discover_sets(results)
    sets = list(dict.fromkeys(str(s) for s in sets))
    title = options.title or f"PhenoProfiler report: {results.name}"

    built = [
        _guard(
            lambda: section_summary(results, manifest, sets), manifest_path, ("summary", "Dataset summary")
        )
        if not manifest_error
        else _section("summary", "Dataset summary", manifest_error),
        _guard(lambda: section_qc(results, manifest, options), results, ("qc", "Quality control")),
        _guard(lambda: section_training(results, sets), results / "model", ("training", "Training curves")),
        _guard(
            lambda: section_metrics(results, sets),
            results / "eval" / "summary.parquet",
            ("metrics", "Metrics"),
        ),
        _guard(
            lambda: section_map(results, sets, options),
            results / "eval",
            ("map", "mAP per treatment (phenotypic activity)"),
        ),
        _guard(
            lambda: section_umap(results, sets, options),
            results / "profiles",
            ("umap", "Well profiles in 2-D (UMAP)"),
        ),
        _guard(lambda: section_runtimes(results), results / "benchmarks", ("runtimes", "Runtimes")),
    ]
    nav = "".join(f'<a href="#{sid}">{_esc(label)}</a>' for sid, label in SECTIONS)
    generated = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_esc(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<header><h1>{_esc(title)}</h1>
<p>Results folder <code>{_esc(results.name)}</code> · feature sets: {_esc(", ".join(sets) or "–")} · generated {generated}</p></header>
<nav>{nav}</nav>
<main>
{chr(10).join(built)}
</main>
<footer>PhenoProfiler pipeline — self-contained report (no external resources).</footer>
<script>{_JS}</script>
</body>
</html>
"""


def _discover_sets(results: Path) -> list[str]:
    """Sets to show when none are named: those with profiles or evaluations on disk."""
    found = []
    for folder in (results / "profiles", results / "eval"):
        if folder.is_dir():
            found += sorted(p.name for p in folder.iterdir() if p.is_dir())
    return list(dict.fromkeys(found))


def write_report(
    results_dir: str | Path,
    out: str | Path,
    *,
    sets: Sequence[str] | None = None,
    options: ReportOptions = ReportOptions(),
) -> Path:
    page = build_report(results_dir, sets=sets, options=options)
    write_text(page, out)
    return Path(out)


# ============================================================================ CLI


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "report",
        help="write the self-contained HTML benchmark report of one results folder",
        description="Collect manifest, QC, training history, metrics, profiles and benchmarks of "
        "results/<dataset> into one offline HTML page. Missing inputs become notes.",
    )
    parser.add_argument("--results-dir", required=True, type=Path, help="results/<dataset> folder")
    parser.add_argument(
        "--sets",
        nargs="*",
        default=None,
        help="feature sets to compare, in display order (default: all found on disk)",
    )
    parser.add_argument(
        "--title", default=None, help="page title (default: 'PhenoProfiler report: <dataset>')"
    )
    parser.add_argument("--out", required=True, type=Path, help="output HTML file")
    defaults = ReportOptions()
    parser.add_argument(
        "--umap-neighbors",
        type=int,
        default=defaults.umap_neighbors,
        help="UMAP n_neighbors (capped at the number of wells - 1)",
    )
    parser.add_argument("--umap-min-dist", type=float, default=defaults.umap_min_dist, help="UMAP min_dist")
    parser.add_argument(
        "--umap-min-wells",
        type=int,
        default=defaults.umap_min_wells,
        help="below this many wells, PCA replaces UMAP",
    )
    parser.add_argument(
        "--example-treatments",
        type=int,
        default=defaults.example_treatments,
        help="at most this many treatments get an example tile",
    )
    parser.add_argument(
        "--table-rows",
        type=int,
        default=defaults.table_rows,
        help="at most this many treatments in the mAP table",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="random seed of UMAP/PCA")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> None:
    options = ReportOptions(
        title=args.title or None,
        umap_neighbors=args.umap_neighbors,
        umap_min_dist=args.umap_min_dist,
        umap_min_wells=args.umap_min_wells,
        example_treatments=args.example_treatments,
        table_rows=args.table_rows,
        seed=args.seed,
    )
    out = write_report(args.results_dir, args.out, sets=args.sets, options=options)
    log.info("wrote %s", out)
