"""Image-stage scaling: wall time and peak memory of each image stage at 1x and 4x the sites.

    python bench/scale_images.py [--sites 12] [--factor 4] [--threads 2] [--rounds 3] [--no-embed]

A synthetic plate at real pixel sizes (1080² 16-bit TIFF sources like cpg0004, 5 channels, 448² tiles)
runs through illumination, tiles, cells, classic and embed (a small untrained model, eager) at ``sites``
and ``factor × sites`` sites.  Each stage runs alone in a fresh process (imports excluded from the
time), so its peak memory is its own: the peak over 20 ms samples of resident memory (anonymous and
file-backed mapped pages, ``/proc/self/statm``) plus the page cache of the files the stage
writes (``mincore``), which a cgroup also charges to the job.  Source-image page cache is not counted
(clean, shared with every image rule, reclaimable).

The two sizes run interleaved for ``rounds`` rounds; per stage and size: ``{stage, size, sites, wall_s
(least of the rounds), peak_mb (median)}``; per stage a growth row:
``time_per_site_ratio`` = (wall 4x / wall 1x) / 4 (1.0 = linear; goal <= 1.1) and ``peak_ratio`` =
peak 4x / peak 1x (goal <= 1.2).  Measured on whatever machine runs it: on a shared, busy one the
times are noisy; the ratios are what to read.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
CHANNELS = ["DNA", "ER", "RNA", "AGP", "Mito"]
SOURCE_SIZE = 1080  # cpg0004 (LINCS) Phenix fields: 1080 x 1080, 16-bit
TILE_SIZE = 448
STAGES = ("illumination", "tiles", "cells", "classic", "embed")


def synthetic_site(seed: int, size: int = SOURCE_SIZE) -> list[np.ndarray]:
    """Five 16-bit channels of one site: ~150 cells (nuclei ~12 px radius in DNA, cytoplasm ~25 px in
    the others, brighter near their nucleus) on a noisy background with an illumination gradient."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    centres = rng.integers(20, size - 20, size=(150, 2))
    yy, xx = np.mgrid[:size, :size]
    vignette = 1.0 - 0.35 * (((yy - size / 2) ** 2 + (xx - size / 2) ** 2) / (size / 2) ** 2)
    planes = []
    for k in range(len(CHANNELS)):
        impulses = np.zeros((size, size), np.float64)
        np.add.at(impulses, (centres[:, 0], centres[:, 1]), rng.uniform(0.6, 1.4, len(centres)))
        sigma = 7.0 if k == 0 else 14.0
        blobs = ndimage.gaussian_filter(impulses, sigma) * (2 * np.pi * sigma**2)
        image = 300.0 + (6000.0 if k == 0 else 2500.0) * blobs
        image = image * vignette + rng.normal(0.0, 40.0, image.shape)
        planes.append(np.clip(image, 0, 65535).astype(np.uint16))
    return planes


def write_plate(folder: Path, n_sites: int, distinct: int) -> Path:
    """Manifest of ``n_sites`` sites whose images cycle through ``distinct`` generated sites."""
    import tifffile

    rows = []
    for s in range(n_sites):
        site_dir = folder / "images" / f"site{s % distinct:03d}"
        if not site_dir.is_dir():
            site_dir.mkdir(parents=True)
            for channel, plane in zip(CHANNELS, synthetic_site(s % distinct)):
                tifffile.imwrite(site_dir / f"{channel}.tif", plane)
        row = {
            "Metadata_Plate": "P",
            "Metadata_Well": f"{chr(ord('A') + s // 9 // 24)}{s // 9 % 24 + 1:02d}",
            "Metadata_Site": s % 9 + 1,
            "Metadata_Treatment": "DMSO" if s % 4 == 0 else f"cpd{s % 7}",
            "Metadata_TreatmentId": "DMSO" if s % 4 == 0 else f"cpd{s % 7}",
            "Metadata_pert_type": "negcon" if s % 4 == 0 else "trt",
            "Metadata_moa": "",
        }
        rows.append(row | {f"Path_{ch}": str(site_dir / f"{ch}.tif") for ch in CHANNELS})
    path = folder / f"manifest{n_sites}.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return path


# The stage runs in a child process: a sampler thread records the peak of resident memory plus the
# page cache of the files in the stage's output folder.
RUNNER = r"""
import ctypes, json, mmap, os, sys, threading, time
from pathlib import Path
import numpy as np

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def cached_bytes(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return 0
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return 0
        try:
            vector = np.zeros((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE, np.uint8)
            libc.mincore(addr, size, vector.ctypes.data)
            return int(np.count_nonzero(vector & 1)) * mmap.PAGESIZE
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def rss_bytes():
    # resident pages: anonymous + file-backed mapped + shmem (what smaps_rollup's Rss sums, but O(1):
    # smaps_rollup walks every mapping and would take a core's worth of CPU at this sampling rate)
    return int(Path("/proc/self/statm").read_text().split()[1]) * mmap.PAGESIZE


stage, manifest_path, work, threads = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
out_dir = work / stage
out_dir.mkdir(parents=True, exist_ok=True)

import pandas as pd
import torch
from phenoprofiler_core.io import write_npy

manifest = pd.read_parquet(manifest_path)
channels = [c[len("Path_"):] for c in manifest.columns if c.startswith("Path_")]
illum = work / "illumination"


def run():
    if stage == "illumination":
        from phenoprofiler_core.illumination import plate_illumination
        for channel, function in plate_illumination(manifest, channels, progress=False).items():
            write_npy(function, out_dir / f"{channel}.npy")
    elif stage == "tiles":
        from phenoprofiler_core.tiles import assemble_tiles
        assemble_tiles(manifest, channels, out_dir / "P.npy", illum_dir=illum, size=448, threads=threads, progress=False)
    elif stage == "cells":
        from phenoprofiler_core.cells import run_cells
        run_cells(manifest_path, "P", out_dir / "P.npy", out_dir / "P.cells.parquet", channels=channels, illum_dir=illum, workers=threads)
    elif stage == "classic":
        from phenoprofiler_core.classic import run_classic
        run_classic(manifest_path, "P", out_dir / "P.parquet", channels=channels, illum_dir=illum, workers=threads)
    elif stage == "embed":
        from phenoprofiler_core.embed import EmbedConfig, build_model, embed_plate
        torch.set_num_threads(threads)
        options = {"backbone": "resnet10t", "transformer_ffn": 256, "input_size": 224}
        model, _ = build_model("untrained", model_options=options, in_channels=len(channels))
        cfg = EmbedConfig(batch_size=8, device="cpu", compile="false")
        table = embed_plate(model, "P", level="site", tiles_dir=work / "tiles", cells_dir=None, cfg=cfg)
        table.to_parquet(out_dir / "P.parquet")


peak = {"charged": 0}
running = True


def sample():
    while running:
        cache = sum(cached_bytes(p) for p in out_dir.iterdir() if p.is_file())
        peak["charged"] = max(peak["charged"], rss_bytes() + cache)
        time.sleep(0.02)


sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
start = time.perf_counter()
run()
wall = time.perf_counter() - start
running = False
sampler.join()
print(json.dumps({"wall_s": wall, "peak_bytes": peak["charged"]}))
"""


def run_stage(stage: str, manifest: Path, work: Path, threads: int) -> dict:
    """Run one stage in a fresh process; its wall time (imports excluded) and peak memory."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, stage, str(manifest), str(work), str(threads)],
        env=env,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"stage {stage} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def image_stage_rows(
    *,
    sites: int = 12,
    factor: int = 4,
    threads: int = 2,
    rounds: int = 3,
    embed: bool = True,
    folder: Path | None = None,
) -> list[dict]:
    """Rows ``{stage, size, sites, wall_s, peak_mb}`` for every stage at 1x and ``factor``x sites, then
    one ``{stage, size: "growth", sites, time_per_site_ratio, peak_ratio}`` row per stage.

    ``rounds`` rounds, the two plate sizes interleaved (their order alternating), each stage in a fresh
    process: ``wall_s`` is the least of the rounds (the run least slowed by other load on the machine),
    ``peak_mb`` the median."""
    stages = [s for s in STAGES if embed or s != "embed"]
    sizes = {"1x": sites, f"{factor}x": sites * factor}
    walls = {(stage, size): [] for stage in stages for size in sizes}
    peaks = {(stage, size): [] for stage in stages for size in sizes}
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        tmp = Path(tmp)
        manifests = {size: write_plate(tmp, n, distinct=sites) for size, n in sizes.items()}
        for r in range(rounds):
            for size in list(sizes)[:: 1 if r % 2 == 0 else -1]:
                for stage in stages:  # in workflow order: each stage reads what the one before wrote
                    measured = run_stage(stage, manifests[size], tmp / f"work{sizes[size]}", threads)
                    walls[stage, size].append(measured["wall_s"])
                    peaks[stage, size].append(measured["peak_bytes"] / 2**20)
                    print(f"round {r + 1} {size} {stage}: {measured}", file=sys.stderr, flush=True)
    rows = [
        {
            "stage": stage,
            "size": size,
            "sites": n,
            "wall_s": round(min(walls[stage, size]), 3),
            "peak_mb": round(float(np.median(peaks[stage, size])), 1),
        }
        for size, n in sizes.items()
        for stage in stages
    ]
    for stage in stages:
        small, large = (r for r in rows if r["stage"] == stage)
        rows.append(
            {
                "stage": stage,
                "size": "growth",
                "sites": f"{small['sites']}->{large['sites']}",
                "time_per_site_ratio": round(large["wall_s"] / small["wall_s"] / factor, 3),
                "peak_ratio": round(large["peak_mb"] / small["peak_mb"], 3),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=12, help="sites of the 1x plate")
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="threads/workers of every stage (rules: 2)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds (least wall time, median peak)"
    )
    parser.add_argument("--no-embed", action="store_true", help="skip the embed stage")
    parser.add_argument("--folder", type=Path, default=None, help="where the synthetic plate is written")
    args = parser.parse_args()
    rows = image_stage_rows(
        sites=args.sites,
        factor=args.factor,
        threads=args.threads,
        embed=not args.no_embed,
        folder=args.folder,
    )
    table = pd.DataFrame(rows)
    print(
        f"synthetic plate: {SOURCE_SIZE}² 16-bit sources x {len(CHANNELS)} channels, {TILE_SIZE}² tiles, "
        f"{args.threads} threads per stage"
    )
    print(table.to_string(index=False, na_rep=""))
    print("goals: time_per_site_ratio <= 1.1 (per-plate stages), peak_ratio <= 1.2")


if __name__ == "__main__":
    main()
