"""Atomic writes: a crash never leaves a truncated file or half a folder under the final name.

Everything is written to a hidden temporary sibling (`.<stem>.<token>.tmp<suffix>`: the same
folder, so the same file system), flushed to disk and renamed into place with `os.replace`.
An exception removes the temporary; a killed process may leave one behind, never a partial
file under the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_LEFTOVER = re.compile(r"\..*\.[0-9a-f]{8}\.(tmp|old)(\..*)?")


def _sibling(path: Path, kind: str) -> Path:
    """A fresh hidden name beside `path` that ends in `path`'s suffix."""
    return path.with_name(f".{path.stem}.{secrets.token_hex(4)}.{kind}{path.suffix}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary file path beside `path` to write; on a clean exit the file is
    flushed and renamed over `path`, on an exception it is removed (`path` is untouched).

    The temporary ends like `path` (`data.npz` -> `.data.<token>.tmp.npz`), so writers that
    add or read a suffix (`np.savez`, `np.save`, `savefig`) write exactly that file.
    """
    path = Path(path)
    tmp = _sibling(path, "tmp")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` (UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, obj: Any, **json_kwargs: Any) -> None:
    """Writes `json.dumps(obj, **json_kwargs)` to `path` atomically."""
    atomic_write_text(path, json.dumps(obj, **json_kwargs))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yields an empty temporary folder beside `path` to fill; on a clean exit its files are
    flushed and it replaces `path` (an old folder is renamed aside, then deleted), on an
    exception it is deleted (`path` is untouched).

    Between the two renames `path` is briefly absent: a crash there leaves the old folder as
    a hidden `.<stem>.<token>.old` sibling.
    """
    path = Path(path)
    tmp = _sibling(path, "tmp")
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                _fsync(file)
        old = _sibling(path, "old")
        with contextlib.suppress(FileNotFoundError):
            os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_leftovers(folder: str | os.PathLike) -> int:
    """Deletes the temporaries (`_sibling` names) a killed atomic write left in `folder`;
    returns how many there were."""
    found = [p for p in Path(folder).iterdir() if _LEFTOVER.fullmatch(p.name)]
    for path in found:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return len(found)
