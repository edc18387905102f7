"""Single-cell path: nuclei from the DNA channel (or centres shipped with the data) and single-cell crops.

Stage ``cells`` (DESIGN.md §2): manifest + illumination functions -> ``cells/<plate>.npy`` (N_cells, C, s, s)
float16 in [0, 1] + ``cells/<plate>.cells.parquet`` (one row per crop).

Nuclei come either from our own segmentation of the DNA channel (``segment``) or from CellProfiler
``Nuclei_Location_Center_X/Y`` tables given with a dataset (``locations``).  The segmentation is the classic
recipe, all sizes in pixels at native resolution (A549 nuclei at 20x are ~20-40 px across):

1. Gaussian smoothing (``sigma``) so the Otsu threshold sees nuclei, not pixel noise;
2. Otsu threshold (× ``threshold_factor``), holes filled, objects smaller than ``min_area`` removed;
3. distance transform, lightly smoothed, whose local maxima at least ``min_distance`` apart seed a
   watershed that splits touching nuclei (what CellProfiler's "shape" declumping does).

On the 60 real LINCS sites (central 480² crops) these defaults give a median |relative error| of nucleus
counts of ~4 % against CellProfiler and put > 99 % of CellProfiler centres inside one of our nuclei
(tests/test_cells.py asserts ≤ 15 % and ≥ 90 %).

Crops: a ``box_size`` square (full-resolution pixels) around each nucleus centre, zero-padded where it
leaves the image (cells at the border are kept, never dropped and never NaN), resized with antialiasing
to ``crop_size``.  The default crop is 96 px from a 128 px box (0.75×): the box matches DeepProfiler's
LINCS setting (box_size 128), and 96² instead of 128² stores 44 % less per cell, which matters at ~2 M
cells per 384-well plate.  Intensities go through the same robust per-plate-and-channel percentile rescale
as site tiles (``tiles.percentiles``): percentiles are estimated from a fixed-seed random sample of
corrected pixels of every site of the plate (≤ ``max_samples`` per channel in total), so memory stays
bounded by one site and the result is reproducible.

Coordinates: ``Metadata_X``/``Metadata_Y`` are in pixels of the raw (full-resolution) image, x = column,
y = row, origin at the centre of the top-left pixel (0, 0) — CellProfiler's ``Location_Center_X/Y``
frame, so given centres pass through unchanged.  With ``masks_dir`` (config ``cells.save_masks``) the
nucleus label image of every site is kept as ``<masks_dir>/<well>_s<site>.tiff`` (same frame; 0 =
background, label i = ``Metadata_ObjectNumber`` i of that site; uint16, or uint32 past 65535 nuclei;
Deflate-compressed), so other segmentations can be compared pixel by pixel.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import io
from .errors import ConfigError, DataError, ImageError
from .illumination import check_image, load_functions
from .manifest import read_manifest as manifest_rows

log = logging.getLogger(__name__)

# Columns every cells table starts with (CONTRACTS.md); the site's other Metadata_* columns follow.
CELL_ID_COLUMNS = (
    "Metadata_Plate",
    "Metadata_Well",
    "Metadata_Site",
    "Metadata_ObjectNumber",
    "Metadata_X",
    "Metadata_Y",
)
SITE_KEY = ("Metadata_Plate", "Metadata_Well", "Metadata_Site")


# ----------------------------------------------------------------------------- options


@dataclass(frozen=True)
class NucleiOptions:
    """How nuclei are found; sizes in pixels at native resolution."""

    method: str = "segment"  # "segment" (our DNA segmentation) or "locations" (given centres)
    channel: str = "DNA"
    sigma: float = 2.0
    threshold_factor: float = 1.0
    min_area: int = 80
    min_distance: int = 10
    locations_root: str | None = None
    locations_pattern: str = "{plate}/{well}-{site}-Nuclei.csv"
    x_column: str = "Nuclei_Location_Center_X"
    y_column: str = "Nuclei_Location_Center_Y"

    def __post_init__(self) -> None:
        if self.method not in ("segment", "locations"):
            raise ConfigError(f"cells.nuclei must be 'segment' or 'locations', got {self.method!r}")
        if self.method == "locations" and not self.locations_root:
            raise ConfigError("cells.nuclei is 'locations' but cells.locations_root is not set")
        if self.sigma < 0 or self.min_area < 0 or self.min_distance < 1 or self.threshold_factor <= 0:
            raise ConfigError(
                "nucleus segmentation needs sigma >= 0, min_area >= 0, min_distance >= 1, threshold_factor > 0; "
                f"got sigma={self.sigma}, min_area={self.min_area}, min_distance={self.min_distance}, "
                f"threshold_factor={self.threshold_factor}"
            )

    def locations_path(self, plate: str, well: str, site: int) -> Path:
        try:
            relative = self.locations_pattern.format(plate=plate, well=well, site=site)
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(
                f"cells.locations_pattern {self.locations_pattern!r} may only use {{plate}}, {{well}}, {{site}}: {exc}"
            ) from exc
        return Path(self.locations_root) / relative


# ----------------------------------------------------------------------------- reading sites


def manifest_channels(manifest: pd.DataFrame, channels: Sequence[str] | None = None) -> list[str]:
    """Channels to use, in canonical order: the given list, or the manifest's ``Path_<Channel>`` columns."""
    available = [c[len("Path_") :] for c in manifest.columns if c.startswith("Path_")]
    if not channels:
        channels = available
    missing = [c for c in channels if f"Path_{c}" not in manifest.columns]
    if missing or not channels:
        raise DataError(
            f"manifest has no Path_ column for channel(s) {missing or list(channels)}; it has {available}"
        )
    return list(channels)


def read_manifest(path: str | os.PathLike, plate: str) -> pd.DataFrame:
    """The manifest rows of one plate, in (well, site) order."""
    rows = manifest_rows(path, str(plate))
    return rows.sort_values(["Metadata_Well", "Metadata_Site"]).reset_index(drop=True)


def load_illumination(
    illum_dir: str | os.PathLike | None, channels: Sequence[str]
) -> dict[str, np.ndarray] | None:
    """Per-channel illumination functions from ``illum/<plate>/<Channel>.npy``; None when correction is off."""
    return None if illum_dir is None else load_functions(illum_dir, channels)


def load_site(
    row: pd.Series | dict, channels: Sequence[str], illumination: dict[str, np.ndarray] | None = None
) -> np.ndarray:
    """One site as (C, H, W) float32 in CellProfiler's scale: raw / dtype max, divided by the illumination function.

    Integer images are divided by their type's maximum (255, 65535) so intensities read like CellProfiler's
    0-1 scaled values whatever the bit depth; float images are used as they are.
    """
    planes = []
    for channel in channels:
        path = row[f"Path_{channel}"]
        image = io.read_image(path)
        check_image(image, path)  # NaN/inf in a float image would poison every statistic downstream
        scale = float(np.iinfo(image.dtype).max) if image.dtype.kind in "ui" else 1.0
        plane = image.astype(np.float32) / np.float32(scale)
        if illumination is not None:
            function = illumination[channel]
            if function.shape != plane.shape:
                raise ImageError(
                    f"image {path} has shape {plane.shape} but the {channel} illumination function has {function.shape}"
                )
            plane /= function
        if planes and plane.shape != planes[0].shape:
            raise ImageError(
                f"image {path} has shape {plane.shape}; the site's first channel has {planes[0].shape}"
            )
        planes.append(plane)
    return np.stack(planes)


# ----------------------------------------------------------------------------- nuclei


def segment_nuclei(
    dna: np.ndarray,
    *,
    sigma: float = 2.0,
    threshold_factor: float = 1.0,
    min_area: int = 80,
    min_distance: int = 10,
    centres_xy: np.ndarray | None = None,
) -> np.ndarray:
    """Label nuclei in a DNA image (int32, 0 = background).

    With ``centres_xy`` (N, 2) (given centres, x = column), those centres seed the watershed instead of the
    distance-transform maxima, so there is exactly one object per given centre (label i+1 for centre i); a
    centre falling in thresholded background still gets a small disc so it is never lost.
    """
    from scipy import ndimage as ndi
    from skimage import feature, filters, morphology, segmentation

    dna = np.asarray(dna, dtype=np.float32)
    smoothed = filters.gaussian(dna, sigma=sigma, preserve_range=True) if sigma > 0 else dna
    if float(smoothed.max()) == float(smoothed.min()):
        foreground = np.zeros(dna.shape, bool)  # a blank image has no nuclei, not an Otsu error
    else:
        foreground = smoothed > filters.threshold_otsu(smoothed) * threshold_factor
    foreground = ndi.binary_fill_holes(foreground)
    if min_area > 0:
        foreground = morphology.remove_small_objects(foreground, max_size=min_area)

    markers = np.zeros(dna.shape, np.int32)
    if centres_xy is not None:
        centres_xy = np.asarray(centres_xy, dtype=float).reshape(-1, 2)
        rows = np.clip(np.round(centres_xy[:, 1]).astype(int), 0, dna.shape[0] - 1)
        cols = np.clip(np.round(centres_xy[:, 0]).astype(int), 0, dna.shape[1] - 1)
        markers[rows, cols] = np.arange(1, len(centres_xy) + 1)
        # A disc of radius 3 around every given centre joins the mask, so no centre ends up without an object.
        seeds = ndi.binary_dilation(markers > 0, structure=morphology.disk(3))
        foreground = foreground | seeds
        distance = None
    else:
        distance = ndi.distance_transform_edt(foreground)
        # Smoothing merges the twin maxima of elongated nuclei, the main cause of over-splitting.
        distance = filters.gaussian(distance, sigma=1.0, preserve_range=True)
        components, _ = ndi.label(foreground)
        peaks = feature.peak_local_max(
            distance, min_distance=int(min_distance), labels=components, exclude_border=False
        )
        # Number seeds in raster order (peak_local_max returns them by height), so object numbers are stable.
        peaks = peaks[np.lexsort((peaks[:, 1], peaks[:, 0]))]
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    if distance is None:
        distance = ndi.distance_transform_edt(foreground)
    labels = segmentation.watershed(-distance, markers, mask=foreground)
    return labels.astype(np.int32)


def read_locations(path: str | os.PathLike, x_column: str, y_column: str) -> np.ndarray:
    """Nucleus centres (N, 2) as (x, y) pixels from a CellProfiler-style CSV."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"nucleus locations file not found: {path}")
    table = pd.read_csv(path)
    missing = [c for c in (x_column, y_column) if c not in table.columns]
    if missing:
        raise DataError(f"nucleus locations {path} lack column(s) {missing}; columns: {list(table.columns)}")
    centres = table[[x_column, y_column]].to_numpy(dtype=float)
    bad = ~np.isfinite(centres).all(axis=1)
    if bad.any():
        raise DataError(f"nucleus locations {path} row {int(np.argmax(bad))} has a non-finite centre")
    return centres


def site_nuclei(row: pd.Series | dict, image: np.ndarray, channels: Sequence[str], options: NucleiOptions):
    """(labels, centres_xy) of one site: segmented nuclei, or given centres used as watershed seeds."""
    if options.channel not in channels:
        raise ConfigError(
            f"nucleus channel {options.channel!r} (cells.nuclei_channel) is not among channels {list(channels)}"
        )
    dna = image[list(channels).index(options.channel)]
    kwargs = dict(
        sigma=options.sigma,
        threshold_factor=options.threshold_factor,
        min_area=options.min_area,
        min_distance=options.min_distance,
    )
    if options.method == "locations":
        path = options.locations_path(row["Metadata_Plate"], row["Metadata_Well"], int(row["Metadata_Site"]))
        centres = read_locations(path, options.x_column, options.y_column)
        labels = segment_nuclei(dna, centres_xy=centres, **kwargs)
        return labels, centres
    labels = segment_nuclei(dna, **kwargs)
    return labels, label_centres(labels)


def label_centres(labels: np.ndarray) -> np.ndarray:
    """Centroids (N, 2) as (x, y) of labels 1..N (vectorised; empty labels give NaN)."""
    n = int(labels.max())
    flat = labels.ravel()
    rows, cols = np.indices(labels.shape)
    count = np.bincount(flat, minlength=n + 1)[1:].astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        x = np.bincount(flat, cols.ravel(), minlength=n + 1)[1:] / count
        y = np.bincount(flat, rows.ravel(), minlength=n + 1)[1:] / count
    return np.stack([x, y], axis=1)


# ----------------------------------------------------------------------------- crops


def crop_cells(
    image: np.ndarray, centres_xy: np.ndarray, *, box_size: int = 128, crop_size: int = 96, chunk: int = 128
) -> Iterator[np.ndarray]:
    """Yield (n, C, crop_size, crop_size) float32 crops around ``centres_xy``, ``chunk`` cells at a time.

    The image is zero-padded by half a box on every side, so a box leaving the image is filled with 0
    instead of being shifted or dropped.  Resizing uses antialiased bilinear interpolation (torch), which
    averages like an area filter when shrinking.
    """
    import torch
    import torch.nn.functional as F

    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3:
        raise ValueError(f"crop_cells expects (C, H, W), got shape {image.shape}")
    half = box_size // 2
    padded = np.pad(image, ((0, 0), (half, half), (half, half)), mode="constant", constant_values=0)
    centres_xy = np.asarray(centres_xy, dtype=float).reshape(-1, 2)
    # Box [c - half, c - half + box) in image coordinates = [c, c + box) in padded coordinates.
    left = np.floor(centres_xy[:, 0]).astype(int)
    top = np.floor(centres_xy[:, 1]).astype(int)
    for start in range(0, len(centres_xy), chunk):
        boxes = np.stack(
            [
                padded[:, t : t + box_size, x : x + box_size]
                for t, x in zip(top[start : start + chunk], left[start : start + chunk])
            ]
        )
        if crop_size != box_size:
            with torch.no_grad():
                boxes = F.interpolate(
                    torch.from_numpy(boxes),
                    size=(crop_size, crop_size),
                    mode="bilinear",
                    antialias=True,
                    align_corners=False,
                ).numpy()
        yield boxes


def rescale(image: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Map per-channel [low, high] to [0, 1] and clip (the tiles' robust rescale)."""
    low = np.asarray(low, np.float32)[:, None, None]
    span = np.maximum(np.asarray(high, np.float32)[:, None, None] - low, np.float32(1e-12))
    return np.clip((image - low) / span, 0.0, 1.0)


# ----------------------------------------------------------------------------- plate driver


def map_sites(function: Callable, rows: Sequence[dict], workers: int) -> Iterator:
    """``function(row)`` for every site, in order, in ``workers`` processes (inline when 1).

    Processes, not threads: the per-site numpy/scikit-image work mostly holds the GIL.
    """
    if workers <= 1 or len(rows) <= 1:
        yield from map(function, rows)
        return
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(function, rows, chunksize=1)


@dataclass
class _SitePass:
    """Picklable per-site job of the first pass: nuclei centres and a pixel sample for the percentiles."""

    channels: list[str]
    illum_dir: str | None
    nuclei: NucleiOptions
    samples_per_site: int
    seed: int
    masks_dir: str | None = None
    _illumination: dict | None = field(default=None, repr=False)

    def __call__(self, row: dict):
        if self._illumination is None and self.illum_dir is not None:
            self._illumination = load_illumination(self.illum_dir, self.channels)
        image = load_site(row, self.channels, self._illumination)
        labels, centres = site_nuclei(row, image, self.channels, self.nuclei)
        if self.masks_dir is not None:
            save_mask(labels, Path(self.masks_dir) / mask_name(row["Metadata_Well"], row["Metadata_Site"]))
        # Seed from the site identity, so the sample does not depend on worker scheduling.
        key = f"{row['Metadata_Plate']}|{row['Metadata_Well']}|{row['Metadata_Site']}"
        rng = np.random.default_rng([self.seed, *key.encode()])
        flat = image.reshape(len(self.channels), -1)
        pick = rng.integers(0, flat.shape[1], size=min(self.samples_per_site, flat.shape[1]))
        return centres, flat[:, pick].copy()


def mask_name(well: str, site: int) -> str:
    """File name of a site's nucleus label image inside ``cells/<plate>.masks/``."""
    return f"{well}_s{int(site)}.tiff"


def save_mask(labels: np.ndarray, path: str | os.PathLike) -> None:
    """Write a label image atomically as a Deflate-compressed TIFF (uint16, uint32 past 65535 labels)."""
    import tifffile

    dtype = np.uint16 if int(labels.max(initial=0)) <= np.iinfo(np.uint16).max else np.uint32
    with io.atomic_path(path) as tmp:
        tifffile.imwrite(tmp, labels.astype(dtype), compression="zlib")


def _replace_folder(tmp: Path, out: Path) -> None:
    """Move a finished temporary folder onto ``out`` (a directory output appears whole or not at all)."""
    import shutil

    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def cell_rows(
    sites: pd.DataFrame, centres: Sequence[np.ndarray], metadata_columns: Sequence[str]
) -> pd.DataFrame:
    """Rows of the cells table for some sites: ``CELL_ID_COLUMNS``, then the sites' ``metadata_columns``.

    ``centres[i]`` (n_i, 2) are the (x, y) nucleus centres of ``sites`` row i; object numbers count
    1..n_i within each site.  Site columns keep the manifest's types (``Metadata_Site`` int64)."""
    counts = np.array([len(c) for c in centres], dtype=np.int64)
    site_rows = sites.iloc[np.repeat(np.arange(len(sites)), counts)].reset_index(drop=True)
    xy = np.concatenate([np.asarray(c, dtype=float).reshape(-1, 2) for c in centres] or [np.zeros((0, 2))])
    first_of_site = np.repeat(np.cumsum(counts) - counts, counts)
    table = pd.DataFrame(
        {
            "Metadata_Plate": site_rows["Metadata_Plate"],
            "Metadata_Well": site_rows["Metadata_Well"],
            "Metadata_Site": site_rows["Metadata_Site"].astype(np.int64),
            "Metadata_ObjectNumber": np.arange(len(site_rows), dtype=np.int64) - first_of_site + 1,
            "Metadata_X": xy[:, 0].astype(np.float32),
            "Metadata_Y": xy[:, 1].astype(np.float32),
        }
    )
    for column in metadata_columns:
        table[column] = site_rows[column]
    return table


def run_cells(
    manifest: str | os.PathLike,
    plate: str,
    out_npy: str | os.PathLike,
    out_table: str | os.PathLike,
    *,
    channels: Sequence[str] | None = None,
    illum_dir: str | os.PathLike | None = None,
    nuclei: NucleiOptions = NucleiOptions(),
    box_size: int = 128,
    crop_size: int = 96,
    percentiles: Sequence[float] = (0.1, 99.9),
    max_samples: int = 2_000_000,
    seed: int = 0,
    workers: int = 1,
    masks_dir: str | os.PathLike | None = None,
) -> dict:
    """Write single-cell crops of one plate and their index table; return ``{"sites", "cells", "low",
    "high"}`` (counts, and the per-channel rescale range).

    Two passes over the plate so memory is bounded by one site: pass 1 finds nuclei and samples pixels
    (-> percentiles, cell count) and streams the index table to Parquet; pass 2 rescales and streams
    crops into the ``.npy`` (:class:`io.NpyStreamWriter`: written through a file descriptor, its page
    cache bounded).  Between the passes only the nucleus centres are kept (16 bytes a cell, 8 MB for
    a 518,000-cell plate).  With ``masks_dir`` the nucleus label images of pass 1 are written there
    (see :func:`save_mask`).
    """
    from tqdm import tqdm

    if box_size < 2 or crop_size < 2:
        raise ConfigError(f"cells.box_size and cells.crop_size must be >= 2, got {box_size}, {crop_size}")
    low_pct, high_pct = (float(p) for p in percentiles)
    if not 0 <= low_pct < high_pct <= 100:
        raise ConfigError(f"tiles.percentiles must be increasing within [0, 100], got {list(percentiles)}")
    sites = read_manifest(manifest, plate)
    channels = manifest_channels(sites, channels)
    if nuclei.channel not in channels:
        raise ConfigError(
            f"nucleus channel {nuclei.channel!r} (cells.nuclei_channel) is not among channels {channels}"
        )
    rows = sites.to_dict("records")
    illum = str(illum_dir) if illum_dir is not None else None
    illumination = load_illumination(illum, channels)  # fail early, naming a missing file

    masks_tmp = None
    if masks_dir is not None:
        masks_dir = Path(masks_dir)
        masks_tmp = masks_dir.with_name(f".{masks_dir.name}.tmp")
        if masks_tmp.exists():
            import shutil

            shutil.rmtree(masks_tmp)
        masks_tmp.mkdir(parents=True)
    first = _SitePass(
        channels,
        illum,
        nuclei,
        max(1000, max_samples // len(rows)),
        seed,
        str(masks_tmp) if masks_tmp is not None else None,
    )
    metadata_columns = [c for c in sites.columns if c.startswith("Metadata_") and c not in CELL_ID_COLUMNS]
    # The table's column types from every site (one placeholder cell each), so that no chunk of it
    # decides them alone (a chunk of sites whose optional column is all empty, say).
    schema = _table_schema(cell_rows(sites, [np.zeros((1, 2))] * len(sites), metadata_columns))
    with io.ParquetStreamWriter(out_table, schema=schema) as table_writer:
        centres_per_site = []
        # the sites' pixel samples side by side in one array, as they come (no list + concatenated
        # copy: 69 MB each for a 3,456-site plate at the 1,000-pixel floor per site)
        sample = np.empty((len(channels), first.samples_per_site * len(rows)), np.float32)
        filled = 0
        for i, (centres, site_sample) in enumerate(
            tqdm(map_sites(first, rows, workers), total=len(rows), desc=f"cells {plate} nuclei")
        ):
            centres_per_site.append(centres)
            sample[:, filled : filled + site_sample.shape[1]] = site_sample
            filled += site_sample.shape[1]
            table_writer.write(cell_rows(sites.iloc[i : i + 1], [centres], metadata_columns))
        # overwrite_input: the percentiles partition the sample in place instead of a copy of it
        bounds = np.percentile(sample[:, :filled], [low_pct, high_pct], axis=1, overwrite_input=True)
        low, high = bounds.astype(np.float32)
        del sample
        log.info(
            "plate %s: rescale %s",
            plate,
            {c: (float(lo), float(hi)) for c, lo, hi in zip(channels, low, high)},
        )
        total = sum(len(c) for c in centres_per_site)
        if total == 0:
            log.warning(
                "plate %s: no nuclei found in %d sites; writing an empty crop array", plate, len(rows)
            )
        shape = (total, len(channels), crop_size, crop_size)
        with io.NpyStreamWriter(out_npy, shape, np.float16) as writer:
            for row, centres in tqdm(list(zip(rows, centres_per_site)), desc=f"cells {plate} crops"):
                if len(centres) == 0:
                    continue
                image = rescale(load_site(row, channels, illumination), low, high)
                for batch in crop_cells(image, centres, box_size=box_size, crop_size=crop_size):
                    writer.write(np.clip(batch, 0.0, 1.0).astype(np.float16))
    if masks_tmp is not None:
        _replace_folder(masks_tmp, masks_dir)
    log.info("plate %s: %d cells from %d sites -> %s", plate, total, len(rows), out_npy)
    return {"sites": len(rows), "cells": total, "low": low.tolist(), "high": high.tolist()}


def _table_schema(template: pd.DataFrame):
    import pyarrow as pa

    return pa.Schema.from_pandas(template, preserve_index=False)


# ----------------------------------------------------------------------------- CLI


def add_site_arguments(parser: argparse.ArgumentParser, *, out_help: str) -> None:
    """Arguments shared by the per-plate site commands (``cells``, ``classic``)."""
    parser.add_argument("manifest", help="manifest.parquet")
    parser.add_argument("--plate", required=True)
    parser.add_argument("--out", required=True, help=out_help)
    parser.add_argument("--illum", default=None, help="illum/<plate> folder; omit when illumination is off")
    parser.add_argument(
        "--channels",
        nargs="+",
        default=None,
        help="canonical channel order (default: the manifest's Path_ columns)",
    )
    add_nuclei_arguments(parser)


def add_nuclei_arguments(parser: argparse.ArgumentParser) -> None:
    """Nucleus options shared by ``cells`` and ``classic`` (config section ``cells``)."""
    group = parser.add_argument_group("nuclei (config section cells)")
    group.add_argument(
        "--nuclei",
        choices=("segment", "locations"),
        default="segment",
        help="segment the DNA channel, or use given centres as seeds",
    )
    group.add_argument("--nuclei-channel", default="DNA", help="channel nuclei are found in")
    group.add_argument(
        "--locations-root", default=None, help="folder of nucleus-centre CSVs (--nuclei locations)"
    )
    group.add_argument(
        "--locations-pattern",
        default="{plate}/{well}-{site}-Nuclei.csv",
        help="CSV path under --locations-root, with {plate} {well} {site}",
    )
    group.add_argument("--sigma", type=float, default=2.0, help="Gaussian smoothing (px) before thresholding")
    group.add_argument("--threshold-factor", type=float, default=1.0, help="multiplies the Otsu threshold")
    group.add_argument("--min-area", type=int, default=80, help="smallest nucleus kept (px²)")
    group.add_argument(
        "--min-distance", type=int, default=10, help="least distance between nucleus seeds (px)"
    )


def nuclei_cli_args(section: dict) -> list[str]:
    """The ``add_nuclei_arguments`` options for a config ``cells`` section, as a list of arguments.

    The rules pass it through Snakemake's ``:q``, which shell-quotes every element.
    """
    args = [
        "--nuclei",
        section["nuclei"],
        "--nuclei-channel",
        section["nuclei_channel"],
        "--locations-pattern",
        section["locations_pattern"],
        "--sigma",
        section["sigma"],
        "--threshold-factor",
        section["threshold_factor"],
        "--min-area",
        section["min_area"],
        "--min-distance",
        section["min_distance"],
    ]
    if section.get("locations_root"):
        args += ["--locations-root", section["locations_root"]]
    return [str(a) for a in args]


def nuclei_options(args: argparse.Namespace) -> NucleiOptions:
    return NucleiOptions(
        method=args.nuclei,
        channel=args.nuclei_channel,
        sigma=args.sigma,
        threshold_factor=args.threshold_factor,
        min_area=args.min_area,
        min_distance=args.min_distance,
        locations_root=args.locations_root,
        locations_pattern=args.locations_pattern,
    )


def _run(args: argparse.Namespace) -> None:
    run_cells(
        args.manifest,
        args.plate,
        args.out,
        args.table,
        channels=args.channels,
        illum_dir=args.illum,
        nuclei=nuclei_options(args),
        box_size=args.box_size,
        crop_size=args.crop_size,
        percentiles=args.percentiles,
        seed=args.seed,
        workers=args.workers,
        masks_dir=args.masks,
    )


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "cells", help="single-cell crops of one plate", description=__doc__.splitlines()[0]
    )
    add_site_arguments(parser, out_help="cells/<plate>.npy (N_cells, C, s, s) float16")
    parser.add_argument("--table", required=True, help="cells/<plate>.cells.parquet")
    parser.add_argument("--box-size", type=int, default=128, help="box around each nucleus (full-res px)")
    parser.add_argument("--crop-size", type=int, default=96, help="stored crop edge (px)")
    parser.add_argument(
        "--percentiles",
        type=float,
        nargs=2,
        default=[0.1, 99.9],
        metavar=("LOW", "HIGH"),
        help="per-plate-and-channel percentiles mapped to 0 and 1 (tiles.percentiles)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="processes for the per-site pass")
    parser.add_argument(
        "--masks",
        default=None,
        help="folder cells/<plate>.masks for the nucleus label image of every site (<well>_s<site>.tiff)",
    )
    parser.set_defaults(func=_run)
