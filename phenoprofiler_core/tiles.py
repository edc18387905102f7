"""Tile assembly: illumination-corrected, rescaled, resized site images at model size.

Output per plate: ``tiles/<plate>.npy`` (sites × channels × S × S, canonical channel order) and
``tiles/<plate>.sites.parquet`` (row i describes tile i), plus ``tiles/<plate>.rescale.json`` with the
per-channel intensity range used.

Streaming, so memory is bounded by a batch and not by the plate:

1. decode each site, divide by the illumination function, resize to S×S (torch bilinear with
   anti-aliasing, batched) and append to a float32 scratch memmap next to the output;
2. per-channel histograms over the scratch (65,536 bins between the plate's min and max) give the
   robust range (``percentiles``, default 0.1–99.9 of all the plate's tile pixels, to within a bin);
3. that range maps to [0, 1] (clipped); a last pass over the scratch writes the final dtype.

Each image is decoded once; the rescale needs the whole plate's range, hence the scratch file.
"""

from __future__ import annotations

import argparse
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .errors import DataError, ImageError
from .illumination import check_image, load_functions
from .io import NpyStreamWriter, read_image, write_json, write_parquet

log = logging.getLogger(__name__)

HISTOGRAM_BINS = 65536  # percentile resolution: (max - min) / 65536 per channel
DTYPE_SCALE = {"float16": None, "float32": None, "uint8": 255, "uint16": 65535}


def resize_stack(stack: np.ndarray, size: int) -> np.ndarray:
    """(N, C, H, W) float32 → (N, C, size, size), bilinear with anti-aliasing when shrinking."""
    if stack.shape[-2:] == (size, size):
        return stack
    tensor = torch.from_numpy(stack)
    shrinking = stack.shape[-1] > size or stack.shape[-2] > size
    out = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False, antialias=shrinking)
    return out.numpy()


def corrected_site(
    row, channels: list[str], functions: dict[str, np.ndarray] | None, shape=None, dtype=None
) -> np.ndarray:
    """(C, H, W) float32 illumination-corrected pixels of one site (raw / function)."""
    first = read_image(row[f"Path_{channels[0]}"]).shape if shape is None else shape
    out = np.empty((len(channels),) + tuple(first), np.float32)
    for k, channel in enumerate(channels):
        dtype = _read_plane(
            row[f"Path_{channel}"], functions[channel] if functions else None, first, dtype, out[k]
        )
    return out


def _read_plane(path, function, shape, dtype, out=None) -> np.ndarray:
    """Decode one image, check it against the plate, and divide by its illumination function."""
    image = read_image(path)
    check_image(image, path, shape=function.shape if function is not None else shape, dtype=dtype)
    if out is None:
        out = np.empty(image.shape, np.float32)
    elif out.shape != image.shape:
        raise ImageError(
            f"image {path} is {image.shape[1]}x{image.shape[0]} px; the other images of this plate are {out.shape[1]}x{out.shape[0]}"
        )
    if function is not None:
        np.divide(image, function, out=out, dtype=np.float32)
    else:
        out[...] = image
    return image.dtype


class ChannelHistogram:
    """Streaming per-channel histogram over a fixed range, for exact-to-a-bin plate percentiles."""

    def __init__(self, channels: int, low: float, high: float, bins: int = HISTOGRAM_BINS) -> None:
        self.low, self.high, self.bins = float(low), float(high), bins
        self.counts = np.zeros((channels, bins), np.int64)

    def add(self, batch: np.ndarray) -> None:
        """Count the pixels of a (N, C, H, W) batch."""
        scale = self.bins / (self.high - self.low)
        for k in range(batch.shape[1]):
            index = ((batch[:, k] - self.low) * scale).astype(np.int32).ravel()
            np.clip(index, 0, self.bins - 1, out=index)
            self.counts[k] += np.bincount(index, minlength=self.bins)

    def percentiles(self, q: float) -> np.ndarray:
        """Per-channel q-th percentile, interpolated linearly inside the bin that holds it."""
        width = (self.high - self.low) / self.bins
        values = np.empty(len(self.counts), np.float32)
        for k, counts in enumerate(self.counts):
            cumulative = np.cumsum(counts)
            rank = q / 100 * (cumulative[-1] - 1)
            b = int(np.searchsorted(cumulative, rank, side="right"))
            before = cumulative[b - 1] if b > 0 else 0
            fraction = min(max((rank - before + 0.5) / max(counts[b], 1), 0.0), 1.0)
            values[k] = self.low + (b + fraction) * width
        return values


def _value_range(dtype: np.dtype, functions) -> tuple[float, float] | None:
    """Range of corrected pixels known in advance: [0, dtype max] for integer images (function ≥ 1)."""
    if np.dtype(dtype).kind in "ui":
        return 0.0, float(np.iinfo(dtype).max) + 1.0
    return None


def rescale(tiles: np.ndarray, low: np.ndarray, high: np.ndarray, dtype: str) -> np.ndarray:
    """Map [low, high] per channel to [0, 1] (clipped), then to the storage dtype."""
    span = np.where(high > low, high - low, 1.0).astype(np.float32)
    x = torch.from_numpy(np.ascontiguousarray(tiles, dtype=np.float32))
    lo = torch.from_numpy(low.astype(np.float32))[None, :, None, None]
    scaled = ((x - lo) / torch.from_numpy(span)[None, :, None, None]).clamp_(0.0, 1.0)
    scale = DTYPE_SCALE[dtype]
    if scale is not None:
        return scaled.mul_(scale).round_().numpy().astype(dtype)
    return scaled.numpy().astype(dtype)


def assemble_tiles(
    manifest: pd.DataFrame,
    channels: list[str],
    out_npy: str | Path,
    *,
    illum_dir: str | Path | None = None,
    size: int = 448,
    dtype: str = "float16",
    percentiles: tuple[float, float] = (0.1, 99.9),
    batch_size: int = 8,
    workers: int = 2,
    progress: bool = True,
) -> dict:
    """Write ``out_npy`` (+ ``.sites.parquet``, ``.rescale.json``) for the sites in ``manifest``."""
    if manifest.empty:
        raise DataError("no sites to assemble")
    if dtype not in DTYPE_SCALE:
        raise DataError(f"tiles dtype {dtype!r} not one of {sorted(DTYPE_SCALE)}")
    out_npy = Path(out_npy)
    stem = out_npy.name[: -len(".npy")] if out_npy.name.endswith(".npy") else out_npy.name
    functions = load_functions(illum_dir, channels) if illum_dir else None
    n, c = len(manifest), len(channels)
    out_npy.parent.mkdir(parents=True, exist_ok=True)
    scratch_path = out_npy.with_name(f".{stem}.scratch.npy")
    try:
        scratch = np.lib.format.open_memmap(
            scratch_path, mode="w+", dtype=np.float32, shape=(n, c, size, size)
        )
        rows = manifest.to_dict("records")
        # the plate's image size and bit depth: from the illumination functions, else the first image
        first = read_image(rows[0][f"Path_{channels[0]}"])
        shape = next(iter(functions.values())).shape if functions else first.shape
        dtype_in = first.dtype
        # two reusable batch buffers (no per-site allocations; page faults dominated otherwise):
        # threads decode batch k+1 into one while the main thread resizes batch k from the other.
        buffers = [np.empty((min(batch_size, n), c) + tuple(shape), np.float32) for _ in range(2)]
        known = _value_range(dtype_in, functions)
        # integer images: histogram during the decode pass; float images: after it, once min/max are known
        histogram = ChannelHistogram(c, *known) if known else None
        lowest = np.full(c, np.inf, np.float32)
        highest = np.full(c, -np.inf, np.float32)
        starts = list(range(0, n, batch_size))
        bar = tqdm(total=n, desc=f"tiles {stem}", unit="site", disable=not progress)

        def submit(pool, b):
            batch_rows = rows[starts[b] : starts[b] + batch_size]
            buffer = buffers[b % 2]
            # PIL/tifffile decoding and numpy division release the GIL, so threads overlap them
            return [
                pool.submit(
                    _read_plane,
                    row[f"Path_{ch}"],
                    functions[ch] if functions else None,
                    shape,
                    dtype_in,
                    buffer[i, k],
                )
                for i, row in enumerate(batch_rows)
                for k, ch in enumerate(channels)
            ]

        with ThreadPoolExecutor(max_workers=workers) as pool:
            pending = submit(pool, 0)
            for b, start in enumerate(starts):
                for future in pending:
                    future.result()  # re-raises a decode error naming the file
                count = min(batch_size, n - start)
                pending = submit(pool, b + 1) if b + 1 < len(starts) else []
                bar.update(count)
                resized = resize_stack(buffers[b % 2][:count], size)
                scratch[start : start + count] = resized
                if histogram is not None:
                    histogram.add(resized)
                else:
                    lowest = np.minimum(lowest, resized.min(axis=(0, 2, 3)))
                    highest = np.maximum(highest, resized.max(axis=(0, 2, 3)))
        bar.close()
        scratch.flush()
        if histogram is None:
            histogram = ChannelHistogram(
                c, float(lowest.min()), float(max(highest.max(), lowest.min() + 1e-6))
            )
            for start in range(0, n, batch_size):
                histogram.add(np.asarray(scratch[start : start + batch_size]))
        low, high = histogram.percentiles(percentiles[0]), histogram.percentiles(percentiles[1])
        for channel, lo, hi in zip(channels, low, high):
            if hi <= lo:
                log.warning("channel %s is constant over the plate (%.4g); its tiles are all 0", channel, lo)
        with NpyStreamWriter(out_npy, (n, c, size, size), dtype) as writer:
            for start in range(0, n, batch_size):
                writer.write(rescale(np.asarray(scratch[start : start + batch_size]), low, high, dtype))
        del scratch
    finally:
        if scratch_path.exists():
            os.unlink(scratch_path)
    sites = manifest[[col for col in manifest.columns if col.startswith("Metadata_")]].reset_index(drop=True)
    write_parquet(sites, out_npy.with_name(f"{stem}.sites.parquet"))
    info = {
        "channels": channels,
        "percentiles": list(percentiles),
        "low": low.tolist(),
        "high": high.tolist(),
        "size": size,
        "dtype": dtype,
        "source_shape": list(shape),
        "illumination": bool(functions),
    }
    write_json(info, out_npy.with_name(f"{stem}.rescale.json"))
    return info


def load_tiles(npy: str | Path, mmap: bool = True) -> tuple[np.ndarray, pd.DataFrame]:
    """Tiles (memory-mapped) and their site table."""
    npy = Path(npy)
    stem = npy.name[: -len(".npy")]
    return np.load(npy, mmap_mode="r" if mmap else None), pd.read_parquet(
        npy.with_name(f"{stem}.sites.parquet")
    )


def as_float(tiles: np.ndarray) -> np.ndarray:
    """Stored tiles → float32 in [0, 1] whatever the storage dtype."""
    scale = DTYPE_SCALE.get(str(tiles.dtype))
    out = np.asarray(tiles, dtype=np.float32)
    return out / scale if scale else out


def _run(args: argparse.Namespace) -> None:
    from .manifest import channels_of, read_manifest

    manifest = read_manifest(args.manifest, args.plate)
    info = assemble_tiles(
        manifest,
        channels_of(manifest),
        args.out,
        illum_dir=args.illum,
        size=args.size,
        dtype=args.dtype,
        percentiles=tuple(args.percentiles),
        batch_size=args.batch_size,
    )
    log.info("tiles %s: %d sites, range low=%s high=%s", args.out, len(manifest), info["low"], info["high"])


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser("tiles", help="corrected, rescaled site tiles at model size")
    parser.add_argument("manifest", help="manifest.parquet")
    parser.add_argument("--plate", required=True)
    parser.add_argument("--out", required=True, help="output tiles/<plate>.npy")
    parser.add_argument("--illum", default=None, help="illum/<plate> folder (omit to skip correction)")
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--dtype", default="float16", choices=sorted(DTYPE_SCALE))
    parser.add_argument("--percentiles", type=float, nargs=2, default=[0.1, 99.9])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.set_defaults(func=_run)
