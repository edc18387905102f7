"""Findings: what the run found, first (issue 11.6).

Per feature set: which treatments are active (copairs activity mAP against negative controls,
BH-corrected p), and where the normalization was fit.  Then the warnings that change how far the
numbers can be trusted: few control wells per plate, a validation loss that rose in stage 2,
illumination functions from too few sites or with implausible ratios, plate-map wells without
images.  Every check says when its input was not available instead of passing silently.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .content import (
    Bullets,
    Figure,
    Heading,
    Paragraph,
    Table,
    blocks,
    bold,
    caption,
    code,
    error_note,
    text,
)
from .contracts import (
    illumination_qc_files,
    illumination_warnings_of,
    read_illumination_qc,
    read_manifest_summary,
    read_normalization,
)
from .figures import bar_panel, fig_to_png, plt
from .readers import read_activity, read_parquet
from .training import read_history

# profiles' default profiles.min_controls_per_plate, used only when no normalization.json says
# which minimum the run used: with fewer control wells a per-plate MAD is badly off for many
# features (config/README.md, profiles section).
DEFAULT_MIN_CONTROLS = 16
# A stage-2 validation loss this much above its stage-2 minimum at the last epoch is "rising".
RISE_TOLERANCE = 0.05
VALIDATION_SPLITS = ("validation", "val", "valid")
# Warnings of one kind listed one by one before the rest is summarised as "… and N more".
LISTED_WARNINGS = 10

SCOPE_WORDS = {
    "plate": "per plate",
    "pooled": "pooled over all plates",
    "batch": "per batch",
    "none": "not normalized",
}


def scope_words(record: dict) -> str:
    words = SCOPE_WORDS[record["scope"]]
    if record["scope"] == "batch" and record.get("batch_column"):
        words = f"per batch of {record['batch_column']}"
    return words if record["scope"] == "none" else f"{words} ({record['method']})"


def _bh_threshold(results: Path) -> str:
    """The BH level evaluate used, from the summary's variant text (e.g. 'copairs BH 0.05')."""
    path = results / "eval" / "summary.parquet"
    try:
        summary = read_parquet(path, ["metric", "variant"])
    except Exception:
        return "evaluate.threshold"
    variants = summary.loc[summary["metric"] == "fraction_retrieved_activity", "variant"].astype(str)
    for variant in variants:
        match = re.search(r"BH\s*([0-9.eE-]+)", variant)
        if match:
            return match.group(1)
    return "evaluate.threshold"


# ------------------------------------------------------------------------------ per set


def _activity_by_set(results: Path, sets: Sequence[str]):
    """({set: activity table}, {set: why there is none}, error notes)."""
    tables, absent, errors = {}, {}, []
    for name in sets:
        path = results / "eval" / name / "map_activity.parquet"
        if not path.is_file():
            absent[name] = f"not available (no eval/{name}/map_activity.parquet)"
            continue
        try:
            tables[name] = read_activity(path)
        except Exception as exc:
            errors.append(error_note(path, exc))
            absent[name] = "unreadable (see the error above)"
    return tables, absent, errors


def _normalization_by_set(results: Path, sets: Sequence[str]):
    records, errors = {}, []
    for name in sets:
        try:
            records[name] = read_normalization(results, name)
        except Exception as exc:
            errors.append(error_note(results / "profiles" / name / "normalization.json", exc))
            records[name] = None
    return records, errors


def _active(table: pd.DataFrame) -> pd.DataFrame:
    active = table[table["significant"].fillna(False).astype(bool)]
    return active.sort_values(["p", "map"], ascending=[True, False], na_position="last")


def activity_notes(results: Path) -> dict[str, str]:
    """evaluate's reason per set when map_activity has no value (summary column ``note``)."""
    path = results / "eval" / "summary.parquet"
    try:
        summary = read_parquet(path, ["set", "metric", "note"])
    except Exception:  # no summary or no note column yet: the overview says "no treatment evaluated"
        return {}
    rows = summary[(summary["metric"] == "map_activity") & summary["note"].fillna("").astype(str).ne("")]
    return dict(zip(rows["set"].astype(str), rows["note"].astype(str)))


def _overview(sets, activity, absent, normalization, notes) -> Table:
    records = []
    for name in sets:
        table = activity.get(name)
        record = {"feature set": name}
        if table is not None and table.empty:
            # e.g. a treatment-level external table: activity needs replicate wells
            reason = notes.get(name, "no treatment was evaluated (empty map_activity table)")
            record.update({"treatments tested": 0, "active": f"n/a: {reason}", "most active": ""})
        elif table is None:
            record.update(
                {"treatments tested": None, "active": absent.get(name, "not available"), "most active": ""}
            )
        else:
            active = _active(table)
            names = list(active["treatment"].head(3))
            record.update(
                {
                    "treatments tested": len(table),
                    "active": f"{len(active):,} ({len(active) / len(table):.0%})" if len(table) else "0",
                    "most active": ", ".join(names) + (" …" if len(active) > len(names) else ""),
                }
            )
        record["normalization"] = (
            scope_words(normalization[name]) if normalization.get(name) else "not available"
        )
        records.append(record)
    columns = ("feature set", "treatments tested", "active", "most active", "normalization")
    return Table(columns, tuple(records))


def _active_chart(sets, activity) -> bytes:
    counts, labels = [], []
    for name in sets:
        table = activity.get(name)
        known = table is not None and not table.empty
        counts.append(float(len(_active(table))) if known else np.nan)
        labels.append(f"{int(counts[-1]):,} of {len(table):,}" if known else "n/a")
    fig, ax = plt().subplots(figsize=(min(2.0 + 1.3 * len(sets), 9.0), 2.6))
    bar_panel(
        ax,
        list(sets),
        counts,
        title="active treatments per feature set",
        why_empty="no feature set has an activity table",
        value_labels=labels,
    )
    fig.tight_layout()
    return fig_to_png(fig)


def _active_tables(sets, activity, table_rows: int, threshold: str):
    parts = []
    for name in sets:
        table = activity.get(name)
        if table is None or table.empty:
            continue
        active = _active(table)
        parts.append(Heading(f"Active treatments: {name}"))
        if active.empty:
            best = table.sort_values("p", na_position="last").head(1)
            closest = (
                text(
                    " The closest is ",
                    bold(best["treatment"].iloc[0]),
                    f" (mAP {best['map'].iloc[0]:.3f}, BH-corrected p {best['p'].iloc[0]:.3g}).",
                )
                if len(best) and pd.notna(best["p"].iloc[0])
                else ()
            )
            parts.append(
                Paragraph(
                    text(
                        f"None: no treatment's replicate wells are distinguishable from the negative "
                        f"controls at BH-corrected p < {threshold} ({len(table):,} tested).",
                        *closest,
                    )
                )
            )
            continue
        shown = active.head(table_rows)
        records = tuple(
            {
                "treatment": row.treatment,
                "treatment id": row.treatment_id,
                "wells": None if pd.isna(row.wells) else int(row.wells),
                "mAP": row.map,
                "p": row.p_raw,
                "BH-corrected p": row.p,
            }
            for row in shown.itertuples(index=False)
        )
        parts.append(
            Table(
                ("treatment", "treatment id", "wells", "mAP", "p", "BH-corrected p"),
                records,
                number_format="{:.3g}",
            )
        )
        if len(active) > len(shown):
            parts.append(
                caption(
                    f"Showing the {len(shown)} most significant of {len(active):,} active treatments "
                    "(report.table_rows)."
                )
            )
    return parts


def _normalization_bullets(sets, normalization) -> list:
    grouped: dict[tuple, list[str]] = {}
    for name in sets:
        record = normalization.get(name)
        if record:
            grouped.setdefault((scope_words(record), record["reason"]), []).append(name)
    return [
        text(bold(", ".join(names)), f": {words}" + (f" — {reason}" if reason else ""))
        for (words, reason), names in grouped.items()
    ]


# ------------------------------------------------------------------------------ warnings


def _controls_per_plate(manifest_summary, normalization, manifest) -> tuple[dict[str, int] | None, str]:
    """(negative-control wells per plate, where the numbers come from)."""
    if manifest_summary is not None:
        return manifest_summary["controls_per_plate"], "manifest.summary.json"
    for record in normalization.values():
        if record:
            return record["controls_per_plate"], "normalization.json"
    if manifest is not None and {"Metadata_pert_type", "Metadata_Well"} <= set(manifest.columns):
        controls = manifest.loc[(manifest["Metadata_pert_type"] == "negcon").to_numpy()]
        per_plate = controls.groupby("Metadata_Plate", observed=True)["Metadata_Well"].nunique()
        per_plate.index = per_plate.index.astype(str)
        plates = [str(p) for p in manifest["Metadata_Plate"].unique()]
        return {p: int(per_plate.get(p, 0)) for p in plates}, "manifest.parquet"
    return None, ""


def control_warnings(manifest_summary, normalization: dict, manifest) -> tuple[list, list[str]]:
    counts, source = _controls_per_plate(manifest_summary, normalization, manifest)
    if not counts:
        return [], ["controls per plate (no manifest, manifest.summary.json or normalization.json)"]
    minimums = {r["min_controls_per_plate"] for r in normalization.values() if r}
    minimum = min(minimums) if minimums else DEFAULT_MIN_CONTROLS
    few = {plate: n for plate, n in counts.items() if n < minimum}
    if not few:
        return [], []
    fewest = min(few, key=few.get)
    scopes: dict[str, list[str]] = {}
    for name, record in normalization.items():
        if record:
            scopes.setdefault(record["scope"], []).append(name)
    if "plate" in scopes:
        consequence = (
            f" Sets normalized per plate anyway: {', '.join(scopes['plate'])} — a robust z-score "
            "from so few wells scales features by the spread of a handful of numbers."
        )
    elif scopes:
        consequence = (
            " Normalization did not rely on them per plate: "
            + "; ".join(f"{', '.join(names)}: {SCOPE_WORDS[scope]}" for scope, names in scopes.items())
            + "."
        )
    else:
        consequence = " Normalization scope: not available (no profiles/<set>/normalization.json)."
    empty = [plate for plate, n in few.items() if n == 0]
    without = (
        f" {len(empty)} plate(s) have none ({', '.join(empty[:5])}{' …' if len(empty) > 5 else ''})."
        if empty
        else ""
    )
    return [
        text(
            bold("Few controls: "),
            f"{len(few):,} of {len(counts):,} plates have fewer than {minimum} negative-control wells "
            f"(fewest: {fewest} with {few[fewest]}; from {source}).{without}{consequence}",
        )
    ], []


def training_warnings(results: Path) -> tuple[list, list]:
    """A stage-2 validation loss that ended ≥ 5 % above its stage-2 minimum."""
    model_dir = results / "model"
    warnings_, errors = [], []
    for path in sorted(model_dir.glob("*/history.csv")) if model_dir.is_dir() else []:
        try:
            history = read_history(path)
        except Exception as exc:
            errors.append(error_note(path, exc))
            continue
        if not {"stage", "split", "loss"} <= set(history.columns):
            continue
        stage2 = history[
            (pd.to_numeric(history["stage"], errors="coerce") == 2)
            & history["split"].astype(str).str.lower().isin(VALIDATION_SPLITS)
        ].dropna(subset=["loss"])
        stage2 = stage2.sort_values("epoch")
        if len(stage2) < 2:
            continue
        best = stage2.loc[stage2["loss"].idxmin()]
        last = stage2.iloc[-1]
        if best["epoch"] < last["epoch"] and last["loss"] > best["loss"] * (1 + RISE_TOLERANCE):
            rise = last["loss"] / best["loss"] - 1
            warnings_.append(
                text(
                    bold("Validation loss rising in stage 2: "),
                    f"model {path.parent.name} reached {best['loss']:.4g} at stage-2 epoch "
                    f"{int(best['epoch'])} and ended at {last['loss']:.4g} (epoch {int(last['epoch'])}, "
                    f"+{rise:.0%}): it is fitting the training plates, not the held-out ones. The "
                    "checkpoint keeps the best-validation weights; fewer stage-2 epochs or more data "
                    "would help (see Training curves).",
                )
            )
    return warnings_, errors


def illumination_warnings(records: list[dict]) -> list:
    lines = []
    for record in records:
        lines += [
            text(bold(f"Illumination, plate {record['plate']}: "), w)
            for w in illumination_warnings_of(record)
        ]
    if len(lines) > LISTED_WARNINGS:
        rest = len(lines) - LISTED_WARNINGS
        lines = lines[:LISTED_WARNINGS] + [
            text(bold("Illumination: "), f"… and {rest:,} more warnings (table in Quality control).")
        ]
    return lines


def _examples(examples: list[dict], fields: Sequence[str]) -> str:
    shown = [" ".join(str(e[f]) for f in fields) for e in examples[:3]]
    return f" (e.g. {'; '.join(shown)})" if shown else ""


def manifest_warnings(summary: dict) -> list:
    lines = []
    missing_images = summary["platemap_wells_without_images"]
    if missing_images["count"]:
        lines.append(
            text(
                bold("Plate-map wells without images: "),
                f"{missing_images['count']:,} wells are in the plate map but have no image"
                + _examples(missing_images["examples"], ("plate", "well", "treatment"))
                + "; their treatments have fewer replicates than planned.",
            )
        )
    unmapped = summary["images_without_platemap_row"]
    if unmapped["count"]:
        lines.append(
            text(
                bold("Images without a plate-map row: "),
                f"{unmapped['count']:,} imaged sites have no treatment in the plate map and are left out"
                + _examples(unmapped["examples"], ("plate", "well", "site"))
                + ".",
            )
        )
    lines += [text(bold("Manifest: "), w) for w in summary["warnings"]]
    return lines


# ------------------------------------------------------------------------------ section


def findings_blocks(results: Path, sets: Sequence[str], manifest: pd.DataFrame | None, table_rows: int):
    threshold = _bh_threshold(results)
    activity, absent, errors = _activity_by_set(results, sets)
    normalization, normalization_errors = _normalization_by_set(results, sets)
    errors += normalization_errors
    parts = [
        Paragraph(
            text(
                "What this run found. A treatment is ",
                bold("active"),
                " when its replicate wells are distinguishable from the negative-control wells: "
                f"copairs activity mAP with a BH-corrected p below {threshold} (",
                code("eval/<set>/map_activity.parquet"),
                "). Normalization: where each set's profiles were normalized (",
                code("profiles/<set>/normalization.json"),
                ").",
            )
        ),
        _overview(sets, activity, absent, normalization, activity_notes(results)),
    ]
    if activity:  # with no activity table at all, the overview's words say it; no empty chart
        parts.append(
            Figure(
                _active_chart(sets, activity),
                "active treatments per feature set",
                text("Active treatments per feature set (label: active of tested; 0 is drawn as 0)."),
            )
        )
    # Warnings, each check on its own input; an absent input is listed, never taken as "fine".
    unavailable: list[str] = []
    try:
        manifest_summary = read_manifest_summary(results)
        if manifest_summary is None:
            unavailable.append("manifest.summary.json (plate-map wells without images)")
    except Exception as exc:
        manifest_summary = None
        errors.append(error_note(results / "manifest.summary.json", exc))
    qc_records = []
    qc_files = illumination_qc_files(results)
    for path in qc_files:
        try:
            qc_records.append(read_illumination_qc(path))
        except Exception as exc:
            errors.append(error_note(path, exc))
    if not qc_files:
        unavailable.append("illum/<plate>/qc.json (illumination checks)")
    absent_norm = [name for name in sets if normalization.get(name) is None]
    if absent_norm:
        unavailable.append(f"profiles/<set>/normalization.json for {', '.join(absent_norm)}")

    lines, missing_inputs = control_warnings(manifest_summary, normalization, manifest)
    unavailable += missing_inputs
    training_lines, training_errors = training_warnings(results)
    errors += training_errors
    lines += training_lines
    lines += illumination_warnings(qc_records)
    if manifest_summary is not None:
        lines += manifest_warnings(manifest_summary)
    for name in sets:
        record = normalization.get(name)
        if record:
            lines += [text(bold(f"Normalization of {name}: "), w) for w in record["warnings"]]

    parts.append(Heading("Warnings"))
    parts.append(Bullets(tuple(lines), "warnings") if lines else Paragraph(text("No warnings.")))
    if unavailable:
        parts.append(caption("Not available, so not checked: " + "; ".join(unavailable) + "."))
    # The details after the warnings: the active-treatment tables can be long.
    norm_lines = _normalization_bullets(sets, normalization)
    if norm_lines:
        parts += [Heading("Normalization"), Bullets(tuple(norm_lines))]
    parts += _active_tables(sets, activity, table_rows, threshold)
    return blocks(errors, parts)
