"""Hand-crafted ("classic") CellProfiler-like features per site: the report baseline and the regression target.

Stage ``classic`` (DESIGN.md §2): manifest + illumination functions -> ``features/classic/<plate>.parquet``,
one row per site with all the manifest's ``Metadata_*`` columns and float32 feature columns.

Images are the full-resolution illumination-corrected channels in CellProfiler's scale (raw ÷ type maximum,
÷ illumination function; :func:`phenoprofiler_core.cells.load_site`).

Objects
    *Nuclei* come from :func:`phenoprofiler_core.cells.segment_nuclei` (config section ``cells``: our DNA
    segmentation, or the given centres as seeds).  *Cells* grow from the nuclei by a seeded watershed on the
    smoothed cell channel (``classic.cell_channel``, default AGP; the mean of the non-nucleus channels when
    absent), limited to its Otsu foreground and to ``classic.max_expansion`` px from the nucleus, the
    cheap analogue of CellProfiler's IdentifySecondaryObjects/Propagation.  *Cytoplasm* = cell minus nucleus.

Feature families (``<Compartment>_<Family>_<Measure>[_<Channel>[_<Channel2>|_<distance>]]``, CellProfiler names)
    ``Count_Nuclei``
        number of nuclei in the site (the only per-site, not per-cell, feature).
    ``{Nuclei,Cells}_AreaShape_{Area,Perimeter,Eccentricity,Solidity,FormFactor,Extent,MajorAxisLength,MinorAxisLength}``
        scikit-image ``regionprops``; FormFactor = 4π·Area/Perimeter² (1 for a disc).
    ``{Nuclei,Cytoplasm,Cells}_Intensity_{Mean,Std,Integrated,LowerQuartile,Median,UpperQuartile}Intensity_<ch>``
        per channel and compartment (quartiles: lower-nearest rank within the object).
    ``Cells_Texture_{AngularSecondMoment,Contrast,Correlation,Entropy,InverseDifferenceMoment}_<ch>_<d>``
        Haralick statistics of the grey-level co-occurrence matrix of each whole cell, ``classic.texture_levels``
        grey levels, pixel distance d = ``classic.texture_distance``, symmetric, averaged over 4 directions
        (0°, 45°, 90°, 135°).  Grey levels are set per image and channel (0 … the 99.9th percentile inside cells),
        so texture describes pattern rather than brightness.
    ``Cells_Texture_GradientMean_<ch>``
        mean Sobel gradient magnitude in the cell: a cheap edge/granularity measure.
    ``Cells_Correlation_Correlation_<ch1>_<ch2>``
        Pearson correlation of the two channels' pixels within each cell, for every channel pair.

Aggregation: each feature is the **median over the site's cells** (NaN-ignoring; pycytominer's default
aggregation is also the median, robust to mis-segmented cells).  A site without nuclei gets Count_Nuclei 0 and
NaN for the per-cell features, with a warning: there is no honest value to put there.

Why not cp_measure (PyPI ``cp-measure`` 0.3.0, CellProfiler's own measurement code): it depends on
``centrosome`` 1.3.4, which requires ``pillow<12`` and would downgrade the project's pillow 13; it also
measures object by object.  Here per-object statistics, co-occurrence matrices and correlations are computed
for all objects of a site at once with ``np.bincount`` over the label image (scikit-image's ``graycomatrix``
takes no mask, so it cannot do per-object GLCMs without one call per object and channel).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from . import io
from .cells import (
    NucleiOptions,
    add_site_arguments,
    load_illumination,
    load_site,
    manifest_channels,
    map_sites,
    nuclei_options,
    read_manifest,
    site_nuclei,
)
from .errors import ConfigError

log = logging.getLogger(__name__)

SHAPE_MEASURES = (
    "Area",
    "Perimeter",
    "Eccentricity",
    "Solidity",
    "FormFactor",
    "Extent",
    "MajorAxisLength",
    "MinorAxisLength",
)
INTENSITY_MEASURES = (
    "MeanIntensity",
    "StdIntensity",
    "IntegratedIntensity",
    "LowerQuartileIntensity",
    "MedianIntensity",
    "UpperQuartileIntensity",
)
TEXTURE_MEASURES = ("AngularSecondMoment", "Contrast", "Correlation", "Entropy", "InverseDifferenceMoment")


@dataclass(frozen=True)
class ClassicOptions:
    cell_channel: str | None = "AGP"
    cell_sigma: float = 2.0
    cell_threshold_factor: float = 1.0
    max_expansion: int = 40
    texture_levels: int = 8
    texture_distance: int = 3

    def __post_init__(self) -> None:
        if self.max_expansion < 0 or self.texture_levels < 2 or self.texture_distance < 1:
            raise ConfigError(
                "classic needs max_expansion >= 0, texture_levels >= 2, texture_distance >= 1; got "
                f"{self.max_expansion}, {self.texture_levels}, {self.texture_distance}"
            )


# ----------------------------------------------------------------------------- objects


def segment_cells(
    image: np.ndarray,
    channels: Sequence[str],
    nuclei: np.ndarray,
    options: ClassicOptions,
    nuclei_channel: str = "DNA",
) -> np.ndarray:
    """Cell labels (same numbers as ``nuclei``) grown from the nuclei into the cell channel's foreground."""
    from skimage import filters, segmentation

    channels = list(channels)
    if options.cell_channel and options.cell_channel in channels:
        cyto = image[channels.index(options.cell_channel)]
    else:
        others = [i for i, c in enumerate(channels) if c != nuclei_channel] or list(range(len(channels)))
        cyto = image[others].mean(axis=0)
    smoothed = (
        filters.gaussian(cyto, sigma=options.cell_sigma, preserve_range=True)
        if options.cell_sigma > 0
        else cyto
    )
    if float(smoothed.max()) > float(smoothed.min()):
        # Three-class Otsu, lower threshold (CellProfiler's "three classes, middle to foreground"): the cell
        # channel has dim cytoplasm between dark background and bright perinuclear signal, and two-class Otsu
        # puts the cytoplasm into background.
        foreground = (
            smoothed > filters.threshold_multiotsu(smoothed, classes=3)[0] * options.cell_threshold_factor
        )
    else:
        foreground = np.zeros(cyto.shape, bool)
    reach = segmentation.expand_labels(nuclei, distance=options.max_expansion) > 0
    mask = (foreground & reach) | (nuclei > 0)
    # Flooding the inverted intensity puts borders between touching cells in the dim valleys between them.
    return segmentation.watershed(-smoothed, markers=nuclei, mask=mask).astype(np.int32)


# ----------------------------------------------------------------------------- per-object measurements


def _intensity_stats(labels: np.ndarray, image: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Per-label intensity statistics for every channel: {measure: (n, C)} for labels 1..n."""
    flat = labels.ravel()
    inside = flat > 0
    index = flat[inside]
    count = np.bincount(index, minlength=n + 1)[1:].astype(np.float64)
    has = count > 0
    starts = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
    last = np.maximum(count - 1, 0)
    out = {m: np.full((n, len(image)), np.nan) for m in INTENSITY_MEASURES}
    for c, plane in enumerate(image):
        values = plane.ravel()[inside].astype(np.float64)
        total = np.bincount(index, values, minlength=n + 1)[1:]
        squares = np.bincount(index, values * values, minlength=n + 1)[1:]
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = total / count
            out["MeanIntensity"][:, c] = mean
            out["StdIntensity"][:, c] = np.sqrt(np.maximum(squares / count - mean * mean, 0))
        out["IntegratedIntensity"][:, c] = np.where(has, total, np.nan)
        # Sorting by (label, value) puts each object's values in one ascending run, so quantiles are lookups.
        # One argsort of label + value scaled into [0, 0.5) does it ~10x faster than np.lexsort.
        low, span = (float(values.min()), float(np.ptp(values))) if values.size else (0.0, 0.0)
        key = index.astype(np.float64)
        if span > 0:
            key += (values - low) * (0.5 / span)
        ordered = values[np.argsort(key)]
        for name, q in (
            ("LowerQuartileIntensity", 0.25),
            ("MedianIntensity", 0.5),
            ("UpperQuartileIntensity", 0.75),
        ):
            position = starts + np.floor(q * last).astype(np.int64)
            out[name][has, c] = ordered[position[has]]
    return out


def _shape(labels: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Per-label shape measures from scikit-image ``regionprops`` (FormFactor = 4π·area/perimeter²)."""
    from skimage.measure import regionprops_table

    # Vectorising area and the inertia ellipse with np.bincount saved only ~10 %: the per-object convex
    # hull behind Solidity dominates, so regionprops does it all.
    props = regionprops_table(
        labels,
        properties=(
            "label",
            "area",
            "perimeter",
            "eccentricity",
            "solidity",
            "extent",
            "axis_major_length",
            "axis_minor_length",
        ),
    )
    out = {m: np.full(n, np.nan) for m in SHAPE_MEASURES}
    index = props["label"] - 1
    for measure, prop in (
        ("Area", "area"),
        ("Perimeter", "perimeter"),
        ("Eccentricity", "eccentricity"),
        ("Solidity", "solidity"),
        ("Extent", "extent"),
        ("MajorAxisLength", "axis_major_length"),
        ("MinorAxisLength", "axis_minor_length"),
    ):
        out[measure][index] = props[prop]
    with np.errstate(invalid="ignore", divide="ignore"):
        out["FormFactor"] = 4 * np.pi * out["Area"] / out["Perimeter"] ** 2
    return out


def quantize(plane: np.ndarray, mask: np.ndarray, levels: int) -> np.ndarray:
    """Grey levels 0..levels-1 spanning 0 … the 99.9th percentile of ``plane`` inside ``mask``."""
    top = float(np.percentile(plane[mask], 99.9)) if mask.any() else 0.0
    if top <= 0:
        top = float(plane.max()) or 1.0
    return np.clip((plane / top * levels).astype(np.int64), 0, levels - 1)


def _texture(
    labels: np.ndarray, plane: np.ndarray, n: int, levels: int, distance: int
) -> dict[str, np.ndarray]:
    """Haralick features of each object's symmetric GLCM (4 directions pooled), all objects in one pass."""
    grey = quantize(plane, labels > 0, levels)
    h, w = labels.shape
    d = distance
    counts = np.zeros((n + 1) * levels * levels, np.float64)
    for dy, dx in ((0, d), (d, 0), (d, d), (d, -d)):
        # Pixel a at (y, x), pixel b at (y + dy, x + dx); pairs count only inside one object.
        ys_a, ys_b = slice(0, h - dy), slice(dy, h)
        xs_a, xs_b = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
        la, lb = labels[ys_a, xs_a], labels[ys_b, xs_b]
        same = (la == lb) & (la > 0)
        code = (la[same].astype(np.int64) * levels + grey[ys_a, xs_a][same]) * levels + grey[ys_b, xs_b][same]
        counts += np.bincount(code, minlength=counts.size)
    glcm = counts.reshape(n + 1, levels, levels)[1:]
    glcm = glcm + glcm.transpose(0, 2, 1)
    total = glcm.sum(axis=(1, 2), keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = glcm / total  # objects without pairs (tiny) give NaN rows
        i = np.arange(levels, dtype=np.float64)[None, :, None]
        j = np.arange(levels, dtype=np.float64)[None, None, :]
        mean_i = (p * i).sum(axis=(1, 2))
        mean_j = (p * j).sum(axis=(1, 2))
        sd_i = np.sqrt((p * (i - mean_i[:, None, None]) ** 2).sum(axis=(1, 2)))
        sd_j = np.sqrt((p * (j - mean_j[:, None, None]) ** 2).sum(axis=(1, 2)))
        covariance = (p * (i - mean_i[:, None, None]) * (j - mean_j[:, None, None])).sum(axis=(1, 2))
        logp = np.where(p > 0, np.log2(np.where(p > 0, p, 1)), 0.0)
        return {
            "AngularSecondMoment": (p * p).sum(axis=(1, 2)),
            "Contrast": (p * (i - j) ** 2).sum(axis=(1, 2)),
            "Correlation": covariance / (sd_i * sd_j),
            "Entropy": -(p * logp).sum(axis=(1, 2)),
            "InverseDifferenceMoment": (p / (1 + (i - j) ** 2)).sum(axis=(1, 2)),
        }


def _correlations(labels: np.ndarray, image: np.ndarray, n: int) -> dict[tuple[int, int], np.ndarray]:
    """Pearson correlation between every channel pair within each object, from per-label sums."""
    flat = labels.ravel()
    inside = flat > 0
    index = flat[inside]
    count = np.bincount(index, minlength=n + 1)[1:].astype(np.float64)
    values = [plane.ravel()[inside].astype(np.float64) for plane in image]
    sums = [np.bincount(index, v, minlength=n + 1)[1:] for v in values]
    squares = [np.bincount(index, v * v, minlength=n + 1)[1:] for v in values]
    out = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for a in range(len(image)):
            for b in range(a + 1, len(image)):
                cross = np.bincount(index, values[a] * values[b], minlength=n + 1)[1:]
                cov = cross - sums[a] * sums[b] / count
                var_a = squares[a] - sums[a] ** 2 / count
                var_b = squares[b] - sums[b] ** 2 / count
                out[(a, b)] = cov / np.sqrt(var_a * var_b)
    return out


def object_features(
    image: np.ndarray, channels: Sequence[str], nuclei: np.ndarray, cells: np.ndarray, options: ClassicOptions
) -> pd.DataFrame:
    """One row per nucleus (label order) with every per-cell feature (module docstring)."""
    from skimage.filters import sobel

    channels = list(channels)
    n = int(nuclei.max())
    cytoplasm = np.where(nuclei > 0, 0, cells)
    columns: dict[str, np.ndarray] = {}
    for compartment, labels in (("Nuclei", nuclei), ("Cells", cells)):
        for measure, values in _shape(labels, n).items():
            columns[f"{compartment}_AreaShape_{measure}"] = values
    for compartment, labels in (("Nuclei", nuclei), ("Cytoplasm", cytoplasm), ("Cells", cells)):
        for measure, values in _intensity_stats(labels, image, n).items():
            for c, channel in enumerate(channels):
                columns[f"{compartment}_Intensity_{measure}_{channel}"] = values[:, c]
    cell_index = cells.ravel()
    cell_count = np.bincount(cell_index, minlength=n + 1)[1:].astype(np.float64)
    for c, channel in enumerate(channels):
        for measure, values in _texture(
            cells, image[c], n, options.texture_levels, options.texture_distance
        ).items():
            columns[f"Cells_Texture_{measure}_{channel}_{options.texture_distance}"] = values
        gradient = np.bincount(cell_index, sobel(image[c]).ravel(), minlength=n + 1)[1:]
        with np.errstate(invalid="ignore", divide="ignore"):
            columns[f"Cells_Texture_GradientMean_{channel}"] = gradient / cell_count
    for (a, b), values in _correlations(cells, image, n).items():
        columns[f"Cells_Correlation_Correlation_{channels[a]}_{channels[b]}"] = values
    table = pd.DataFrame(columns)
    table.insert(0, "ObjectNumber", np.arange(1, n + 1))
    # Labels without pixels (two given centres on one pixel) are not objects.
    return table[
        np.isfinite(table["Nuclei_AreaShape_Area"]) & (table["Nuclei_AreaShape_Area"] > 0)
    ].reset_index(drop=True)


def feature_names(channels: Sequence[str], options: ClassicOptions = ClassicOptions()) -> list[str]:
    """Every feature column, in output order (depends only on the channels and options)."""
    return list(_feature_names(tuple(channels), options))


@functools.lru_cache(maxsize=16)
def _feature_names(channels: tuple[str, ...], options: ClassicOptions) -> tuple[str, ...]:
    # Measured on a tiny dummy site, so the list can never drift from what object_features produces.
    rng = np.random.default_rng(0)
    image = rng.random((len(channels), 24, 24)).astype(np.float32)
    nuclei = np.zeros((24, 24), np.int32)
    nuclei[8:16, 8:16] = 1
    cells = np.zeros_like(nuclei)
    cells[4:20, 4:20] = 1
    table = object_features(image, channels, nuclei, cells, options)
    return ("Count_Nuclei", *(c for c in table.columns if c != "ObjectNumber"))


def aggregate_site(objects: pd.DataFrame, names: Sequence[str]) -> dict[str, float]:
    """Median over the site's cells of every per-cell feature, plus the nucleus count."""
    result = {"Count_Nuclei": float(len(objects))}
    per_cell = [c for c in names if c != "Count_Nuclei"]
    if len(objects):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns (e.g. one-pixel objects)
            medians = np.nanmedian(objects[per_cell].to_numpy(np.float64), axis=0)
    else:
        medians = np.full(len(per_cell), np.nan)
    result.update(zip(per_cell, medians))
    return result


def site_features(
    image: np.ndarray,
    channels: Sequence[str],
    nuclei: np.ndarray,
    options: ClassicOptions = ClassicOptions(),
    nuclei_channel: str = "DNA",
) -> tuple[dict[str, float], pd.DataFrame]:
    """(site feature dict, per-cell table) of one corrected site image (C, H, W) and its nucleus labels."""
    cells = segment_cells(image, channels, nuclei, options, nuclei_channel)
    objects = object_features(image, channels, nuclei, cells, options)
    return aggregate_site(objects, feature_names(channels, options)), objects


# ----------------------------------------------------------------------------- plate driver


@dataclass
class _ClassicSite:
    channels: list[str]
    illum_dir: str | None
    nuclei: NucleiOptions
    options: ClassicOptions
    _illumination: dict | None = field(default=None, repr=False)

    def __call__(self, row: dict) -> dict[str, float]:
        if self._illumination is None and self.illum_dir is not None:
            self._illumination = load_illumination(self.illum_dir, self.channels)
        image = load_site(row, self.channels, self._illumination)
        labels, _ = site_nuclei(row, image, self.channels, self.nuclei)
        features, _ = site_features(image, self.channels, labels, self.options, self.nuclei.channel)
        return features


def run_classic(
    manifest: str | os.PathLike,
    plate: str,
    out: str | os.PathLike,
    *,
    channels: Sequence[str] | None = None,
    illum_dir: str | os.PathLike | None = None,
    nuclei: NucleiOptions = NucleiOptions(),
    options: ClassicOptions = ClassicOptions(),
    workers: int = 1,
) -> pd.DataFrame:
    """Write ``features/classic/<plate>.parquet`` (one row per site) and return it."""
    from tqdm import tqdm

    sites = read_manifest(manifest, plate)
    channels = manifest_channels(sites, channels)
    if nuclei.channel not in channels:
        raise ConfigError(
            f"nucleus channel {nuclei.channel!r} (cells.nuclei_channel) is not among channels {channels}"
        )
    if options.cell_channel and options.cell_channel not in channels:
        log.warning(
            "classic.cell_channel %r not among %s: cells grow into the mean of the other channels",
            options.cell_channel,
            channels,
        )
    illum = str(illum_dir) if illum_dir is not None else None
    load_illumination(illum, channels)  # fail before any work when a function is missing
    names = feature_names(channels, options)
    rows = sites.to_dict("records")
    job = _ClassicSite(list(channels), illum, nuclei, options)
    records = list(tqdm(map_sites(job, rows, workers), total=len(rows), desc=f"classic {plate}"))
    features = pd.DataFrame.from_records(records, columns=names).astype(np.float32)
    empty = features["Count_Nuclei"] == 0
    for i in np.flatnonzero(empty.to_numpy()):
        log.warning(
            "plate %s well %s site %s: no nuclei; per-cell features are NaN",
            plate,
            rows[i]["Metadata_Well"],
            rows[i]["Metadata_Site"],
        )
    metadata = sites[[c for c in sites.columns if c.startswith("Metadata_")]].reset_index(drop=True)
    table = pd.concat([metadata, features], axis=1)
    io.write_parquet(table, out)
    log.info("plate %s: %d sites x %d classic features -> %s", plate, len(table), len(names), out)
    return table


# ----------------------------------------------------------------------------- CLI


def _run(args: argparse.Namespace) -> None:
    run_classic(
        args.manifest,
        args.plate,
        args.out,
        channels=args.channels,
        illum_dir=args.illum,
        nuclei=nuclei_options(args),
        options=ClassicOptions(
            cell_channel=args.cell_channel or None,
            cell_sigma=args.cell_sigma,
            cell_threshold_factor=args.cell_threshold_factor,
            max_expansion=args.max_expansion,
            texture_levels=args.texture_levels,
            texture_distance=args.texture_distance,
        ),
        workers=args.workers,
    )


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "classic",
        help="hand-crafted CellProfiler-like features per site",
        description=__doc__.splitlines()[0],
    )
    add_site_arguments(parser, out_help="features/classic/<plate>.parquet")
    parser.add_argument(
        "--cell-channel",
        default="AGP",
        help="channel cells grow into ('' = mean of the non-nucleus channels)",
    )
    parser.add_argument("--cell-sigma", type=float, default=2.0, help="smoothing (px) of the cell channel")
    parser.add_argument(
        "--cell-threshold-factor", type=float, default=1.0, help="multiplies its Otsu threshold"
    )
    parser.add_argument(
        "--max-expansion", type=int, default=40, help="farthest a cell reaches from its nucleus (px)"
    )
    parser.add_argument(
        "--texture-levels", type=int, default=8, help="grey levels of the co-occurrence matrices"
    )
    parser.add_argument(
        "--texture-distance", type=int, default=3, help="pixel distance of the co-occurrence pairs"
    )
    parser.add_argument("--workers", type=int, default=1, help="processes (sites in parallel)")
    parser.set_defaults(func=_run)
