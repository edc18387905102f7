"""Quality control: illumination functions, one example site per treatment, cells per well."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DataError
from .content import (
    Figure,
    Gallery,
    Marked,
    Table,
    TileCard,
    TileGrid,
    blocks,
    bold,
    caption,
    code,
    error_note,
    missing,
    note,
    text,
)
from .contracts import illumination_qc_files, read_illumination_qc
from .figures import array_to_png, fig_to_png, plt
from .readers import count_column, plate_shape, read_parquet, row_label, sorted_by_plate, well_position


def illumination_check_blocks(results: Path, plates: list[str], table_rows: int):
    """The illumination step's checks per plate (qc.json): sites used, max/min ratio per channel."""
    files = sorted_by_plate(illumination_qc_files(results), plates, plate_of=lambda path: path.parent.name)
    if not files:
        return blocks(missing("illumination checks", results / "illum" / "<plate>" / "qc.json"))
    records, notes = [], []
    for path in files:
        try:
            records.append(read_illumination_qc(path))
        except Exception as exc:
            notes.append(error_note(path, exc))
    if not records:
        return blocks(notes)
    channels = list(dict.fromkeys(c for r in records for c in r["channels"]))
    rows = []
    for record in records:
        found = list(record["warnings"])
        for channel, entry in record["channels"].items():
            found += [f"{channel}: {w}" for w in entry["warnings"] if w not in record["warnings"]]
        row = {"plate": record["plate"], "sites": record["n_sites"]}
        for channel in channels:
            entry = record["channels"].get(channel)
            ratio = np.nan if entry is None else entry["max_over_min"]
            flagged = entry is not None and (entry["warnings"] or ratio > record["max_ratio_limit"])
            row[f"max/min {channel}"] = Marked(ratio, "warn") if flagged else ratio
        row["warnings"] = "; ".join(dict.fromkeys(found))
        rows.append(row)
    # Plates with warnings first: at a thousand plates the table is capped, the problems are not.
    rows.sort(key=lambda row: not row["warnings"])
    shown = rows[:table_rows]
    limits = sorted({(r["min_sites"], r["max_ratio_limit"]) for r in records})
    words = (
        "The illumination step's checks (illum/<plate>/qc.json): sites averaged into each plate's "
        "functions and each function's max/min ratio; flagged = fewer than "
        + " / ".join(f"{m} sites or a ratio above {limit:g}" for m, limit in limits)
        + "."
    )
    if len(rows) > len(shown):
        words += (
            f" Showing {len(shown)} of {len(rows):,} plates, those with warnings first (report.table_rows)."
        )
    columns = ("plate", "sites", *(f"max/min {c}" for c in channels), "warnings")
    return blocks(notes, Table(columns, tuple(shown), number_format="{:.2f}"), caption(words))


def illumination_blocks(results: Path, plates: list[str]):
    illum_dir = results / "illum"
    candidates = sorted(illum_dir.glob("*/qc.png")) if illum_dir.is_dir() else []
    candidates = sorted_by_plate(candidates, plates, plate_of=lambda path: path.parent.name)
    pictures = []
    for path in candidates:
        try:
            png = path.read_bytes()
            if not png.startswith(b"\x89PNG"):
                raise DataError("not a PNG file")
        except (OSError, DataError) as exc:
            pictures.append(error_note(path, exc))
            continue
        pictures.append(
            Figure(
                png,
                f"illumination functions, plate {path.parent.name}",
                text(
                    "Illumination functions of plate ",
                    bold(path.parent.name),
                    " (",
                    code(path.relative_to(results)),
                    ").",
                ),
            )
        )
    if not pictures:
        return blocks(missing("illumination QC pictures", illum_dir / "<plate>" / "qc.png"))
    return blocks(Gallery(tuple(pictures)))


def to_unit(tile: np.ndarray) -> np.ndarray:
    """Tiles may be stored as scaled integers (config tiles.dtype); bring them back to [0, 1]."""
    tile = np.asarray(tile)
    if tile.dtype.kind in "ui":
        return tile.astype(np.float32) / float(np.iinfo(tile.dtype).max)
    return tile.astype(np.float32)


def stretch(channel: np.ndarray) -> np.ndarray:
    """Per-channel 1–99.5 % contrast stretch so dim stains are visible in the thumbnail."""
    lo, hi = np.percentile(channel, [1.0, 99.5])
    if hi <= lo:
        return np.zeros_like(channel)
    return np.clip((channel - lo) / (hi - lo), 0.0, 1.0)


def thumbnail(tile: np.ndarray, size: int = 192) -> np.ndarray:
    """Shrink (C, S, S) by block averaging (no aliasing of bright nuclei)."""
    factor = max(1, tile.shape[-1] // size)
    c, h, w = tile.shape
    h2, w2 = (h // factor) * factor, (w // factor) * factor
    return tile[:, :h2, :w2].reshape(c, h2 // factor, factor, w2 // factor, factor).mean(axis=(2, 4))


def composite(tile: np.ndarray) -> np.ndarray:
    """RGB picture of a (C, H, W) tile: blue = channel 1, green = channel 2, red = channel 3.

    Blue for the first channel because the canonical order starts with DNA, and nuclei are shown
    blue in Cell Painting figures; with fewer than 3 channels the missing colours stay dark.
    """
    rgb = np.zeros(tile.shape[1:] + (3,), dtype=np.float32)
    for i, colour in zip(range(min(3, tile.shape[0])), (2, 1, 0)):
        rgb[..., colour] = stretch(tile[i])
    if tile.shape[0] == 1:  # a single stain reads better as grey than as blue on black
        rgb[:] = rgb[..., 2:3]
    return rgb


_CONTROL_RANK = {"negcon": 0, "poscon": 1}


def example_tile_blocks(results: Path, plates: list[str], channels: list[str], example_treatments: int):
    tiles_dir = results / "tiles"
    tile_files = sorted(tiles_dir.glob("*.npy")) if tiles_dir.is_dir() else []
    tile_files = sorted_by_plate(tile_files, plates)
    if not tile_files:
        return blocks(missing("site tiles", tiles_dir / "<plate>.npy"))

    # One example site per treatment: the first site of the treatment, plate by plate.  Controls
    # first, so the reader has a reference to compare the treatments against.
    examples: dict[str, tuple[Path, int, str]] = {}
    notes = []
    for npy in tile_files:
        index_path = npy.with_suffix(".sites.parquet")
        if not index_path.is_file():
            notes.append(missing(f"tile index of plate {npy.stem}", index_path))
            continue
        try:
            sites = read_parquet(index_path)
        except Exception as exc:
            notes.append(error_note(index_path, exc))
            continue
        if "Metadata_Treatment" not in sites.columns:
            notes.append(note(code(index_path), " has no ", code("Metadata_Treatment"), " column."))
            continue
        pert = sites.get("Metadata_pert_type", pd.Series("trt", index=sites.index)).astype(str)
        for position, (treatment, kind) in enumerate(zip(sites["Metadata_Treatment"].astype(str), pert)):
            examples.setdefault(treatment, (npy, position, kind))
    if not examples:
        return blocks(notes) or blocks(missing("site tiles", tiles_dir / "<plate>.npy"))

    chosen = sorted(examples.items(), key=lambda kv: (_CONTROL_RANK.get(kv[1][2], 2), kv[0]))
    shown = chosen[:example_treatments]
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
            tile = thumbnail(to_unit(array[position]))
        except Exception as exc:
            notes.append(error_note(npy, exc))
            continue
        if first_tile is None:
            first_tile = (treatment, npy.stem, tile)
        cards.append(
            TileCard(
                array_to_png(composite(tile)),
                f"example site of {treatment}",
                treatment,
                kind if kind in _CONTROL_RANK else "",
            )
        )
    n_channels = first_tile[2].shape[0] if first_tile else 0
    names = channels if len(channels) == n_channels else [f"channel {i + 1}" for i in range(n_channels)]
    colour_key = ", ".join(f"{c} = {n}" for c, n in zip(("blue", "green", "red"), names[:3]))
    words = (
        "One site per treatment (the first one imaged), illumination-corrected tile as the model "
        f"sees it, contrast-stretched per channel: {colour_key}."
    )
    if len(chosen) > len(shown):
        words += f" Showing {len(shown)} of {len(chosen)} treatments (controls first, then by name)."
    parts = [TileGrid(tuple(cards)), caption(words)]
    if first_tile is not None and n_channels > 1:
        treatment, plate, tile = first_tile
        strip = np.concatenate(
            [np.pad(stretch(ch), ((0, 0), (0, 4)), constant_values=1.0) for ch in tile], axis=1
        )[:, :-4]
        parts.append(
            Figure(
                array_to_png(strip),
                f"all channels of one site of {treatment}",
                text(
                    "All channels of the same site of ",
                    bold(treatment),
                    f" (plate {plate}), left to right: {', '.join(names)}.",
                ),
            )
        )
    return blocks(notes, parts)


def cell_count_blocks(results: Path, plates: list[str]):
    classic_dir = results / "features" / "classic"
    files = sorted(classic_dir.glob("*.parquet")) if classic_dir.is_dir() else []
    files = sorted_by_plate(files, plates)
    if not files:
        return blocks(missing("classic features with cell counts", classic_dir / "<plate>.parquet"))
    import pyarrow.parquet as pq

    notes, figures = [], []
    for path in files:
        try:
            column = count_column(pq.read_schema(path).names)
            if column is None:
                notes.append(
                    note(
                        "No ",
                        code("Count_*"),
                        " column in ",
                        code(path.relative_to(results)),
                        "; cell counts not shown for this plate.",
                    )
                )
                continue
            # Read only the columns needed: classic feature tables have thousands of columns.
            df = read_parquet(path, ["Metadata_Well", column])
        except Exception as exc:
            notes.append(error_note(path, exc))
            continue
        figure = _plate_heatmap(df, column, path.stem)
        if isinstance(figure, Figure):
            figures.append(figure)
        else:
            notes.append(figure)
    return blocks(notes, Gallery(tuple(figures)) if figures else None)


def _plate_heatmap(df: pd.DataFrame, column: str, plate: str):
    per_well = df.groupby("Metadata_Well")[column].sum()
    n_sites = df.groupby("Metadata_Well").size()
    positions = {w: well_position(w) for w in per_well.index}
    if any(p is None for p in positions.values()):
        bad = [w for w, p in positions.items() if p is None][:3]
        return note(
            f"Plate {plate}: well names such as {bad} are not A01/r01c01-style, so no plate map; "
            f"summary only: median {per_well.median():.0f} cells per well."
        )
    rows, cols = plate_shape(max(p[0] for p in positions.values()), max(p[1] for p in positions.values()))
    grid = np.full((rows, cols), np.nan)
    for well, (r, c) in positions.items():
        grid[r, c] = per_well[well]
    # Sized so two 96-well plates fit side by side; 384/1536-well plates get wider.
    width = min(11.0, 1.4 + 0.27 * cols)
    fig, ax = plt().subplots(figsize=(width, 0.8 + 0.26 * rows))
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", aspect="equal")
    ax.set_facecolor("#e6e6e6")
    step = 1 if cols <= 24 else 2
    ax.set_xticks(range(0, cols, step), [str(c + 1) for c in range(0, cols, step)], fontsize=7)
    ax.set_yticks(range(0, rows, step), [row_label(r) for r in range(0, rows, step)], fontsize=7)
    ax.set_title(f"Plate {plate}: {column} per well", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.02, label="cells per well")
    words = text(
        "Cells per well on plate ",
        bold(plate),
        ": ",
        code(column),
        f" summed over the well's sites ({int(n_sites.min())}–{int(n_sites.max())} sites per well); "
        f"grey = no data. Median {per_well.median():.0f}, range {per_well.min():.0f}–{per_well.max():.0f}. "
        "Edge effects or empty wells show up as patterns here.",
    )
    return Figure(fig_to_png(fig), f"cell counts plate {plate}", words)
