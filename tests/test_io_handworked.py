"""Atomic writers and image reading (phenoprofiler_core/io.py), by behaviour a user can observe.

"Atomic" means (DESIGN.md §4): while a writer is busy, or after it was killed, nothing sits under
the final name (or, once finished, the complete file does); a reader who opened the previous
version keeps reading that complete version (the new file is renamed over it, the old one is
never truncated).  The kill tests fork a real writer process and SIGKILL it mid-write.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from phenoprofiler_core.errors import ImageError
from phenoprofiler_core.io import (
    NpyStreamWriter,
    atomic_path,
    read_image,
    write_json,
    write_npy,
    write_parquet,
    write_text,
)

# ----------------------------------------------------------------------------- helpers


def _others(folder: Path, final: Path) -> list[Path]:
    """Entries of ``folder`` other than ``final`` (temporary files)."""
    return sorted(p for p in folder.iterdir() if p != final)


def _fork_and_stop(body) -> tuple[int, int]:
    """Fork a child that runs ``body(ready_fd)``; return (pid, read end) once it wrote b'!' to ready_fd.

    The child never returns into pytest: it ends with os._exit (or is killed by the parent).
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        try:
            body(write_fd)
        finally:
            os._exit(0)
    os.close(write_fd)
    assert os.read(read_fd, 1) == b"!", "the writer process did not reach the checkpoint"
    return pid, read_fd


def _kill(pid: int, read_fd: int) -> None:
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    os.close(read_fd)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def _hang(ready_fd: int) -> None:
    os.write(ready_fd, b"!")
    time.sleep(120)  # the parent kills us long before


class _BlockWhilePickled:
    """An object whose pickling (inside np.save of an object array) signals and then hangs."""

    ready_fd = -1

    def __reduce__(self):
        _hang(self.ready_fd)
        raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- atomic_path


def test_atomic_path_writes_beside_the_target_and_renames_on_success(tmp_path):
    final = tmp_path / "nested" / "deeper" / "table.csv"  # parent folders are created
    with atomic_path(final) as tmp:
        assert tmp.parent == final.parent  # same folder: the rename is atomic (same file system)
        assert tmp.name.startswith(".table.csv.") and tmp.name.endswith(".tmp.csv")
        assert tmp.exists() and not final.exists()
        tmp.write_text("a,b\n1,2\n")
        assert not final.exists()  # nothing under the final name while the write is open
    assert final.read_text() == "a,b\n1,2\n"
    assert _others(final.parent, final) == []  # the temporary file is gone


def test_atomic_path_suffix_option(tmp_path):
    with atomic_path(tmp_path / "picture.png", suffix=".svg") as tmp:
        assert tmp.name.endswith(".tmp.svg")
        tmp.write_text("x")
    assert (tmp_path / "picture.png").read_text() == "x"


def test_atomic_path_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    final = tmp_path / "out.txt"
    final.write_text("old complete content")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(final) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("boom")
    assert final.read_text() == "old complete content"
    assert _others(tmp_path, final) == []


def test_atomic_path_failure_without_old_file_leaves_nothing(tmp_path):
    final = tmp_path / "out.txt"
    with pytest.raises(ValueError):
        with atomic_path(final) as tmp:
            tmp.write_text("partial")
            raise ValueError
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("umask, mode", [(0o027, 0o640), (0o002, 0o664)])
def test_outputs_get_normal_file_permissions(tmp_path, umask, mode):
    # mkstemp creates 0600 files; outputs must get rw-rw-rw- minus the user's umask, like any file.
    old = os.umask(umask)
    try:
        write_text("x", tmp_path / "a.txt")
        with NpyStreamWriter(tmp_path / "b.npy", (1,), np.uint8) as writer:
            writer.write(np.zeros(1, np.uint8))
    finally:
        os.umask(old)
    for name in ("a.txt", "b.npy"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


def test_killed_inside_atomic_path_leaves_no_final_file(tmp_path):
    final = tmp_path / "result.txt"

    def body(ready_fd):
        with atomic_path(final) as tmp:
            tmp.write_text("first half ")
            _hang(ready_fd)

    pid, read_fd = _fork_and_stop(body)
    assert not final.exists()
    leftovers = _others(tmp_path, final)
    assert len(leftovers) == 1 and leftovers[0].read_text() == "first half "  # the work went to a temp
    _kill(pid, read_fd)
    assert not final.exists()


# ----------------------------------------------------------------------------- whole-file writers


def _reader_keeps_old_version(path: Path, write_new, read) -> None:
    """An open handle on the previous version still reads it whole after the new one is written."""
    with open(path, "rb") as old_handle:
        old_bytes = path.read_bytes()
        write_new()
        assert old_handle.read() == old_bytes  # not truncated or overwritten in place
    read()


def test_write_npy_round_trip_and_replacement(tmp_path):
    path = tmp_path / "a.npy"
    write_npy(np.arange(6, dtype=np.int16).reshape(2, 3), path)
    loaded = np.load(path)
    assert loaded.dtype == np.int16 and loaded.tolist() == [[0, 1, 2], [3, 4, 5]]
    new = np.linspace(0, 1, 5, dtype=np.float32)

    def read():
        np.testing.assert_array_equal(np.load(path), new)

    _reader_keeps_old_version(path, lambda: write_npy(new, path), read)
    assert _others(tmp_path, path) == []


def test_write_parquet_round_trip_and_replacement(tmp_path):
    path = tmp_path / "t.parquet"
    df = pd.DataFrame(
        {"Metadata_Well": ["A01", "B02"], "f": np.array([0.5, -1.25], np.float32)}, index=[7, 9]
    )
    write_parquet(df, path)
    back = pd.read_parquet(path)
    assert back.index.tolist() == [0, 1]  # index dropped
    assert back["Metadata_Well"].tolist() == ["A01", "B02"] and back["f"].tolist() == [0.5, -1.25]
    assert back["f"].dtype == np.float32
    new = pd.DataFrame({"g": [1, 2, 3]})
    _reader_keeps_old_version(
        path,
        lambda: write_parquet(new, path),
        lambda: pd.testing.assert_frame_equal(pd.read_parquet(path), new),
    )
    assert _others(tmp_path, path) == []


def test_write_json_format_and_replacement(tmp_path):
    path = tmp_path / "r.json"
    write_json({"n": 2, "where": Path("/x/y")}, path)  # non-JSON values are written with str()
    assert path.read_text() == '{\n  "n": 2,\n  "where": "/x/y"\n}'
    _reader_keeps_old_version(
        path, lambda: write_json([1, 2], path), lambda: json.loads(path.read_text()) == [1, 2]
    )
    assert json.loads(path.read_text()) == [1, 2]
    assert _others(tmp_path, path) == []


def test_write_text_and_replacement(tmp_path):
    path = tmp_path / "report.html"
    write_text("<p>one</p>", path)
    assert path.read_text() == "<p>one</p>"
    _reader_keeps_old_version(path, lambda: write_text("<p>two</p>", path), lambda: None)
    assert path.read_text() == "<p>two</p>"
    assert _others(tmp_path, path) == []


def test_write_npy_killed_mid_write_leaves_no_final_file(tmp_path):
    # np.save pickles an object array element by element; the second element hangs the writer
    # after the header and the first element are written.
    path = tmp_path / "objects.npy"

    def body(ready_fd):
        blocker = _BlockWhilePickled()
        blocker.ready_fd = ready_fd
        write_npy(np.array([{"first": 1}, blocker], dtype=object), path)

    pid, read_fd = _fork_and_stop(body)
    assert not path.exists()
    leftovers = _others(tmp_path, path)
    # the write is under way in a temporary file beside the target (its bytes may still be buffered)
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".objects.npy.")
    _kill(pid, read_fd)
    assert not path.exists()


# ----------------------------------------------------------------------------- NpyStreamWriter


def test_stream_writer_is_invisible_until_closed(tmp_path):
    path = tmp_path / "results" / "tiles" / "P1.npy"  # missing parent folders are created
    writer = NpyStreamWriter(path, (5, 2), np.float32)
    writer.write(np.array([[0, 1], [2, 3]], np.float32))
    writer.write(np.zeros((0, 2), np.float32))  # an empty batch changes nothing
    writer.write(np.array([[4, 5], [6, 7], [8, 9]], np.float32))
    assert not path.exists()
    (temp,) = _others(path.parent, path)
    assert temp.name.startswith(".P1.npy.") and temp.name.endswith(".tmp.npy")
    writer.close()
    loaded = np.load(path)
    assert loaded.dtype == np.float32
    assert loaded.tolist() == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert _others(path.parent, path) == []


def test_stream_writer_refuses_to_publish_a_short_array(tmp_path):
    path = tmp_path / "P1.npy"
    writer = NpyStreamWriter(path, (4, 3), np.uint16)
    writer.write(np.ones((3, 3), np.uint16))
    with pytest.raises(RuntimeError, match=r"P1\.npy: wrote 3 rows, expected 4"):
        writer.close()
    assert not path.exists()
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_stream_writer_context_manager(tmp_path):
    done = tmp_path / "done.npy"
    with NpyStreamWriter(done, (2,), np.int64) as writer:
        writer.write(np.array([7, 8]))
    assert np.load(done).tolist() == [7, 8]
    failed = tmp_path / "failed.npy"
    with pytest.raises(KeyError):
        with NpyStreamWriter(failed, (2,), np.int64) as writer:
            writer.write(np.array([1]))
            raise KeyError("source image missing")
    assert not failed.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done.npy"]  # the temp file was removed


def test_stream_writer_abort_keeps_an_existing_complete_file(tmp_path):
    path = tmp_path / "P1.npy"
    np.save(path, np.arange(3))
    writer = NpyStreamWriter(path, (3,), np.int64)
    writer.write(np.array([9, 9]))
    writer.abort()
    writer.abort()  # a second abort is harmless
    assert np.load(path).tolist() == [0, 1, 2]
    assert _others(tmp_path, path) == []


def test_killed_stream_writer_leaves_nothing_then_a_finished_one_leaves_a_complete_file(tmp_path):
    path = tmp_path / "plate.npy"
    rows = np.arange(12, dtype=np.uint8).reshape(6, 2)

    def killed(ready_fd):
        writer = NpyStreamWriter(path, (6, 2), np.uint8)
        writer.write(rows[:4])
        _hang(ready_fd)

    pid, read_fd = _fork_and_stop(killed)
    assert not path.exists()
    _kill(pid, read_fd)
    assert not path.exists()  # the half-written array never appears under the real name

    def finished(ready_fd):
        with NpyStreamWriter(path, (6, 2), np.uint8) as writer:
            writer.write(rows[:4])
            writer.write(rows[4:])
        os.write(ready_fd, b"!")

    pid, read_fd = _fork_and_stop(finished)
    _, status = os.waitpid(pid, 0)
    os.close(read_fd)
    assert os.WIFEXITED(status)
    np.testing.assert_array_equal(np.load(path), rows)  # complete


# ----------------------------------------------------------------------------- read_image


@pytest.mark.parametrize(
    "name, array",
    [
        ("a.png", np.array([[0, 255], [17, 128]], np.uint8)),
        ("b.png", np.array([[0, 65535], [1000, 4095]], np.uint16)),
        ("c.tif", np.array([[0, 65535], [1000, 4095]], np.uint16)),
        ("d.tiff", np.array([[0.25, -1.5], [3.0, 1e6]], np.float32)),
        ("e.TIF", np.array([[0.5, 2.0], [1e-3, 7.0]], np.float64)),  # upper-case suffix: still TIFF
    ],
)
def test_read_image_returns_the_pixels_and_bit_depth(tmp_path, name, array):
    path = tmp_path / name
    if path.suffix.lower() == ".png":
        Image.fromarray(array).save(path)
    else:
        tifffile.imwrite(path, array)
    image = read_image(str(path))
    assert image.dtype == array.dtype
    np.testing.assert_array_equal(image, array)


def test_read_image_squeezes_a_single_plane_stack(tmp_path):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, np.arange(6, dtype=np.uint16).reshape(1, 2, 3))
    assert read_image(path).tolist() == [[0, 1, 2], [3, 4, 5]]


def test_read_image_errors_name_the_file(tmp_path):
    with pytest.raises(ImageError, match=r"^image file not found: .*absent\.png$"):
        read_image(tmp_path / "absent.png")
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(rgb)
    with pytest.raises(ImageError, match=r"rgb\.png has shape \(4, 5, 3\); expected one 2-D grey channel"):
        read_image(rgb)
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"this is not a TIFF file")
    with pytest.raises(ImageError, match=r"^cannot decode image .*junk\.tif: ") as error:
        read_image(junk)
    cause = error.value.__cause__  # the decoder's own exception, named in the message
    assert cause is not None and f": {type(cause).__name__}: " in str(error.value)
    cut = tmp_path / "cut.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(cut)
    cut.write_bytes(cut.read_bytes()[:50])
    with pytest.raises(ImageError, match=r"cannot decode image .*cut\.png"):
        read_image(cut)
    complex_tiff = tmp_path / "complex.tif"
    tifffile.imwrite(complex_tiff, np.ones((2, 2), np.complex64))
    with pytest.raises(ImageError, match=r"complex\.tif has unsupported pixel type complex64"):
        read_image(complex_tiff)
