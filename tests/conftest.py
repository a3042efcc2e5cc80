"""Test setup (before JAX is imported): 8 fake CPU devices for mesh tests, and one JAX
compilation cache for the session, shared with the subprocesses the crash tests start
(the same tiny programs are compiled by many tests: the cache makes the repeats cheap)."""

import os
import pathlib
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="llm4rec-jax-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

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
