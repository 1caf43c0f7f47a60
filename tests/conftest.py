"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest

from shardify.profiles.battery.sample import SynthResult, synthesize


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> SynthResult:
    """The synthetic AI-Hub-shaped dataset; tests only read it (they copy it to change it)."""
    return synthesize(tmp_path_factory.mktemp("src"))
