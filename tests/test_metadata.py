"""The metadata stage (issue 13): wells and treatments tables from a dataset's published per-site index
and a shipped MoA table, instead of a snippet users ran by hand."""

from __future__ import annotations

import pandas as pd
import pytest

from phenoprofiler_core import cli
from phenoprofiler_core.config import validate_config
from phenoprofiler_core.errors import DataError
from phenoprofiler_core.metadata import build_tables, built_tables_section

SPEC = {
    "plate_column": "Metadata_Plate",
    "well_column": "Metadata_Well",
    "treatment_column": "Treatment",
    "name_column": None,
    "moa_key_column": "Compound",
    "moa_key_length": 13,
    "moa_table_key": "Var1",
    "moa_table_column": "Metadata_moa.x",
    "moa_table_separator": "|",
}


def _index() -> pd.DataFrame:
    """DeepProfiler's index.csv of BBBC022, three sites per well (its real column names and id forms)."""
    wells = [
        ("20585", "A01", "BRD-K98763141-001-06-8@8.858401197993738", "BRD-K98763141-001-06-8"),
        ("20585", "A02", "DMSO@0", "DMSO"),
        ("20585", "B01", "BRD-A00993607-001-01-9@5.0", "BRD-A00993607-001-01-9"),
        ("20586", "A01", "BRD-A01078468-001-02-1@5.0", "BRD-A01078468-001-02-1"),
    ]
    rows = [
        {"Metadata_Plate": p, "Metadata_Well": w, "Metadata_Site": s, "Treatment": t, "Compound": c}
        for p, w, t, c in wells
        for s in (1, 2, 3)
    ]
    return pd.DataFrame(rows)


MOA = pd.DataFrame(
    {
        "Var1": ["BRD-A00993607", "BRD-A01078468", "BRD-K98763141"],
        "Metadata_moa.x": ["adrenergic receptor antagonist", "synthetic estrogen", "b|a"],
    }
)


def test_tables_join_the_first_13_characters_of_the_compound_id():
    wells, treatments, counts = build_tables(_index(), SPEC, moa_table=MOA)
    assert (
        list(wells.columns) == ["plate", "well_position", "treatment"] and len(wells) == 4
    )  # one row per well
    moa = dict(zip(treatments.treatment, treatments.moa))
    assert moa["BRD-A00993607-001-01-9@5.0"] == "adrenergic receptor antagonist"
    assert moa["BRD-K98763141-001-06-8@8.858401197993738"] == "a|b"  # labels sorted, '|'-joined
    assert moa["DMSO@0"] == ""
    names = dict(zip(treatments.treatment, treatments.name))
    assert names["BRD-A01078468-001-02-1@5.0"] == "BRD-A01078468-001-02-1"  # the label before '@'
    assert counts == {"treatments": 4, "with_moa": 3}


def test_a_moa_table_that_matches_nothing_names_both_keys():
    spec = {**SPEC, "moa_key_length": None}  # whole compound ids never equal 13-character keys
    with pytest.raises(DataError) as error:
        build_tables(_index(), spec, moa_table=MOA)
    message = str(error.value)
    assert "'Var1'" in message and "Compound" in message
    assert "BRD-K98763141-001-06-8" in message and "BRD-A00993607" in message


def test_a_well_with_two_treatments_is_an_error():
    index = _index()
    index.loc[0, "Treatment"] = "other@1"
    with pytest.raises(DataError, match=r"20585/A01 has more than one 'Treatment'"):
        build_tables(index, SPEC, moa_table=MOA)


def test_missing_index_columns_are_named():
    with pytest.raises(DataError, match=r"no column\(s\) \['Compound'\]"):
        build_tables(_index().drop(columns=["Compound"]), SPEC, moa_table=MOA)


def test_cli_writes_tables_the_manifest_reads(tmp_path, repo_root):
    index = tmp_path / "index.csv"
    _index().to_csv(index, index=False)
    moa = tmp_path / "moa.csv"
    MOA.to_csv(moa, index=False)
    config = validate_config(
        {
            "dataset": "d",
            "images": {"root": str(tmp_path), "layout": "imagexpress", "channel_map": {"1": "DNA"}},
            "channels": ["DNA"],
            "metadata": {
                "index": {
                    "path": str(index),
                    "treatment_column": "Treatment",
                    "moa_key_column": "Compound",
                    "moa_key_length": 13,
                    "moa_table": str(moa),
                }
            },
        }
    )
    import yaml

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    assert (
        cli.main(
            [
                "metadata",
                "--configfile",
                str(tmp_path / "c.yaml"),
                "--wells",
                str(out / "w.csv"),
                "--treatments",
                str(out / "t.csv"),
            ]
        )
        == 0
    )
    section = built_tables_section(config["metadata"], str(out / "w.csv"), str(out / "t.csv"))
    wells = pd.read_csv(section["wells"], dtype=str)
    assert set(wells[section["plate_column"]]) == {"20585", "20586"}
    treatments = pd.read_csv(section["treatments"], dtype=str, keep_default_na=False)
    assert {section["treatment_id_column"], section["treatment_name_column"], section["moa_column"]} <= set(
        treatments.columns
    )
