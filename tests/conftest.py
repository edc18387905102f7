"""Shared pytest fixtures.

Real-data tests use ``../shared/data`` beside the checkout; a user's clone has no ``../shared``,
so those tests skip with a printed reason instead of failing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ../shared/data, or skip the test when it is absent."""
    if not SHARED_DATA.is_dir():
        reason = f"real data folder {SHARED_DATA} is absent (only present beside the project's own checkout)"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    return SHARED_DATA
