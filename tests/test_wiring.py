"""The workflow's parameter wiring, read from the commands Snakemake would run (`snakemake -n -p`).

Mutation testing cannot reach the rules, and a one-line slip there (phenotype correction applied to the
hand-crafted set, the trained set embedded without its checkpoint, training on the wrong teacher) changes
the science without failing any stage test.  Plates are listed in an overlay so the dry run plans every
job without running the manifest checkpoint.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

BIN = Path(sys.executable).parent
PLATES = ["SQ00015198", "SQ00015230"]


def _commands(repo_root: Path, tmp_path: Path, **overlay) -> list[str]:
    results = tmp_path / "results"
    config = {"results": str(results), "images": {"plates": PLATES}, **overlay}
    path = tmp_path / "overlay.yaml"
    path.write_text(yaml.safe_dump(config))
    run = subprocess.run(
        [str(BIN / "snakemake"), "-n", "-p", "--configfile", "config/demo.yaml", str(path)],
        cwd=repo_root,
        env=dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    text = run.stdout + run.stderr  # Snakemake 9 logs the planned commands to stderr
    lines = [line.strip().removeprefix("Shell command:").strip() for line in text.splitlines()]
    return [line for line in lines if line.startswith("phenoprofiler ")]


def _alpha_per_set(commands: list[str]) -> dict[str, float]:
    found = {}
    for command in commands:
        if command.startswith("phenoprofiler profiles "):
            out = re.search(r"--out \S*/profiles/(\S+?)'? ", command).group(1)
            found[out] = float(re.search(r"--correction-alpha '?([0-9.]+)", command).group(1))
    return found


def test_phenotype_correction_reaches_learned_sets_only(repo_root, tmp_path):
    commands = _commands(repo_root, tmp_path)
    # DESIGN.md §5: alpha 0.7 on learned embeddings, never on hand-crafted features
    assert _alpha_per_set(commands) == {"classic": 0.0, "untrained": 0.7, "phenoprofiler_demo": 0.7}


def test_correction_switches_reach_the_rule(repo_root, tmp_path):
    commands = _commands(
        repo_root,
        tmp_path,
        profiles={"correction_alpha": 0.5, "correction_exclude": ["classic", "untrained"]},
    )
    assert _alpha_per_set(commands) == {"classic": 0.0, "untrained": 0.0, "phenoprofiler_demo": 0.5}
    commands = _commands(repo_root, tmp_path, profiles={"correction": False})
    assert set(_alpha_per_set(commands).values()) == {0.0}


def test_sets_are_embedded_with_their_own_weights_and_trained_on_the_teacher(repo_root, tmp_path):
    commands = _commands(repo_root, tmp_path)
    embeds = [c for c in commands if c.startswith("phenoprofiler embed ")]
    untrained = [c for c in embeds if "/features/untrained/" in c]
    trained = [c for c in embeds if "/features/phenoprofiler_demo/" in c]
    assert len(untrained) == len(trained) == len(PLATES)
    assert all("--untrained" in c and "--checkpoint" not in c for c in untrained)
    assert all(
        re.search(r"--checkpoint '?\S*/model/phenoprofiler_demo/stage2\.pt", c) and "--untrained" not in c
        for c in trained
    )
    (train,) = [c for c in commands if c.startswith("phenoprofiler train ")]
    # the demo has no CNN-1 teacher: training regresses the classic features of the same plates
    assert re.search(r"--targets-dir '?\S*/features/classic'? ", train)
    assert re.search(r"--plates " + r" ".join(f"'?{p}'?" for p in PLATES) + " ", train)


def test_evaluation_settings_reach_every_set(repo_root, tmp_path):
    commands = _commands(
        repo_root, tmp_path, evaluate={"null_size": 2000, "threshold": 0.01, "foe_percentile": 95}
    )
    evaluates = [c for c in commands if c.startswith("phenoprofiler evaluate --profiles")]
    assert len(evaluates) == 3
    for option, value in (("--null-size", "2000"), ("--threshold", "0.01"), ("--foe-percentile", "95")):
        assert all(re.search(rf"{option} '?{value}'? ", c) for c in evaluates), option
