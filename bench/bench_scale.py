"""Benchmark: whole-dataset table steps at real size — time and peak memory, and how they grow.

    .venv/bin/python bench/bench_scale.py [--sizes bbbc022 jump] [--jump-fractions 0.125 0.25]
                                          [--labelled 0.2] [--null-size 10000] [--workdir DIR]

Synthetic tables shaped like the real ones (``Metadata_*`` columns, 384-well plates, replicate wells
of each treatment on different plates, DMSO negative controls on every plate, positive controls,
multi-label MoA annotations for part of the treatments, 672 float32 features):

* ``bbbc022``: 20 plates, 7,680 wells, 69,120 sites, 1,600 treatments on 4 wells each, 64 DMSO
  wells per plate, MoA labels for 1,000 treatments (the BBBC022 MoA table has 995 compounds);
* ``jump``: 1,112 plates, 427,008 wells, 3.84 million sites, 100,080 treatments on 4 wells each,
  16 DMSO and 8 positive-control wells per plate (JUMP-compound-like), MoA labels for ``--labelled``
  of the treatments.

Every stage runs the product's code path (``profiles.build_profiles`` as the profiles rule runs it,
with phenotype correction; the three evaluation functions ``evaluate_profiles`` calls) in its own
process, so its peak memory (the process's maximum resident set) is its own.  ``--jump-fractions``
runs JUMP's layout on a fraction of its plate maps (the same shapes, fewer plates) and extrapolates
from the largest fraction to full size when the full size was not run: memory above the imports
linearly per unit of data (sites, wells, labelled treatments); time linearly, except where the work
is all pairs - the MoA stages (labelled treatments squared) and activity against the controls of all
plates (wells x control wells) - there quadratically.  ``activity_plate`` is activity with
``evaluate.same_plate_negcon: true`` (linear).  The MoA stages are also run at full JUMP size on the
labelled treatments alone (rows marked "labelled"), their all-pairs part measured, not extrapolated.

Printed: one table with each stage's time and peak memory at each size, per unit of data, and the
growth ratio per unit between the smallest and largest size run (1.0 = grows like the data).  Image
stages join the table when ``bench/scale_images.py`` provides ``image_stage_rows() -> list[dict]``
(keys: stage, size, units, unit, seconds, peak_mib).  Runs on a shared machine vary; run it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
N_FEATURES = 672
SITES_PER_WELL = 9
WELLS_PER_PLATE = 384
ROWS = "ABCDEFGHIJKLMNOP"

SIZES = {
    # plate maps x replicate plates; wells per plate: treatments, negcon, poscon
    "bbbc022": dict(plate_maps=5, replicates=4, treated=320, negcon=64, poscon=0, labelled=1000),
    "jump": dict(plate_maps=278, replicates=4, treated=360, negcon=16, poscon=8, labelled=None),
}


# ----------------------------------------------------------------------------- synthetic data


def layout(size: str, fraction: float, labelled_fraction: float, seed: int = 0) -> dict:
    spec = dict(SIZES[size])
    spec["plate_maps"] = max(1, round(spec["plate_maps"] * fraction))
    n_treatments = spec["plate_maps"] * spec["treated"]
    if spec["labelled"] is None:
        spec["labelled"] = round(n_treatments * labelled_fraction)
    spec["labelled"] = min(spec["labelled"], n_treatments)
    spec.update(size=size, fraction=fraction, n_treatments=n_treatments, seed=seed)
    spec["plates"] = spec["plate_maps"] * spec["replicates"]
    spec["wells"] = spec["plates"] * WELLS_PER_PLATE
    spec["sites"] = spec["wells"] * SITES_PER_WELL
    return spec


def write_sites(spec: dict, folder: Path) -> list[Path]:
    """One site table per plate, as features/<set>/<plate>.parquet: Metadata_* + 672 float32."""
    rng = np.random.default_rng(spec["seed"])
    n_t, n_labelled = spec["n_treatments"], spec["labelled"]
    n_moas = max(2, n_labelled // 10)
    moa_centroids = rng.standard_normal((n_moas, N_FEATURES)).astype(np.float32)
    first = rng.integers(0, n_moas, n_t)
    second = rng.integers(0, n_moas, n_t)
    labelled = np.zeros(n_t, dtype=bool)
    labelled[rng.choice(n_t, n_labelled, replace=False)] = True
    moa = np.where(
        ~labelled,
        "",
        np.where(
            rng.random(n_t) < 0.1,
            np.char.add(np.char.add("moa", first.astype(str)), np.char.add("|moa", second.astype(str))),
            np.char.add("moa", first.astype(str)),
        ),
    )
    strength = rng.uniform(0, 1.5, n_t).astype(np.float32)
    poscon_effect = rng.standard_normal((max(spec["poscon"], 1), N_FEATURES)).astype(np.float32) * 2
    folder.mkdir(parents=True, exist_ok=True)
    wells = [f"{r}{c:02d}" for r in ROWS for c in range(1, 25)]
    paths = []
    for plate_map in range(spec["plate_maps"]):
        treatments = np.arange(plate_map * spec["treated"], (plate_map + 1) * spec["treated"])
        for replicate in range(spec["replicates"]):
            plate = f"P{plate_map * spec['replicates'] + replicate:05d}"
            # layout of this replicate plate: shuffled positions (JUMP plate maps differ per replicate)
            kinds = ["trt"] * spec["treated"] + ["negcon"] * spec["negcon"] + ["poscon"] * spec["poscon"]
            positions = rng.permutation(WELLS_PER_PLATE)
            plate_effect = rng.standard_normal(N_FEATURES).astype(np.float32) * 0.3
            meta, centres = [], np.zeros((len(kinds), N_FEATURES), dtype=np.float32)
            k_trt = k_pos = 0
            for i, (position, kind) in enumerate(zip(positions, kinds)):
                if kind == "trt":
                    t = treatments[k_trt]
                    k_trt += 1
                    meta.append((wells[position], f"JCP{t:07d}", f"cpd{t}", kind, moa[t]))
                    centres[i] = strength[t] * moa_centroids[first[t]]
                elif kind == "negcon":
                    meta.append((wells[position], "DMSO", "DMSO", kind, ""))
                else:
                    meta.append((wells[position], f"POSCON{k_pos}", f"poscon{k_pos}", kind, ""))
                    centres[i] = poscon_effect[k_pos]
                    k_pos += 1
            meta_df = pd.DataFrame(
                meta,
                columns=[
                    "Metadata_Well",
                    "Metadata_TreatmentId",
                    "Metadata_Treatment",
                    "Metadata_pert_type",
                    "Metadata_moa",
                ],
            )
            meta_df = meta_df.loc[meta_df.index.repeat(SITES_PER_WELL)].reset_index(drop=True)
            meta_df.insert(0, "Metadata_Plate", plate)
            meta_df.insert(2, "Metadata_Site", np.tile(np.arange(1, SITES_PER_WELL + 1), len(meta)))
            values = np.repeat(centres, SITES_PER_WELL, axis=0) + plate_effect
            values += rng.standard_normal(values.shape, dtype=np.float32)
            features = pd.DataFrame(values, columns=[f"f{j:03d}" for j in range(N_FEATURES)])
            path = folder / f"{plate}.parquet"
            pd.concat([meta_df, features], axis=1).to_parquet(path, index=False)
            paths.append(path)
    return paths


# ----------------------------------------------------------------------------- stages (child processes)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def stage_main(stage: str, spec: dict, workdir: Path, null_size: int) -> dict:
    """Run one stage in this process; return its wall time and this process's peak memory."""
    from phenoprofiler_core import evaluate, profiles

    baseline = _rss_mib()
    sites_dir, prof_dir = workdir / "features", workdir / "profiles"
    if spec.get("treatments_only"):
        return treatment_stage(stage, spec, baseline)
    t0 = time.perf_counter()
    if stage == "profiles":
        paths = sorted(sites_dir.glob("*.parquet"))
        profiles.build_profiles(paths, prof_dir, correction_alpha=0.7)
        units = spec["sites"]
    elif stage in ("activity", "activity_plate"):
        wells, features = evaluate._read_profiles(prof_dir / "selected.parquet", evaluate.WELL_KEYS)
        table = evaluate.activity_map(
            wells, features, null_size=null_size, same_plate_negcon=stage == "activity_plate"
        )
        units = len(wells)
        assert len(table), "activity produced no rows"
    elif stage == "consistency":
        consensus, features = evaluate._read_profiles(prof_dir / "consensus.parquet", ["Metadata_moa"])
        table = evaluate.consistency_map(consensus, features, null_size=null_size)
        units = spec["labelled"]
        assert len(table), "consistency produced no rows"
    elif stage == "retrieval":
        wells, features = evaluate._read_profiles(prof_dir / "selected.parquet", evaluate.WELL_KEYS)
        table = evaluate.foe_map_recall(wells, features)
        units = spec["labelled"]
        assert len(table), "retrieval produced no rows"
    else:
        raise ValueError(stage)
    seconds = time.perf_counter() - t0
    return dict(stage=stage, seconds=seconds, peak_mib=_rss_mib(), baseline_mib=baseline, units=units)


def labelled_wells(spec: dict, replicates: int = 4) -> tuple[pd.DataFrame, list[str]]:
    """Well profiles of the labelled treatments only (what the MoA stages keep of a full table)."""
    rng = np.random.default_rng(spec["seed"])
    n = spec["labelled"]
    n_moas = max(2, n // 10)
    first, second = rng.integers(0, n_moas, n), rng.integers(0, n_moas, n)
    moa = np.where(
        rng.random(n) < 0.1,
        np.char.add(np.char.add("moa", first.astype(str)), np.char.add("|moa", second.astype(str))),
        np.char.add("moa", first.astype(str)),
    )
    centroids = rng.standard_normal((n_moas, N_FEATURES)).astype(np.float32)
    treatment = np.repeat(np.arange(n), replicates)
    values = centroids[first[treatment]] + rng.standard_normal((treatment.size, N_FEATURES), dtype=np.float32)
    features = [f"f{j:03d}" for j in range(N_FEATURES)]
    meta = pd.DataFrame(
        {
            "Metadata_Plate": [f"P{k % 1112:05d}" for k in range(treatment.size)],
            "Metadata_Well": [f"W{k:07d}" for k in range(treatment.size)],
            "Metadata_TreatmentId": [f"JCP{t:07d}" for t in treatment],
            "Metadata_Treatment": [f"cpd{t}" for t in treatment],
            "Metadata_pert_type": "trt",
            "Metadata_moa": moa[treatment],
        }
    )
    return pd.concat([meta, pd.DataFrame(values, columns=features)], axis=1), features


def treatment_stage(stage: str, spec: dict, baseline: float) -> dict:
    """The MoA stages on the labelled treatments of a full-size dataset (no sites, no controls)."""
    from phenoprofiler_core import evaluate

    wells, features = labelled_wells(spec)
    t0 = time.perf_counter()
    if stage == "consistency":
        table = evaluate.consistency_map(
            evaluate.treatment_means(wells, features), features, null_size=spec["null_size"]
        )
    elif stage == "retrieval":
        table = evaluate.foe_map_recall(wells, features)
    else:
        raise ValueError(f"{stage} needs the whole table, not only the labelled treatments")
    assert len(table), f"{stage} produced no rows"
    seconds = time.perf_counter() - t0
    return dict(
        stage=stage, seconds=seconds, peak_mib=_rss_mib(), baseline_mib=baseline, units=spec["labelled"]
    )


def run_stage(stage: str, spec: dict, workdir: Path, null_size: int) -> dict:
    argv = [sys.executable, __file__, "--child", stage, "--spec", json.dumps(spec), "--workdir", str(workdir)]
    argv += ["--null-size", str(null_size)]
    # copairs caches its null distributions under ~/.copairs: a fresh home per stage, so every run
    # pays what a first run pays
    with tempfile.TemporaryDirectory(prefix="bench_scale_home_") as home:
        env = dict(os.environ, PYTHONWARNINGS="ignore", HOME=home)
        done = subprocess.run(argv, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"stage {stage} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- driver

UNIT = {
    "profiles": "site",
    "activity": "well",
    "activity_plate": "well",  # evaluate.same_plate_negcon: true
    "consistency": "labelled treatment",
    "retrieval": "labelled treatment",
}
# time grows with the square of the units for these: every pair of labelled treatments is scored;
# activity ranks every well against every control well, and both grow with the plates
QUADRATIC_TIME = {"retrieval", "consistency", "activity"}


def copairs_pairs(spec: dict) -> dict:
    """Pairs copairs' own average_precision would list (and hold) for the two copairs metrics."""
    negcon = spec["plates"] * spec["negcon"]
    queries = spec["plates"] * (spec["treated"] + spec["poscon"])
    labelled = spec["labelled"]
    return dict(activity=queries * negcon, consistency=labelled * (labelled - 1) // 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["bbbc022", "jump"], choices=list(SIZES))
    parser.add_argument(
        "--jump-fractions", nargs="+", type=float, default=[1.0], help="fractions of JUMP's plates to run"
    )
    parser.add_argument(
        "--labelled", type=float, default=0.2, help="JUMP: fraction of treatments with MoA labels"
    )
    parser.add_argument("--null-size", type=int, default=10000, help="copairs null size (the config default)")
    parser.add_argument(
        "--stages",
        nargs="+",
        default=["profiles", "activity", "activity_plate", "consistency", "retrieval"],
        choices=list(UNIT),
        help="activity_plate = activity against the controls of the well's own plate (same_plate_negcon)",
    )
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one, removed)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        sys.path.insert(0, str(HERE.parent))
        print(json.dumps(stage_main(args.child, json.loads(args.spec), Path(args.workdir), args.null_size)))
        return

    scratch = Path(args.workdir or tempfile.mkdtemp(prefix="bench_scale_"))
    runs = [("bbbc022", 1.0)] if "bbbc022" in args.sizes else []
    runs += [("jump", f) for f in sorted(args.jump_fractions)] if "jump" in args.sizes else []
    rows = []
    try:
        for size, fraction in runs:
            spec = layout(size, fraction, args.labelled)
            workdir = scratch / f"{size}_{fraction:g}"
            t0 = time.perf_counter()
            write_sites(spec, workdir / "features")
            print(
                f"[{size} x{fraction:g}] {spec['plates']} plates, {spec['wells']:,} wells, {spec['sites']:,} sites, "
                f"{spec['n_treatments']:,} treatments ({spec['labelled']:,} with MoA labels); "
                f"tables written in {time.perf_counter() - t0:.0f} s",
                flush=True,
            )
            full = layout(size, 1.0, args.labelled)
            for stage in args.stages:
                result = run_stage(stage, spec, workdir, args.null_size)
                units_full = {"site": full["sites"], "well": full["wells"]}.get(UNIT[stage], full["labelled"])
                result.update(size=size, fraction=fraction, unit=UNIT[stage], units_full=units_full)
                rows.append(result)
                print(
                    f"    {stage:12s} {result['seconds']:9.1f} s  peak {result['peak_mib']:9.0f} MiB "
                    f"(imports {result['baseline_mib']:.0f} MiB)",
                    flush=True,
                )
            pairs = copairs_pairs(spec)
            print(
                f"    copairs' own pair lists would hold {pairs['activity']:,} activity pairs and "
                f"{pairs['consistency']:,} consistency pairs (>= 8 bytes of indices + 4 of similarity each: "
                f"{(pairs['activity'] + pairs['consistency']) * 12 / 2**30:.1f} GiB)",
                flush=True,
            )
            shutil.rmtree(workdir / "features", ignore_errors=True)
        if "jump" in args.sizes and max(args.jump_fractions) < 1.0:
            # The all-pairs MoA stages depend on the labelled treatments only: run them at full size.
            spec = layout("jump", 1.0, args.labelled)
            spec.update(treatments_only=True, null_size=args.null_size)
            for stage in [s for s in args.stages if s in ("consistency", "retrieval")]:
                result = run_stage(stage, spec, scratch, args.null_size)
                result.update(size="jump", fraction=1.0, unit=UNIT[stage], units_full=spec["labelled"])
                result["note"] = "labelled treatments only"
                rows.append(result)
                print(
                    f"[jump x1, labelled treatments only] {stage:12s} {result['seconds']:9.1f} s  "
                    f"peak {result['peak_mib']:9.0f} MiB",
                    flush=True,
                )
    finally:
        if args.workdir is None:
            shutil.rmtree(scratch, ignore_errors=True)

    try:
        sys.path.insert(0, str(HERE))
        from scale_images import image_stage_rows  # another stage's rows, when present

        rows += image_stage_rows()
    except ImportError:
        pass
    print_table(rows)


def extrapolate(rows: list[dict], stage: str) -> dict | None:
    """Full-JUMP time and memory from the largest JUMP fraction run, when full JUMP itself was not:
    memory above the imports grows like the units; time too, except where the work is all pairs
    (MoA stages: labelled treatments squared; activity: wells x control wells, both growing with
    the plates): there with the square of the units."""
    # whole-table runs only (the labelled-only runs leave out reading and grouping all wells)
    jump = [r for r in rows if r["stage"] == stage and r["size"] == "jump" and not r.get("note")]
    if not jump or max(r["fraction"] for r in jump) >= 1.0 or jump[0].get("units_full") is None:
        return None
    b = max(jump, key=lambda r: r["units"])
    scale = b["units_full"] / b["units"]
    power = 2 if stage in QUADRATIC_TIME else 1
    return dict(
        stage=stage,
        size="jump",
        fraction=1.0,
        units=b["units_full"],
        unit=UNIT[stage],
        seconds=b["seconds"] * scale**power,
        peak_mib=b["baseline_mib"] + (b["peak_mib"] - b["baseline_mib"]) * scale,
        extrapolated=True,
    )


def print_table(rows: list[dict]) -> None:
    stages = list(dict.fromkeys(r["stage"] for r in rows))
    rows = rows + [e for e in (extrapolate(rows, s) for s in stages) if e]
    print()
    print(
        f"{'stage':12s} {'size':16s} {'units':>12s} {'unit':20s} {'time s':>9s} {'peak MiB':>9s} "
        f"{'us/unit':>9s} {'KiB/unit':>9s}"
    )
    for stage in stages:
        these = [r for r in rows if r["stage"] == stage]
        for r in these:
            label = f"{r['size']} x{r.get('fraction', 1):g}" + (" (extrap.)" if r.get("extrapolated") else "")
            label += " (labelled)" if r.get("note") else ""
            print(
                f"{stage:12s} {label:16s} {r['units']:>12,} {r['unit']:20s} {r['seconds']:9.1f} "
                f"{r['peak_mib']:9.0f} {1e6 * r['seconds'] / r['units']:9.2f} "
                f"{1024 * r['peak_mib'] / r['units']:9.3f}"
            )
        measured = sorted((r for r in these if not r.get("extrapolated")), key=lambda r: r["units"])
        if len(measured) >= 2 and measured[-1]["units"] > measured[0]["units"]:
            small, large = measured[0], measured[-1]
            data = large["units"] / small["units"]
            print(
                f"{'':12s} growth {small['size']} x{small.get('fraction', 1):g} -> {large['size']} "
                f"x{large.get('fraction', 1):g}: data x{data:.1f}, time x{large['seconds'] / small['seconds']:.1f} "
                f"(per unit x{large['seconds'] / small['seconds'] / data:.2f}), peak memory "
                f"x{large['peak_mib'] / small['peak_mib']:.1f} (per unit x{large['peak_mib'] / small['peak_mib'] / data:.2f})"
            )


if __name__ == "__main__":
    main()
