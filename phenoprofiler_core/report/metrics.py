"""Metrics of every feature set side by side, and mAP per treatment (phenotypic activity)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DataError
from .content import (
    Figure,
    Heading,
    Marked,
    Paragraph,
    Styled,
    Table,
    blocks,
    caption,
    code,
    error_note,
    missing,
    note,
    table_from_frame,
    text,
)
from .figures import bar_panel, fig_to_png, plt
from .readers import ordered_sets, read_activity, read_parquet

METRICS_CAPTION = (
    "Feature sets side by side, evaluated on the same wells (one row per metric and variant, from ",
    code("eval/summary.parquet"),
    "). mAP: copairs mean average precision (activity = replicates vs. negative controls; "
    "consistency = treatments sharing an MoA). FoE: folds of enrichment in the top 1 % most similar "
    "treatments. Recall@k: share of same-MoA treatments among the top k %. Cosine similarity throughout. "
    "n/a [k]: evaluated, but there is no value (the reason is footnote k); –: the set has no such "
    "row; ∞: an infinite result, not a missing one.",
)


def _reason_for_missing(entry: pd.Series) -> str:
    """Why a metric has no value: evaluate's ``note``, else what ``n`` tells, else that nobody said."""
    note_text = str(entry.get("note") or "").strip() if "note" in entry.index else ""
    if note_text and note_text.lower() not in ("nan", "none", "<na>"):
        return note_text
    n = pd.to_numeric(entry.get("n"), errors="coerce") if "n" in entry.index else np.nan
    if n == 0:
        return "computed over nothing (n = 0: no query or treatment qualified)"
    return "no reason recorded (eval/summary.parquet has no note for it)"


def read_summary(path: Path) -> pd.DataFrame:
    """eval/summary.parquet with a display row name ``_row`` = metric (variant)."""
    summary = read_parquet(path)
    absent_columns = {"set", "metric", "value"} - set(summary.columns)
    if absent_columns:
        raise DataError(
            f"{path}: missing columns {sorted(absent_columns)}; expected one row per (set, metric) "
            f"with columns set, metric, value (has {list(summary.columns)})"
        )
    summary = summary.copy()
    summary["set"] = summary["set"].astype(str)
    summary["value"] = pd.to_numeric(summary["value"], errors="coerce")
    # 'variant' tells the published flavours apart (e.g. map_interpolated vs map_ap); keep it
    # visible in the row name instead of silently averaging the two.
    row = summary["metric"].astype(str)
    if "variant" in summary.columns:
        variant = summary["variant"].astype("string").fillna("")
        row = row.where(variant == "", row + " (" + variant + ")")
    summary["_row"] = row
    return summary


def metrics_blocks(results: Path, sets: Sequence[str]):
    path = results / "eval" / "summary.parquet"
    if not path.is_file():
        return blocks(missing("the metrics summary", path))
    summary = read_summary(path)
    duplicated = summary.duplicated(["_row", "set"], keep="first")
    first = summary[~duplicated].set_index(["_row", "set"])
    # Every metric evaluate wrote gets a row, also one no set could compute (issue 13.7): a
    # missing number with its reason tells the reader more than a silently shorter table.
    row_names = list(dict.fromkeys(summary["_row"]))
    shown_sets = ordered_sets(list(dict.fromkeys(summary["set"])), sets)
    reasons: dict[str, int] = {}  # reason -> footnote number, so a shared reason is listed once
    reasons_by_row: dict[str, list[str]] = {name: [] for name in row_names}
    records, values = [], pd.DataFrame(np.nan, index=row_names, columns=shown_sets)
    for row_name in row_names:
        record = {"metric": row_name}
        for name in shown_sets:
            if (row_name, name) not in first.index:
                record[name] = None  # the set has no such row at all: "–"
                continue
            entry = first.loc[(row_name, name)]
            value = float(entry["value"])
            values.loc[row_name, name] = value
            if np.isnan(value):
                reason = _reason_for_missing(entry)
                ref = reasons.setdefault(reason, len(reasons) + 1)
                reasons_by_row[row_name].append(reason)
                record[name] = Marked(value, title=reason, label=f"n/a [{ref}]")
            else:
                record[name] = value
        records.append(record)
    columns = ["metric", *shown_sets]
    if "description" in summary.columns:
        # evaluate writes what each number measures; a reader needs that more than the code name.
        described = summary.dropna(subset=["description"]).groupby("_row", sort=False)["description"].first()
        columns.append("what it measures")
        for record in records:
            record["what it measures"] = str(described.get(record["metric"], ""))
    footnotes = tuple(text(f"[{ref}] n/a: {reason}") for reason, ref in reasons.items())
    parts = [Table(tuple(columns), tuple(records), index=True, footnotes=footnotes)]
    if duplicated.any():
        # Several values for one (set, metric, variant): say so rather than pick one silently.
        pairs = summary.loc[duplicated, ["set", "_row"]].drop_duplicates().head(5)
        listed = ", ".join(f"{a}/{b}" for a, b in zip(pairs["set"], pairs["_row"]))
        parts.append(
            Paragraph(
                text(
                    f"{int(duplicated.sum())} duplicate (set, metric, variant) rows in ",
                    code(path),
                    f" (e.g. {listed}); the table shows the first of each.",
                ),
                "note error",
            )
        )
    absent = [s for s in sets if s not in shown_sets]
    if absent:
        parts.append(note(f"No metrics for feature set(s) {', '.join(absent)} in ", code(path), "."))
    parts.append(caption(*METRICS_CAPTION))
    if len(values) and len(shown_sets):
        panel_reasons = {name: "; ".join(dict.fromkeys(found)) for name, found in reasons_by_row.items()}
        parts.append(
            Figure(
                metrics_chart(values, panel_reasons),
                "metrics bar chart",
                text(
                    "The same metrics as bars, one panel per metric; every bar carries its value "
                    "(a 0 is a bar of height 0 labelled 0, ∞ a bar past the largest value labelled ∞, "
                    "n/a a label without a bar), and a panel no set could compute says why."
                ),
            )
        )
    return blocks(parts)


def metrics_chart(values: pd.DataFrame, reasons: dict[str, str]) -> bytes:
    """One panel per metric (rows of ``values``), one bar per feature set (columns)."""
    n = len(values)
    cols = min(4, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt().subplots(rows, cols, figsize=(3.0 * cols, 2.3 * rows), squeeze=False)
    for ax, (metric, row) in zip(axes.flat, values.iterrows()):
        bar_panel(
            ax, list(row.index), row.to_numpy(dtype=float), title=str(metric), why_empty=reasons.get(metric)
        )
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    return fig_to_png(fig)


def map_blocks(results: Path, sets: Sequence[str], table_rows: int):
    per_set: dict[str, pd.DataFrame] = {}
    notes = []
    for name in sets:
        path = results / "eval" / name / "map_activity.parquet"
        if not path.is_file():
            notes.append(missing(f"mAP per treatment for {name}", path))
            continue
        try:
            per_set[name] = read_activity(path)
        except Exception as exc:
            notes.append(error_note(path, exc))
    if not per_set:
        return blocks(notes)

    summary_rows = []
    for name, df in per_set.items():
        known = df["significant"].dropna()
        summary_rows.append(
            {
                "feature set": name,
                "treatments": len(df),
                "mean mAP": float(df["map"].mean()),
                "fraction retrieved (corrected p < 0.05)": float(known.astype(bool).mean())
                if len(known)
                else np.nan,
            }
        )
    parts = [Heading("Per feature set"), table_from_frame(pd.DataFrame(summary_rows))]

    fig, ax = plt().subplots(figsize=(7.5, 3.4))
    for name, df in per_set.items():
        values = np.sort(df["map"].dropna().to_numpy())[::-1]
        # markers help with a few treatments; with 100,000 they only hide the curve
        marker = "o" if len(values) <= 200 else None
        ax.plot(np.arange(1, len(values) + 1), values, marker=marker, ms=3, label=name)
    ax.set_xlabel("treatments ranked by mAP", fontsize=9)
    ax.set_ylabel("mAP (activity)", fontsize=9)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    parts.append(
        Figure(
            fig_to_png(fig),
            "mAP per treatment, ranked",
            text(
                "mAP of each treatment's replicate wells against negative-control wells, sorted; "
                "a curve further up and to the right = more treatments distinguishable from controls."
            ),
        )
    )

    merged = None
    for name, df in per_set.items():
        column = df.set_index("treatment")[["map", "significant"]].rename(
            columns={"map": name, "significant": f"_sig_{name}"}
        )
        merged = column if merged is None else merged.join(column, how="outer")
    merged["_mean"] = merged[list(per_set)].mean(axis=1)
    merged = merged.sort_values("_mean", ascending=False)
    shown = merged.head(table_rows)
    records = []
    for treatment, row in shown.iterrows():
        record = {"treatment": str(treatment)}
        for name in per_set:
            significant = row[f"_sig_{name}"]
            shaded = not pd.isna(row[name]) and not pd.isna(significant) and bool(significant)
            record[name] = Marked(row[name], "sig") if shaded else row[name]
        records.append(record)
    parts += [Heading("Per treatment"), Table(("treatment", *per_set), tuple(records), css="map")]
    words = [
        "mAP per treatment (rows sorted by mean mAP over feature sets); ",
        Styled("shaded", "sig"),
        " = retrieved, i.e. BH-corrected p < 0.05.",
    ]
    if len(merged) > len(shown):
        words.append(f" Showing the top {len(shown)} of {len(merged)} treatments.")
    parts.append(caption(*words))
    return blocks(notes, parts)
