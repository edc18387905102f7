"""Dataset summary: what was imaged (plates, wells, sites, treatments, controls, channels)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from ..errors import DataError
from .content import Heading, Table, blocks, caption, code, error_note, missing, note, table_from_frame
from .contracts import read_manifest_summary
from .readers import channels_from_manifest, external_sets


def summary_blocks(results: Path, manifest: pd.DataFrame | None, sets: Sequence[str], table_rows: int):
    path = results / "manifest.parquet"
    if manifest is None:
        return blocks(missing("the site manifest", path))
    needed = {"Metadata_Plate", "Metadata_Well"}
    if not needed <= set(manifest.columns):
        raise DataError(f"{path}: needs columns {sorted(needed)}; has {list(manifest.columns)[:12]}")
    # The manifest has a row per site (3.6 million at JUMP size) and categorical columns: compare
    # and group the categories, never convert every row to a Python string.
    wells = manifest[["Metadata_Plate", "Metadata_Well"]].drop_duplicates()
    channels = channels_from_manifest(manifest)
    pert = manifest.get("Metadata_pert_type", pd.Series("trt", index=manifest.index))
    treatment = manifest.get("Metadata_Treatment", pd.Series("", index=manifest.index))
    is_control = pert.isin(["negcon", "poscon"]).to_numpy()
    moa = manifest.get("Metadata_moa", pd.Series("", index=manifest.index))
    moa_labels = sorted(
        {
            label.strip()
            for value in pd.unique(moa.dropna())
            for label in str(value).split("|")
            if label.strip()
        }
    )

    facts = [
        ("Plates", f"{manifest['Metadata_Plate'].nunique():,}"),
        ("Wells", f"{len(wells):,}"),
        ("Sites (images per channel)", f"{len(manifest):,}"),
        ("Treatments (excluding controls)", f"{treatment[~is_control].nunique():,}"),
        ("MoA labels", f"{len(moa_labels):,}" if moa_labels else "none annotated"),
        ("Channels (canonical order)", ", ".join(channels) if channels else "–"),
        ("Feature sets compared", ", ".join(sets) if sets else "–"),
    ]
    parts = [
        Table(
            ("fact", "value"),
            tuple({"fact": k, "value": v} for k, v in facts),
            index=True,
            header=False,
            css="facts",
        )
    ]

    if is_control.any():
        controls = pd.DataFrame(
            {
                "plate": manifest["Metadata_Plate"].to_numpy()[is_control],
                "well": manifest["Metadata_Well"].to_numpy()[is_control],
                "control type": pert[is_control].astype(str).to_numpy(),
                "treatment": treatment[is_control].astype(str).to_numpy(),
            }
        )
        keys = ["control type", "treatment"]
        per_control = pd.DataFrame(
            {
                "wells": controls.drop_duplicates().groupby(keys).size(),
                "sites": controls.groupby(keys).size(),
            }
        ).reset_index()
        parts += [Heading("Controls"), table_from_frame(per_control)]
    else:
        parts.append(note("No control wells are marked in ", code("Metadata_pert_type"), " (negcon/poscon)."))

    parts += [Heading("Plates"), *_plate_table(manifest, pert, table_rows)]
    parts.append(caption("From ", code(path.relative_to(results)), "."))
    parts += manifest_summary_blocks(results)
    parts += feature_set_blocks(results, sets)
    return blocks(parts)


def _plate_table(manifest: pd.DataFrame, pert: pd.Series, table_rows: int):
    is_negcon = (pert == "negcon").to_numpy()
    plate = manifest["Metadata_Plate"]
    per_plate = pd.DataFrame(
        {
            "wells": manifest.groupby(plate, observed=True)["Metadata_Well"].nunique(),
            "sites": plate.value_counts(),
            "negative-control sites": pd.Series(is_negcon, index=manifest.index)
            .groupby(plate, observed=True)
            .sum(),
            # Wells, not sites, are what normalization and copairs count as control replicates.
            "negative-control wells": manifest.loc[is_negcon]
            .groupby("Metadata_Plate", observed=True)["Metadata_Well"]
            .nunique(),
        }
    )
    per_plate = per_plate.fillna(0).astype(int).rename_axis("plate").reset_index()
    per_plate["plate"] = per_plate["plate"].astype(str)
    per_plate = per_plate.sort_values("plate", kind="stable").reset_index(drop=True)
    if len(per_plate) <= table_rows:
        return [table_from_frame(per_plate)]
    # A thousand plates do not fit a page; the ones a reader must check do: fewest controls first.
    shown = per_plate.sort_values(["negative-control wells", "plate"]).head(table_rows)
    return [
        table_from_frame(shown),
        caption(
            f"Showing the {len(shown)} of {len(per_plate):,} plates with the fewest negative-control wells "
            "(report.table_rows)."
        ),
    ]


def _rows_in(path: Path) -> int | None:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows if path.is_file() else None


def trained_on(results: Path, name: str) -> str:
    """What made a set, from its embed jobs' records (features/<set>/<plate>.embed.json): the datasets
    and plates a model was trained on (this run's or another run's checkpoint), random weights, or the
    published weights; "–" for sets that are not embeddings."""
    records = sorted((results / "features" / name).glob("*.embed.json"))
    if not records:
        return "–"
    try:
        record = json.loads(records[0].read_text())
    except (OSError, ValueError):
        return "–"
    kind, source = record.get("kind"), record.get("trained_on") or {}
    if kind == "untrained":
        return "nothing (seeded random weights)"
    if kind == "published":
        return "the authors' training (published weights)"
    if source.get("datasets"):
        return ", ".join(f"{d} ({len(p):,} plates)" for d, p in source["datasets"].items())
    if source.get("plates"):
        return f"{len(source['plates']):,} plates of this dataset"
    return "–"


def feature_set_blocks(results: Path, sets: Sequence[str]):
    """Where each set's profiles come from: per-plate features of this run, or an external table."""
    if not sets:
        return []
    external = set(external_sets(results, sets))
    records = []
    for name in sets:
        plate_files = sorted((results / "features" / name).glob("*.parquet"))
        source = (
            "external profile table (no per-site features)"
            if name in external
            else f"per-site features, {len(plate_files):,} plate file(s)"
        )
        records.append(
            {
                "feature set": name,
                "profiles from": source,
                "trained on": trained_on(results, name),
                "well profiles": _rows_in(results / "profiles" / name / "normalized.parquet"),
                "treatment profiles": _rows_in(results / "profiles" / name / "consensus.parquet"),
            }
        )
    return [
        Heading("Feature sets"),
        Table(
            ("feature set", "profiles from", "trained on", "well profiles", "treatment profiles"),
            tuple(records),
        ),
        caption(
            "Rows of ",
            code("profiles/<set>/normalized.parquet"),
            " and ",
            code("consensus.parquet"),
            "; – = not written.",
        ),
    ]


def _example_words(block: dict, fields: Sequence[str]) -> str:
    examples = ["/".join(str(e[f]) for f in fields) for e in block["examples"][:5]]
    return f"{block['count']:,}" + (f" (e.g. {', '.join(examples)})" if examples else "")


def manifest_summary_blocks(results: Path):
    """What the manifest step found when it matched images to the plate map."""
    path = results / "manifest.summary.json"
    try:
        summary = read_manifest_summary(results)
    except Exception as exc:
        return [Heading("Plate map and images"), error_note(path, exc)]
    if summary is None:
        return [Heading("Plate map and images"), missing("the manifest step's summary", path)]
    facts = [
        (
            "Plate-map wells without images",
            _example_words(summary["platemap_wells_without_images"], ("plate", "well", "treatment")),
        ),
        (
            "Imaged sites without a plate-map row",
            _example_words(summary["images_without_platemap_row"], ("plate", "well", "site")),
        ),
        (
            "Manifest warnings",
            f"{len(summary['warnings']):,}" + (" (listed under Findings)" if summary["warnings"] else ""),
        ),
    ]
    return [
        Heading("Plate map and images"),
        Table(
            ("fact", "value"),
            tuple({"fact": k, "value": v} for k, v in facts),
            index=True,
            header=False,
            css="facts",
        ),
        caption("From ", code("manifest.summary.json"), "."),
    ]
