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
import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .errors import DataError
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


def corrected_site(row, channels: list[str], functions: dict[str, np.ndarray] | None, shape=None, dtype=None) -> np.ndarray:
    """(C, H, W) float32 illumination-corrected pixels of one site (raw / function)."""
    planes = []
    for channel in channels:
        path = row[f"Path_{channel}"]
        image = read_image(path)
        function = functions[channel] if functions else None
        check_image(image, path, shape=function.shape if function is not None else shape, dtype=dtype)
        shape, dtype = image.shape, image.dtype
        plane = image.astype(np.float32)
        if function is not None:
            plane /= function
        planes.append(plane)
    return np.stack(planes)


def plate_percentiles(scratch, lowest, highest, percentiles, batch_size) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel percentiles of every pixel of ``scratch`` (N, C, H, W), streamed via histograms."""
    c = scratch.shape[1]
    counts = np.zeros((c, HISTOGRAM_BINS), np.int64)
    for start in range(0, scratch.shape[0], batch_size):
        batch = np.asarray(scratch[start : start + batch_size])
        for k in range(c):
            if highest[k] > lowest[k]:
                counts[k] += np.histogram(batch[:, k], bins=HISTOGRAM_BINS, range=(lowest[k], highest[k]))[0]
    result = []
    for q in percentiles:
        values = np.empty(c, np.float32)
        for k in range(c):
            if not highest[k] > lowest[k]:
                values[k] = lowest[k]
                continue
            cumulative = np.cumsum(counts[k])
            rank = q / 100 * (cumulative[-1] - 1)
            b = int(np.searchsorted(cumulative, rank, side="right"))
            before = cumulative[b - 1] if b > 0 else 0
            width = (highest[k] - lowest[k]) / HISTOGRAM_BINS
            # linear position inside the bin holding the rank
            fraction = (rank - before + 0.5) / max(counts[k][b], 1)
            values[k] = lowest[k] + (b + min(max(fraction, 0.0), 1.0)) * width
        result.append(values)
    return result[0], result[1]


def rescale(tiles: np.ndarray, low: np.ndarray, high: np.ndarray, dtype: str) -> np.ndarray:
    """Map [low, high] per channel to [0, 1] (clipped), then to the storage dtype."""
    span = np.where(high > low, high - low, 1.0).astype(np.float32)
    scaled = np.clip((tiles - low[None, :, None, None]) / span[None, :, None, None], 0.0, 1.0)
    scale = DTYPE_SCALE[dtype]
    if scale is not None:
        return np.round(scaled * scale).astype(dtype)
    return scaled.astype(dtype)


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
    lowest = np.full(c, np.inf, np.float32)
    highest = np.full(c, -np.inf, np.float32)
    try:
        scratch = np.lib.format.open_memmap(scratch_path, mode="w+", dtype=np.float32, shape=(n, c, size, size))
        shape = dtype_in = None
        rows = list(manifest.itertuples(index=False))
        bar = tqdm(total=n, desc=f"tiles {stem}", unit="site", disable=not progress)
        for start in range(0, n, batch_size):
            batch_rows = rows[start : start + batch_size]
            batch = []
            for row in batch_rows:
                site = corrected_site(row._asdict(), channels, functions, shape, dtype_in)
                shape = site.shape[1:]
                batch.append(site)
                bar.update()
            resized = resize_stack(np.stack(batch), size)
            scratch[start : start + len(batch)] = resized
            lowest = np.minimum(lowest, resized.min(axis=(0, 2, 3)))
            highest = np.maximum(highest, resized.max(axis=(0, 2, 3)))
        bar.close()
        scratch.flush()
        low, high = plate_percentiles(scratch, lowest, highest, percentiles, batch_size)
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
    return np.load(npy, mmap_mode="r" if mmap else None), pd.read_parquet(npy.with_name(f"{stem}.sites.parquet"))


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
