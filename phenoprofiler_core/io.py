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
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import ImageError

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


class NpyStreamWriter:
    """Write a (N, ...) array to ``.npy`` batch by batch without holding it in memory.

    The file is created under a temporary name as a memory map of the final shape; ``close()``
    flushes and renames it into place.  If the writer is abandoned (exception, kill) the temporary
    file is removed / never renamed, so no half-written array is ever visible under the real name.
    """

    def __init__(self, path: str | os.PathLike, shape: tuple[int, ...], dtype) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = _temp_beside(self.path, ".tmp.npy")
        self.array = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=dtype, shape=shape)
        self.position = 0

    def write(self, batch: np.ndarray) -> None:
        n = len(batch)
        self.array[self.position : self.position + n] = batch
        self.position += n

    def close(self) -> None:
        if self.position != self.array.shape[0]:
            raise RuntimeError(f"{self.path}: wrote {self.position} rows, expected {self.array.shape[0]}")
        self.array.flush()
        del self.array
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            del self.array
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()

    def __enter__(self) -> NpyStreamWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


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
