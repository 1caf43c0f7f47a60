"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from s3server import moto_server

from shardify.profiles.battery.sample import SynthResult, synthesize


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> SynthResult:
    """The synthetic AI-Hub-shaped dataset; tests only read it (they copy it to change it)."""
    return synthesize(tmp_path_factory.mktemp("src"))


@dataclass(frozen=True)
class S3Server:
    """A real S3-compatible server (moto's server mode) on 127.0.0.1, for this test session."""

    endpoint: str
    key: str = "testing"
    secret: str = "testing"

    @property
    def options(self) -> dict[str, object]:
        """fsspec/s3fs storage options that reach it."""
        return {"endpoint_url": self.endpoint, "key": self.key, "secret": self.secret}

    @property
    def cli_options(self) -> list[str]:
        """The same, as `--storage-option` arguments."""
        return [arg for key, value in self.options.items()
                for arg in ("--storage-option", f"{key}={value}")]

    def make_bucket(self, name: str) -> str:
        """A new, empty bucket; returns `s3://name`."""
        import s3fs

        fs = s3fs.S3FileSystem(**self.options)
        fs.mkdir(name)
        fs.invalidate_cache()
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server, started on a free loopback port and stopped after the session. The
    environment's AWS settings are pointed at it, so nothing can reach beyond this machine."""
    with moto_server() as endpoint:
        yield S3Server(endpoint)


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Nothing reaches the network or ~/.cache: offline, and a private cache (HF_HOME is read
    when datasets is first imported, which may have happened already: the cache is passed too).
    """
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return str(tmp_path / "hf_cache")
