"""Benchmark: the report step at real dataset size (wall time and peak memory of write_report).

    .venv/bin/python bench/bench_report_scale.py [--sizes bbbc022 jump] [--root DIR] [--keep]
                                                 [--reuse] [--sets 4]

Builds a synthetic ``results/<dataset>/`` folder shaped like a real run -- ``Metadata_*`` columns,
384-well plates with 9 sites per well, negative-control wells on every plate, treatments
replicated across plates, multi-label MoA strings, 672 features per set -- then runs
``write_report`` in a fresh child process and prints its wall time and peak memory
(``ru_maxrss`` of the child) and the seconds spent per section (the report's own log).

Sizes: ``bbbc022`` = 20 plates, 7,680 wells, 1,600 treatments (Gustafsdottir 2013);
``jump`` = 1,050 plates, 403,200 wells, 100,000 treatments (JUMP-compound scale).
Everything a report reads is written at full size, with two exceptions that do not change what
the report does: site tiles are sparse ``.npy`` files (the real shape and header, zero pages, so
the disk holds no 7 TB of zeros; the report memory-maps the few example tiles it shows), and the
classic feature tables hold a dozen feature columns besides ``Count_Nuclei`` (the report reads
only the count column from them; Parquet is columnar).  The sets share one normalized profile
file (hard links): each set is still read and embedded separately.

The goal (task 16.5): both sizes within 24 GB and within minutes.  Numbers depend on the machine;
say how busy it was when quoting them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

CHANNELS = ("DNA", "ER", "RNA", "AGP", "Mito")
ROWS, COLUMNS, SITES = 16, 24, 9  # 384-well plates, 9 sites per well
N_FEATURES = 672


@dataclass(frozen=True)
class Size:
    name: str
    plates: int
    treatments: int
    controls_per_plate: int
    moa_labels: int

    @property
    def wells(self) -> int:
        return self.plates * ROWS * COLUMNS


SIZES = {
    # BBBC022: 20 plates x 384 wells, 1,600 compounds; 64 DMSO wells per plate -> 4 replicates
    "bbbc022": Size("bbbc022", plates=20, treatments=1600, controls_per_plate=64, moa_labels=400),
    # JUMP-compound scale: >= 400,000 wells, >= 100,000 compounds; 16 DMSO wells per plate
    "jump": Size("jump", plates=1050, treatments=100_000, controls_per_plate=16, moa_labels=1200),
}


def _wells_of_plate() -> list[str]:
    return [f"{chr(ord('A') + r)}{c + 1:02d}" for r in range(ROWS) for c in range(COLUMNS)]


def well_layout(size: Size, seed: int) -> pd.DataFrame:
    """One row per well: plate, well, treatment id/name, pert_type, moa (categoricals: 400k rows)."""
    rng = np.random.default_rng(seed)
    wells = _wells_of_plate()
    plate = np.repeat([f"P{i:04d}" for i in range(size.plates)], len(wells))
    well = np.tile(wells, size.plates)
    # controls: the first controls_per_plate wells of every plate (edge columns in real plates)
    is_control = np.tile(np.arange(len(wells)) < size.controls_per_plate, size.plates)
    n_treated = int((~is_control).sum())
    # treatments round-robin over the plates' treated wells: each one 3-5 replicates on different plates
    treatment_index = np.empty(len(plate), dtype=np.int64)
    treatment_index[is_control] = -1
    treatment_index[~is_control] = rng.permutation(np.arange(n_treated) % size.treatments)
    labels = np.array([f"moa_{k:04d}" for k in range(size.moa_labels)])
    first = rng.integers(0, size.moa_labels, size.treatments)
    second = rng.integers(0, size.moa_labels, size.treatments)
    kind = rng.random(size.treatments)
    moa_of_treatment = np.where(
        kind < 0.3,
        "",
        np.where(kind < 0.45, np.char.add(np.char.add(labels[first], "|"), labels[second]), labels[first]),
    )
    treatment_id = np.where(
        is_control, "DMSO", np.char.add("BRD-", np.char.zfill(treatment_index.astype(str), 8))
    )
    frame = pd.DataFrame(
        {
            "Metadata_Plate": plate,
            "Metadata_Well": well,
            "Metadata_TreatmentId": treatment_id,
            "Metadata_Treatment": np.where(
                is_control, "DMSO", np.char.add("cmpd-", treatment_index.astype(str))
            ),
            "Metadata_pert_type": np.where(is_control, "negcon", "trt"),
            "Metadata_moa": np.where(is_control, "", moa_of_treatment[np.maximum(treatment_index, 0)]),
        }
    )
    return frame.astype("category")


def _write_manifest(results: Path, layout: pd.DataFrame) -> None:
    """manifest.parquet: one row per site, a path per channel; written plate by plate (3.6M rows)."""
    writer = None
    for plate, wells in layout.groupby("Metadata_Plate", observed=True, sort=False):
        sites = wells.loc[wells.index.repeat(SITES)].astype(str).reset_index(drop=True)
        sites.insert(2, "Metadata_Site", np.tile(np.arange(1, SITES + 1), len(wells)))
        for k, channel in enumerate(CHANNELS, start=1):
            sites[f"Path_{channel}"] = (
                f"/data/images/{plate}/"
                + sites["Metadata_Well"]
                + "_s"
                + sites["Metadata_Site"].astype(str)
                + f"_w{k}.tif"
            )
        table = pa.Table.from_pandas(sites, preserve_index=False)
        if writer is None:
            writer = pq.ParquetWriter(results / "manifest.parquet", table.schema)
        writer.write_table(table)
    writer.close()


def _png_bytes(seed: int) -> bytes:
    """A real PNG about the size of an illumination QC picture (~150 KB)."""
    from PIL import Image

    noise = np.random.default_rng(seed).integers(0, 255, (250, 600), dtype=np.uint8)
    import io

    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    return buffer.getvalue()


def _per_plate_files(results: Path, layout: pd.DataFrame, size: Size, seed: int) -> None:
    rng = np.random.default_rng(seed + 1)
    png = results / "_qc.png"
    png.write_bytes(_png_bytes(seed))
    for folder in (
        "tiles",
        "features/classic",
        "benchmarks/illumination",
        "benchmarks/tiles",
        "benchmarks/classic",
    ):
        (results / folder).mkdir(parents=True, exist_ok=True)
    bench_header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    for i, (plate, wells) in enumerate(layout.groupby("Metadata_Plate", observed=True, sort=False)):
        sites = wells.loc[wells.index.repeat(SITES)].astype(str).reset_index(drop=True)
        sites.insert(2, "Metadata_Site", np.tile(np.arange(1, SITES + 1), len(wells)))
        sites.to_parquet(results / "tiles" / f"{plate}.sites.parquet", index=False)
        # sparse tile file: real header and shape, no data pages on disk
        np.lib.format.open_memmap(
            results / "tiles" / f"{plate}.npy",
            mode="w+",
            dtype=np.float16,
            shape=(len(sites), len(CHANNELS), 448, 448),
        ).flush()
        classic = sites.copy()
        classic["Count_Nuclei"] = rng.poisson(60, len(sites)).astype(np.float32)
        for j in range(12):
            classic[f"Intensity_Feature_{j:02d}"] = rng.random(len(sites), dtype=np.float32)
        classic.to_parquet(results / "features" / "classic" / f"{plate}.parquet", index=False)
        illum = results / "illum" / str(plate)
        illum.mkdir(parents=True)
        os.link(png, illum / "qc.png")
        flagged = i % 50 == 7  # one plate in 50 has an implausible Mito function
        (illum / "qc.json").write_text(
            json.dumps(
                {
                    "plate": str(plate),
                    "n_sites": len(sites),
                    "min_sites": 50,
                    "max_ratio_limit": 4.0,
                    "channels": {
                        c: {
                            "max_over_min": 6.2 if flagged and c == "Mito" else 1.6,
                            "warnings": ["max/min 6.2 above 4"] if flagged and c == "Mito" else [],
                        }
                        for c in CHANNELS
                    },
                    "warnings": [],
                }
            )
        )
        for rule in ("illumination", "tiles", "classic"):
            (results / "benchmarks" / rule / f"{plate}.tsv").write_text(
                bench_header
                + f"{rng.uniform(20, 90):.2f}\t0:01:00\t2100.5\t5000\t1500\t1800.2\t1\t2\t95\t55\n"
            )


def _write_profiles(results: Path, layout: pd.DataFrame, sets: list[str], seed: int) -> None:
    """normalized.parquet of the first set (row groups of 40 plates), hard-linked for the others."""
    rng = np.random.default_rng(seed + 2)
    first = results / "profiles" / sets[0] / "normalized.parquet"
    first.parent.mkdir(parents=True)
    writer = None
    plates = layout["Metadata_Plate"].cat.categories
    for start in range(0, len(plates), 40):
        chunk = (
            layout[layout["Metadata_Plate"].isin(plates[start : start + 40])]
            .astype(str)
            .reset_index(drop=True)
        )
        features = rng.standard_normal((len(chunk), N_FEATURES), dtype=np.float32)
        table = pa.Table.from_pandas(chunk, preserve_index=False)
        for j in range(N_FEATURES):
            table = table.append_column(f"emb{j:03d}", pa.array(features[:, j]))
        if writer is None:
            writer = pq.ParquetWriter(first, table.schema)
        writer.write_table(table)
    writer.close()
    for name in sets[1:]:
        (results / "profiles" / name).mkdir(parents=True)
        os.link(first, results / "profiles" / name / "normalized.parquet")


def _write_eval(results: Path, layout: pd.DataFrame, size: Size, sets: list[str], seed: int) -> None:
    rng = np.random.default_rng(seed + 3)
    treated = layout[layout["Metadata_pert_type"] == "trt"]
    per_treatment = (
        treated.groupby("Metadata_TreatmentId", observed=True)
        .agg(Metadata_Treatment=("Metadata_Treatment", "first"), n_wells=("Metadata_Well", "size"))
        .reset_index()
        .astype({"Metadata_TreatmentId": str, "Metadata_Treatment": str})
    )
    summary = []
    for k, name in enumerate(sets):
        activity = per_treatment.copy()
        activity["mean_average_precision"] = rng.beta(1.5, 4, len(activity))
        activity["p_value"] = rng.beta(0.6 + 0.2 * k, 1.5, len(activity))
        activity["corrected_p_value"] = np.minimum(activity["p_value"] * 3.0, 1.0)
        activity["below_corrected_p"] = activity["corrected_p_value"] < 0.05
        (results / "eval" / name).mkdir(parents=True)
        activity.to_parquet(results / "eval" / name / "map_activity.parquet", index=False)
        for metric, variant in (
            ("map_activity", "copairs"),
            ("fraction_retrieved_activity", "copairs BH 0.05"),
            ("map_consistency", "copairs multilabel"),
            ("foe_top1_mean", "published (inf OR -> v22)"),
            ("foe_top1_median", "median OR"),
            ("map_interpolated", "DeepProfilerExperiments"),
            ("map_ap", "PhenoProfiler"),
            ("recall_top1pct", "PhenoProfiler"),
        ):
            summary.append(
                {
                    "set": name,
                    "metric": metric,
                    "variant": variant,
                    "value": float(rng.random()),
                    "n": size.treatments,
                    "description": metric,
                    "note": "",
                }
            )
    pd.DataFrame(summary).to_parquet(results / "eval" / "summary.parquet", index=False)


def _write_run_records(results: Path, layout: pd.DataFrame, size: Size, sets: list[str]) -> None:
    controls = (
        layout[layout["Metadata_pert_type"] == "negcon"].groupby("Metadata_Plate", observed=True).size()
    )
    controls_per_plate = {str(p): int(n) for p, n in controls.items()}
    (results / "manifest.summary.json").write_text(
        json.dumps(
            {
                "sites": len(layout) * SITES,
                "plates": size.plates,
                "wells": len(layout),
                "treatments": size.treatments,
                "controls_per_plate": controls_per_plate,
                "platemap_wells_without_images": {"count": 0, "examples": []},
                "images_without_platemap_row": {"count": 0, "examples": []},
                "warnings": [],
            }
        )
    )
    for name in sets:
        (results / "profiles" / name / "normalization.json").write_text(
            json.dumps(
                {
                    "method": "mad_robustize",
                    "scope": "plate" if size.controls_per_plate >= 16 else "pooled",
                    "batch_column": None,
                    "reason": f"every plate has at least 16 control wells (fewest: {size.controls_per_plate})",
                    "controls_per_plate": controls_per_plate,
                    "min_controls_per_plate": 16,
                    "warnings": [],
                }
            )
        )
    history = pd.DataFrame(
        [
            {
                "stage": stage,
                "epoch": epoch,
                "split": split,
                "loss": 1.0 / epoch,
                "mse": 0.01 / epoch,
                "ce": 2.0,
                "contrastive": 1.0,
            }
            for stage in (1, 2)
            for epoch in range(1, 101)
            for split in ("train", "validation")
        ]
    )
    (results / "model" / sets[0]).mkdir(parents=True)
    history.to_csv(results / "model" / sets[0] / "history.csv", index=False)
    for rule, jobs in (("manifest", 1), ("train", 1), ("profiles", len(sets)), ("evaluate", len(sets) + 1)):
        (results / "benchmarks" / rule).mkdir(parents=True, exist_ok=True)
        for job in range(jobs):
            (results / "benchmarks" / rule / f"job{job}.tsv").write_text(
                "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
                "600.0\t0:10:00\t9000\t12000\t7000\t8000\t1\t2\t95\t550\n"
            )


def build(results: Path, size: Size, n_sets: int, seed: int = 0) -> list[str]:
    sets = ["phenoprofiler", "classic", "untrained", "published"][:n_sets]
    results.mkdir(parents=True)
    layout = well_layout(size, seed)
    _write_manifest(results, layout)
    _per_plate_files(results, layout, size, seed)
    _write_profiles(results, layout, sets, seed)
    _write_eval(results, layout, size, sets, seed)
    _write_run_records(results, layout, size, sets)
    (results / "_qc.png").unlink()
    return sets


CHILD = """
import json, logging, resource, sys, time
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
start = time.perf_counter()
from phenoprofiler_core.report import write_report
write_report(sys.argv[1], sys.argv[2], sets=sys.argv[3:])
print(json.dumps({"seconds": time.perf_counter() - start,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(results: Path, sets: list[str]) -> dict:
    out = results / "report.html"
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(results), str(out), *sets],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"write_report failed:\n{done.stderr[-4000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    figures["page_mb"] = out.stat().st_size / 1e6
    figures["sections"] = [line for line in done.stderr.splitlines() if "report: section" in line]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["bbbc022", "jump"], choices=sorted(SIZES))
    parser.add_argument("--sets", type=int, default=4, help="feature sets (3-4 in real runs)")
    parser.add_argument("--root", type=Path, default=None, help="where to build (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic folders")
    parser.add_argument("--reuse", action="store_true", help="reuse folders already built under --root")
    args = parser.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="bench_report_"))
    rows = []
    try:
        for name in args.sizes:
            size = SIZES[name]
            results = root / name
            started = time.perf_counter()
            if args.reuse and (results / "eval" / "summary.parquet").is_file():
                sets = sorted(p.name for p in (results / "profiles").iterdir())
                built = "reused"
            else:
                shutil.rmtree(results, ignore_errors=True)
                sets = build(results, size, args.sets)
                built = f"{time.perf_counter() - started:.0f} s"
            print(
                f"{name}: {size.plates:,} plates, {size.wells:,} wells, {size.wells * SITES:,} sites, "
                f"{size.treatments:,} treatments, {len(sets)} sets x {N_FEATURES} features (built: {built})",
                flush=True,
            )
            figures = measure(results, sets)
            for line in figures["sections"]:
                print("   ", line)
            rows.append((name, size, figures))
    finally:
        if not args.keep and args.root is None:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\n{'size':8s} {'wells':>9s} {'treatments':>10s} {'wall s':>8s} {'peak MB':>9s} {'page MB':>8s}")
    for name, size, figures in rows:
        print(
            f"{name:8s} {size.wells:9,d} {size.treatments:10,d} {figures['seconds']:8.1f} "
            f"{figures['peak_mb']:9,.0f} {figures['page_mb']:8.1f}"
        )
    print(f"\n(one run each; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f} at the end)")


if __name__ == "__main__":
    main()
