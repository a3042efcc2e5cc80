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


def write_tiny_ml100k(
    folder: pathlib.Path, num_users: int = 20, num_items: int = 30, per_user: int = 8
) -> pathlib.Path:
    """A random ml-100k-format folder (`u.data`, `u.item`) under `folder`."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = [
        f"{u}\t{rng.integers(1, num_items)}\t4\t{t}"
        for u in range(1, num_users + 1)
        for t in range(per_user)
    ]
    (folder / "u.data").write_text("\n".join(lines) + "\n")
    items = "".join(f"{i}|Movie {i}|d||u|0\n" for i in range(1, num_items + 1))
    (folder / "u.item").write_text(items, encoding="latin-1")
    return folder
