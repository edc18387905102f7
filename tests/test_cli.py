"""The CLI imports only the stage a job runs (workflow jobs pay no torch start-up for table steps)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from phenoprofiler_core import cli


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys; print(' '.join(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(out.stdout.split())


@pytest.mark.parametrize("stage", ["manifest", "profiles", "fetch", "report"])
def test_one_stage_parser_does_not_import_torch(stage):
    loaded = _modules_after(f"from phenoprofiler_core import cli; cli.build_parser(only={stage!r})")
    assert f"phenoprofiler_core.{stage}" in loaded
    assert "torch" not in loaded
    assert "phenoprofiler_core.train" not in loaded and "phenoprofiler_core.embed" not in loaded


def test_full_help_lists_every_stage(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for stage in cli.STAGE_MODULES:
        assert stage in text


def test_requested_stage_skips_options_and_unknown_words():
    assert cli._requested_stage(["-v", "tiles", "--plate", "P1"]) == "tiles"
    assert cli._requested_stage(["--verbose"]) is None
    assert cli._requested_stage(["nonsense"]) is None


def test_unknown_command_still_fails_like_argparse(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["nonsense"])
    assert done.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
