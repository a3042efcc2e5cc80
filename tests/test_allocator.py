"""eval.allocator: finding tcmalloc and re-executing under it (execve is intercepted)."""

import sys

import pytest

from eval import allocator


def test_find_tcmalloc_searches_the_given_dirs(tmp_path):
    assert allocator.find_tcmalloc((str(tmp_path),)) is None
    (tmp_path / "libtcmalloc.so.4").write_bytes(b"")
    assert allocator.find_tcmalloc((str(tmp_path),)) == str(tmp_path / "libtcmalloc.so.4")
    assert allocator.active_allocator() in ("tcmalloc", "system")


@pytest.fixture
def execve(monkeypatch):
    calls = []
    monkeypatch.setattr(allocator.os, "execve", lambda *a: calls.append(a))
    monkeypatch.setattr(allocator, "active_allocator", lambda: "system")
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "/lib/libtcmalloc.so.4")
    monkeypatch.delenv(allocator.ENV_SWITCH, raising=False)
    monkeypatch.setenv("LD_PRELOAD", "/lib/other.so")
    return calls


def test_reexec_preloads_tcmalloc_once(execve):
    allocator.reexec_with_tcmalloc()
    ((exe, argv, env),) = execve
    assert exe == sys.executable and argv[1:] == sys.orig_argv[1:]
    assert env["LD_PRELOAD"] == "/lib/libtcmalloc.so.4 /lib/other.so"
    assert env[allocator.ENV_SWITCH] == "system"  # the child never re-executes


def test_reexec_is_skipped_when_switched_off_or_missing(execve, monkeypatch):
    monkeypatch.setenv(allocator.ENV_SWITCH, "system")
    allocator.reexec_with_tcmalloc()
    monkeypatch.delenv(allocator.ENV_SWITCH)
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
    allocator.reexec_with_tcmalloc()
    assert execve == []
