"""Mutation testing of the core modules: do the tests fail when the science breaks?

    make mutants                          # every module listed in tools/mutation/mutants.toml
    make mutants MODULES="metrics io"     # some of them
    python tools/mutation/run_mutants.py metrics --no-planted      # mutmut only
    python tools/mutation/run_mutants.py model --planted-only      # the hand-planted bugs only
    python tools/mutation/run_mutants.py model --rerun-survivors   # last run's survivors, current tests
    python tools/mutation/run_mutants.py tiles --before            # score without the *_handworked.py tests;
                                                                   # then --rerun-survivors adds them

Two kinds of mutants, each run against the fast suite (``-m "not slow"``) restricted to the test
files that concern the module (``mutants.toml``):

* **mutmut** (PyPI ``mutmut`` 3, its default operators): every small change to the code inside the
  module's functions and methods, one at a time.  For each module a fresh scratch folder
  ``mutants/<module>/mutmut/`` gets copies of ``phenoprofiler_core/``, ``tests/`` and ``pyproject.toml``
  whose ``[tool.mutmut]`` table names the one file to mutate and the module's test files; then
  ``mutmut run --max-children 1`` runs there on the functions in scope.
* **planted** (``[[planted]]`` in ``mutants.toml``): one-line bugs written by hand where mutmut 3
  cannot reach, because it mutates only inside undecorated functions: module constants, dataclass
  defaults (the paper's configuration), ``@contextmanager`` functions (``atomic_path``).

The score is killed / total per module ("killed" includes mutants that made the tests time out or
crash).  Survivors listed in ``[[survivor]]`` are marked with their reason: ``equivalent`` ones
(same behaviour as the original, so no test can kill them) are also left out of a second,
"adjusted" score; ``accepted`` ones (e.g. prose of a label) stay in both scores.  To look
at a survivor: ``cd mutants/<module>/mutmut && ../../../.venv/bin/mutmut show <name>`` (or ``browse``).

Slow and CPU-heavy on purpose (one worker): not part of CI's default run.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIG = Path(__file__).with_name("mutants.toml")
PACKAGE = "phenoprofiler_core"
DATA_FOLDERS = ("resources", "config", "workflow")  # linked, not copied, into the scratch folders
CLASS_SEPARATOR = "ǁ"  # mutmut 3 names a method's mutants xǁClassǁmethod__mutmut_N

# mutmut exit codes (mutmut.stats.status_by_exit_code), folded into what the score needs.
KILLED_CODES = {1, 3}  # a test failed / pytest internal error
TIMEOUT_CODES = {24, -24, 36, 152, 255, -9, -11}  # CPU limit, SIGKILL after it, segfault: detected
SURVIVED_CODES = {0}
NO_TESTS_CODES = {5, 33}  # no test touches the function: a survivor too
# Planted mutants: stop at the first failing test; nothing written into the scratch tests.
PLANTED_PYTEST_ARGS = ("-x", "-q", "-p", "no:cacheprovider", "-m", "not slow")


@dataclass
class Module:
    name: str
    tests: list[str]
    only: list[str] = field(default_factory=list)
    skip: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def source(self) -> str:
        return f"{PACKAGE}/{self.name}.py"


@dataclass
class Outcome:
    module: str
    kind: str  # "mutmut" or "planted"
    killed: int = 0
    timeout: int = 0
    survived: list[str] = field(default_factory=list)
    no_tests: list[str] = field(default_factory=list)
    not_checked: list[str] = field(default_factory=list)
    equivalent: dict[str, str] = field(default_factory=dict)  # survivor -> reason (same behaviour)
    accepted: dict[str, str] = field(default_factory=dict)  # survivor -> why it is not worth killing
    diffs: dict[str, str] = field(default_factory=dict)  # survivor -> changed lines

    @property
    def total(self) -> int:
        return self.killed + self.timeout + len(self.survived) + len(self.no_tests) + len(self.not_checked)

    @property
    def detected(self) -> int:
        return self.killed + self.timeout


# ----------------------------------------------------------------------------- configuration


def load_config(path: Path = CONFIG) -> tuple[dict[str, Module], list[dict], list[dict]]:
    """Modules, planted mutants and known survivors ([[survivor]]) of mutants.toml."""
    data = tomllib.loads(path.read_text())
    modules = {
        name: Module(
            name=name,
            tests=list(entry["tests"]),
            only=list(entry.get("only", [])),
            skip=list(entry.get("skip", [])),
            note=entry.get("note", ""),
        )
        for name, entry in data["modules"].items()
    }
    survivors = list(data.get("survivor", []))
    bad = [s for s in survivors if s.get("kind") not in ("equivalent", "accepted")]
    if bad:
        raise SystemExit(f"mutants.toml [[survivor]]: kind must be 'equivalent' or 'accepted': {bad[:1]}")
    return modules, list(data.get("planted", [])), survivors


def functions_in_scope(module: Module, root: Path = REPO) -> list[str]:
    """mutmut's names (x_func, xǁClassǁmethod) of the module's functions in scope.

    ``only`` / ``skip`` hold 'func', 'Class.method' or 'Class' (all its methods).
    """
    tree = ast.parse((root / module.source).read_text())
    found: list[tuple[str, str]] = []  # (config name, mutmut name)
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            found.append((node.name, f"x_{node.name}"))
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    mangled = f"x{CLASS_SEPARATOR}{node.name}{CLASS_SEPARATOR}{item.name}"
                    found.append((f"{node.name}.{item.name}", mangled))

    def selected(name: str, patterns: list[str]) -> bool:
        return any(name == p or name.startswith(f"{p}.") for p in patterns)

    known = {name for name, _ in found} | {name.split(".")[0] for name, _ in found}
    unknown = [p for p in module.only + module.skip if p not in known]
    if unknown:  # a renamed function must not silently widen or narrow the scope
        raise SystemExit(f"mutants.toml [modules.{module.name}]: no function/class named {unknown}")
    return [
        mangled
        for name, mangled in found
        if (not module.only or selected(name, module.only)) and not selected(name, module.skip)
    ]


def existing_tests(module: Module, root: Path = REPO) -> list[str]:
    """The module's test files (or ``file::test`` node ids, to leave out a file's slow tests) that exist."""
    missing = [t for t in module.tests if not (root / t.partition("::")[0]).exists()]
    if missing:
        print(f"  note: test file(s) not present, left out: {missing}")
    tests = [t for t in module.tests if (root / t.partition("::")[0]).exists()]
    if not tests:
        raise SystemExit(f"module {module.name}: none of its test files exist: {module.tests}")
    return tests


def mutmut_table(module: Module, tests: list[str]) -> str:
    """The [tool.mutmut] table of the scratch folder: one file mutated, the module's tests run."""
    base = tomllib.loads((REPO / "pyproject.toml").read_text()).get("tool", {}).get("mutmut", {})
    table = dict(base)
    table["source_paths"] = [PACKAGE]
    table["only_mutate"] = [module.source]
    table["pytest_add_cli_args_test_selection"] = [*tests, "-m", "not slow"]
    lines = ["[tool.mutmut]"]
    for key, value in table.items():
        lines.append(f"{key} = {json.dumps(value, ensure_ascii=False)}")  # JSON scalars/lists are TOML
    return "\n".join(lines) + "\n"


def without_mutmut_table(pyproject_text: str) -> str:
    """pyproject.toml with its [tool.mutmut] table removed (the scratch copy gets its own)."""
    out, skipping = [], False
    for line in pyproject_text.splitlines(keepends=True):
        if re.match(r"^\[.*\]\s*$", line):
            skipping = line.strip() == "[tool.mutmut]"
        if not skipping:
            out.append(line)
    return "".join(out)


def make_scratch(folder: Path, pyproject_text: str, *, repo_copy: Path) -> None:
    """A fresh ``folder`` with copies of the package, the tests and ``pyproject_text``.

    ``repo_copy`` is where the tests will run (mutmut runs them in ``folder/mutants``): it gets links
    to the read-only data folders the tests open through ``repo_root``, and its parent a link to
    ``../shared`` (or $PHENOPROFILER_SHARED; tests/conftest.py looks for real data beside the
    checkout), so the suite runs as it does in the checkout instead of skipping the real-data tests.
    """
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    shutil.copytree(REPO / PACKAGE, folder / PACKAGE, ignore=ignore)
    shutil.copytree(REPO / "tests", folder / "tests", ignore=ignore)
    (folder / "pyproject.toml").write_text(pyproject_text)
    repo_copy.mkdir(parents=True, exist_ok=True)
    for name in DATA_FOLDERS:
        if (REPO / name).exists():
            (repo_copy / name).symlink_to(REPO / name)
    shared = Path(os.environ.get("PHENOPROFILER_SHARED", REPO.parent / "shared"))
    if shared.is_dir() and not (repo_copy.parent / "shared").exists():
        (repo_copy.parent / "shared").symlink_to(shared)


# ----------------------------------------------------------------------------- mutmut


def mutmut_bin() -> str:
    candidate = Path(sys.executable).with_name("mutmut")
    if candidate.exists():
        return str(candidate)
    found = shutil.which("mutmut")
    if not found:
        raise SystemExit("mutmut is not installed: pip install -e '.[mutants]' (make mutants does it)")
    return found


def last_survivors(module: Module, scratch: Path) -> list[str]:
    """Mutant names (package.module.x_func__mutmut_N) that survived or had no tests in the last run."""
    meta = scratch / "mutants" / (module.source + ".meta")
    if not meta.exists():
        raise SystemExit(f"no earlier mutmut run of {module.name} to rerun ({meta} missing)")
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    in_scope = {f"{PACKAGE}.{module.name}.{name}" for name in functions_in_scope(module)}
    return [
        key
        for key, code in codes.items()
        if code in SURVIVED_CODES | NO_TESTS_CODES and key.partition("__mutmut_")[0] in in_scope
    ]


def rerun_survivors(module: Module, scratch: Path, log_path: Path) -> None:
    """Run the last run's survivors again against the checkout's current tests.

    The scratch folder is kept (mutants, coverage stats, the other verdicts); its tests are replaced
    by the checkout's, and mutmut collects coverage for the tests it has not seen, so a new test
    kills what it touches without re-running every mutant (hours for a big module).
    """
    _, _, known = load_config()
    names = last_survivors(module, scratch)
    diffs = mutant_diffs(scratch, module, names)
    # known equivalent/accepted survivors would run every test that touches them again, for nothing
    names = [key for key in names if not known_survivor(module.name, key, diffs[key], known)]
    if not names:
        print("  no survivors to rerun")
        return
    tests = existing_tests(module)
    pyproject = (
        without_mutmut_table((REPO / "pyproject.toml").read_text()) + "\n" + mutmut_table(module, tests)
    )
    (scratch / "pyproject.toml").write_text(pyproject)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    shutil.copytree(REPO / "tests", scratch / "tests", ignore=ignore, dirs_exist_ok=True)
    print(f"  rerunning {len(names)} survivors of {module.source}, tests: {' '.join(tests)}")
    start = time.monotonic()
    with open(log_path, "a") as log:
        code = subprocess.call(
            [mutmut_bin(), "run", "--max-children", "1", *names],
            cwd=scratch,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        )
    print(f"  mutmut finished in {time.monotonic() - start:.0f} s (exit code {code})")


def blank_handworked_tests(scratch: Path, tests: list[str]) -> list[str]:
    """Empty the scratch copies of the module's ``*_handworked.py`` test files (no tests in them).

    The test selection stays the same, so that ``--rerun-survivors`` can later bring the real files
    back without mutmut treating it as a new configuration (which resets every verdict).
    """
    blanked = []
    for test in tests:
        path = test.partition("::")[0]
        if path.endswith("_handworked.py"):
            (scratch / path).write_text('"""Left empty for the score before these tests (--before)."""\n')
            blanked.append(path)
    return blanked


def run_mutmut(
    module: Module,
    survivors: list[dict],
    *,
    report_only: bool = False,
    rerun: bool = False,
    before: bool = False,
) -> Outcome:
    scratch = REPO / "mutants" / module.name / "mutmut"
    scope = functions_in_scope(module)
    log_path = scratch / "mutmut.log"
    if rerun:
        rerun_survivors(module, scratch, log_path)
    elif not report_only:
        tests = existing_tests(module)
        pyproject = (
            without_mutmut_table((REPO / "pyproject.toml").read_text()) + "\n" + mutmut_table(module, tests)
        )
        make_scratch(scratch, pyproject, repo_copy=scratch / "mutants")
        if before:
            print(f"  before the hand-worked tests: {blank_handworked_tests(scratch, tests)} left empty")
        patterns = [f"{PACKAGE}.{module.name}.{name}__mutmut_*" for name in scope]
        print(f"  mutmut on {module.source} ({len(scope)} functions in scope), tests: {' '.join(tests)}")
        print(f"  log: {log_path.relative_to(REPO)}", flush=True)
        start = time.monotonic()
        with open(log_path, "w") as log:
            code = subprocess.call(
                [mutmut_bin(), "run", "--max-children", "1", *patterns],
                cwd=scratch,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
            )
        print(f"  mutmut finished in {time.monotonic() - start:.0f} s (exit code {code})")
    meta = scratch / "mutants" / (module.source + ".meta")
    if not meta.exists():
        raise SystemExit(f"mutmut wrote no results ({meta} missing); see {log_path}")
    exit_codes = json.loads(meta.read_text())["exit_code_by_key"]
    in_scope = {f"{PACKAGE}.{module.name}.{name}" for name in scope}
    outcome = Outcome(module=module.name, kind="mutmut")
    for key, exit_code in sorted(exit_codes.items(), key=lambda kv: _natural(kv[0])):
        if key.partition("__mutmut_")[0] not in in_scope:
            continue
        if exit_code in KILLED_CODES:
            outcome.killed += 1
        elif exit_code in TIMEOUT_CODES:
            outcome.timeout += 1
        elif exit_code in SURVIVED_CODES:
            outcome.survived.append(key)
        elif exit_code in NO_TESTS_CODES:
            outcome.no_tests.append(key)
        else:  # None (not run, e.g. interrupted) or an unknown code: never counted as killed
            outcome.not_checked.append(key)
    outcome.diffs = mutant_diffs(scratch, module, outcome.survived + outcome.no_tests)
    for key in outcome.survived + outcome.no_tests:
        known = known_survivor(module.name, key, outcome.diffs[key], survivors)
        if known:
            (outcome.equivalent if known["kind"] == "equivalent" else outcome.accepted)[key] = known["reason"]
    return outcome


def _natural(key: str) -> tuple[str, int]:
    stem, _, number = key.rpartition("__mutmut_")
    return stem, int(number) if number.isdigit() else 0


def mutant_diffs(scratch: Path, module: Module, keys: list[str]) -> dict[str, str]:
    """The lines each mutant changes: its function in mutmut's mutated file against ``__mutmut_orig``.

    (What ``mutmut show`` prints, without starting mutmut once per survivor.)
    """
    text = (scratch / "mutants" / module.source).read_text()
    lines = text.splitlines()
    wanted = {key.rpartition(".")[2] for key in keys}
    wanted |= {f"{name.partition('__mutmut_')[0]}__mutmut_orig" for name in wanted}
    functions = {}
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name in wanted:
            functions[node.name] = "\n".join(lines[node.lineno - 1 : node.end_lineno])
    out = {}
    for key in keys:
        name = key.rpartition(".")[2]
        stem = name.partition("__mutmut_")[0]
        original = functions.get(f"{stem}__mutmut_orig", "").replace(f"{stem}__mutmut_orig", stem)
        mutated = functions.get(name, "").replace(name, stem)
        diff = difflib.unified_diff(original.splitlines(), mutated.splitlines(), lineterm="", n=0)
        out[key] = "\n".join(
            line for line in diff if line[:1] in "+-" and not line.startswith(("+++", "---"))
        )
    return out


def known_survivor(module: str, key: str, diff: str, survivors: list[dict]) -> dict | None:
    """The [[survivor]] entry whose module, function and mutated ('+') line match this survivor."""
    function = key.partition("__mutmut_")[0].rpartition(".")[2]
    added = [line[1:].strip() for line in diff.splitlines() if line.startswith("+")]
    removed = [line[1:].strip() for line in diff.splitlines() if line.startswith("-")]
    for entry in survivors:
        if entry["module"] != module or entry["function"] != function:
            continue
        # 'removed' (a '-' line) names mutants that delete an argument line and add nothing telling
        if "mutation" not in entry:
            if entry["removed"].strip() in removed and not added:
                return entry
        elif entry["mutation"].strip() in added and entry.get("removed", "").strip() in removed + [""]:
            return entry
    return None


# ----------------------------------------------------------------------------- planted mutants


def run_planted(module: Module, planted: list[dict]) -> Outcome | None:
    entries = [p for p in planted if p["module"] == module.name]
    if not entries:
        return None
    scratch = REPO / "mutants" / module.name / "planted"
    tests = existing_tests(module)
    make_scratch(scratch, without_mutmut_table((REPO / "pyproject.toml").read_text()), repo_copy=scratch)
    outcome = Outcome(module=module.name, kind="planted")
    for entry in entries:
        path = scratch / entry.get("file", module.source)
        top = scratch / Path(entry.get("file", module.source)).parts[0]
        if top.is_symlink():  # a linked data folder: copy it, never write through the link
            top.unlink()
            shutil.copytree(REPO / top.name, top)
        original = (REPO / entry.get("file", module.source)).read_text()
        if original.count(entry["find"]) != 1:
            raise SystemExit(
                f"planted mutant '{entry['why']}': the text to replace occurs {original.count(entry['find'])} "
                f"times in {entry.get('file', module.source)} (must be exactly once; update mutants.toml)"
            )
        path.write_text(original.replace(entry["find"], entry["replace"]))
        try:
            # PYTHONPATH: the mutated copy of the package wins over the editable install.
            result = subprocess.run(
                [sys.executable, "-m", "pytest", *PLANTED_PYTEST_ARGS, *tests],
                cwd=scratch,
                capture_output=True,
                text=True,
                timeout=3600,
                env={**os.environ, "PYTHONPATH": str(scratch), "PYTHONDONTWRITEBYTECODE": "1"},
            )
            code = result.returncode
        except subprocess.TimeoutExpired:
            code = 36
        finally:
            path.write_text(original)
        label = f"planted: {entry['why']}"
        if code == 0:
            outcome.survived.append(label)
            outcome.diffs[label] = f"-{entry['find']}\n+{entry['replace']}"
        elif code == 36:
            outcome.timeout += 1
        else:
            outcome.killed += 1
        print(f"  {'SURVIVED' if code == 0 else 'killed  '} {entry['why']}")
    return outcome


# ----------------------------------------------------------------------------- report


def print_outcome(outcome: Outcome) -> None:
    for key in outcome.survived + outcome.no_tests:
        status = "no tests" if key in outcome.no_tests else "survived"
        if key in outcome.equivalent:
            tag = f"equivalent: {outcome.equivalent[key]}"
        elif key in outcome.accepted:
            tag = f"accepted ({status}): {outcome.accepted[key]}"
        else:
            tag = status
        print(f"    {key}  [{tag}]")
        for line in outcome.diffs.get(key, "").splitlines():
            print(f"        {line}")
    for key in outcome.not_checked:
        print(f"    {key}  [not checked]")


def score_line(outcome: Outcome) -> str:
    total = outcome.total
    score = 100.0 * outcome.detected / total if total else float("nan")
    adjusted_total = total - len(outcome.equivalent)
    adjusted = 100.0 * outcome.detected / adjusted_total if adjusted_total else float("nan")
    return (
        f"{outcome.module:<14} {outcome.kind:<8} killed {outcome.detected:>4} / {total:<4} = {score:5.1f} %"
        f"   (timeouts {outcome.timeout}, survived {len(outcome.survived)}, no tests {len(outcome.no_tests)},"
        f" of which equivalent {len(outcome.equivalent)} / accepted {len(outcome.accepted)};"
        f" {adjusted:5.1f} % of the non-equivalent)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help="modules of mutants.toml (default: all)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--no-planted", action="store_true", help="skip the hand-planted mutants")
    group.add_argument("--planted-only", action="store_true", help="only the hand-planted mutants")
    parser.add_argument(
        "--report", action="store_true", help="run nothing: score the last mutmut run of each module again"
    )
    parser.add_argument(
        "--before",
        action="store_true",
        help="leave the module's *_handworked.py test files empty (the score before them)",
    )
    parser.add_argument(
        "--rerun-survivors",
        action="store_true",
        help="run only the last run's survivors again, against the current tests (after adding tests)",
    )
    args = parser.parse_args(argv)

    modules, planted, survivors = load_config()
    names = args.modules or list(modules)
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise SystemExit(f"unknown module(s) {unknown}; known: {sorted(modules)}")
    outcomes = []
    for name in names:
        module = modules[name]
        print(f"== {name}" + (f"  ({module.note})" if module.note else ""), flush=True)
        if not args.planted_only:
            outcome = run_mutmut(
                module, survivors, report_only=args.report, rerun=args.rerun_survivors, before=args.before
            )
            print_outcome(outcome)
            outcomes.append(outcome)
        if not args.no_planted and not args.report and not args.rerun_survivors:
            outcome = run_planted(module, planted)
            if outcome is not None:
                print_outcome(outcome)
                outcomes.append(outcome)
        print(flush=True)
    print("== mutation score (fast suite, module's test files only)")
    for outcome in outcomes:
        print("  " + score_line(outcome))
    return 0


if __name__ == "__main__":
    sys.exit(main())
