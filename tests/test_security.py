"""Names from data are never trusted (issue 12).

* every value interpolated into a rule's ``shell:`` command is shell-quoted (Snakemake ``:q``);
* plate / well / site names must match the documented safe pattern where they enter (folders, file
  names, plate maps, LoadData CSVs, config), else the manifest stops with one line naming them;
* ``fetch`` never writes outside its destination (see tests/test_fetch.py for the S3 cases).
"""

from __future__ import annotations

import re
from pathlib import Path

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
