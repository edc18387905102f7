"""Illumination correction, CellProfiler's recipe as used in JUMP production (DESIGN.md §5).

Per plate and channel: average all images, downsample (×0.2), median filter (size 20 at that scale),
upsample back, floor at the robust minimum (2nd percentile of positive values) and divide by it, so the
function is ≥ 1.  Images are corrected by dividing by the function.

The median filter runs at the downsampled scale because a size-100 median at full resolution costs
~100 s per 1080² image for the same smooth result (bench/bench_illumination.py measures both).

A function averaged over few sites shows the cells, not the optics.  On the real LINCS sites of
``shared/data`` (1080², 8-bit) the DNA function's max/min fell from 85 (1 site) to 28, 17, 9.4, 4.0, 2.6
and 2.0 for 2, 3, 6, 12, 24 and 60 random sites (ER: 292 → 1.7; Mito: 29 → 1.6).  So every plate's
``qc.json`` records the number of sites and each channel's max/min, and warns below ``min_sites`` (50)
sites or above ``max_ratio`` (3.0: real vignetting stayed at 1.6–2.6 from 24 sites on).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.transform import resize
from tqdm import tqdm

from .errors import DataError, ImageError
from .io import atomic_path, read_image, write_json, write_npy

log = logging.getLogger(__name__)


def check_image(image: np.ndarray, path, *, shape=None, dtype=None) -> None:
    """Reject images that would silently corrupt a plate: NaN/inf, or a size/bit depth unlike the rest."""
    if shape is not None and image.shape != tuple(shape):
        raise ImageError(
            f"image {path} is {image.shape[1]}x{image.shape[0]} px; the other images of this plate are {shape[1]}x{shape[0]}"
        )
    if dtype is not None and image.dtype != dtype:
        raise ImageError(
            f"image {path} is {image.dtype}; the other images of this plate are {dtype} (mixed bit depth)"
        )
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise ImageError(f"image {path} contains NaN or infinite pixels")


def mean_image(paths: Iterable[str | Path], *, progress: bool = False) -> np.ndarray:
    """Pixel-wise mean of images (float64 accumulator); all must share shape and bit depth."""
    total, count, shape, dtype = None, 0, None, None
    for path in tqdm(list(paths), desc="averaging", disable=not progress, leave=False):
        image = read_image(path)
        check_image(image, path, shape=shape, dtype=dtype)
        if total is None:
            total, shape, dtype = np.zeros(image.shape, np.float64), image.shape, image.dtype
        total += image
        count += 1
    if count == 0:
        raise DataError("no images to average")
    return total / count


def illumination_function(
    average: np.ndarray,
    *,
    downsample: float = 0.2,
    median_size: int = 20,
    robust_quantile: float = 0.02,
) -> np.ndarray:
    """CellProfiler's 'Regular, All, median-smoothed, robust-minimum rescaled' function (≥ 1).

    ``average`` is the mean image of one channel over a plate.
    """
    full_shape = average.shape
    small_shape = tuple(max(1, round(s * downsample)) for s in full_shape)
    small = resize(average, small_shape, order=1, anti_aliasing=True, preserve_range=True)
    smooth = ndimage.median_filter(small, size=median_size, mode="nearest")
    function = resize(smooth, full_shape, order=1, anti_aliasing=False, preserve_range=True)
    return robust_rescale(function, robust_quantile)


def robust_rescale(function: np.ndarray, robust_quantile: float = 0.02) -> np.ndarray:
    """Floor at the robust minimum (quantile of positive values) and divide by it → values ≥ 1."""
    positive = function[function > 0]
    if positive.size == 0:
        raise DataError("illumination average is zero everywhere (all images blank?)")
    robust_min = np.quantile(positive, robust_quantile)
    return (np.maximum(function, robust_min) / robust_min).astype(np.float32)


def plate_illumination(
    manifest, channels: list[str], *, downsample=0.2, median_size=20, robust_quantile=0.02, progress=True
) -> dict[str, np.ndarray]:
    """Illumination function per channel for the sites of one plate (manifest rows)."""
    functions = {}
    for channel in channels:
        average = mean_image(manifest[f"Path_{channel}"], progress=progress)
        functions[channel] = illumination_function(
            average, downsample=downsample, median_size=median_size, robust_quantile=robust_quantile
        )
        log.info("%s: function range %.3f–%.3f", channel, functions[channel].min(), functions[channel].max())
    return functions


def illumination_qc(
    functions: dict[str, np.ndarray], *, plate: str, n_sites: int, min_sites: int = 50, max_ratio: float = 3.0
) -> dict:
    """The plate's ``qc.json``: sites used, each channel's max/min, and warnings (also logged).

    Keys: plate, n_sites, min_sites, max_ratio_limit, channels {channel: {max_over_min, warnings}},
    warnings (the plate-level ones and every channel's, in that order).
    """
    plate_warnings = []
    if n_sites < min_sites:
        plate_warnings.append(
            f"plate {plate}: illumination functions averaged over {n_sites} site(s), fewer than "
            f"illumination.min_sites={min_sites}; they may show cells rather than the optics"
        )
    channels = {}
    for channel, function in functions.items():
        ratio = float(function.max() / function.min())
        warnings = []
        if ratio > max_ratio:
            warnings.append(
                f"plate {plate} {channel}: illumination function max/min is {ratio:.2f}, above "
                f"illumination.max_ratio={max_ratio:g}; images are divided by up to this factor"
            )
        channels[channel] = {"max_over_min": ratio, "warnings": warnings}
    all_warnings = plate_warnings + [w for entry in channels.values() for w in entry["warnings"]]
    for warning in all_warnings:
        log.warning("%s", warning)
    return {
        "plate": str(plate),
        "n_sites": int(n_sites),
        "min_sites": int(min_sites),
        "max_ratio_limit": float(max_ratio),
        "channels": channels,
        "warnings": all_warnings,
    }


def load_functions(folder: str | Path, channels: list[str]) -> dict[str, np.ndarray]:
    """Per-channel functions from ``illum/<plate>/<Channel>.npy``, checked to be usable divisors."""
    folder = Path(folder)
    out = {}
    for channel in channels:
        path = folder / f"{channel}.npy"
        if not path.is_file():
            raise ImageError(f"illumination function not found: {path} (channel {channel})")
        function = np.load(path).astype(np.float32)
        if function.ndim != 2 or not np.all(np.isfinite(function)) or function.min() <= 0:
            raise ImageError(
                f"illumination function {path} must be a finite 2-D array > 0, got shape {function.shape}"
            )
        out[channel] = function
    return out


def save_qc_picture(functions: dict[str, np.ndarray], path: str | Path, title: str) -> None:
    """One panel per channel: the function as a heat map with its range (for the report)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(functions), figsize=(2.6 * len(functions), 2.8), squeeze=False)
    for ax, (channel, function) in zip(axes[0], functions.items()):
        step = max(1, function.shape[0] // 256)
        im = ax.imshow(function[::step, ::step], cmap="magma")
        ax.set_title(f"{channel}\n{function.min():.2f}–{function.max():.2f}", fontsize=9)
        ax.axis("off")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


def _run(args: argparse.Namespace) -> None:
    from .manifest import channels_of, read_manifest

    manifest = read_manifest(args.manifest, args.plate)
    channels = channels_of(manifest)
    functions = plate_illumination(
        manifest,
        channels,
        downsample=args.downsample,
        median_size=args.median_size,
        robust_quantile=args.robust_quantile,
    )
    out = Path(args.out)
    # Write into a temporary folder and rename it: the directory output appears complete or not at all.
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for channel, function in functions.items():
        write_npy(function, tmp / f"{channel}.npy")
    qc = illumination_qc(
        functions,
        plate=args.plate,
        n_sites=len(manifest),
        min_sites=args.min_sites,
        max_ratio=args.max_ratio,
    )
    write_json(qc, tmp / "qc.json")
    save_qc_picture(functions, tmp / "qc.png", f"Illumination functions, plate {args.plate}")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser("illumination", help="per plate x channel illumination functions")
    parser.add_argument("manifest", help="manifest.parquet")
    parser.add_argument("--plate", required=True)
    parser.add_argument("--out", required=True, help="output folder illum/<plate>")
    parser.add_argument("--downsample", type=float, default=0.2)
    parser.add_argument("--median-size", type=int, default=20)
    parser.add_argument("--robust-quantile", type=float, default=0.02)
    parser.add_argument(
        "--min-sites", type=int, default=50, help="warn (qc.json) when the plate has fewer sites"
    )
    parser.add_argument(
        "--max-ratio", type=float, default=3.0, help="warn (qc.json) when a function's max/min exceeds this"
    )
    parser.set_defaults(func=_run)
