"""Training data: memory-mapped site tiles (or cell crops) paired with their site's regression
target and treatment label, split into training and validation by plate or by treatment.

Targets: a per-site table (Metadata_Plate/Well/Site + numeric columns), z-scored per feature with
statistics of the training split only (NaN → 0).  Validation is split by plate or by treatment,
never by site within a well (sites of a well are near-replicates; splitting them leaks).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import ConfigError, DataError
from .train_config import TrainConfig

log = logging.getLogger(__name__)

SITE_KEYS = ["Metadata_Plate", "Metadata_Well", "Metadata_Site"]
# Columns that name an item's class for the cross-entropy head, in order of preference.
LABEL_COLUMNS = ("Metadata_TreatmentId", "Metadata_Treatment")


def image_to_float(array: np.ndarray) -> np.ndarray:
    """Tile/crop storage type → float32 in [0, 1] (ints are scaled from their full range)."""
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535.0
    if array.dtype.kind == "f":
        return array.astype(np.float32)
    raise DataError(f"image array of unsupported dtype {array.dtype}; expected float16/32, uint8 or uint16")


Folders = str | Path | Sequence[str | Path]


def plate_file(folders: Folders, plate: str, suffix: str) -> Path:
    """``<folder>/<plate><suffix>`` in the one folder that has it (training datasets each bring their own
    tiles/targets folders); the first folder's path when none has it (so the error names a path); an
    error when several have it (plate names must be unique across the datasets trained on)."""
    folders = [Path(folders)] if isinstance(folders, (str, Path)) else [Path(f) for f in folders]
    found = [f / f"{plate}{suffix}" for f in folders if (f / f"{plate}{suffix}").is_file()]
    if len(found) > 1:
        raise DataError(
            f"plate {plate} is in more than one folder trained on: {[str(p) for p in found]}; plate names "
            "must be unique across train.datasets"
        )
    return found[0] if found else folders[0] / f"{plate}{suffix}"


def open_images(images_dir: Folders, plate: str, level: str) -> tuple[np.ndarray, pd.DataFrame]:
    """Memory-map ``<dir>/<plate>.npy`` and read its index table (sites or cells)."""
    array_path = plate_file(images_dir, plate, ".npy")
    table_path = array_path.with_name(f"{plate}.{'sites' if level == 'site' else 'cells'}.parquet")
    for p in (array_path, table_path):
        if not p.is_file():
            raise DataError(f"missing {level} input for plate {plate}: {p}")
    array = np.load(array_path, mmap_mode="r")
    table = pd.read_parquet(table_path)
    if array.ndim != 4 or array.shape[2] != array.shape[3]:
        raise DataError(f"{array_path}: expected shape (N, C, S, S), got {array.shape}")
    if len(table) != array.shape[0]:
        raise DataError(f"{table_path} has {len(table)} rows but {array_path} holds {array.shape[0]} images")
    missing = [c for c in SITE_KEYS if c not in table.columns]
    if missing:
        raise DataError(f"{table_path}: missing column(s) {missing}")
    return array, normalise_keys(table)


def normalise_keys(df: pd.DataFrame) -> pd.DataFrame:
    """Site keys as one type everywhere (plate, well: str; site: int64), so tables join on them."""
    df = df.copy()
    df["Metadata_Plate"] = df["Metadata_Plate"].astype(str)
    df["Metadata_Well"] = df["Metadata_Well"].astype(str)
    df["Metadata_Site"] = pd.to_numeric(df["Metadata_Site"]).astype("int64")
    return df


_normalise_keys = normalise_keys  # the earlier private name, still imported by embed.py


def _read_target_files(
    plates: Sequence[str], targets: str | None, targets_dir: Folders | None
) -> tuple[pd.DataFrame, str]:
    """The raw target table and where it came from (for error messages)."""
    if targets:
        path = Path(targets)
        if not path.is_file():
            raise ConfigError(f"train.targets: file not found: {path}")
        if path.suffix.lower() == ".parquet":
            return pd.read_parquet(path), str(path)
        # csv / tsv, optionally compressed: let pandas sniff the separator
        return pd.read_csv(path, sep=None, engine="python"), str(path)
    if targets_dir:
        frames = []
        for plate in plates:
            path = plate_file(targets_dir, plate, ".parquet")
            if not path.is_file():
                raise DataError(f"regression targets for plate {plate} not found: {path}")
            frames.append(pd.read_parquet(path))
        return pd.concat(frames, ignore_index=True), str(targets_dir)
    raise ConfigError("no regression targets: give --targets-dir or set train.targets")


def read_targets(
    plates: Sequence[str], *, targets: str | None = None, targets_dir: Folders | None = None
) -> pd.DataFrame:
    """Per-site regression targets: one table (``train.targets``) or ``<targets_dir>/<plate>.parquet``."""
    table, sources = _read_target_files(plates, targets, targets_dir)
    missing = [c for c in SITE_KEYS if c not in table.columns]
    if missing:
        raise DataError(f"regression target table {sources}: missing key column(s) {missing}")
    table = normalise_keys(table)
    feature_cols = [
        c for c in table.columns if not c.startswith("Metadata_") and pd.api.types.is_numeric_dtype(table[c])
    ]
    if not feature_cols:
        raise DataError(f"regression target table {sources}: no numeric feature columns")
    dup = table.duplicated(SITE_KEYS)
    if dup.any():
        plate, well, site = table.loc[dup, SITE_KEYS].iloc[0].tolist()
        raise DataError(
            f"regression target table {sources}: duplicate site plate {plate}, well {well}, site {site}"
        )
    return table[SITE_KEYS + feature_cols]


@dataclass
class TrainingData:
    """Everything the loop needs, as plain arrays; ``images[p]`` is a memory map per plate."""

    images: dict[str, np.ndarray]
    plate_of: np.ndarray  # (N,) plate name per item
    row_of: np.ndarray  # (N,) row in that plate's array
    targets: np.ndarray  # (N, D) standardized float32
    labels: np.ndarray  # (N,) int64 class index
    is_val: np.ndarray  # (N,) bool
    classes: list[str]
    target_columns: list[str]
    target_mean: np.ndarray
    target_std: np.ndarray
    in_channels: int
    image_size: int
    split_info: dict[str, Any]


# ----------------------------------------------------------------------------- validation split


def _plate_split(items: pd.DataFrame, cfg: TrainConfig, rng: np.random.Generator) -> list[str]:
    """Validation plates: ``val_plates``, or a seeded ``val_fraction`` of the plates (at least one,
    never all)."""
    plates = sorted(items["Metadata_Plate"].unique())
    if cfg.val_plates:
        unknown = sorted(set(cfg.val_plates) - set(plates))
        if unknown:
            raise ConfigError(
                f"train.val_plates: plate(s) {unknown} are not among the training plates {plates}"
            )
        val = sorted(cfg.val_plates)
    else:
        if len(plates) < 2:
            raise ConfigError(
                f"train.split: plate needs at least 2 plates, got {plates}; use train.split: treatment "
                "or train.val_fraction: 0"
            )
        n_val = min(max(1, round(cfg.val_fraction * len(plates))), len(plates) - 1)
        val = sorted(rng.choice(plates, size=n_val, replace=False).tolist())
    if set(val) == set(plates):
        raise ConfigError(f"train.val_plates: {val} leaves no plate for training")
    return val


def _treatment_split(items: pd.DataFrame, cfg: TrainConfig, rng: np.random.Generator) -> list[str]:
    """Validation treatments: a seeded ``val_fraction`` of the non-control treatments.  Negative
    controls stay in training because every plate needs them and they are not a perturbation to
    generalise to."""
    label = items["_label"]
    negcon = set()
    if "Metadata_pert_type" in items.columns:
        negcon = set(label[items["Metadata_pert_type"].astype(str) == "negcon"])
    candidates = sorted(set(label) - negcon)
    if len(candidates) < 2:
        raise ConfigError(f"train.split: treatment needs at least 2 non-control treatments, got {candidates}")
    n_val = min(max(1, round(cfg.val_fraction * len(candidates))), len(candidates) - 1)
    return sorted(rng.choice(candidates, size=n_val, replace=False).tolist())


def choose_validation(items: pd.DataFrame, cfg: TrainConfig, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """(is_val per item, split description) for ``train.split``."""
    rng = np.random.default_rng(seed)
    if cfg.val_fraction == 0 and not cfg.val_plates:
        return np.zeros(len(items), bool), {"split": "none"}
    if cfg.split == "plate":
        val = _plate_split(items, cfg, rng)
        return items["Metadata_Plate"].isin(val).to_numpy(), {"split": "plate", "validation": val}
    val = _treatment_split(items, cfg, rng)
    return items["_label"].isin(val).to_numpy(), {"split": "treatment", "validation": val}


# ----------------------------------------------------------------------------- pairing and scaling


def _open_plates(
    images_dir: str | Path, plates: Sequence[str], level: str
) -> tuple[dict[str, np.ndarray], pd.DataFrame]:
    """Memory maps per plate and one item table (``_file``/``_row`` locate each item, ``_label``
    holds its class name)."""
    if not plates:
        raise ConfigError("train: no plates given")
    images, tables = {}, []
    for plate in plates:
        array, table = open_images(images_dir, plate, level)
        images[plate] = array
        # the file's plate name keys the array (the table's Metadata_Plate could be spelt differently)
        tables.append(table.assign(_row=np.arange(len(table)), _file=plate))
    shapes = {p: a.shape[1:] for p, a in images.items()}
    if len(set(shapes.values())) != 1:
        raise DataError(f"image arrays differ in (C, S, S) between plates: {shapes}")
    items = pd.concat(tables, ignore_index=True)
    label_col = next((c for c in LABEL_COLUMNS if c in items.columns), None)
    if label_col is None:
        raise DataError(f"{images_dir}: index tables have no Metadata_TreatmentId/Metadata_Treatment column")
    items["_label"] = items[label_col].astype(str)
    items.attrs["label_column"] = label_col
    return images, items


def _attach_targets(
    items: pd.DataFrame, target_table: pd.DataFrame, level: str, missing: str = "error"
) -> tuple[pd.DataFrame, int]:
    """(every item with its site's target row, number of items left out).

    An item without a target row is an error naming the site, or with ``missing='skip'`` (train.missing_
    targets) it is left out and counted: the teacher has no target for a site without cells.
    """
    merged = items.merge(target_table, on=SITE_KEYS, how="left", indicator=True, validate="many_to_one")
    absent = merged["_merge"] != "both"
    if not absent.any():
        return merged, 0
    rows = merged.loc[absent, SITE_KEYS].drop_duplicates()
    example = f"e.g. (plate, well, site) {rows.head(3).values.tolist()}"
    if missing != "skip":
        raise DataError(
            f"{int(absent.sum())} {level}(s) have no regression target row, {example} "
            "(train.missing_targets: skip leaves them out)"
        )
    kept = merged.loc[~absent].reset_index(drop=True)
    if kept.empty:
        raise DataError(f"no {level} has a regression target row ({example})")
    log.warning(
        "%d %s(s) without a regression target left out of training, %s", int(absent.sum()), level, example
    )
    return kept, int(absent.sum())


def _standardize_targets(
    merged: pd.DataFrame, feature_cols: list[str], is_val: np.ndarray, standardize: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(z-scored float32 targets, mean, std): statistics from the training split only, one row per
    site (cells share their site's target); constant or all-NaN features become 0.  With
    ``standardize=False`` the raw values (NaN → 0), mean 0 and std 1."""
    values = merged[feature_cols].to_numpy(dtype=np.float64)
    if not standardize:
        ones = np.ones(len(feature_cols))
        return np.nan_to_num(values, nan=0.0).astype(np.float32), ones * 0.0, ones
    train_sites = merged.loc[~is_val].drop_duplicates(SITE_KEYS)
    fit = train_sites[feature_cols].to_numpy(dtype=np.float64)
    with np.errstate(all="ignore"):
        mean = np.nanmean(fit, axis=0)
        std = np.nanstd(fit, axis=0)
    std = np.where(np.isfinite(std) & (std > 0), std, np.inf)  # constant feature → 0 after scaling
    mean = np.where(np.isfinite(mean), mean, 0.0)
    standardized = np.nan_to_num((values - mean) / std, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)
    return standardized, mean, std


def load_training_data(
    images_dir: str | Path, plates: Sequence[str], target_table: pd.DataFrame, cfg: TrainConfig, seed: int
) -> TrainingData:
    """Pair every site tile (or cell crop) with its site's target and treatment, then split."""
    images, items = _open_plates(images_dir, plates, cfg.level)
    label_col = items.attrs["label_column"]
    feature_cols = [c for c in target_table.columns if c not in SITE_KEYS]
    merged, n_without_target = _attach_targets(items, target_table, cfg.level, cfg.missing_targets)
    is_val, split_info = choose_validation(merged, cfg, seed)
    if (~is_val).sum() < 2:
        raise DataError(
            f"only {(~is_val).sum()} training item(s) after the {cfg.split} split; need at least 2"
        )
    standardized, mean, std = _standardize_targets(merged, feature_cols, is_val, cfg.standardize_targets)
    classes = sorted(merged["_label"].unique())
    class_index = {c: i for i, c in enumerate(classes)}
    channels, size = next(iter(images.values())).shape[1:3]
    split_info.update(
        n_train=int((~is_val).sum()),
        n_validation=int(is_val.sum()),
        label_column=label_col,
        n_without_target=n_without_target,
    )
    return TrainingData(
        images=images,
        plate_of=merged["_file"].to_numpy(),
        row_of=merged["_row"].to_numpy(),
        targets=standardized,
        labels=merged["_label"].map(class_index).to_numpy(dtype=np.int64),
        is_val=is_val,
        classes=classes,
        target_columns=feature_cols,
        target_mean=mean.astype(np.float32),
        target_std=np.where(np.isfinite(std), std, 0.0).astype(np.float32),
        in_channels=int(channels),
        image_size=int(size),
        split_info=split_info,
    )
