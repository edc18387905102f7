"""Per-plate stages in flat memory (issue 16): the array writer and reader behind ``cells`` and
``embed``, the streamed tables and medians, and the two stages themselves at real sizes.

Memory is measured as ``bench/scale_images.py`` measures it (its ``PROBE``, what a cgroup charges a
job, each page once): the stage process's resident set (anonymous + file-backed mapped pages), plus
the pages only its worker processes map, plus the page cache of the stage's data files (what it
writes, and the array it reads) that it does not map.  Sizes are real: 1080² 16-bit sources and
96² crops for ``cells``, 448² tiles for ``embed``; only the count of sites is small.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch

from phenoprofiler_core import cells, io
from phenoprofiler_core.embed import EmbedConfig, SiteMedians, build_model, embed_plate
from phenoprofiler_core.errors import DataError
from phenoprofiler_core.model import inference_model
from phenoprofiler_core.train_data import image_to_float

REPO = Path(__file__).resolve().parents[1]
MIB = 1 << 20


def _load_scale_images():
    spec = importlib.util.spec_from_file_location("scale_images", REPO / "bench" / "scale_images.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


scale_images = _load_scale_images()
PROBE: dict = {}
exec(scale_images.PROBE, PROBE)
cached_bytes = PROBE["cached_bytes"]


def _drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- NpyStreamWriter


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [((7, 3, 5, 5), "float16"), ((9, 2, 3), "uint8"), ((4, 11), "float32"), ((0, 5, 8, 8), "float16")],
)
@pytest.mark.parametrize("window", [None, 4096])
def test_stream_writer_writes_the_bytes_np_save_writes(tmp_path, shape, dtype, window):
    """Header and rows byte for byte as np.save writes the whole array, in uneven batches (and with
    a write-back every page), converted to the writer's dtype like an assignment into the array."""
    rng = np.random.default_rng(1)
    array = (rng.random(shape) * 200).astype(dtype)
    with io.NpyStreamWriter(tmp_path / "a.npy", shape, dtype, window=window) as writer:
        start = 0
        for size in (1, 3, 2, 100):
            # float64 in: the writer converts, as `array[rows] = batch` would
            writer.write(array[start : start + size].astype(np.float64))
            start += size
    np.save(tmp_path / "expected.npy", array)
    assert (tmp_path / "a.npy").read_bytes() == (tmp_path / "expected.npy").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "expected.npy"]


def test_stream_writer_is_atomic_and_checks_what_it_is_given(tmp_path):
    out = tmp_path / "crops.npy"
    writer = io.NpyStreamWriter(out, (4, 2, 3), "float16")
    writer.write(np.zeros((3, 2, 3)))
    assert not out.exists() and writer.tmp.exists()  # nothing visible under the real name yet
    with pytest.raises(ValueError, match=r"crops\.npy.*\(2, 2, 3\)"):
        writer.write(np.zeros((2, 2, 3)))  # one row too many
    with pytest.raises(ValueError, match=r"crops\.npy.*\(1, 3, 2\)"):
        writer.write(np.zeros((1, 3, 2)))  # rows of another shape
    with pytest.raises(RuntimeError, match=r"wrote 3 rows, expected 4"):
        writer.close()
    assert list(tmp_path.iterdir()) == []  # a short array is never renamed into place, nor left hidden
    with pytest.raises(KeyError):
        with io.NpyStreamWriter(out, (2, 1), "uint8") as writer:
            writer.write(np.ones((1, 1)))
            raise KeyError("killed half-way")
    assert list(tmp_path.iterdir()) == []


def test_stream_writer_holds_at_most_a_window_in_the_page_cache(tmp_path):
    """64 MiB written in 2 MiB batches with an 8 MiB window: the file's cached pages never exceed the
    window plus one batch, and none are left once it is closed (a memory map of the output, the old
    writer, kept every written page dirty in the cache: 64 MiB here, 6.9 GB for a plate of tiles)."""
    batch = np.ones((1, 1024, 1024), np.float16)  # 2 MiB
    window = 8 * MIB
    writer = io.NpyStreamWriter(tmp_path / "big.npy", (32, 1024, 1024), "float16", window=window)
    most = 0
    for _ in range(32):
        writer.write(batch)
        most = max(most, cached_bytes(writer.tmp))
    assert most <= window + batch.nbytes, most / MIB
    assert most >= window - batch.nbytes  # pages really were cached in between: the check can see them
    writer.close()
    assert cached_bytes(tmp_path / "big.npy") == 0
    assert np.load(tmp_path / "big.npy", mmap_mode="r").shape == (32, 1024, 1024)


# ----------------------------------------------------------------------------- NpyRowReader


@pytest.mark.parametrize("version", [(1, 0), (2, 0)])
def test_row_reader_reads_the_rows_np_load_reads(tmp_path, version):
    rng = np.random.default_rng(2)
    array = rng.integers(0, 65535, size=(10, 3, 4, 4)).astype(np.uint16)
    with open(tmp_path / "a.npy", "wb") as handle:
        np.lib.format.write_array(handle, array, version=version)
    reader = io.NpyRowReader(tmp_path / "a.npy")
    assert reader.shape == array.shape and reader.dtype == array.dtype and len(reader) == 10
    for start, stop in [(0, 10), (3, 4), (7, 10), (8, 20), (5, 5)]:
        rows = reader.read(start, stop)
        assert rows.dtype == np.uint16 and np.array_equal(rows, array[start:stop])
    np.save(tmp_path / "empty.npy", np.zeros((0, 5, 2, 2), np.float16))
    assert io.NpyRowReader(tmp_path / "empty.npy").read(0, 4).shape == (0, 5, 2, 2)


def test_row_reader_names_the_file_when_it_cannot_be_read(tmp_path):
    with pytest.raises(DataError, match=r"not found: .*missing\.npy"):
        io.NpyRowReader(tmp_path / "missing.npy")
    (tmp_path / "text.npy").write_text("not an array")
    with pytest.raises(DataError, match=r"text\.npy is not a readable \.npy"):
        io.NpyRowReader(tmp_path / "text.npy")
    np.save(tmp_path / "short.npy", np.zeros((10, 100), np.float32))
    with open(tmp_path / "short.npy", "r+b") as handle:
        handle.truncate(128 + 9 * 400)  # header + 9 of the 10 rows
    with pytest.raises(DataError, match=r"short\.npy is truncated: 3728 bytes, its header needs 4128"):
        io.NpyRowReader(tmp_path / "short.npy")
    np.save(tmp_path / "fortran.npy", np.asfortranarray(np.zeros((3, 4))))
    with pytest.raises(DataError, match=r"fortran\.npy: expected a C-ordered"):
        io.NpyRowReader(tmp_path / "fortran.npy")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"objects\.npy: expected .* numbers"):
        io.NpyRowReader(tmp_path / "objects.npy")


def _readahead_bytes(path: Path) -> int:
    """The kernel's readahead for the device holding ``path`` (sysfs), 16 MiB when unknown."""
    device = os.stat(path).st_dev
    block = Path(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}")
    for setting in (block / "queue" / "read_ahead_kb", block / ".." / "queue" / "read_ahead_kb"):
        if setting.is_file():
            return int(setting.read_text()) * 1024
    return 16 * MIB


def test_row_reader_drops_what_it_read_from_the_page_cache(tmp_path):
    """A 128 MiB file read front to back in 2 MiB rows with an 8 MiB window: never more than the
    window, a row and the kernel's readahead of what follows cached (a memory map keeps all 128 MiB)."""
    path = tmp_path / "tiles.npy"
    np.save(path, np.repeat(np.arange(64, dtype=np.float16), 1024 * 1024).reshape(64, 1024, 1024))
    _drop_cache(path)
    window, readahead = 8 * MIB, _readahead_bytes(path)
    reader = io.NpyRowReader(path, window=window)
    most = 0
    for start in range(64):
        rows = reader.read(start, start + 1)
        assert rows.shape == (1, 1024, 1024) and (rows == start).all()
        most = max(most, cached_bytes(path))
    print(f"most cached {most / MIB:.1f} MiB (window 8 MiB, readahead {readahead / MIB:.1f} MiB)")
    # the kernel reads ahead in two windows (the current one, and the next once half is used)
    assert window - 2 * MIB <= most <= window + 2 * MIB + 2 * readahead
    assert window + 2 * MIB + 2 * readahead < 64 * MIB  # else this file could not tell a map from a window
    reader.close()


# ----------------------------------------------------------------------------- embed


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    built, _ = build_model(
        "untrained", model_options={"backbone": "test_resnet", "transformer_ffn": 64}, in_channels=5
    )
    return built


def _reference_embeddings(model, array: np.ndarray, batch_size: int) -> np.ndarray:
    """The folded inference model on the same consecutive batches, eager: what ``embed`` computed
    from a memory map before it read batches at offsets (and what it must still compute)."""
    fast = inference_model(model)
    out = []
    with torch.inference_mode():
        for start in range(0, len(array), batch_size):
            batch = torch.from_numpy(image_to_float(array[start : start + batch_size]))
            out.append(fast(batch.contiguous(memory_format=torch.channels_last)).numpy())
    return np.concatenate(out)


def _sites(wells: int, sites: int) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"Metadata_Plate": "P1", "Metadata_Well": f"B{w + 1:02d}", "Metadata_Site": s, "Metadata_Dose": w}
            for w in range(wells)
            for s in range(1, sites + 1)
        ]
    )


@pytest.mark.parametrize("num_workers", [0, 2])
def test_site_embeddings_are_bit_identical_to_the_model_on_the_same_batches(tmp_path, model, num_workers):
    rng = np.random.default_rng(3)
    tiles = rng.random((13, 5, 32, 32)).astype(np.float16)
    np.save(tmp_path / "P1.npy", tiles)
    _sites(13, 1).to_parquet(tmp_path / "P1.sites.parquet")
    cfg = EmbedConfig(batch_size=5, compile="false", num_workers=num_workers)  # 13 = 5 + 5 + 3
    table, stats = embed_plate(model, "P1", level="site", tiles_dir=tmp_path, cells_dir=None, cfg=cfg)
    expected = _reference_embeddings(model, tiles, 5)
    assert np.array_equal(table.filter(like="emb_").to_numpy(), expected)
    assert table["Metadata_Well"].tolist() == _sites(13, 1)["Metadata_Well"].tolist()
    assert stats.images == 13 and stats.batches == 3


@pytest.mark.parametrize("with_sites_table", [True, False])
def test_cell_medians_are_bit_identical_to_a_groupby_median_of_every_cell(tmp_path, model, with_sites_table):
    """Per-site medians taken as the cells stream past equal pandas' groupby median over all the
    cells' embeddings (what embed computed before), odd and even cell counts, batches cutting sites;
    a site without cells has no row."""
    rng = np.random.default_rng(4)
    sites = _sites(3, 2)
    counts = [3, 4, 1, 0, 6, 2]
    cells_table = sites.loc[sites.index.repeat(counts)].reset_index(drop=True)
    cells_table["Metadata_ObjectNumber"] = (
        cells_table.groupby(["Metadata_Well", "Metadata_Site"]).cumcount() + 1
    )
    crops = rng.random((len(cells_table), 5, 24, 24)).astype(np.float16)
    (tmp_path / "cells").mkdir()
    (tmp_path / "tiles").mkdir()
    np.save(tmp_path / "cells" / "P1.npy", crops)
    cells_table.to_parquet(tmp_path / "cells" / "P1.cells.parquet")
    if with_sites_table:
        sites.to_parquet(tmp_path / "tiles" / "P1.sites.parquet")
    cfg = EmbedConfig(batch_size=4, compile="false")
    table, _ = embed_plate(
        model, "P1", level="cell", tiles_dir=tmp_path / "tiles", cells_dir=tmp_path / "cells", cfg=cfg
    )
    per_cell = _reference_embeddings(model, crops, 4)
    columns = [f"emb_{i:03d}" for i in range(per_cell.shape[1])]
    keys = ["Metadata_Plate", "Metadata_Well", "Metadata_Site"]
    frame = pd.concat([cells_table[keys], pd.DataFrame(per_cell, columns=columns)], axis=1)
    expected = frame.groupby(keys, sort=False)[columns].median().astype(np.float32).reset_index()
    assert table[keys].values.tolist() == expected[keys].values.tolist()  # B02 site 2 has no cells
    assert np.array_equal(table[columns].to_numpy(), expected[columns].to_numpy())
    assert table["Metadata_Dose"].tolist() == [0, 0, 1, 2, 2]


def test_site_medians_hold_only_the_sites_still_open():
    """Hand-worked: 2-d embeddings of 6 cells of sites a (3 cells), b (2), c (1), in batches of 2."""
    cells_table = pd.DataFrame(
        {"Metadata_Plate": "P", "Metadata_Well": list("aaabbc"), "Metadata_Site": [1, 1, 1, 1, 1, 1]}
    )
    embeddings = np.array([[1, 9], [5, 2], [3, 4], [10, 0], [20, 1], [7, 7]], np.float32)
    medians = SiteMedians(cells_table, 2)
    medians.add(0, embeddings[0:2])
    assert sorted(medians.pending) == [0]  # a is still open after 2 of its 3 cells
    medians.add(2, embeddings[2:4])
    assert sorted(medians.pending) == [1]  # a done; b open
    medians.add(4, embeddings[4:6])
    assert medians.pending == {}
    table = medians.table()
    assert table["Metadata_Well"].tolist() == ["a", "b", "c"]
    # a: median(1, 5, 3) = 3, median(9, 2, 4) = 4; b: mean of the two = 15, 0.5; c: itself
    assert table.filter(like="emb_").to_numpy().tolist() == [[3, 4], [15, 0.5], [7, 7]]


# ----------------------------------------------------------------------------- cells' table


def _blank_site_plate(folder: Path, *, blank: set[int]) -> Path:
    """Three 160² sites with two bright nuclei each, except the sites in ``blank`` (no nucleus)."""
    yy, xx = np.mgrid[:160, :160]
    rows = []
    for site in (1, 2, 3):
        dna = np.full((160, 160), 500, np.uint16)
        if site not in blank:
            for x, y in [(50, 60), (110, 100)]:
                dna[(xx - x) ** 2 + (yy - y) ** 2 <= 81] = 40000
        row = {"Metadata_Plate": "P1", "Metadata_Well": "C03", "Metadata_Site": site, "Metadata_Dose": 0.5}
        for channel, plane in (("DNA", dna), ("ER", (xx * 300).astype(np.uint16))):
            path = folder / f"s{site}_{channel}.tif"
            tifffile.imwrite(path, plane)
            row[f"Path_{channel}"] = str(path)
        rows.append(row)
    pd.DataFrame(rows).to_parquet(folder / "manifest.parquet")
    return folder / "manifest.parquet"


@pytest.mark.parametrize("blank", [{2}, {1, 2, 3}])
def test_cells_table_is_streamed_with_every_column_typed_even_without_cells(tmp_path, blank):
    manifest = _blank_site_plate(tmp_path, blank=blank)
    options = cells.NucleiOptions(min_area=50, min_distance=6)
    out, table_path = tmp_path / "out" / "P1.npy", tmp_path / "out" / "P1.cells.parquet"
    summary = cells.run_cells(manifest, "P1", out, table_path, nuclei=options, box_size=32, crop_size=16)
    table = pd.read_parquet(table_path)
    n = 2 * (3 - len(blank))
    assert summary["cells"] == n == len(table) and np.load(out).shape == (n, 2, 16, 16)
    assert list(table.columns) == [*cells.CELL_ID_COLUMNS, "Metadata_Dose"]
    assert table.dtypes.astype(str).tolist()[2:] == ["int64", "int64", "float32", "float32", "float64"]
    assert table["Metadata_Site"].tolist() == [s for s in (1, 2, 3) if s not in blank for _ in range(2)]
    assert table["Metadata_ObjectNumber"].tolist() == [1, 2] * (3 - len(blank))
    assert sorted(p.name for p in out.parent.iterdir()) == ["P1.cells.parquet", "P1.npy"]


def test_parquet_stream_writer_writes_row_groups_atomically(tmp_path):
    import pyarrow.parquet as pq

    out = tmp_path / "t.parquet"
    frame = pd.DataFrame({"Metadata_Well": [f"A{i:02d}" for i in range(10)], "x": np.arange(10.0)})
    with io.ParquetStreamWriter(out, row_group_rows=4) as writer:
        for start in range(0, 10, 3):
            writer.write(frame.iloc[start : start + 3])
            assert not out.exists()
    pd.testing.assert_frame_equal(pd.read_parquet(out), frame)
    assert [pq.ParquetFile(out).metadata.row_group(i).num_rows for i in range(3)] == [4, 4, 2]
    with pytest.raises(KeyError):
        with io.ParquetStreamWriter(tmp_path / "u.parquet") as writer:
            writer.write(frame)
            raise KeyError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.parquet"]


# ----------------------------------------------------------------------------- memory at real sizes


def _check_flat(small: dict, large: dict, what: str) -> None:
    for name, run in (("small", small), ("large", large)):
        print(
            f"{what} {name}: peak {run['peak_bytes'] / MIB:.0f} MiB (resident {run['resident'] / MIB:.0f} "
            f"+ workers {run['workers'] / MIB:.0f} + file cache {run['cache'] / MIB:.0f}), "
            f"VmHWM {run['hwm'] / MIB:.0f} MiB, {run['wall_s']:.1f} s"
        )
    print(f"{what}: peak ratio {large['peak_bytes'] / small['peak_bytes']:.2f}")
    assert large["peak_bytes"] <= 1.2 * small["peak_bytes"], (small, large)


def _cells_peaks(tmp_path: Path, small_sites: int, factor: int) -> tuple[dict, dict]:
    runs = []
    for n in (small_sites, small_sites * factor):
        manifest = scale_images.write_plate(tmp_path, n, distinct=small_sites)
        work = tmp_path / f"work{n}"
        scale_images.run_stage("illumination", manifest, work, 2)
        runs.append(scale_images.run_stage("cells", manifest, work, 2))
        crops = np.load(work / "cells" / "P.npy", mmap_mode="r")
        assert crops.shape[1:] == (5, 96, 96) and len(crops) >= 100 * n  # ~140 nuclei a synthetic site
        shutil.rmtree(work)
    return runs[0], runs[1]


def test_cells_memory_is_flat_from_8_to_32_sites(tmp_path):
    """1080² 16-bit sources (cpg0004's size), 96² crops, ~140 cells a site: 32 sites write 4,500
    crops (400 MB); the memory-mapped output grew the job by all of it (1.29x here), now 1.03x."""
    _check_flat(*_cells_peaks(tmp_path, 8, 4), "cells 8 -> 32 sites")


@pytest.mark.slow
def test_cells_memory_is_flat_from_8_to_64_sites(tmp_path):
    _check_flat(*_cells_peaks(tmp_path, 8, 8), "cells 8 -> 64 sites")


EMBED = r"""
from phenoprofiler_core import io
from phenoprofiler_core.embed import EmbedConfig, build_model, embed_plate
import pandas as pd, torch

folder, n = Path(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(2)
model, _ = build_model(
    "untrained", model_options={"backbone": "test_resnet", "transformer_ffn": 64, "input_size": 64}, in_channels=5
)
cfg = EmbedConfig(batch_size=8, device="cpu", compile="false")
out = {}
run = lambda: out.update(table=embed_plate(model, "P", level="site", tiles_dir=folder, cells_dir=None, cfg=cfg)[0])
result = measure(run, lambda: [folder / "P.npy"])
assert len(out["table"]) == n
print(json.dumps(result))
"""


def _tiles(folder: Path, n: int) -> Path:
    """n real-size tiles (5 x 448² float16), 8 distinct ones cycled; written and dropped from the cache."""
    folder.mkdir(parents=True)
    distinct = np.random.default_rng(5).random((8, 5, 448, 448)).astype(np.float16)
    with io.NpyStreamWriter(folder / "P.npy", (n, 5, 448, 448), "float16") as writer:
        for start in range(0, n, 8):
            writer.write(distinct[: min(8, n - start)])
    _sites(n, 1).assign(Metadata_Plate="P").to_parquet(folder / "P.sites.parquet")
    return folder


def test_embed_memory_is_flat_from_48_to_432_tiles(tmp_path):
    """Real 448² float16 tiles, 2 MB a site: 432 sites are 867 MB, all of which a memory map left
    resident and charged to the job; read at offsets, the job holds a window of them."""
    small = scale_images.run_probe(EMBED, [str(_tiles(tmp_path / "small", 48)), "48"])
    large = scale_images.run_probe(EMBED, [str(_tiles(tmp_path / "large", 432)), "432"])
    _check_flat(small, large, "embed 48 -> 432 tiles")
