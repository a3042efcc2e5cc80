"""The lock files (`requirements/*.txt`, written by `make lock`) against pyproject.toml's ranges
and against what the running interpreter has installed."""

import os
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
CORE = [Requirement(s) for s in PROJECT["dependencies"]]
EXTRAS = [Requirement(s) for e in ("dev", "torch") for s in PROJECT["optional-dependencies"][e]]
CORE_LOCK = ROOT / "requirements" / "core.txt"  # `make setup`
TEST_LOCK = ROOT / "requirements" / "test.txt"  # `make setup-test`: core + dev + torch extras


def read_lock(path: Path) -> dict[str, Version]:
    """Canonical name -> pinned version; every line must be one exact `name==version` pin."""
    pins: dict[str, Version] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==" and "*" not in specs[0].version, (
            f"{path.name}:{n}: not an exact pin: {line!r}"
        )
        name = canonicalize_name(req.name)
        assert name not in pins, f"{path.name}:{n}: {name} pinned twice"
        pins[name] = Version(specs[0].version)
    return pins


def applies(req: Requirement) -> bool:
    return req.marker is None or req.marker.evaluate({"extra": ""})


CASES = [(CORE_LOCK, r) for r in CORE] + [(TEST_LOCK, r) for r in CORE + EXTRAS]


@pytest.mark.parametrize(
    ("lock", "req"), CASES, ids=[f"{lock.name}:{req.name}" for lock, req in CASES]
)
def test_pyproject_dependency_is_pinned_inside_its_range(lock, req):
    if not applies(req):
        pytest.skip(f"{req} does not apply here")
    pins = read_lock(lock)
    name = canonicalize_name(req.name)
    assert name in pins, (
        f"{req.name} is in pyproject.toml but not pinned in {lock.name}: `make lock`"
    )
    assert req.specifier.contains(pins[name], prereleases=True), (
        f"{lock.name} pins {req.name}=={pins[name]}, outside pyproject's {req}: `make lock`"
    )


def test_core_pins_agree_with_test_pins():
    """setup-test installs on top of setup: it must not move any core pin."""
    core, test = read_lock(CORE_LOCK), read_lock(TEST_LOCK)
    differ = {n: (str(v), str(test.get(n))) for n, v in core.items() if test.get(n) != v}
    assert not differ, f"core.txt vs test.txt: {differ}"


TOP = [r for r in CORE + EXTRAS if applies(r)]


@pytest.mark.parametrize("req", TOP, ids=[r.name for r in TOP])
def test_installed_version_is_the_pinned_one(req):
    if os.environ.get("LLM4REC_LOCK") == "0":
        pytest.skip("installed from the pyproject ranges (make test LOCK=0)")
    try:
        installed = Version(metadata.version(req.name))
    except metadata.PackageNotFoundError:
        pytest.skip(f"{req.name} is not installed in {sys.executable}")
    pinned = read_lock(TEST_LOCK).get(canonicalize_name(req.name))
    assert pinned is not None, f"{req.name} is not pinned in {TEST_LOCK.name}: `make lock`"
    assert installed == pinned, (
        f"{req.name} {installed} is installed, the lock pins {pinned}: "
        "`make setup-test` reinstalls the pins (an install with LOCK=0 does not)"
    )
