"""Tile assembly: illumination-corrected, rescaled, resized site tiles at model size.

Output per plate: ``tiles/<plate>.npy`` (sites × channels × S × S, canonical channel order) and
``tiles/<plate>.sites.parquet`` (row i describes tile i), plus ``tiles/<plate>.rescale.json`` with the
per-channel intensity range used.

Two passes, memory bounded by ``threads`` images whatever the plate size:

1. decode pass: each image is decoded, divided by its illumination function and resized to S×S
   (torch bilinear, anti-aliased when shrinking) by one of ``threads`` workers; the plane's pixels go
   into per-channel histograms (65,536 bins; integer images: [0, dtype max], known up front) and its
   exact float32 values to disk (see :class:`PlateStore`);
2. the histograms give the robust range (``percentiles``, default 0.1–99.9 of all the plate's tile
   pixels, to within a bin); the rescale pass reads each site back, maps that range to [0, 1]
   (clipped) and writes the storage dtype in place.  (Float images, whose range is not known up
   front, get one more read pass for the histogram.)

Why exact float32 and not float16 tiles rescaled in place: a float16 intermediate changes ~27% of
the final float16 values (by up to 4.9e-4) against rescaling the exact float32 values, on the demo
and on full 1080² LINCS sites alike.  Why not decode twice: decoding is most of the work (30 ms for a
1080² PNG against ~10 ms for divide + resize + histogram), so a second decode would double the time.
So the exact values are kept on disk in the space the output needs anyway plus a hidden side file:
of each float32 plane's bytes, the output dtype's share (half for float16/uint16, a quarter for uint8,
all for float32) goes where that plane's final tile will be, the rest to the side file.  The disk
holds 4 bytes per pixel while the rule runs — less than the float32 scratch plus output it replaces —
and the final dtype after it.

Nothing is memory-mapped: files are written and read at offsets through their descriptors, and once
``WRITE_BACK_BYTES`` have been written to a file since the last write-back it is written back
(``fdatasync``) and dropped from the page cache (``POSIX_FADV_DONTNEED``).  A cgroup (a SLURM job)
charges both the mapped pages and the page cache of the files a job writes to that job; this keeps
both flat as the plate grows (tests/test_tiles_memory.py measures it at 448² up to 3,456 sites).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import io
from .errors import DataError
from .illumination import check_image, load_functions
from .io import CacheBound, atomic_path, npy_header, read_at, read_image, write_at, write_json, write_parquet

log = logging.getLogger(__name__)

HISTOGRAM_BINS = 65536  # percentile resolution: (max - min) / 65536 per channel
DTYPE_SCALE = {"float16": None, "float32": None, "uint8": 255, "uint16": 65535}
# Page cache one tile file may hold before it is written back and dropped (io.WRITE_BACK_BYTES: a small
# plate, up to 16 sites of 5 x 448² float16, is read back from memory); a tiles setting of its own.
WRITE_BACK_BYTES = io.WRITE_BACK_BYTES


def resize_stack(stack: np.ndarray, size: int) -> np.ndarray:
    """(N, C, H, W) float32 → (N, C, size, size), bilinear with anti-aliasing when shrinking."""
    if stack.shape[-2:] == (size, size):
        return stack
    tensor = torch.from_numpy(stack)
    shrinking = stack.shape[-1] > size or stack.shape[-2] > size
    out = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False, antialias=shrinking)
    return out.numpy()


def corrected_plane(path, function: np.ndarray | None, *, shape=None, dtype=None) -> np.ndarray:
    """Decode one image, check it against the plate (size, bit depth), divide it by its illumination
    function: (H, W) float32."""
    image = read_image(path)
    check_image(image, path, shape=function.shape if function is not None else shape, dtype=dtype)
    if function is not None:
        return np.divide(image, function, dtype=np.float32)
    return image.astype(np.float32)


def corrected_site(
    row, channels: list[str], functions: dict[str, np.ndarray] | None, shape=None, dtype=None
) -> np.ndarray:
    """(C, H, W) float32 illumination-corrected pixels of one site (raw / function)."""
    shape = read_image(row[f"Path_{channels[0]}"]).shape if shape is None else shape
    return np.stack(
        [
            corrected_plane(row[f"Path_{ch}"], functions[ch] if functions else None, shape=shape, dtype=dtype)
            for ch in channels
        ]
    )


class ChannelHistogram:
    """Per-channel histogram over a fixed range, for exact-to-a-bin plate percentiles.

    Threads may add planes at once: counting happens outside the lock, only the sum inside it.
    """

    def __init__(self, channels: int, low: float, high: float, bins: int = HISTOGRAM_BINS) -> None:
        self.low, self.high, self.bins = float(low), float(high), bins
        self.counts = np.zeros((channels, bins), np.int64)
        self._lock = threading.Lock()

    def add_plane(self, channel: int, pixels: np.ndarray) -> None:
        """Count pixels (any shape) of one channel."""
        scale = self.bins / (self.high - self.low)
        shifted = pixels - self.low if self.low else pixels  # x - 0.0 == x: skip a pass over the pixels
        index = (shifted * scale).astype(np.int32).ravel()
        np.clip(index, 0, self.bins - 1, out=index)
        counts = np.bincount(index, minlength=self.bins)
        with self._lock:
            self.counts[channel] += counts

    def add(self, batch: np.ndarray) -> None:
        """Count the pixels of a (N, C, H, W) batch."""
        for k in range(batch.shape[1]):
            self.add_plane(k, batch[:, k])

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


class ChannelRange:
    """Per-channel min and max of float images (their histogram range is only known at the end)."""

    def __init__(self, channels: int) -> None:
        self.lowest = np.full(channels, np.inf, np.float32)
        self.highest = np.full(channels, -np.inf, np.float32)
        self._lock = threading.Lock()

    def add_plane(self, channel: int, pixels: np.ndarray) -> None:
        low, high = pixels.min(), pixels.max()
        with self._lock:
            self.lowest[channel] = min(self.lowest[channel], low)
            self.highest[channel] = max(self.highest[channel], high)

    def histogram(self) -> ChannelHistogram:
        low = float(self.lowest.min())
        return ChannelHistogram(len(self.lowest), low, float(max(self.highest.max(), low + 1e-6)))


def _value_range(dtype: np.dtype) -> tuple[float, float] | None:
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
    if dtype == "float16":
        # torch's conversion rounds to nearest-even like numpy's (same bytes), about 4x faster
        return scaled.to(torch.float16).numpy()
    return scaled.numpy()


# ----------------------------------------------------------------------------- the plate on disk


class PlateStore:
    """A plate's tiles on disk: exact float32 values during the decode pass, the final dtype after.

    The final tiles take ``itemsize`` bytes per pixel, the exact float32 values 4: the first
    ``itemsize / 4`` of each float32 plane's bytes are stored in the output ``.npy`` where that plane's
    final tile will go, the rest in a hidden side file beside it (deleted by :meth:`close`).  Plain
    byte ranges, no per-pixel shuffling.  Sites are written and read at offsets, so threads work on
    different sites at once, and no page of either file is ever mapped.
    """

    def __init__(self, path: Path, shape: tuple[int, int, int, int], dtype: str, *, side_prefix: str) -> None:
        self.shape, self.dtype = tuple(int(s) for s in shape), np.dtype(dtype)
        plane_pixels = self.shape[2] * self.shape[3]
        self.head = plane_pixels * self.dtype.itemsize  # bytes of a float32 plane kept in the output
        self.tail = plane_pixels * 4 - self.head  # bytes of it kept in the side file
        self.fd = os.open(path, os.O_RDWR)
        self.side_fd, self.side_path = None, None
        try:
            header = npy_header(self.shape, self.dtype)
            write_at(self.fd, header, 0)
            self.offset = len(header)
            self.out_cache = CacheBound(self.fd, WRITE_BACK_BYTES)
            if self.tail:
                fd, side = tempfile.mkstemp(prefix=side_prefix, suffix=".side", dir=path.parent)
                self.side_fd, self.side_path = fd, Path(side)
                self.side_cache = CacheBound(fd, WRITE_BACK_BYTES)
        except BaseException:
            self.close()
            raise

    def _head_at(self, site: int, channel: int = 0) -> int:
        return self.offset + (site * self.shape[1] + channel) * self.head

    def _tail_at(self, site: int, channel: int = 0) -> int:
        return (site * self.shape[1] + channel) * self.tail

    def put_plane(self, site: int, channel: int, plane: np.ndarray) -> None:
        """Store the exact float32 (S, S) values of one site's channel (decode pass)."""
        raw = memoryview(np.ascontiguousarray(plane, np.float32)).cast("B")
        write_at(self.fd, raw[: self.head], self._head_at(site, channel))
        if self.tail:
            write_at(self.side_fd, raw[self.head :], self._tail_at(site, channel))

    def get_site(self, site: int) -> np.ndarray:
        """The exact float32 (C, S, S) values of one site, as the decode pass stored them."""
        values = np.empty(self.shape[1:], np.float32)
        for k in range(self.shape[1]):
            raw = memoryview(values[k]).cast("B")
            read_at(self.fd, raw[: self.head], self._head_at(site, k))
            if self.tail:
                read_at(self.side_fd, raw[self.head :], self._tail_at(site, k))
        return values

    def put_final_site(self, site: int, tile: np.ndarray) -> None:
        """Write one site's tile in the final dtype over its stored values (rescale pass)."""
        write_at(self.fd, np.ascontiguousarray(tile, self.dtype), self._head_at(site))

    def stored(self, start: int, stop: int) -> None:
        """Sites [start, stop) were stored (decode pass): bound the cache of both files."""
        planes = (stop - start) * self.shape[1]
        self.out_cache.wrote(planes * self.head, self._head_at(stop))
        if self.tail:
            self.side_cache.wrote(planes * self.tail, self._tail_at(stop))

    def end_decode_pass(self) -> None:
        """Every site is stored: see :meth:`CacheBound.end_pass`."""
        self.out_cache.end_pass(self._head_at(self.shape[0]))
        if self.tail:
            self.side_cache.end_pass(self._tail_at(self.shape[0]))

    def read(self, start: int, stop: int) -> None:
        """Sites [start, stop) were read back (histogram pass): drop what is on disk already."""
        self.out_cache.forget(self._head_at(stop))
        self.rescaled(start, stop, wrote=False)

    def rescaled(self, start: int, stop: int, *, wrote: bool = True) -> None:
        """Sites [start, stop) were read and their final tiles written (rescale pass)."""
        if wrote:
            self.out_cache.wrote(self._head_at(stop) - self._head_at(start), self._head_at(stop))
        if self.tail:
            self.side_cache.forget(self._tail_at(stop))

    def finish(self) -> None:
        """Every final tile is written: put the output on disk (before its rename) and out of the cache."""
        self.out_cache.write_back(self._head_at(self.shape[0]))

    def close(self) -> None:
        """Close both files; delete the side file."""
        for fd in (self.fd, self.side_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.fd = self.side_fd = None
        if self.side_path is not None:
            self.side_path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- threads


@contextlib.contextmanager
def thread_budget(threads: int) -> Iterator[ThreadPoolExecutor]:
    """A pool of ``threads`` workers, each single-threaded inside: the stage then runs exactly
    ``threads`` busy threads, the number the rule declares.  Torch is the only library here with a
    pool of its own (interpolate, the rescale); numpy's element-wise work and PIL decode in the
    calling thread, and so does tifffile for contiguous TIFFs (it adds threads of its own only for
    compressed or many-segment files; ``io.read_image`` does not limit them).

    The pool is shut down (queued work cancelled, running work waited for) before the caller closes
    the files the workers write to."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # read by each new thread on its first torch op
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tiles")
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(previous)


def _in_batches(
    pool: ThreadPoolExecutor,
    n: int,
    batch_size: int,
    submit_site: Callable[[int], list[Future]],
    done: Callable[[int, int], None],
    bar: tqdm,
) -> None:
    """Run ``submit_site`` for every site, one batch ahead of the batch being waited for, so the workers
    never idle while the caller settles a finished batch (``done(start, stop)``, in site order)."""
    starts = list(range(0, n, batch_size))

    def submit(b: int) -> list[Future]:
        return [f for site in range(starts[b], min(starts[b] + batch_size, n)) for f in submit_site(site)]

    pending = submit(0)
    for b, start in enumerate(starts):
        following = submit(b + 1) if b + 1 < len(starts) else []
        for future in pending:
            future.result()  # re-raises a worker's error (a decode error names its file)
        stop = min(start + batch_size, n)
        done(start, stop)
        bar.update(stop - start)
        pending = following


# ----------------------------------------------------------------------------- the stage


def _remove_leftovers(out_npy: Path) -> None:
    """Delete the hidden files a killed run of this plate left: its temporary output and side file
    (``.<name>.*``: random names, so a rerun would never reuse them; a full plate's are 13.9 GB).
    Snakemake's lock keeps two runs of the same output from overlapping."""
    for leftover in out_npy.parent.glob(f".{out_npy.name}.*"):
        log.warning(
            "removing %s (%.0f MB) left by an interrupted run", leftover, leftover.stat().st_size / 2**20
        )
        leftover.unlink(missing_ok=True)


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
    threads: int = 2,
    progress: bool = True,
) -> dict:
    """Write ``out_npy`` (+ ``.sites.parquet``, ``.rescale.json``) for the sites in ``manifest``.

    ``threads`` workers decode, correct and resize one image each at a time; memory is bounded by
    them and by ``WRITE_BACK_BYTES`` of page cache per file, not by the plate."""
    if manifest.empty:
        raise DataError("no sites to assemble")
    if dtype not in DTYPE_SCALE:
        raise DataError(f"tiles dtype {dtype!r} not one of {sorted(DTYPE_SCALE)}")
    if threads < 1 or batch_size < 1:
        raise DataError(f"tiles threads and batch_size must be >= 1, got {threads} and {batch_size}")
    out_npy = Path(out_npy)
    stem = out_npy.name[: -len(".npy")] if out_npy.name.endswith(".npy") else out_npy.name
    functions = load_functions(illum_dir, channels) if illum_dir else None
    n, c = len(manifest), len(channels)
    rows = manifest.to_dict("records")
    # the plate's image size and bit depth: from the illumination functions, else the first image
    first = read_image(rows[0][f"Path_{channels[0]}"])
    shape = next(iter(functions.values())).shape if functions else first.shape
    dtype_in = first.dtype
    known = _value_range(dtype_in)
    # integer images: histogram during the decode pass; float images: after it, once min/max are known
    counter = ChannelHistogram(c, *known) if known else ChannelRange(c)

    def tile_plane(store: PlateStore, site: int, k: int) -> None:
        channel = channels[k]
        function = functions[channel] if functions else None
        plane = corrected_plane(rows[site][f"Path_{channel}"], function, shape=shape, dtype=dtype_in)
        resized = resize_stack(plane[None, None], size)[0, 0]
        counter.add_plane(k, resized)
        store.put_plane(site, k, resized)

    def count_site(store: PlateStore, histogram: ChannelHistogram, site: int) -> None:
        values = store.get_site(site)
        for k in range(c):
            histogram.add_plane(k, values[k])

    def rescale_site(store: PlateStore, low: np.ndarray, high: np.ndarray, site: int) -> None:
        store.put_final_site(site, rescale(store.get_site(site)[None], low, high, dtype)[0])

    out_npy.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(out_npy)
    bar = tqdm(total=n, desc=f"tiles {stem}", unit="site", disable=not progress)
    with atomic_path(out_npy) as tmp, thread_budget(threads) as pool:
        store = PlateStore(tmp, (n, c, size, size), dtype, side_prefix=f".{out_npy.name}.")
        try:
            _in_batches(
                pool,
                n,
                batch_size,
                lambda i: [pool.submit(tile_plane, store, i, k) for k in range(c)],
                store.stored,
                bar,
            )
            store.end_decode_pass()
            histogram = counter if known else counter.histogram()
            if not known:
                bar.reset()
                bar.set_description(f"tiles {stem} histogram")
                _in_batches(
                    pool,
                    n,
                    batch_size,
                    lambda i: [pool.submit(count_site, store, histogram, i)],
                    store.read,
                    bar,
                )
            low, high = histogram.percentiles(percentiles[0]), histogram.percentiles(percentiles[1])
            for channel, lo, hi in zip(channels, low, high):
                if hi <= lo:
                    log.warning(
                        "channel %s is constant over the plate (%.4g); its tiles are all 0", channel, lo
                    )
            bar.reset()
            bar.set_description(f"tiles {stem} rescale")
            _in_batches(
                pool,
                n,
                batch_size,
                lambda i: [pool.submit(rescale_site, store, low, high, i)],
                store.rescaled,
                bar,
            )
            store.finish()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # no worker may touch the files once closed
            store.close()
    bar.close()
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
        threads=args.threads,
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
    parser.add_argument("--batch-size", type=int, default=8, help="sites queued per step")
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="worker threads (each single-threaded inside); the rule's threads",
    )
    parser.set_defaults(func=_run)
