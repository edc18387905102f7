"""Runtimes: wall time, CPU time and peak memory per rule, from Snakemake's benchmark files."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..errors import DataError
from .content import Figure, blocks, code, error_note, missing, table_from_frame, text
from .figures import fig_to_png, plt


def hms(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def runtime_blocks(results: Path):
    bench_dir = results / "benchmarks"
    files = sorted(bench_dir.rglob("*.tsv")) if bench_dir.is_dir() else []
    if not files:
        return blocks(missing("Snakemake benchmark files", bench_dir / "<rule>" / "*.tsv"))
    rows, notes = [], []
    for path in files:
        try:
            bench = pd.read_csv(path, sep="\t")
            if "s" not in bench.columns:
                raise DataError(f"no 's' column (has {list(bench.columns)})")
        except Exception as exc:
            notes.append(error_note(path, exc))
            continue
        rule = path.relative_to(bench_dir).parts[0]
        rule = rule[:-4] if rule.endswith(".tsv") else rule  # a benchmark file directly under benchmarks/
        # Snakemake writes "-" (or NA) where it could not measure; treat as missing, not 0.
        seconds = pd.to_numeric(bench["s"], errors="coerce")
        rss = pd.to_numeric(bench.get("max_rss", pd.Series(dtype=float)), errors="coerce")
        cpu = pd.to_numeric(bench.get("cpu_time", pd.Series(dtype=float)), errors="coerce")
        # With `benchmark: repeat(...)` a file holds several runs; their mean is the job's time.
        rows.append({"rule": rule, "s": seconds.mean(), "max_rss": rss.max(), "cpu": cpu.mean()})
    if not rows:
        return blocks(notes)
    jobs = pd.DataFrame(rows)
    per_rule = jobs.groupby("rule").agg(
        jobs=("s", "size"),
        total_s=("s", "sum"),
        longest_s=("s", "max"),
        cpu_s=("cpu", "sum"),
        peak_rss_mb=("max_rss", "max"),
    )
    per_rule = per_rule.sort_values("total_s", ascending=False)
    table = pd.DataFrame(
        {
            "rule": per_rule.index,
            "jobs": per_rule["jobs"].astype(int).to_numpy(),
            "wall time (sum)": [hms(s) for s in per_rule["total_s"]],
            "seconds (sum)": per_rule["total_s"].to_numpy(),
            "longest job (s)": per_rule["longest_s"].to_numpy(),
            "CPU seconds": per_rule["cpu_s"].to_numpy(),
            "peak memory (MB)": per_rule["peak_rss_mb"].to_numpy(),
        }
    )
    fig, ax = plt().subplots(figsize=(7.5, 0.5 + 0.32 * len(per_rule)))
    ax.barh(per_rule.index[::-1], per_rule["total_s"].to_numpy()[::-1], color="#4c78a8")
    ax.set_xlabel("wall-clock seconds, summed over jobs", fontsize=9)
    ax.tick_params(labelsize=8)
    figure = Figure(
        fig_to_png(fig),
        "runtime per rule",
        text(
            f"Wall-clock time per rule from {len(jobs)} Snakemake benchmark files under ",
            code("benchmarks/"),
            "; jobs that ran in parallel are summed, so the total is the compute spent, not the elapsed time.",
        ),
    )
    return blocks(notes, table_from_frame(table, number_format="{:,.1f}"), figure)
