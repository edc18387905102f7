"""Image-stage scaling: wall time and peak memory of each image stage at 1x and 4x the sites.

    python bench/scale_images.py [--sites 12] [--factor 4] [--threads 2] [--rounds 3]
                                 [--stages illumination tiles cells classic embed] [--package-root DIR]

The image half of the dataset-scale table (issue 16): per stage, its time and peak memory at ``sites``
and ``factor x sites`` sites and the growth ratios (time per site 4x/1x, goal <= 1.1; peak 4x/1x, goal
<= 1.2).  A synthetic plate at real pixel sizes (1080² 16-bit TIFF sources like cpg0004's, 5
channels, 448² tiles, ~150 cells a site) runs through illumination, tiles, cells, classic and embed
(a small untrained model, eager, site level).  Each stage runs alone in a fresh process (imports
excluded from the time), the two sizes interleaved for ``rounds`` rounds: ``seconds`` is the least of
the rounds (the run least slowed by other load on the machine), ``peak_mib`` the median.  Beside the
wall time, ``cpu_seconds`` (median) counts the CPU time of the stage and its workers: on a busy
machine wall times swing by 2x between rounds, CPU time much less, so its per-site ratio is the
steadier sign of work growing faster than the plate.

Peak memory is what a cgroup (a SLURM job's memory limit) charges the job, each page once, sampled
every 20 ms (:data:`PROBE`):

* the stage process's resident set: anonymous, file-backed mapped (libraries, memory-mapped arrays)
  and shared pages (``/proc/self/statm``);
* plus the pages only each of its worker processes maps (their USS: ``Private_Clean +
  Private_Dirty`` of ``/proc/<pid>/smaps_rollup``, read every 100 ms; pages a forked worker still
  shares with the stage process are counted once, in the stage process);
* plus the page cache (``mincore``) of the stage's data files that the process does not map: the
  files it writes (its output folder, temporaries included) and the array it reads (embed: the
  tiles).  A mapped file's resident pages are in the resident set already (which files are mapped:
  ``/proc/self/maps``, read every 100 ms).

Not counted: page cache of the source images (clean, shared with every image rule, reclaimable).
``--package-root`` imports ``phenoprofiler_core`` from another folder (e.g. an older version
unpacked with ``git archive``), so two versions can be measured by the same probe.
Measured on whatever machine runs it: on a shared, busy one the times are noisy; the ratios are what
to read.  ``image_stage_rows()`` returns the rows (keys ``stage, size, units, unit, seconds,
peak_mib`` + the parts of the peak), which ``bench/bench_scale.py`` adds to its own table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
# what a stage reads that another stage writes
NEEDS = {"tiles": ("illumination",), "cells": ("illumination",), "classic": ("illumination",)}
NEEDS["embed"] = ("illumination", "tiles")
MIB = 2**20


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


# The memory probe, run inside the measured process: ``measure(run, data_files)`` calls ``run()`` with
# a sampler thread beside it and returns {"wall_s", "cpu_s", "peak_bytes", "resident", "workers",
# "cache", "hwm"} (bytes; the three parts as they were at the peak sample; hwm = the kernel's VmHWM).
# ``data_files()`` lists the files whose page cache counts.  Tests reuse it (tests/test_stage_memory.py).
PROBE = r"""
import ctypes, json, mmap, os, sys, threading, time
from pathlib import Path
import numpy as np

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
            vector = np.zeros((size + PAGE - 1) // PAGE, np.uint8)
            libc.mincore(addr, size, vector.ctypes.data)
            return int(np.count_nonzero(vector & 1)) * PAGE
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def resident_bytes():
    # anonymous + file-backed mapped + shmem resident pages (smaps_rollup's Rss, but O(1): smaps_rollup
    # walks every mapping and would take a core's worth of CPU at this sampling rate)
    return int(Path("/proc/self/statm").read_text().split()[1]) * PAGE


def mapped(paths):
    # those of the paths this process maps (a memory-mapped array): their pages are resident bytes
    # already.  /proc/self/maps ends each file mapping's line with the file's canonical path.
    maps = Path("/proc/self/maps").read_text()
    return {p for p in paths if f" {os.path.realpath(p)}\n" in maps}


def worker_pids(pid):
    pids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            pids += [child] + worker_pids(child)
    return pids


def unique_bytes(pid):
    # pages only this process maps (USS): what it adds to the job beside the process it forked from
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    kb = 0
    for line in text.splitlines():
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            kb += int(line.split()[1])
    return kb * 1024


def measure(run, data_files):
    peak = {"peak_bytes": 0, "resident": 0, "workers": 0, "cache": 0}
    state = {"running": True, "workers": 0, "mapped": set(), "sampler_cpu": 0.0}

    def sample():
        tick = 0
        while state["running"]:
            files = data_files()
            if tick % 5 == 0:  # smaps_rollup ~10 ms a process, /proc/self/maps ~2 ms: every 100 ms
                state["workers"] = sum(unique_bytes(p) for p in worker_pids(os.getpid()))
                state["mapped"] = mapped(files)
            unmapped = set(files) - state["mapped"]
            resident = resident_bytes()
            cache = sum(cached_bytes(p) for p in unmapped)
            charged = resident + state["workers"] + cache
            if charged > peak["peak_bytes"]:
                peak.update(peak_bytes=charged, resident=resident, workers=state["workers"], cache=cache)
            tick += 1
            time.sleep(0.02)
        state["sampler_cpu"] = time.thread_time()

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start, cpu_start = time.perf_counter(), os.times()
    try:
        run()
    finally:
        wall, cpu_end = time.perf_counter() - start, os.times()
        state["running"] = False
        sampler.join()
    # CPU seconds of the process's threads (less the sampler's) and of its workers (counted once
    # they were waited for)
    cpu = sum(cpu_end[k] - cpu_start[k] for k in range(4)) - state["sampler_cpu"]
    status = Path("/proc/self/status").read_text().splitlines()
    hwm = [int(l.split()[1]) * 1024 for l in status if l.startswith("VmHWM:")][0]
    return {"wall_s": wall, "cpu_s": cpu, **peak, "hwm": hwm}
"""

# One image stage on the synthetic plate, measured by the probe: argv = stage, manifest, work folder,
# threads.  Each stage writes work/<stage>/ and reads what the stages before it wrote there.
STAGE = r"""
stage, manifest_path, work, threads = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
out_dir = work / stage
out_dir.mkdir(parents=True, exist_ok=True)

import pandas as pd

# the stage's module is imported before the clock starts, as the CLI imports it (and only it)
if stage == "illumination":
    from phenoprofiler_core.illumination import plate_illumination
    from phenoprofiler_core.io import write_npy
elif stage == "tiles":
    from phenoprofiler_core.tiles import assemble_tiles
elif stage == "cells":
    from phenoprofiler_core.cells import run_cells
elif stage == "classic":
    from phenoprofiler_core.classic import run_classic
elif stage == "embed":
    import torch
    from phenoprofiler_core.embed import EmbedConfig, build_model, embed_plate

manifest = pd.read_parquet(manifest_path)
channels = [c[len("Path_"):] for c in manifest.columns if c.startswith("Path_")]
illum = work / "illumination"
inputs = [work / "tiles" / "P.npy"] if stage == "embed" else []


def run():
    if stage == "illumination":
        for channel, function in plate_illumination(manifest, channels, progress=False).items():
            write_npy(function, out_dir / f"{channel}.npy")
    elif stage == "tiles":
        assemble_tiles(manifest, channels, out_dir / "P.npy", illum_dir=illum, size=448, threads=threads, progress=False)
    elif stage == "cells":
        run_cells(manifest_path, "P", out_dir / "P.npy", out_dir / "P.cells.parquet", channels=channels, illum_dir=illum, workers=threads)
    elif stage == "classic":
        run_classic(manifest_path, "P", out_dir / "P.parquet", channels=channels, illum_dir=illum, workers=threads)
    elif stage == "embed":
        torch.set_num_threads(threads)
        options = {"backbone": "resnet10t", "transformer_ffn": 256, "input_size": 224}
        model, _ = build_model("untrained", model_options=options, in_channels=len(channels))
        cfg = EmbedConfig(batch_size=8, device="cpu", compile="false")
        table, _ = embed_plate(model, "P", level="site", tiles_dir=work / "tiles", cells_dir=None, cfg=cfg)
        table.to_parquet(out_dir / "P.parquet")


result = measure(run, lambda: [p for p in out_dir.iterdir() if p.is_file()] + inputs)
print(json.dumps(result))
"""


def run_probe(code: str, args: list[str], *, package_root: Path = ROOT) -> dict:
    """Run ``PROBE + code`` in a fresh Python with ``args``; its last stdout line, parsed as JSON."""
    env = dict(os.environ, PYTHONPATH=str(package_root))
    # run in package_root: "python -c" puts its working folder first on sys.path
    result = subprocess.run(
        [sys.executable, "-c", PROBE + code, *args], env=env, cwd=package_root, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"measured process failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_stage(stage: str, manifest: Path, work: Path, threads: int, *, package_root: Path = ROOT) -> dict:
    """Run one stage in a fresh process; its wall time (imports excluded) and peak memory (bytes).

    The stage's output folder is emptied first: an earlier run's output, still in the page cache,
    would count towards this run until replaced."""
    shutil.rmtree(work / stage, ignore_errors=True)
    return run_probe(STAGE, [stage, str(manifest), str(work), str(threads)], package_root=package_root)


def image_stage_rows(
    *,
    sites: int = 12,
    factor: int = 4,
    threads: int = 2,
    rounds: int = 3,
    stages: tuple[str, ...] = STAGES,
    folder: Path | None = None,
    package_root: Path = ROOT,
) -> list[dict]:
    """One row per stage and plate size: ``{stage, size ("1x" / "<factor>x"), units (sites), unit
    ("sites"), seconds, cpu_seconds, peak_mib, resident_mib, workers_mib, cache_mib}``.

    ``rounds`` rounds, the two plate sizes interleaved (their order alternating), each stage in a fresh
    process: ``seconds`` is the least of the rounds, the memory figures the median (the parts are
    those of the median peak's run).  Stages another measured stage needs but that are not measured
    themselves run once per size beforehand."""
    stages = tuple(s for s in STAGES if s in stages)  # workflow order
    sizes = {"1x": sites, f"{factor}x": sites * factor}
    runs: dict[tuple[str, str], list[dict]] = {(stage, size): [] for stage in stages for size in sizes}
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        tmp = Path(tmp)
        manifests = {size: write_plate(tmp, n, distinct=sites) for size, n in sizes.items()}
        needed = [s for s in STAGES if s not in stages and any(s in NEEDS.get(m, ()) for m in stages)]
        for size, n in sizes.items():
            for stage in needed:
                run_stage(stage, manifests[size], tmp / f"work{n}", threads, package_root=package_root)
        for r in range(rounds):
            for size in list(sizes)[:: 1 if r % 2 == 0 else -1]:
                for stage in stages:  # in workflow order: each stage reads what the one before wrote
                    work = tmp / f"work{sizes[size]}"
                    measured = run_stage(stage, manifests[size], work, threads, package_root=package_root)
                    runs[stage, size].append(measured)
                    print(
                        f"round {r + 1} {size} {stage}: {measured['wall_s']:.1f} s, peak "
                        f"{measured['peak_bytes'] / MIB:.0f} MiB (resident {measured['resident'] / MIB:.0f} "
                        f"+ workers {measured['workers'] / MIB:.0f} + file cache {measured['cache'] / MIB:.0f})",
                        file=sys.stderr,
                        flush=True,
                    )
    rows = []
    for size, n in sizes.items():
        for stage in stages:
            measured = sorted(runs[stage, size], key=lambda m: m["peak_bytes"])
            median = measured[(len(measured) - 1) // 2]  # the lower median: a run that happened
            rows.append(
                {
                    "stage": stage,
                    "size": size,
                    "units": n,
                    "unit": "sites",
                    "seconds": round(min(m["wall_s"] for m in measured), 3),
                    "cpu_seconds": round(float(np.median([m["cpu_s"] for m in measured])), 3),
                    "peak_mib": round(median["peak_bytes"] / MIB, 1),
                    "resident_mib": round(median["resident"] / MIB, 1),
                    "workers_mib": round(median["workers"] / MIB, 1),
                    "cache_mib": round(median["cache"] / MIB, 1),
                }
            )
    return rows


def growth_rows(rows: list[dict]) -> list[dict]:
    """Per stage: time per site and peak memory, the larger plate against the smaller."""
    growth = []
    for stage in dict.fromkeys(r["stage"] for r in rows):
        small, large = sorted((r for r in rows if r["stage"] == stage), key=lambda r: r["units"])
        factor = large["units"] / small["units"]
        growth.append(
            {
                "stage": stage,
                "sites": f"{small['units']} -> {large['units']}",
                "time_per_site_ratio": round(large["seconds"] / small["seconds"] / factor, 3),
                "cpu_per_site_ratio": round(large["cpu_seconds"] / small["cpu_seconds"] / factor, 3),
                "peak_ratio": round(large["peak_mib"] / small["peak_mib"], 3),
            }
        )
    return growth


def scale_table(rows: list[dict]) -> pd.DataFrame:
    """The image half of the issue's table: one line per stage, both sizes and the growth ratios."""
    lines = []
    for g in growth_rows(rows):
        small, large = sorted((r for r in rows if r["stage"] == g["stage"]), key=lambda r: r["units"])
        lines.append(
            {
                "stage": g["stage"],
                "sites": g["sites"],
                "time 1x s": small["seconds"],
                "time 4x s": large["seconds"],
                "time/site 4x/1x": g["time_per_site_ratio"],
                "cpu 1x s": small["cpu_seconds"],
                "cpu 4x s": large["cpu_seconds"],
                "cpu/site 4x/1x": g["cpu_per_site_ratio"],
                "peak 1x MiB": small["peak_mib"],
                "peak 4x MiB": large["peak_mib"],
                "peak 4x/1x": g["peak_ratio"],
            }
        )
    return pd.DataFrame(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=12, help="sites of the 1x plate")
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="threads/workers of every stage (rules: 2)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds (least wall time, median peak)"
    )
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="stages measured")
    parser.add_argument("--folder", type=Path, default=None, help="where the synthetic plate is written")
    parser.add_argument(
        "--package-root",
        type=Path,
        default=ROOT,
        help="folder phenoprofiler_core is imported from (default: this checkout)",
    )
    args = parser.parse_args()
    rows = image_stage_rows(
        sites=args.sites,
        factor=args.factor,
        threads=args.threads,
        rounds=args.rounds,
        stages=tuple(args.stages),
        folder=args.folder,
        package_root=args.package_root.resolve(),
    )
    print(
        f"synthetic plate: {SOURCE_SIZE}² 16-bit sources x {len(CHANNELS)} channels, {TILE_SIZE}² tiles, "
        f"{args.threads} threads per stage, {args.rounds} interleaved rounds; code from {args.package_root}"
    )
    print(pd.DataFrame(rows).to_string(index=False))
    print()
    table = scale_table(rows).rename(
        columns=lambda c: c.replace("4x", f"{args.factor}x") if args.factor != 4 else c
    )
    print(table.to_string(index=False))
    print(
        "goals (issue 16): time/site ratio <= 1.1 (per-plate stages), peak ratio <= 1.2; peak = resident set "
        "+ workers' unique pages + page cache of the stage's data files (not mapped), sampled every 20 ms"
    )


if __name__ == "__main__":
    main()
