"""Reading the run's outputs for the report: small helpers over tables and well names."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DataError


def read_parquet(path: Path, columns: Sequence[str] | None = None) -> pd.DataFrame:
    return pd.read_parquet(path, columns=list(columns) if columns is not None else None)


def feature_columns(columns: Sequence[str]) -> list[str]:
    return [c for c in columns if not str(c).startswith("Metadata_")]


# The manifest columns the report uses; the Path_<channel> columns (most of the file at millions
# of sites) are only counted from the schema.
MANIFEST_COLUMNS = (
    "Metadata_Plate",
    "Metadata_Well",
    "Metadata_Site",
    "Metadata_Treatment",
    "Metadata_pert_type",
    "Metadata_moa",
)


def read_manifest(path: Path) -> pd.DataFrame:
    """The manifest's metadata columns, strings as categoricals; channels in ``attrs["channels"]``."""
    import pyarrow.parquet as pq

    names = pq.read_schema(path).names
    if "Metadata_Plate" not in names:
        raise DataError(f"{path}: no Metadata_Plate column")
    table = pq.read_table(path, columns=[c for c in MANIFEST_COLUMNS if c in names])
    manifest = table.to_pandas(strings_to_categorical=True)
    manifest.attrs["channels"] = [c[len("Path_") :] for c in names if c.startswith("Path_")]
    return manifest


def channels_from_manifest(manifest: pd.DataFrame | None) -> list[str]:
    if manifest is None:
        return []
    if "channels" in manifest.attrs:
        return list(manifest.attrs["channels"])
    return [c[len("Path_") :] for c in manifest.columns if str(c).startswith("Path_")]


_WELL_A01 = re.compile(r"^([A-Za-z]{1,2})0*(\d{1,3})$")
_WELL_RC = re.compile(r"^[rR]0*(\d{1,3})[cC]0*(\d{1,3})$")


def well_position(well: str) -> tuple[int, int] | None:
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


def plate_shape(max_row: int, max_col: int) -> tuple[int, int]:
    """Snap to a standard plate format so empty edge wells still show as empty."""
    for rows, cols in ((8, 12), (16, 24), (32, 48)):
        if max_row < rows and max_col < cols:
            return rows, cols
    return max_row + 1, max_col + 1


def row_label(row: int) -> str:
    label = ""
    row += 1
    while row:
        row, rem = divmod(row - 1, 26)
        label = chr(ord("A") + rem) + label
    return label


def count_column(columns: Sequence[str]) -> str | None:
    """The cell-count column of a classic feature table (Count_Nuclei preferred)."""
    if "Count_Nuclei" in columns:
        return "Count_Nuclei"
    counts = [c for c in columns if str(c).startswith("Count_")]
    return counts[0] if counts else None


def find_column(
    columns: Sequence[str], *candidates: str, contains: str | None = None, exclude: str | None = None
) -> str | None:
    for name in candidates:
        if name in columns:
            return name
    if contains is not None:
        for name in columns:
            lower = str(name).lower()
            if contains in lower and (exclude is None or exclude not in lower):
                return name
    return None


def read_activity(path: Path) -> pd.DataFrame:
    """One map_activity table, one row per treatment.

    Columns: treatment (display name; `` [id]`` appended where one name covers several ids),
    treatment_id, wells, map, p_raw, p (BH-corrected), significant.  Column names are matched
    loosely (copairs' own names, or anything containing 'average_precision', 'corrected_p'...),
    so an older evaluate output still reads.
    """
    df = read_parquet(path)
    columns = list(df.columns)
    treatment = find_column(columns, "Metadata_Treatment", contains="treatment")
    ap = find_column(columns, "mean_average_precision", contains="average_precision")
    if treatment is None or ap is None:
        raise DataError(
            f"{path}: expected a treatment column (e.g. Metadata_Treatment) and a column "
            f"containing 'average_precision'; has {columns}"
        )
    p_value = find_column(columns, "corrected_p_value", contains="corrected_p", exclude="below")
    below = find_column(columns, "below_corrected_p", contains="below")
    label = df[treatment].astype(str)
    ids = df["Metadata_TreatmentId"].astype(str) if "Metadata_TreatmentId" in columns else label
    if treatment != "Metadata_TreatmentId" and "Metadata_TreatmentId" in columns:
        # One display name can cover several treatment ids (e.g. doses of one compound): keep
        # them apart by appending the id, instead of averaging different treatments together.
        shared = ids.groupby(label).transform("nunique") > 1
        label = label.where(~shared, label + " [" + ids + "]")
    out = pd.DataFrame(
        {
            "treatment": label,
            "treatment_id": ids if "Metadata_TreatmentId" in columns else None,
            "wells": pd.to_numeric(df["n_wells"], errors="coerce") if "n_wells" in columns else np.nan,
            "map": pd.to_numeric(df[ap], errors="coerce"),
            "p_raw": pd.to_numeric(df["p_value"], errors="coerce") if "p_value" in columns else np.nan,
        }
    )
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
        .agg(
            treatment_id=("treatment_id", "first"),
            wells=("wells", "first"),
            map=("map", "mean"),
            p_raw=("p_raw", "min"),
            p=("p", "min"),
            significant=("significant", "max"),
        )
        .reset_index()
    )


def ordered_sets(found: Sequence[str], requested: Sequence[str]) -> list[str]:
    found = [str(s) for s in found]
    return [s for s in requested if s in found] + [s for s in found if s not in requested]


def discover_sets(results: Path) -> list[str]:
    """Sets to show when none are named: those with profiles or evaluations on disk."""
    found = []
    for folder in (results / "profiles", results / "eval"):
        if folder.is_dir():
            found += sorted(p.name for p in folder.iterdir() if p.is_dir())
    return list(dict.fromkeys(found))


def external_sets(results: Path, sets: Sequence[str]) -> list[str]:
    """Sets brought in as profile tables (config ``external:``): profiles or evaluations on disk but
    no per-plate ``features/<set>/``.  They have no sites, so no per-site QC and no training."""
    return [
        name
        for name in sets
        if not (results / "features" / name).is_dir()
        and ((results / "profiles" / name).is_dir() or (results / "eval" / name).is_dir())
    ]


def sorted_by_plate(files: list[Path], plates: Sequence[str], plate_of=lambda path: path.stem) -> list[Path]:
    """Files of plates in the manifest's plate order (plates it does not list last, by name)."""
    order = {p: i for i, p in enumerate(plates)}
    return sorted(files, key=lambda path: (order.get(plate_of(path), len(order)), plate_of(path)))
