"""Load a data set by name, through an on-disk cache keyed by the source files' hashes.

The cache holds `data.npz` (sequences, timestamps, ratings, evaluation examples),
`items.json` (the item table and drop report) and `manifest.json` (source hashes, options).
It is rebuilt whenever a source file or an option changes, and (with a warning) when an
entry cannot be read. Every file is written atomically, the manifest last: it marks a complete
entry. A build holds an exclusive lock (`<cache>/locks/<entry>.lock`), so processes loading
the same entry at once (those of one multi-process run, two runs side by side) build it once.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import pathlib
import zipfile
from typing import Literal

import numpy as np
from absl import logging

from eval.data.dataset import Dataset, DropReport, EvalExamples, ItemTable, Ragged
from eval.data.formats import build_dataset
from eval.data.registry import get_spec
from eval.errors import MissingFileError
from eval.io import atomic_path, atomic_write_json, remove_leftovers

CACHE_VERSION = 2
_MANIFEST = "manifest.json"
# What a truncated data.npz or a damaged items.json / manifest.json raises while being read.
_DAMAGED = (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile)


def default_cache_dir() -> pathlib.Path:
    """`$LLM4REC_CACHE`, else `$XDG_CACHE_HOME/llm4rec`, else `~/.cache/llm4rec`."""
    if os.environ.get("LLM4REC_CACHE"):
        return pathlib.Path(os.environ["LLM4REC_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base).expanduser() / "llm4rec"


def load(
    name: str,
    data_dir: str | os.PathLike,
    *,
    fmt: str | None = None,
    min_rating: float | None = None,
    k_core: int | None = None,
    duplicates: Literal["drop", "keep"] = "drop",
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> Dataset:
    """The canonical `Dataset` for `name` read from `data_dir` (cached; see module doc)."""
    spec = get_spec(name, fmt)
    data_dir = pathlib.Path(data_dir)
    if not data_dir.is_dir():
        raise MissingFileError(f"--data_dir={data_dir}: not a directory")
    sources = sorted({p for g in spec.source_globs for p in data_dir.glob(g) if p.is_file()})
    manifest = {
        "version": CACHE_VERSION,
        "dataset": name,
        "format": fmt,
        "options": {"min_rating": min_rating, "k_core": k_core, "duplicates": duplicates},
        "sources": {p.name: _sha256(p) for p in sources},
    }
    key = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
    folder = pathlib.Path(cache_dir or default_cache_dir()) / "processed" / f"{name}-{key}"
    build = functools.partial(
        build_dataset, name, min_rating=min_rating, k_core=k_core, duplicates=duplicates
    )
    if not use_cache:
        return build(spec.read(data_dir))
    cached = _cached(folder, name, manifest, warn=False)
    if cached is not None:
        return cached
    with _locked(folder):
        cached = _cached(folder, name, manifest, warn=True)  # built while we waited?
        if cached is not None:
            return cached
        ds = build(spec.read(data_dir))
        _write(folder, ds, manifest)
    return ds


def _cached(folder: pathlib.Path, name: str, manifest: dict, warn: bool) -> Dataset | None:
    """The complete entry in `folder` made from `manifest`, else None (`warn`: say why a
    damaged one is rebuilt)."""
    if not (folder / _MANIFEST).exists():
        return None
    try:
        if json.loads((folder / _MANIFEST).read_text()) != manifest:
            raise ValueError(f"{_MANIFEST} does not match the sources and options")
        return _read(folder, name)
    except _DAMAGED as e:
        if warn:
            logging.warning(
                "data cache %s is damaged (%s: %s); rebuilding it", folder, type(e).__name__, e
            )
        return None


@contextlib.contextmanager
def _locked(folder: pathlib.Path):
    """Holds the exclusive build lock of cache entry `folder` (released if the process dies)."""
    locks = folder.parent.parent / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{folder.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write(folder: pathlib.Path, ds: Dataset, manifest: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / _MANIFEST).unlink(missing_ok=True)  # incomplete until the manifest is rewritten
    remove_leftovers(folder)  # of a rebuild that was killed
    arrays = {"seq_values": ds.sequences.values, "seq_offsets": ds.sequences.offsets}
    if ds.timestamps is not None:
        arrays["ts_values"] = ds.timestamps.values
    if ds.ratings is not None:
        arrays["rating_values"] = ds.ratings.values
    for split, ex in ds.examples.items():
        arrays.update(
            {
                f"{split}/users": ex.users,
                f"{split}/targets": ex.targets,
                f"{split}/history_values": ex.history.values,
                f"{split}/history_offsets": ex.history.offsets,
            }
        )
        if ex.history_timestamps is not None:
            arrays[f"{split}/history_ts_values"] = ex.history_timestamps.values
            arrays[f"{split}/target_ts"] = ex.target_timestamps
    with atomic_path(folder / "data.npz") as tmp:
        np.savez(tmp, **arrays)
    items = {
        "user_ids": ds.user_ids,
        "original_ids": ds.items.original_ids,
        "titles": ds.items.titles,
        "fields": ds.items.fields,
        "report": ds.report.counts,
        "splits": sorted(ds.examples),
    }
    atomic_write_json(folder / "items.json", items)
    atomic_write_json(folder / _MANIFEST, manifest, indent=1)


def _read(folder: pathlib.Path, name: str) -> Dataset:
    meta = json.loads((folder / "items.json").read_text())
    with np.load(folder / "data.npz") as z:
        offsets = z["seq_offsets"]
        examples = {}
        for split in meta["splits"]:
            hist_offsets = z[f"{split}/history_offsets"]
            has_ts = f"{split}/target_ts" in z
            examples[split] = EvalExamples(
                users=z[f"{split}/users"],
                history=Ragged(z[f"{split}/history_values"], hist_offsets),
                targets=z[f"{split}/targets"],
                history_timestamps=Ragged(z[f"{split}/history_ts_values"], hist_offsets)
                if has_ts
                else None,
                target_timestamps=z[f"{split}/target_ts"] if has_ts else None,
            )
        return Dataset(
            name=name,
            items=ItemTable(meta["original_ids"], meta["titles"], meta["fields"]),
            user_ids=meta["user_ids"],
            sequences=Ragged(z["seq_values"], offsets),
            timestamps=Ragged(z["ts_values"], offsets) if "ts_values" in z else None,
            ratings=Ragged(z["rating_values"], offsets) if "rating_values" in z else None,
            examples=examples,
            report=DropReport(dict(meta["report"])),
        )
