"""Reading images and writing outputs atomically.

Every output is written under a temporary name in the destination folder and renamed into place,
so a job killed half-way never leaves a file that looks finished (DESIGN.md §4).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import DataError, ImageError

# ----------------------------------------------------------------------------- atomic writes


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_beside(path: Path, suffix: str) -> Path:
    """A new empty temp file in ``path``'s folder, with the permissions a normal file would get."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; outputs should be readable like any file
    return Path(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix if suffix is None else suffix
    tmp = _temp_beside(path, f".tmp{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_parquet(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write a DataFrame as Parquet atomically (index dropped)."""
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def write_npy(array: np.ndarray, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        np.save(tmp, array)


def write_json(obj, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str))


def write_text(text: str, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


# ----------------------------------------------------------------------------- files at offsets
#
# A cgroup (a SLURM job's memory limit) charges the job for the page cache of the files it writes and
# reads and for the file pages it maps, not only for its own allocations; dirty pages cannot be
# reclaimed without a write-back, clean ones only under pressure.  So the plate-sized arrays are never
# memory-mapped here: they are written and read at offsets through a file descriptor, and the pages
# behind what was written or read are dropped from the page cache once a window of them accumulates.

# Page cache one array file may hold before it is written back and dropped: large enough that a small
# plate (up to 16 sites of 5 x 448² float16) stays in memory, small next to any rule's mem_mb.
WRITE_BACK_BYTES = 32 << 20


def write_at(fd: int, buffer, offset: int) -> None:
    """Write a contiguous buffer at ``offset`` (pwrite may write less than asked: loop)."""
    view = memoryview(buffer).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def read_at(fd: int, buffer, offset: int) -> None:
    """Fill a contiguous, writable buffer from ``offset``."""
    view = memoryview(buffer).cast("B")
    while view:
        got = os.preadv(fd, [view], offset)
        if got == 0:
            raise OSError(f"file descriptor {fd} ends before offset {offset} (+{len(view)} bytes)")
        view, offset = view[got:], offset + got


def npy_header(shape: tuple[int, ...], dtype) -> bytes:
    """The .npy header numpy itself writes (``np.save``) for a C-ordered array of this shape and dtype."""
    buffer = BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


def _drop_cached(fd: int, upto: int) -> None:
    """Drop the file's clean cached pages before ``upto`` (dirty ones must be written back first)."""
    if upto > 0 and hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, upto, os.POSIX_FADV_DONTNEED)


class CacheBound:
    """Bounds the page cache of a file we write: once ``window`` bytes were written to it since the
    last write-back, everything written so far goes to disk (``fdatasync``) and leaves the cache."""

    def __init__(self, fd: int, window: int | None = None) -> None:
        self.fd, self.window = fd, WRITE_BACK_BYTES if window is None else window
        self.unsynced = 0  # bytes written since the last write-back
        self.synced_to = 0  # every byte before this offset is on disk

    def wrote(self, nbytes: int, upto: int) -> None:
        """``nbytes`` more were written; every byte before ``upto`` is final for this pass."""
        self.unsynced += nbytes
        if self.unsynced >= self.window:
            self.write_back(upto)

    def write_back(self, upto: int) -> None:
        getattr(os, "fdatasync", os.fsync)(self.fd)
        self.unsynced, self.synced_to = 0, max(self.synced_to, upto)
        self.forget(upto)

    def end_pass(self, upto: int) -> None:
        """A pass over the file ended.  If it outgrew the window, write it all back now: the next pass
        starts over from the first site and would otherwise hold this pass's last window besides its
        own.  A file that never outgrew it stays in the cache, to be read back from memory."""
        if self.synced_to:
            self.write_back(upto)

    def forget(self, upto: int) -> None:
        """Drop everything before ``upto`` that is on disk from the cache.

        Always from the start of the file: pages another thread holds for a moment (being read, in a
        CPU's LRU batch) survive one ``DONTNEED`` — 1 page in 8 when two threads read a file — and
        are dropped on the next call instead of piling up; over an emptied range the call is cheap."""
        _drop_cached(self.fd, min(upto, self.synced_to))


class _CommitOnSuccess:
    """``with`` a stream writer: ``close()`` (publish under the final name) on success, ``abort()`` on error."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class NpyStreamWriter(_CommitOnSuccess):
    """Write a (N, ...) array to ``.npy`` batch by batch without holding it in memory.

    The file is created under a temporary name beside ``path``: numpy's header, then the rows written
    through the file descriptor in order.  Every ``window`` bytes (default :data:`WRITE_BACK_BYTES`)
    they are written back and dropped from the page cache (:class:`CacheBound`), so neither the
    process nor the page cache holds more than a window of the array, whatever its size; nothing is
    mapped.  ``close()`` checks that all N rows came, writes the rest back and renames the file into
    place: the bytes are exactly those of ``np.save`` of the whole array.  If the writer is abandoned
    (exception, kill) the temporary file is removed / never renamed, so no half-written array is ever
    visible under the real name.
    """

    def __init__(
        self, path: str | os.PathLike, shape: tuple[int, ...], dtype, *, window: int | None = None
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.shape, self.dtype = tuple(int(n) for n in shape), np.dtype(dtype)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self.tmp = _temp_beside(self.path, ".tmp.npy")
        self.fd: int | None = os.open(self.tmp, os.O_WRONLY)
        try:
            header = npy_header(self.shape, self.dtype)
            write_at(self.fd, header, 0)
            self.offset = len(header)  # where the next row goes
            self.cache = CacheBound(self.fd, window)
        except BaseException:
            self.abort()
            raise
        self.position = 0  # rows written

    def write(self, batch: np.ndarray) -> None:
        """Append ``batch`` (n, *shape[1:]) rows, converted to the array's dtype."""
        batch = np.asarray(batch)
        if batch.shape[1:] != self.shape[1:] or self.position + len(batch) > self.shape[0]:
            raise ValueError(
                f"{self.path}: batch of shape {batch.shape} does not fit rows {self.position}.. of an "
                f"array of shape {self.shape}"
            )
        rows = np.ascontiguousarray(batch, dtype=self.dtype)
        if rows.nbytes == 0:
            return
        write_at(self.fd, rows, self.offset)
        self.offset += rows.nbytes
        self.position += len(rows)
        self.cache.wrote(rows.nbytes, self.offset)

    def close(self) -> None:
        if self.position != self.shape[0]:
            self.abort()  # a short array is never renamed into place, nor left behind hidden
            raise RuntimeError(f"{self.path}: wrote {self.position} rows, expected {self.shape[0]}")
        self.cache.write_back(self.offset)  # on disk before the rename, and out of the cache
        os.close(self.fd)
        self.fd = None
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()


class ParquetStreamWriter(_CommitOnSuccess):
    """Write a table to Parquet chunk by chunk, in row groups of ``row_group_rows`` rows (the last
    one shorter).

    Chunks (DataFrames with the same columns) are buffered until a row group is full, converted to
    ``schema`` (default: the first chunk's) and written, so memory holds about one row group of the
    table, whatever its length.  Atomic like :func:`write_parquet`: the file is written under a
    temporary name and renamed into place by ``close()``; ``abort()`` (or an exception inside
    ``with``) removes it.  Read back with ``pd.read_parquet``, it is the concatenated chunks.
    """

    def __init__(self, path: str | os.PathLike, *, schema=None, row_group_rows: int = 65536) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.schema, self.row_group_rows = schema, int(row_group_rows)
        self.tmp = _temp_beside(self.path, f".tmp{self.path.suffix}")
        self.buffered: list[pd.DataFrame] = []
        self.buffered_rows = 0
        self.rows = 0  # rows written to the file so far
        self.writer = None

    def write(self, chunk: pd.DataFrame) -> None:
        self.buffered.append(chunk)
        self.buffered_rows += len(chunk)
        if self.buffered_rows >= self.row_group_rows:
            self._flush()

    def _flush(self, *, final: bool = False) -> None:
        """Write the buffered rows as full row groups (all of them when ``final``); keep the rest."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.buffered:
            return
        frame = pd.concat(self.buffered, ignore_index=True) if len(self.buffered) > 1 else self.buffered[0]
        full = len(frame) if final else len(frame) // self.row_group_rows * self.row_group_rows
        rest = frame.iloc[full:]
        self.buffered, self.buffered_rows = ([rest], len(rest)) if len(rest) else ([], 0)
        if full == 0:
            return
        table = pa.Table.from_pandas(frame.iloc[:full], schema=self.schema, preserve_index=False)
        if self.writer is None:
            self.schema = table.schema
            self.writer = pq.ParquetWriter(self.tmp, self.schema)
        self.writer.write_table(table, row_group_size=self.row_group_rows)
        self.rows += full

    def close(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._flush(final=True)
        if self.writer is None:  # no row at all: an empty table, with the schema when there is one
            if self.schema is None:
                raise RuntimeError(f"{self.path}: nothing was written and no schema was given")
            self.writer = pq.ParquetWriter(self.tmp, self.schema)
            self.writer.write_table(pa.Table.from_batches([], schema=self.schema))
        self.writer.close()
        self.writer = None
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()
            self.writer = None
        self.buffered = []
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()


_NPY_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


class NpyRowReader:
    """Rows of a C-ordered ``.npy`` array read at offsets, without mapping the file.

    ``read(start, stop)`` returns rows [start, stop) as a new array.  Pages read are dropped from the
    page cache once ``window`` bytes (default :data:`WRITE_BACK_BYTES`) were read since the last drop,
    so a pass over a plate-sized file holds at most a window of it, plus the kernel's readahead of
    what follows (up to twice the device's ``read_ahead_kb``: 128 KiB to a few MiB); a file smaller
    than the window stays cached.  A memory map would instead keep every page touched
    resident and charged to the job until the map is closed.

    Safe to pass to DataLoader workers: each process opens its own descriptor (forked or spawned).
    Raises :class:`DataError` naming the file when it is missing, not a .npy array, Fortran-ordered,
    of Python objects, or shorter than its header says.
    """

    def __init__(self, path: str | os.PathLike, *, window: int | None = None) -> None:
        self.path = Path(path)
        self.window = WRITE_BACK_BYTES if window is None else window
        if not self.path.is_file():
            raise DataError(f"array file not found: {self.path}")
        with open(self.path, "rb") as handle:
            try:
                version = np.lib.format.read_magic(handle)
                read_header = _NPY_HEADER_READERS.get(version)
                if read_header is None:
                    raise ValueError(f"format version {version} (expected 1.0 or 2.0, what np.save writes)")
                shape, fortran, dtype = read_header(handle)
            except (ValueError, OSError, SyntaxError) as exc:
                raise DataError(f"{self.path} is not a readable .npy array: {exc}") from exc
            self.offset = handle.tell()  # the first row starts right after the header
        if fortran or dtype.hasobject or not shape:
            raise DataError(
                f"{self.path}: expected a C-ordered array of numbers with a first (row) axis, got shape "
                f"{shape}, {'Fortran order' if fortran else 'C order'}, dtype {dtype}"
            )
        self.shape, self.dtype = tuple(shape), dtype
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        expected = self.offset + self.shape[0] * self.row_bytes
        size = self.path.stat().st_size
        if size < expected:
            raise DataError(f"{self.path} is truncated: {size} bytes, its header needs {expected}")
        self._fd: int | None = None
        self._pid = 0
        self._unforgotten = 0  # bytes read since the last drop

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            # (no POSIX_FADV_SEQUENTIAL: it doubles the readahead, pages cached ahead of the reader)
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) (clipped to the array) as a new array."""
        start, stop = max(0, int(start)), min(int(stop), self.shape[0])
        rows = np.empty((max(stop - start, 0), *self.shape[1:]), self.dtype)
        if rows.nbytes:
            fd = self._descriptor()
            end = self.offset + stop * self.row_bytes
            read_at(fd, rows, self.offset + start * self.row_bytes)
            self._unforgotten += rows.nbytes
            if self._unforgotten >= self.window:
                # from the start of the file, like CacheBound.forget: what a DataLoader worker
                # holds for a moment survives one drop and goes with the next
                _drop_cached(fd, end)
                self._unforgotten = 0
        return rows

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_pid": 0}  # a descriptor means nothing in another process

    def __enter__(self) -> NpyRowReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------- images

_TIFF_SUFFIXES = {".tif", ".tiff"}
# Pixel types a Cell Painting image may have; anything else (RGB, 32-bit ints, booleans) is an error.
SUPPORTED_DTYPES = ("uint8", "uint16", "float32", "float64")
# Grey PIL modes -> the numpy dtype np.asarray gives (16-bit PNGs open as I;16 in Pillow >= 10).
_PIL_GREY_MODES = {"L": "uint8", "I;16": "uint16", "I;16B": "uint16", "I;16L": "uint16", "F": "float32"}


@dataclass(frozen=True)
class ImageHeader:
    """What a file's header says about its pixels, read without decoding them."""

    path: str
    shape: tuple[int, ...]  # (rows, cols) after dropping length-1 axes, like read_image
    dtype: str
    compression: str  # "none", a TIFF compression name ("LZW", "ADOBE_DEFLATE", ...) or "png"


def _tiff_compression_name(compression) -> str:
    return getattr(compression, "name", str(compression))


def _decode_error(path: Path, exc: Exception) -> ImageError:
    """An ImageError for a decoder failure, saying which codec is missing when that is the cause."""
    text = str(exc)
    if "imagecodecs" in text:
        # tifffile: "<COMPRESSION.LZW: 5> requires the 'imagecodecs' package"
        return ImageError(
            f"cannot decode image {path}: its TIFF compression needs the 'imagecodecs' package, which is "
            f"not installed here ({text}); run: pip install imagecodecs (a dependency of phenoprofiler-core)"
        )
    if "is not a known COMPRESSION" in text:
        return ImageError(
            f"cannot decode image {path}: TIFF compression {text.split()[0]} has no decoder (known: none, "
            "LZW, Deflate, Adobe-Deflate, ZSTD, PackBits, JPEG, ... as imagecodecs supports); "
            "re-save the image uncompressed or with LZW/Deflate"
        )
    return ImageError(f"cannot decode image {path}: {type(exc).__name__}: {exc}")


def read_image_header(path: str | os.PathLike) -> ImageHeader:
    """Shape, pixel type and compression of one image from its header (no pixel decoding).

    Raises :class:`ImageError` naming the file when it is missing or its header is unreadable, when it
    is not one 2-D grey plane, or when its pixel type is not one of :data:`SUPPORTED_DTYPES`.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image file not found: {path}")
    try:
        if path.suffix.lower() in _TIFF_SUFFIXES:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                shape, dtype = tuple(series.shape), np.dtype(series.dtype).name
                compression = _tiff_compression_name(tif.pages[0].compression)
        else:
            from PIL import Image

            with Image.open(path) as handle:
                mode, (width, height) = handle.mode, handle.size
                compression = (handle.format or "image").lower()
            if mode not in _PIL_GREY_MODES:
                raise ImageError(
                    f"image {path} has PIL mode {mode}; expected one grey channel per file "
                    "(8- or 16-bit grey, or 32-bit float)"
                )
            shape, dtype = (height, width), _PIL_GREY_MODES[mode]
    except ImageError:
        raise
    except Exception as exc:  # any header parse failure means a corrupt, truncated or foreign file
        raise _decode_error(path, exc) from exc
    shape = tuple(int(n) for n in shape if n != 1)
    if len(shape) != 2:
        raise ImageError(f"image {path} has shape {shape}; expected one 2-D grey channel per file")
    if dtype not in SUPPORTED_DTYPES:
        raise ImageError(
            f"image {path} has pixel type {dtype}; expected one of {', '.join(SUPPORTED_DTYPES)}"
        )
    return ImageHeader(str(path), shape, dtype, "none" if compression == "NONE" else compression)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read one single-channel microscopy image (8/16-bit PNG or TIFF) as a 2-D array.

    TIFFs may be uncompressed, LZW, Deflate/Adobe-Deflate, ZSTD or PackBits compressed (with or without
    a predictor), striped or tiled: tifffile decodes them, through imagecodecs for LZW, ZSTD and
    PackBits.  Raises :class:`ImageError` naming the file when it is missing, unreadable/corrupt, needs
    a codec that is not installed, or is not 2-D.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image file not found: {path}")
    try:
        if path.suffix.lower() in _TIFF_SUFFIXES:
            import tifffile

            image = tifffile.imread(path)
        else:
            from PIL import Image

            with Image.open(path) as handle:
                handle.load()
                image = np.asarray(handle)
    except Exception as exc:  # any decoder failure means a corrupt or truncated file, or a missing codec
        raise _decode_error(path, exc) from exc
    image = np.squeeze(image)
    if image.ndim != 2:
        raise ImageError(f"image {path} has shape {image.shape}; expected one 2-D grey channel per file")
    if image.dtype.kind not in "uif":
        raise ImageError(f"image {path} has unsupported pixel type {image.dtype}")
    return image
