"""Quality control: illumination functions, one example site per treatment, cells per well."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

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
from .contracts import illumination_qc_files, illumination_warnings_of, read_illumination_qc
from .figures import array_to_png, fig_to_png, plt
from .readers import count_column, plate_shape, read_parquet, row_label, sorted_by_plate, well_position


def _plate_folder(path: Path) -> str:
    """The plate of a file under illum/<plate>/."""
    return path.parent.name


def _capped(notes: list, limit: int, what: str) -> list:
    """At a thousand plates one broken input per plate must not become a thousand notes."""
    if len(notes) <= limit:
        return notes
    return notes[:limit] + [note(f"… and {len(notes) - limit:,} more {what}.")]


def illumination_blocks(results: Path, plates: list[str], table_rows: int, max_plates: int):
    """The illumination step's checks per plate (qc.json) as a table, then its QC pictures."""
    records, notes = [], []
    for path in sorted_by_plate(illumination_qc_files(results), plates, plate_of=_plate_folder):
        try:
            records.append(read_illumination_qc(path))
        except Exception as exc:
            notes.append(error_note(path, exc))
    parts = _capped(notes, 5, "unreadable qc.json files")
    if records:
        parts += _illumination_table(records, table_rows)
    elif not notes:
        parts.append(missing("illumination checks", results / "illum" / "<plate>" / "qc.json"))
    flagged = {r["plate"] for r in records if illumination_warnings_of(r)}
    parts += _illumination_pictures(results, plates, flagged, max_plates)
    return blocks(parts)


def _illumination_table(records: list[dict], table_rows: int) -> list:
    channels = list(dict.fromkeys(c for r in records for c in r["channels"]))
    rows = []
    for record in records:
        row = {"plate": record["plate"], "sites": record["n_sites"]}
        for channel in channels:
            entry = record["channels"].get(channel)
            ratio = np.nan if entry is None else entry["max_over_min"]
            flagged = entry is not None and (entry["warnings"] or ratio > record["max_ratio_limit"])
            row[f"max/min {channel}"] = Marked(ratio, "warn") if flagged else ratio
        row["warnings"] = "; ".join(illumination_warnings_of(record))
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
    return [Table(columns, tuple(shown), number_format="{:.2f}"), caption(words)]


def _illumination_pictures(results: Path, plates: list[str], flagged: set[str], max_plates: int) -> list:
    illum_dir = results / "illum"
    candidates = sorted(illum_dir.glob("*/qc.png")) if illum_dir.is_dir() else []
    candidates = sorted_by_plate(candidates, plates, plate_of=_plate_folder)
    total = len(candidates)
    if total > max_plates:
        # plates whose functions were flagged first (stable: then in plate order)
        candidates = sorted(candidates, key=lambda path: _plate_folder(path) not in flagged)[:max_plates]
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
        return [missing("illumination QC pictures", illum_dir / "<plate>" / "qc.png")]
    parts = [Gallery(tuple(pictures))]
    if total > len(candidates):
        parts.append(
            caption(
                f"Pictures of {len(candidates)} of {total:,} plates, plates with illumination warnings "
                "first (report.qc_plates)."
            )
        )
    return parts


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
            columns = pq.read_schema(index_path).names
            if "Metadata_Treatment" not in columns:
                notes.append(note(code(index_path), " has no ", code("Metadata_Treatment"), " column."))
                continue
            sites = read_parquet(
                index_path, [c for c in ("Metadata_Treatment", "Metadata_pert_type") if c in columns]
            )
        except Exception as exc:
            notes.append(error_note(index_path, exc))
            continue
        # the first site of each treatment on this plate (row number = position in the tile file)
        first = sites.astype(str).drop_duplicates("Metadata_Treatment")
        kinds = first["Metadata_pert_type"] if "Metadata_pert_type" in first.columns else ["trt"] * len(first)
        for position, treatment, kind in zip(first.index, first["Metadata_Treatment"], kinds):
            examples.setdefault(treatment, (npy, int(position), kind))
    notes = _capped(notes, 5, "plates without a readable tile index")
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


def cell_count_blocks(results: Path, plates: list[str], max_plates: int):
    classic_dir = results / "features" / "classic"
    files = sorted(classic_dir.glob("*.parquet")) if classic_dir.is_dir() else []
    files = sorted_by_plate(files, plates)
    if not files:
        return blocks(missing("classic features with cell counts", classic_dir / "<plate>.parquet"))
    counts: dict[str, tuple[str, pd.Series, pd.Series]] = {}  # plate -> (column, cells, sites per well)
    without, errors = [], []
    for path in files:
        try:
            column = count_column(pq.read_schema(path).names)
            if column is None:
                without.append(path.stem)
                continue
            # Read only the columns needed: classic feature tables have thousands of columns.
            df = read_parquet(path, ["Metadata_Well", column])
        except Exception as exc:
            errors.append(error_note(path, exc))
            continue
        by_well = df.groupby("Metadata_Well", observed=True)[column]
        counts[path.stem] = (column, by_well.sum(), by_well.size())
    notes = _capped(errors, 5, "unreadable classic feature tables")
    if without:
        listed = ", ".join(without[:5]) + (f" and {len(without) - 5:,} more" if len(without) > 5 else "")
        where = (
            code(f"features/classic/{without[0]}.parquet") if len(without) == 1 else "the tables of plates"
        )
        notes.append(
            note(
                "No ", code("Count_*"), " column in ", where, f" ({listed}); cell counts not shown for them."
            )
        )
    shown = list(counts)
    parts = []
    if len(counts) > max_plates:
        # Too many plates for a map each: map the plates whose median cell count is furthest
        # from the typical plate's (empty or overgrown plates), and show every plate as a dot.
        medians = pd.Series({plate: cells.median() for plate, (_, cells, _) in counts.items()})
        typical = medians.median()
        distance = (np.log((medians + 1) / (typical + 1))).abs()
        chosen = set(distance.sort_values(ascending=False, kind="stable").index[:max_plates])
        shown = [plate for plate in counts if plate in chosen]
        parts.append(_plate_medians_figure(medians, chosen, typical))
    figures = []
    for plate in shown:
        column, cells, sites = counts[plate]
        figure = _plate_heatmap(cells, sites, column, plate)
        (figures if isinstance(figure, Figure) else notes).append(figure)
    return blocks(notes, parts, Gallery(tuple(figures)) if figures else None)


def _plate_medians_figure(medians: pd.Series, chosen: set[str], typical: float) -> Figure:
    fig, ax = plt().subplots(figsize=(9.0, 2.8))
    x = np.arange(len(medians))
    marked = medians.index.isin(list(chosen))
    ax.scatter(x[~marked], medians[~marked], s=6, color="#4c78a8", label="plate")
    ax.scatter(x[marked], medians[marked], s=14, color="#d64545", label="mapped below")
    ax.axhline(typical, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("plate (manifest order)", fontsize=8)
    ax.set_ylabel("median cells per well", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    return Figure(
        fig_to_png(fig),
        "median cells per well of every plate",
        text(
            f"Median cells per well of all {len(medians):,} plates (dotted: the median plate, "
            f"{typical:.0f}); the {len(chosen)} plates furthest from it are mapped below (report.qc_plates)."
        ),
    )


def _plate_heatmap(per_well: pd.Series, n_sites: pd.Series, column: str, plate: str):
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
