"""Tile assembly: shape, dtype, channel order, pixels that follow from the source, atomicity."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from helpers import cell_image, save
from skimage.transform import resize

from phenoprofiler_core.errors import ImageError
from phenoprofiler_core.io import write_npy
from phenoprofiler_core.tiles import as_float, assemble_tiles, load_tiles

CHANNELS = ["DNA", "ER", "RNA"]


def make_plate(folder, n_sites=5, shape=(64, 64), dtype=np.uint16):
    rows = []
    for s in range(n_sites):
        row = {
            "Metadata_Plate": "P1",
            "Metadata_Well": f"A{s + 1:02d}",
            "Metadata_Site": 1,
            "Metadata_Treatment": "x",
            "Metadata_TreatmentId": "x",
            "Metadata_pert_type": "trt",
            "Metadata_moa": "",
        }
        for k, ch in enumerate(CHANNELS):
            image = cell_image(shape, seed=10 * s + k, dtype=dtype, peak=1000.0 * (k + 1))
            if ch == "DNA":
                image[:8, :8] = np.iinfo(dtype).max  # a DNA-only mark, to check channel order
            row[f"Path_{ch}"] = str(save(image, folder / f"s{s}_{ch}.tif"))
        rows.append(row)
    return pd.DataFrame(rows)


def read_site(row):
    import tifffile

    return np.stack([tifffile.imread(row[f"Path_{c}"]).astype(np.float32) for c in CHANNELS])


def test_shape_dtype_and_channel_order(tmp_path):
    manifest = make_plate(tmp_path / "img")
    out = tmp_path / "tiles" / "P1.npy"
    assemble_tiles(manifest, CHANNELS, out, size=32, dtype="float16", batch_size=2, progress=False)
    tiles, sites = load_tiles(out)
    assert tiles.shape == (5, 3, 32, 32) and tiles.dtype == np.float16
    assert sites[["Metadata_Well"]].values.ravel().tolist() == manifest.Metadata_Well.tolist()
    assert float(tiles.min()) >= 0.0 and float(tiles.max()) <= 1.0
    # the DNA mark (top-left 8x8 of 64 -> 4x4 of 32) is saturated in channel 0 only
    assert (tiles[:, 0, :3, :3] > 0.99).all()
    assert not (tiles[:, 1, :3, :3] > 0.99).all()


def test_pixels_follow_from_source_without_resize(tmp_path):
    manifest = make_plate(tmp_path / "img")
    illum = tmp_path / "illum"
    yy, xx = np.mgrid[:64, :64]
    for k, ch in enumerate(CHANNELS):
        write_npy((1.0 + 0.01 * (k + 1) * (xx + yy) / 2).astype(np.float32), illum / f"{ch}.npy")
    out = tmp_path / "P1.npy"
    info = assemble_tiles(manifest, CHANNELS, out, illum_dir=illum, size=64, dtype="float32", progress=False)
    tiles, _ = load_tiles(out)
    low, high = np.array(info["low"]), np.array(info["high"])
    functions = np.stack([np.load(illum / f"{c}.npy") for c in CHANNELS])
    for i, row in manifest.iterrows():
        corrected = read_site(row) / functions
        expected = np.clip((corrected - low[:, None, None]) / (high - low)[:, None, None], 0, 1)
        np.testing.assert_allclose(tiles[i], expected, atol=1e-5)
    # the rescale range is the configured percentiles of the plate's corrected pixels
    allpix = np.stack([read_site(r) / functions for _, r in manifest.iterrows()])
    for c in range(3):
        assert high[c] == pytest.approx(np.percentile(allpix[:, c], 99.9), rel=0.01)
        assert low[c] == pytest.approx(np.percentile(allpix[:, c], 0.1), rel=0.01, abs=1.0)
    assert json.loads((tmp_path / "P1.rescale.json").read_text())["channels"] == CHANNELS


def test_resized_pixels_match_reference_resampling(tmp_path):
    manifest = make_plate(tmp_path / "img", shape=(96, 96))
    out = tmp_path / "P1.npy"
    info = assemble_tiles(manifest, CHANNELS, out, size=48, dtype="float32", progress=False)
    tiles, _ = load_tiles(out)
    low, high = np.array(info["low"]), np.array(info["high"])
    for i, row in manifest.iterrows():
        ref = resize(read_site(row), (3, 48, 48), order=1, anti_aliasing=True, preserve_range=True)
        ref = np.clip((ref - low[:, None, None]) / (high - low)[:, None, None], 0, 1)
        assert np.corrcoef(ref.ravel(), tiles[i].ravel())[0, 1] > 0.98


def test_uint8_storage_round_trips(tmp_path):
    manifest = make_plate(tmp_path / "img")
    assemble_tiles(manifest, CHANNELS, tmp_path / "a.npy", size=32, dtype="float32", progress=False)
    assemble_tiles(manifest, CHANNELS, tmp_path / "b.npy", size=32, dtype="uint8", progress=False)
    a, _ = load_tiles(tmp_path / "a.npy")
    b, _ = load_tiles(tmp_path / "b.npy")
    assert b.dtype == np.uint8
    np.testing.assert_allclose(as_float(b), a, atol=1 / 255)


def test_corrupt_image_mid_plate_leaves_no_output(tmp_path):
    manifest = make_plate(tmp_path / "img")
    bad = manifest.loc[3, "Path_RNA"]
    with open(bad, "r+b") as handle:
        handle.truncate(100)
    out = tmp_path / "tiles" / "P1.npy"
    with pytest.raises(ImageError, match=r"s3_RNA\.tif"):
        assemble_tiles(manifest, CHANNELS, out, size=32, batch_size=2, progress=False)
    assert list((tmp_path / "tiles").iterdir()) == []  # no tile file, no scratch, no half index


def test_wrong_size_within_plate_fails_naming_the_file(tmp_path):
    manifest = make_plate(tmp_path / "img")
    save(cell_image((64, 80)), tmp_path / "img" / "s2_ER.tif")
    with pytest.raises(ImageError, match=r"s2_ER\.tif"):
        assemble_tiles(manifest, CHANNELS, tmp_path / "P1.npy", size=32, progress=False)


THREADS_SCRIPT = r"""
import json, os, sys, threading, time
from pathlib import Path
import pandas as pd
from phenoprofiler_core.tiles import assemble_tiles


def cpu_ticks():
    ticks = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        ticks[int(tid)] = int(fields[11]) + int(fields[12])  # utime + stime
    return ticks


seen, running = {}, True


def sample():  # threads that end before the run does are still counted
    me = threading.get_native_id()
    while running:
        seen.update({tid: t for tid, t in cpu_ticks().items() if tid != me})
        time.sleep(0.02)


manifest = pd.read_parquet(sys.argv[1])
before = cpu_ticks()
sampler = threading.Thread(target=sample)
sampler.start()
assemble_tiles(manifest, ["DNA", "ER", "RNA"], sys.argv[2], size=448, threads=int(sys.argv[3]), progress=False)
running = False
sampler.join()
used = {tid: t - before.get(tid, 0) for tid, t in seen.items() if tid != threading.main_thread().native_id}
print(json.dumps(sorted(used.values(), reverse=True)))
"""


@pytest.fixture(scope="module")
def full_size_manifest(tmp_path_factory) -> Path:
    """72 three-channel sites of 1080² 16-bit images (3 files reused: the work is per image read)."""
    folder = tmp_path_factory.mktemp("full_size")
    files = [save(cell_image((1080, 1080), seed=k, n_cells=20), folder / f"img{k}.tif") for k in range(3)]
    rows = [
        {"Metadata_Plate": "P", "Metadata_Well": f"A{s + 1:02d}", "Metadata_Site": 1}
        | {f"Path_{ch}": str(files[(s + k) % 3]) for k, ch in enumerate(CHANNELS)}
        for s in range(72)
    ]
    pd.DataFrame(rows).to_parquet(folder / "manifest.parquet")
    return folder / "manifest.parquet"


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc per-thread CPU times")
@pytest.mark.parametrize("threads", [1, 2])
def test_threads_is_the_number_of_threads_doing_the_work(tmp_path, full_size_manifest, threads):
    """--threads N (the rule's threads): N threads share the work, none besides them (torch's own
    intra-op pool would add as many again, and oversubscribed runs 5x slower on a busy machine)."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    command = [
        sys.executable,
        "-c",
        THREADS_SCRIPT,
        str(full_size_manifest),
        str(tmp_path / "P.npy"),
        str(threads),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    ticks = json.loads(result.stdout.strip().splitlines()[-1])  # CPU time of each thread but the caller's
    busy = [t for t in ticks if t >= 0.05 * sum(ticks)]
    assert len(busy) == threads, ticks


@pytest.mark.parametrize("dtype", ["float16", "uint8", "uint16", "float32"])
@pytest.mark.parametrize("window", [None, 4096])
def test_stored_tiles_are_the_exact_rescale_of_the_corrected_pixels(tmp_path, monkeypatch, dtype, window):
    """Bit for bit: the plate's float32 values survive the decode pass exactly (a float16 intermediate
    would move ~1 value in 4 by one step), also when the files are written back and dropped from
    the page cache every page (window 4096 bytes) instead of every 32 MiB."""
    import phenoprofiler_core.tiles as tiles_module

    if window is not None:
        monkeypatch.setattr(tiles_module, "WRITE_BACK_BYTES", window)
    manifest = make_plate(tmp_path / "img", n_sites=7)
    illum = tmp_path / "illum"
    yy, xx = np.mgrid[:64, :64]
    for k, ch in enumerate(CHANNELS):
        write_npy((1.0 + 0.013 * (k + 1) * (xx + 2 * yy) / 3).astype(np.float32), illum / f"{ch}.npy")
    out = tmp_path / "P1.npy"
    info = assemble_tiles(
        manifest, CHANNELS, out, illum_dir=illum, size=64, dtype=dtype, batch_size=3, progress=False
    )
    tiles, _ = load_tiles(out)
    low = np.array(info["low"], np.float32)[:, None, None]
    span = (np.array(info["high"], np.float32) - np.array(info["low"], np.float32))[:, None, None]
    functions = np.stack([np.load(illum / f"{c}.npy") for c in CHANNELS])
    for i, row in manifest.iterrows():
        raw = np.stack([tifffile.imread(row[f"Path_{c}"]) for c in CHANNELS])
        unit = np.clip((np.divide(raw, functions, dtype=np.float32) - low) / span, 0, 1)
        if dtype in ("uint8", "uint16"):
            expected = np.round(unit * np.iinfo(dtype).max).astype(dtype)
        else:
            expected = unit.astype(dtype)
        assert tiles.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(tiles[i], expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["img", "illum", "P1.npy", "P1.sites.parquet", "P1.rescale.json"]
    )


def test_leftovers_of_a_killed_run_are_removed_and_nothing_else(tmp_path):
    """A killed run leaves its hidden temporary output and side file under random names (up to 4
    bytes per pixel of the plate); the next run of the same plate deletes them, and only them."""
    manifest = make_plate(tmp_path / "img", n_sites=2)
    out = tmp_path / "tiles" / "P1.npy"
    out.parent.mkdir()
    stale = [out.parent / ".P1.npy.k3j2h1.tmp.npy", out.parent / ".P1.npy.q8w7e6.side"]
    unrelated = [out.parent / ".P2.npy.a1b2c3.side", out.parent / ".P1.sites.parquet.x1y2.tmp.parquet"]
    for path in stale + unrelated:
        path.write_bytes(b"\0" * 1000)
    assemble_tiles(manifest, CHANNELS, out, size=32, progress=False)
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(
        ["P1.npy", "P1.sites.parquet", "P1.rescale.json"] + [p.name for p in unrelated]
    )
