"""Runtimes: wall time, CPU time and peak memory per rule, from Snakemake's benchmark files.

Memory is ``max_pss`` (proportional set size): a page shared by several processes is divided
among them.  ``max_rss`` counts it once per process, so a job with forked workers (DataLoader
workers, torchrun processes) reports many times the memory it used: the demo's ``train`` showed
34 GB RSS on a 23 GB machine (issue 13.6).  ``max_rss`` is used only for a job whose file has no
PSS, and the table marks that.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..errors import DataError
from .content import Figure, Marked, blocks, caption, code, error_note, missing, table_from_frame, text
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
        pss = pd.to_numeric(bench.get("max_pss", pd.Series(dtype=float)), errors="coerce")
        rss = pd.to_numeric(bench.get("max_rss", pd.Series(dtype=float)), errors="coerce")
        cpu = pd.to_numeric(bench.get("cpu_time", pd.Series(dtype=float)), errors="coerce")
        rss_only = bool(pss.isna().all() and rss.notna().any())
        # With `benchmark: repeat(...)` a file holds several runs; their mean is the job's time.
        rows.append(
            {
                "rule": rule,
                "s": seconds.mean(),
                "memory": float(rss.max() if rss_only else pss.max()),
                "rss_only": rss_only,
                "cpu": cpu.mean(),
            }
        )
    if not rows:
        return blocks(notes)
    jobs = pd.DataFrame(rows)
    per_rule = jobs.groupby("rule").agg(
        jobs=("s", "size"),
        total_s=("s", "sum"),
        longest_s=("s", "max"),
        cpu_s=("cpu", "sum"),
        peak_mb=("memory", "max"),
        rss_jobs=("rss_only", "sum"),
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
            "peak memory, PSS (MB)": [
                Marked(
                    mb,
                    title=f"{int(n)} job(s) had no max_pss; their max_rss is used",
                    label=f"{mb:,.1f} (RSS)",
                )
                if n and pd.notna(mb)
                else mb
                for mb, n in zip(per_rule["peak_mb"], per_rule["rss_jobs"])
            ],
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
    memory_note = caption(
        "Peak memory: the largest ",
        code("max_pss"),
        " of the rule's jobs (proportional set size: memory shared between processes, such as "
        "forked data-loader workers, is divided among them). ",
        code("max_rss"),
        " would count shared memory once per process and overstate it (the demo's train once "
        "showed 34 GB RSS on a 23 GB machine); it is shown, marked (RSS), only where a benchmark "
        "file has no PSS.",
    )
    return blocks(notes, table_from_frame(table, number_format="{:,.1f}"), memory_note, figure)
