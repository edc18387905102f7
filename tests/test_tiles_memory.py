"""Tile assembly memory is flat in the plate size, at 448² tiles: 48 sites against 432 (48 wells × 9
sites, in the fast suite) and against a full 384-well × 9-site plate (3,456 sites, slow).

What is measured is what a cgroup (a SLURM job's memory limit) charges to the job for this stage:

* the process's resident memory, anonymous *and* file-backed mapped pages (``/proc/self/statm``
  resident, the sum ``smaps_rollup`` reports as Rss), sampled every 20 ms, and the kernel's own
  high-water mark ``VmHWM``;
* plus the page cache of the files the stage writes (output, temporaries) — a cgroup charges those to
  the job, and dirty ones cannot be reclaimed without a write-back.  Counted with ``mincore(2)`` over
  every file in the output folder at each sample.

Not counted: page cache of the *source images*, which any reader of them fills (the decode alone),
holds only clean pages the kernel reclaims under the job's limit, and is shared with the other image
rules.  The sources are small synthetic 16-bit images (512², 10 files reused): only the pixel count of
the *tiles* (448², the real model size) and the count of sites (3,456 = 384 × 9) matter for memory.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

CHANNELS = ["DNA", "ER", "RNA", "AGP", "Mito"]
FULL_PLATE = 384 * 9

PEAK_SCRIPT = r"""
import ctypes, json, mmap, os, sys, threading, time
from pathlib import Path
import numpy as np, pandas as pd
from phenoprofiler_core.tiles import assemble_tiles

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
PAGE = mmap.PAGESIZE


def cached_bytes(path):
    # mapping without touching faults nothing in; mincore reports which pages are in the page cache
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return 0
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return 0
        try:
            vector = np.zeros((size + PAGE - 1) // PAGE, np.uint8)
            libc.mincore(addr, size, vector.ctypes.data)
            return int(np.count_nonzero(vector & 1)) * PAGE
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def rss_bytes():
    # resident pages: anonymous + file-backed mapped + shmem (what smaps_rollup's Rss sums, but O(1):
    # smaps_rollup walks every mapping and would take a core's worth of CPU at this sampling rate)
    return int(Path("/proc/self/statm").read_text().split()[1]) * mmap.PAGESIZE


manifest = pd.read_parquet(sys.argv[1])
out = Path(sys.argv[2])
out.parent.mkdir(parents=True, exist_ok=True)
peak = {"charged": 0, "rss": 0, "cache": 0}
running = True


def sample():
    while running:
        rss = rss_bytes()
        cache = sum(cached_bytes(p) for p in out.parent.iterdir() if p.is_file())
        peak["charged"] = max(peak["charged"], rss + cache)
        peak["rss"], peak["cache"] = max(peak["rss"], rss), max(peak["cache"], cache)
        time.sleep(0.02)


sampler = threading.Thread(target=sample)
sampler.start()
start = time.perf_counter()
try:
    assemble_tiles(manifest, list(sys.argv[4].split(",")), out, illum_dir=sys.argv[3], size=448, threads=2, progress=False)
finally:
    running = False
    sampler.join()
hwm = [int(l.split()[1]) * 1024 for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:")][0]
print(json.dumps({**peak, "hwm": hwm, "wall_s": time.perf_counter() - start, "bytes": out.stat().st_size}))
"""


def _plate(folder: Path, n_sites: int) -> Path:
    """A manifest of n_sites 5-channel 512² 16-bit sites (10 files reused: the tiles are what grows)."""
    from helpers import cell_image, save

    files = [save(cell_image((512, 512), seed=k, n_cells=40), folder / f"img{k}.tif") for k in range(10)]
    rows = []
    for s in range(n_sites):
        row = {"Metadata_Plate": "P", "Metadata_Well": f"W{s // 9:03d}", "Metadata_Site": s % 9 + 1}
        for k, ch in enumerate(CHANNELS):
            row[f"Path_{ch}"] = str(files[(s + k) % len(files)])
        rows.append(row)
    path = folder / f"manifest{n_sites}.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return path


def _illumination(folder: Path) -> Path:
    """Smooth functions >= 1, so the division by them is part of what runs."""
    from phenoprofiler_core.io import write_npy

    yy, xx = np.mgrid[:512, :512]
    for k, ch in enumerate(CHANNELS):
        function = 1.0 + 0.3 * np.exp(-((yy - 256.0) ** 2 + (xx - 200.0 - 10 * k) ** 2) / 2e5)
        write_npy(function.astype(np.float32), folder / f"{ch}.npy")
    return folder


def _peak(manifest: Path, illum: Path, out: Path) -> dict:
    """Run the stage in a fresh process; its peaks, wall time and output size.  The output folder is
    deleted afterwards (a full plate is 6.9 GB)."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    try:
        result = subprocess.run(
            [sys.executable, "-c", PEAK_SCRIPT, str(manifest), str(out), str(illum), ",".join(CHANNELS)],
            env=env,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        run = json.loads(result.stdout.strip().splitlines()[-1])
        run["leftovers"] = sorted(p.name for p in out.parent.glob(".*"))
        return run
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)


def _check_flat(tmp_path: Path, n_large: int) -> None:
    illum = _illumination(tmp_path / "illum")
    small = _peak(_plate(tmp_path / "src", 48), illum, tmp_path / "small" / "P.npy")
    large = _peak(_plate(tmp_path / "src", n_large), illum, tmp_path / "large" / "P.npy")
    mb = 1 << 20
    for name, run, n in (("48 sites", small, 48), (f"{n_large} sites", large, n_large)):
        print(
            f"{name}: charged peak {run['charged'] / mb:.0f} MB (RSS {run['rss'] / mb:.0f} MB + written-file "
            f"cache {run['cache'] / mb:.0f} MB), VmHWM {run['hwm'] / mb:.0f} MB, {run['wall_s']:.0f} s"
        )
        # the output really is the plate at 448² float16: header + n × 5 × 448 × 448 × 2 bytes
        assert run["bytes"] - n * 5 * 448 * 448 * 2 in range(64, 4096)
        assert not run["leftovers"], f"temporary files left behind: {run['leftovers']}"
    print(
        f"ratio {n_large} / 48 sites: charged {large['charged'] / small['charged']:.2f}x, VmHWM {large['hwm'] / small['hwm']:.2f}x"
    )
    # the tiles of n_large sites are n_large x 4 MB at 448² float16, their exact float32 values twice
    # that: none of it may stay in memory (the old scratch + mapped output grew 5.75 MB per site)
    assert large["charged"] <= 1.2 * small["charged"], (small, large)
    assert large["hwm"] <= 1.2 * small["hwm"], (small, large)


def test_tile_memory_is_flat_from_48_to_432_sites(tmp_path):
    """48 wells x 9 sites, 9x the small plate (1.7 GB on disk while it runs, ~1 min)."""
    _check_flat(tmp_path, 48 * 9)


@pytest.mark.slow
def test_tile_memory_is_flat_from_48_sites_to_a_full_plate(tmp_path):
    """384 wells x 9 sites: 6.9 GB of float16 tiles, 13.9 GB on disk while it runs (minutes)."""
    free = shutil.disk_usage(tmp_path).free
    if free < 16e9:
        reason = f"a full plate needs 13.9 GB of disk while it runs; {tmp_path} has {free / 1e9:.1f} GB free"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    _check_flat(tmp_path, FULL_PLATE)
