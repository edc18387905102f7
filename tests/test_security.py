"""Names from data are never trusted (issue 12).

* every value interpolated into a rule's ``shell:`` command is shell-quoted (Snakemake ``:q``);
* plate / well / site names must match the documented safe pattern where they enter (folders, file
  names, plate maps, LoadData CSVs, config), else the manifest stops with one line naming them;
* ``fetch`` never writes outside its destination (see tests/test_fetch.py for the S3 cases).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers import cell_image, save, write_phenix_plate, write_platemap

from phenoprofiler_core.config import validate_config
from phenoprofiler_core.errors import ConfigError, DataError
from phenoprofiler_core.manifest import build_manifest
from phenoprofiler_core.names import check_name, is_safe_name

REPO = Path(__file__).resolve().parents[1]
RULE_FILES = sorted((REPO / "workflow").rglob("*.smk")) + [REPO / "workflow" / "Snakefile"]

# {name}, {name.attr}, {name[0]}, {name:spec}; "{{" and "}}" are literal braces, not interpolations
_FIELD = re.compile(r"(?<!\{)\{(?!\{)([^{}]*)\}(?!\})")


def shell_commands(text: str) -> list[tuple[int, str]]:
    """(line number, command text) of every ``shell:`` block of a Snakemake file."""
    lines = text.split("\n")
    found = []
    i = 0
    while i < len(lines):
        match = re.match(r"^(\s*)shell:\s*(.*)$", lines[i])
        if not match:
            i += 1
            continue
        indent, rest = len(match.group(1)), match.group(2)
        start, parts = i + 1, [rest] if rest else []
        i += 1
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
            stripped = lines[i].strip()
            if stripped and not stripped.startswith("#"):
                parts.append(stripped)
            i += 1
        found.append((start, "\n".join(parts)))
    return found


def unquoted_fields(command: str) -> list[str]:
    """Interpolated fields of a shell command that are not shell-quoted with ``:q``."""
    return [field for field in _FIELD.findall(command) if not field.endswith(":q")]


def test_scanner_finds_unquoted_fields():
    """The scan itself must be able to fail: an unquoted field is reported, a quoted one is not."""
    rule = (
        "rule x:\n"
        "    shell:\n"
        '        "tool {input.a:q} --plate {wildcards.plate} "\n'
        '        "--out {output:q} {{literal}} > {log} 2>&1"\n'
        "rule y:\n"
        "    shell:\n"
        '        "tool {params.p:q}"\n'
    )
    commands = shell_commands(rule)
    assert [unquoted_fields(c) for _, c in commands] == [["wildcards.plate", "log"], []]


def test_every_shell_interpolation_is_quoted():
    offenders = []
    n_commands = 0
    for path in RULE_FILES:
        for line, command in shell_commands(path.read_text()):
            n_commands += 1
            for field in unquoted_fields(command):
                offenders.append(f"{path.relative_to(REPO)}:{line}: {{{field}}}")
    assert n_commands >= 10, "the scan found too few shell commands: is the parser still right?"
    assert not offenders, "unquoted interpolations in shell commands (add :q):\n" + "\n".join(offenders)


def test_no_run_blocks_build_shell_commands():
    """Rules are thin: no ``run:`` block (where a shell() call could slip past the scan above)."""
    for path in RULE_FILES:
        assert not re.search(r"^\s*run:\s*$", path.read_text(), re.M), f"{path}: run: block"


# ----------------------------------------------------------------------------- names from data (issue 12.2)

BIN = Path(sys.executable).parent
CH = {"1": "DNA", "2": "ER", "3": "RNA", "4": "AGP", "5": "Mito"}

# What real instruments and the Gallery write: all accepted.
SAFE = [
    "SQ00015198",
    "BR00117035__2021-05-02T16_02_51-Measurement1",
    "CP-CC9-R1-05",
    "20585",
    "Week1_22123",
    "a.b",
]
# Spaces, quotes, $(), backticks, ;, newlines, .., leading - or ., non-ASCII letters, path separators.
UNSAFE = [
    "SQ00015198 copy",
    "P1'x",
    'P1"x',
    "P1$(touch INJECTED)",
    "P1`id`",
    "P1;ls",
    "P1\nx",
    "..",
    ".hidden",
    "-rf",
    "Plaqué1",
    "Пластина",
    "a/b",
    "",
    "x" * 129,
]
# the subset a folder on disk can be named
FOLDER_UNSAFE = [n for n in UNSAFE if n and "/" not in n and n not in ("..",) and len(n) < 100]


@pytest.mark.parametrize("name", SAFE)
def test_real_instrument_names_are_safe(name):
    assert is_safe_name(name) and check_name(name, kind="plate name", source="test") == name


@pytest.mark.parametrize("name", UNSAFE, ids=[repr(n)[:20] for n in UNSAFE])
def test_unsafe_names_are_refused_on_one_line(name):
    assert not is_safe_name(name)
    with pytest.raises(DataError) as info:
        check_name(name, kind="plate name", source="folder X", fix="rename the folder")
    message = str(info.value)
    assert "\n" not in message and "folder X" in message and "rename the folder" in message
    assert repr(name) in message  # the name as Python writes it: visible, and on one line


def _dataset(tmp_path: Path, plate: str) -> Path:
    """A demo-like Phenix plate in folder <plate> with its plate-map row; returns the config file."""
    write_phenix_plate(tmp_path / "img", plate, shape=(48, 48))
    meta = write_platemap(tmp_path / "meta", plate, {"A01": "DMSO", "B02": "cpd"})
    config = {
        "dataset": "names",
        "results": str(tmp_path / "results"),
        "images": {"root": str(tmp_path / "img"), "layout": "phenix", "channel_map": CH},
        "metadata": meta,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("plate", FOLDER_UNSAFE, ids=[repr(n)[:20] for n in FOLDER_UNSAFE])
def test_unsafe_plate_folder_stops_the_manifest(tmp_path, plate):
    configfile = _dataset(tmp_path, plate)
    config = validate_config(yaml.safe_load(configfile.read_text()))
    with pytest.raises(DataError, match=r"unsafe plate name .* from folder .*rename the folder"):
        build_manifest(config)
    # listing the good plates leaves a stray folder out instead of failing on it
    write_phenix_plate(tmp_path / "img", "P1", shape=(48, 48))
    (tmp_path / "meta" / "barcode_platemap.csv").write_text("Assay_Plate_Barcode,Plate_Map_Name\nP1,MAP-1\n")
    config["images"]["plates"] = ["P1"]
    assert set(build_manifest(config).Metadata_Plate) == {"P1"}


def test_unsafe_names_in_tables_stop_the_manifest(tmp_path):
    configfile = _dataset(tmp_path, "P1")
    config = validate_config(yaml.safe_load(configfile.read_text()))
    # a plate-map name used as a file name: path traversal
    (tmp_path / "meta" / "barcode_platemap.csv").write_text(
        "Assay_Plate_Barcode,Plate_Map_Name\nP1,../MAP-1\n"
    )
    with pytest.raises(
        DataError, match=r"unsafe plate map name '\.\./MAP-1' from .*barcode_platemap\.csv row 2"
    ):
        build_manifest(config)
    # a LoadData CSV's plate
    rows = []
    for site in (1, 2):
        path = save(cell_image((32, 32), seed=site), tmp_path / "ld" / f"s{site}.tif")
        rows.append(
            {
                "Metadata_Plate": "P1; rm -rf ~",
                "Metadata_Well": "A01",
                "Metadata_Site": site,
                "FileName_OrigDNA": path.name,
                "PathName_OrigDNA": str(path.parent),
            }
        )
    pd.DataFrame(rows).to_csv(tmp_path / "load_data.csv", index=False)
    loaddata = validate_config(
        {
            "dataset": "t",
            "channels": ["DNA"],
            "images": {
                "root": str(tmp_path),
                "layout": "loaddata",
                "loaddata": str(tmp_path / "load_data.csv"),
                "channel_map": {"OrigDNA": "DNA"},
            },
            "metadata": {"wells": str(tmp_path / "w.csv")},
        }
    )
    with pytest.raises(DataError, match=r"unsafe plate name 'P1; rm -rf ~' from .*load_data\.csv row 2"):
        build_manifest(loaddata)
    # a well that is not a well, and a site that is not a number
    pd.DataFrame([{**rows[0], "Metadata_Plate": "P1", "Metadata_Well": "$(id)"}]).to_csv(
        tmp_path / "load_data.csv", index=False
    )
    with pytest.raises(DataError, match=r"well name '\$\(id\)' in .*load_data\.csv row 2"):
        build_manifest(loaddata)
    pd.DataFrame([{**rows[0], "Metadata_Plate": "P1", "Metadata_Site": "1`id`"}]).to_csv(
        tmp_path / "load_data.csv", index=False
    )
    with pytest.raises(DataError, match=r"site '1`id`' in .*load_data\.csv row 2"):
        build_manifest(loaddata)


@pytest.mark.parametrize(
    "key,value",
    [
        ("dataset", "my data"),
        ("dataset", ".."),
        ("dataset", "-x"),
        ("images.plate", "P1$(id)"),
        ("images.plates", ["ok", "bad name"]),
        ("train.name", "-model"),
        ("train.name", ".."),
        ("train.val_plates", ["P1`id`"]),
        ("channels", ["DNA", "E R"]),
    ],
)
def test_unsafe_config_names_fail_validation_naming_the_key(key, value):
    config = {
        "dataset": "t",
        "images": {"root": "x", "layout": "phenix", "channel_map": {"1": "DNA", "2": "ER"}},
        "channels": ["DNA", "ER"],
    }
    section, _, leaf = key.partition(".")
    if leaf:
        config.setdefault(section, {})[leaf] = value
    else:
        config[section] = value
    if key == "channels":
        config["images"]["channel_map"] = {"1": "DNA", "2": "E R"}
    with pytest.raises(ConfigError, match=rf"unsafe .* from config: config key '{key}'"):
        validate_config(config)


@pytest.mark.slow
def test_injected_plate_folder_never_runs(tmp_path):
    """The real injection case: a plate folder named P1$(touch INJECTED) with its plate-map row.
    The whole workflow is asked for; the manifest job (the one place that scans the folder) stops with
    one line naming the folder, no other job starts, and nothing is executed."""
    plate = "P1$(touch INJECTED)"
    configfile = _dataset(tmp_path, plate)
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}")
    result = subprocess.run(
        [
            str(BIN / "snakemake"),
            "--snakefile",
            str(REPO / "workflow" / "Snakefile"),
            "--cores",
            "1",
            "--configfile",
            str(configfile),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    err = result.stderr
    assert result.returncode != 0, err
    log = (tmp_path / "results" / "names" / "logs" / "manifest.log").read_text()
    line = f"phenoprofiler manifest: error: unsafe plate name 'P1$(touch INJECTED)' from folder '{tmp_path / 'img' / plate}'"
    assert log.strip().startswith(line), log
    assert "Traceback" not in log, log
    assert "Error in rule manifest" in err and "manifest.log" in err, err
    for folder in (tmp_path, REPO, Path.cwd()):
        assert not list(folder.rglob("INJECTED")), folder
    results = tmp_path / "results" / "names"
    assert not (results / "manifest.parquet").exists()
    # the config snapshot and the manifest's log and benchmark folders, nothing of a later stage
    assert sorted(p.name for p in results.iterdir()) == ["benchmarks", "config.yaml", "logs"]
    assert sorted(p.name for p in (results / "logs").iterdir()) == ["manifest.log"]
