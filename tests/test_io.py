"""eval.io: a write that fails half way leaves the old file / folder intact and no temporary."""

import json

import numpy as np
import pytest

from eval.io import atomic_dir, atomic_path, atomic_write_json, atomic_write_text


class Crash(Exception):
    pass


def test_atomic_write_text_and_json_replace_the_file(tmp_path):
    path = tmp_path / "run.json"
    atomic_write_text(path, "old")
    atomic_write_json(path, {"a": [1, 2]}, indent=1)
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    assert list(tmp_path.iterdir()) == [path]


def test_crash_while_writing_a_file_keeps_the_old_one(tmp_path):
    path = tmp_path / "result.json"
    path.write_text('{"ok": true}')
    with pytest.raises(Crash), atomic_path(path) as tmp:
        tmp.write_text('{"ok": fa')  # half of the new content, then the writer dies
        raise Crash
    assert path.read_text() == '{"ok": true}'
    assert list(tmp_path.iterdir()) == [path]


def test_atomic_path_keeps_the_suffix_for_numpy(tmp_path):
    path = tmp_path / "data.npz"
    with atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".") and tmp.suffix == ".npz"
        np.savez(tmp, x=np.arange(3))  # np.savez appends .npz to any other name
    with np.load(path) as z:
        np.testing.assert_array_equal(z["x"], [0, 1, 2])
    assert list(tmp_path.iterdir()) == [path]


def test_atomic_dir_replaces_an_old_folder(tmp_path):
    path = tmp_path / "hf"
    path.mkdir()
    (path / "stale.safetensors").write_text("old")
    with atomic_dir(path) as tmp:
        assert tmp.parent == tmp_path and not any(tmp.iterdir())
        (tmp / "sub").mkdir()
        (tmp / "sub" / "config.json").write_text("{}")
    assert [p.relative_to(path).as_posix() for p in sorted(path.rglob("*"))] == [
        "sub",
        "sub/config.json",
    ]
    assert list(tmp_path.iterdir()) == [path]


def test_crash_while_writing_a_folder_keeps_the_old_one(tmp_path):
    path = tmp_path / "adapter"
    path.mkdir()
    (path / "adapter_config.json").write_text("old")
    with pytest.raises(Crash), atomic_dir(path) as tmp:
        (tmp / "adapter_config.json").write_text("new")
        (tmp / "adapter_model.safetensors").write_bytes(b"\0" * 10)
        raise Crash
    assert [p.name for p in path.iterdir()] == ["adapter_config.json"]
    assert (path / "adapter_config.json").read_text() == "old"
    assert list(tmp_path.iterdir()) == [path]
    with pytest.raises(Crash), atomic_dir(tmp_path / "new") as tmp:  # no old folder: none left
        raise Crash
    assert list(tmp_path.iterdir()) == [path]
