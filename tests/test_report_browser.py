"""Render the HTML report in real headless Chromium: no console errors, every picture decodes,
every section is in the DOM, and the screenshot is not blank.

Skipped (with the reason printed) where ``chromium`` is not installed; CI installs Debian's
chromium package.  The first test runs the same checks on a deliberately broken page, so the
checks are shown to be able to fail.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_report import SETS, make_fake_results

from phenoprofiler_core import report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

if CHROMIUM is None:
    _REASON = "chromium is not on PATH (apt-get install -y chromium)"
    print(f"SKIP: {_REASON}")
    pytestmark = pytest.mark.skip(reason=_REASON)

# The machine is offline and shared: no sandbox (we run as root in containers), no GPU, and
# nothing that phones home.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]

# Chromium logs page console messages and uncaught exceptions as "...:CONSOLE:<line>] ..." with
# --enable-logging=stderr; failed resource loads (an external URL on an offline machine) also
# land there.  Our page writes nothing to the console, so any such line is a defect.
_CONSOLE = re.compile(r"CONSOLE|Uncaught|Failed to load resource|net::ERR_", re.I)


def _chromium(page: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *extra, page.resolve().as_uri()],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def render(page: Path, tmp: Path) -> tuple[str, list[str]]:
    """(DOM after the load event, console error lines)."""
    done = _chromium(page, tmp / "profile-dom", "--enable-logging=stderr", "--v=0", "--dump-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if _CONSOLE.search(line)]
    return done.stdout, errors


def images_ok(dom: str) -> tuple[int, int]:
    match = re.search(r'data-images-ok="(\d+)/(\d+)"', dom)
    assert match, "the page's load handler did not run (no data-images-ok on <body>)"
    return int(match.group(1)), int(match.group(2))


@pytest.fixture(scope="module")
def report_page(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("browser")
    results = make_fake_results(root, contracts=True)
    out = results / "report.html"
    report.write_report(results, out, sets=SETS)
    return out


def test_checks_catch_a_broken_page(tmp_path):
    """Negative control: a script error and an undecodable picture must both be detected."""
    page = tmp_path / "broken.html"
    good = report.build_report(tmp_path, sets=[])  # empty folder: notes only, but the real page shell
    broken = good.replace(
        "</main>",
        '<img src="data:image/png;base64,iVBORw0KGgoAAAAbroken" alt="bad">'
        "<script>notDefinedAnywhere();</script></main>",
    )
    page.write_text(broken)
    dom, errors = render(page, tmp_path)
    assert any("notDefinedAnywhere" in line for line in errors), errors
    assert images_ok(dom) == (0, 1)
    assert '<p class="note error">This picture could not be displayed: bad</p>' in dom


def test_report_renders_without_errors(report_page, tmp_path):
    html = report_page.read_text()
    dom, errors = render(report_page, tmp_path)
    assert errors == [], errors
    n_images = html.count("<img ")
    assert n_images >= 15
    assert images_ok(dom) == (n_images, n_images)  # every embedded PNG decoded in the browser
    for section_id, _ in report.SECTIONS:
        assert f'<section id="{section_id}">' in dom, section_id
    assert '<p class="note error">This picture' not in dom


def test_undecodable_picture_becomes_a_visible_note(report_page, tmp_path):
    html = report_page.read_text()
    # Truncate one payload, as a cut-off copy of the file would.
    first = re.search(r'data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    damaged = html[: first.start(1)] + first.group(1)[:40] + html[first.end(1) :]
    page = tmp_path / "damaged.html"
    page.write_text(damaged)
    dom, _errors = render(page, tmp_path)
    total = html.count("<img ")
    assert images_ok(dom) == (total - 1, total)
    assert dom.count('<p class="note error">This picture could not be displayed: ') == 1


def test_screenshot_is_not_blank(report_page, tmp_path):
    shot = tmp_path / "report.png"
    done = _chromium(
        report_page, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1280,4000"
    )
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert pixels.shape == (4000, 1280, 3)
    assert pixels.std() > 20  # a blank or single-colour page has ~0
    # The styled header (dark blue band) rendered, i.e. the inline CSS was applied.
    assert np.allclose(pixels[10, 10], (0x1F, 0x3B, 0x57), atol=6), pixels[10, 10]
    # Pictures rendered too: a page of text and tables has few distinct colours, plots many.
    colours = np.unique(pixels[::4, ::4].astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 500, len(colours)
    print(f"screenshot: {shot}")
