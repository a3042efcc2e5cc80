"""Test setup: 8 fake CPU devices for mesh tests (set before JAX is imported)."""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"
SHARED_DATA = SHARED / "data"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own data cache, never the user's."""
    monkeypatch.setenv("LLM4REC_CACHE", str(tmp_path / "cache"))


def shared_data(name: str) -> pathlib.Path:
    """`../shared/data/<name>` or skip the test when it is absent."""
    folder = SHARED_DATA / name
    if not folder.is_dir():
        pytest.skip(f"{folder} not available")
    return folder
