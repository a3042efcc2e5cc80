"""eval.data: loaders for every format, errors naming file and line, cache, splits, examples."""

import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import shared_data
from tiny import U_DATA, U_ITEM, amazon_folder, write

from eval import data
from eval.data import examples
from eval.data.dataset import EvalExamples, Ragged
from eval.data.stats import describe


def test_grouplens_canonical_form(tmp_path):
    ds = data.load("ml-100k", write(tmp_path / "ml", {"u.data": U_DATA, "u.item": U_ITEM}))
    assert ds.items.original_ids == ["", "10", "11", "12", "13"]
    assert ds.items.titles[2] == "Béta (1996)"  # latin-1 decoded
    assert ds.items.fields["genres"][1] == "Action"
    assert ds.user_ids == ["1", "2", "3"]
    # user 1 sorted by time: 11 (100), 12 (200), 10 (300) -> dense 2, 3, 1
    np.testing.assert_array_equal(ds.sequences[0], [2, 3, 1])
    np.testing.assert_array_equal(ds.timestamps[0], [100, 200, 300])
    np.testing.assert_array_equal(ds.sequences[1], [1, 3])  # tie at 50: file order
    np.testing.assert_array_equal(ds.ratings[1], [3, 1])
    assert ds.report.counts == {"catalogue items without interactions (kept)": 1}
    assert describe(ds)[-1] == "users=3 items=4 interactions=6"


def test_recbole_copy_of_movielens_has_the_grouplens_titles(tmp_path):
    # RecBole (make demo's fallback copy) splits the year off the title and names the
    # genres `class`; the data set must not depend on which copy was fetched.
    inter = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t10\t4\t5\n"
    item = (
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "10\tToy Story\t1995\tAnimation Children's Comedy\n11\tunkonwn\tunkonwn\t\n"
    )
    ds = data.load(
        "ml-100k", write(tmp_path / "rb", {"ml-100k.inter": inter, "ml-100k.item": item})
    )
    assert ds.items.titles[1:] == ["Toy Story (1995)", "unkonwn"]  # no year: title as it is
    assert ds.items.text(1, ("title", "genres")) == (
        "Title: Toy Story (1995); Genres: Animation, Children's, Comedy"
    )
    assert "release_year" not in ds.items.fields and "class" not in ds.items.fields


def test_rating_threshold_and_k_core_are_reported(tmp_path):
    folder = write(tmp_path / "ml", {"u.data": U_DATA, "u.item": U_ITEM})
    ds = data.load("ml-100k", folder, min_rating=3)
    assert ds.num_interactions == 5
    assert ds.report.counts["interactions with rating < 3"] == 1
    ds = data.load("ml-100k", folder, k_core=2)
    # user 3 (one interaction) goes, then item 11 (now seen once), then nothing more.
    assert ds.user_ids == ["1", "2"] and ds.items.original_ids == ["", "10", "12"]
    assert ds.report.counts["interactions removed by 2-core filter"] == 2
    assert ds.report.counts["catalogue items without interactions (dropped)"] == 2


def test_sasrec_lcrec_recbole_formats(tmp_path):
    ds = data.load("amazon-games-2014", write(tmp_path / "g", {"Video.txt": "1 5\n1 3\n2 5\n"}))
    assert ds.num_users == 2 and ds.num_items == 2
    np.testing.assert_array_equal(ds.sequences[0], [2, 1])  # file order, dense ids by original id
    assert ds.report.counts["items without title (kept, empty title)"] == 2

    inter = {"0": [0, 1, 2], "1": [2, 0]}
    items = {"0": {"title": "A", "brand": "X"}, "1": {"title": "B  b"}, "2": {"title": "C"}}
    folder = write(
        tmp_path / "s", {"S.inter.json": json.dumps(inter), "S.item.json": json.dumps(items)}
    )
    ds = data.load("amazon-scientific-2018", folder)
    assert ds.items.titles == ["", "A", "B b", "C"]
    assert ds.items.text(1, ("title", "brand")) == "Title: A; Brand: X"
    np.testing.assert_array_equal(ds.sequences[1], [3, 1])

    atomic = (
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n7\t1\t4\t20\n7\t2\t5\t10\n"
    )
    item = "item_id:token\tmovie_title:token_seq\n1\tOne\n2\tTwo\n"
    ds = data.load("x", write(tmp_path / "r", {"x.inter": atomic, "x.item": item}), fmt="recbole")
    np.testing.assert_array_equal(ds.sequences[0], [2, 1])
    assert ds.items.titles == ["", "One", "Two"]


def test_amazon_csv_rebuilds_histories_and_split_has_no_leakage(tmp_path):
    ds = data.load("amazon-cds-vinyl-2018", amazon_folder(tmp_path))
    assert ds.num_items == 6  # info.txt is the catalogue; item 5 has no interactions
    u1 = ds.user_ids.index("u1")
    np.testing.assert_array_equal(ds.sequences[u1], [1, 2, 3, 4, 5])  # original 0..4 -> dense 1..5
    sp = data.split(ds)
    assert len(sp.valid) == 2 and len(sp.test) == 2
    # u1's first evaluation target is original item 2 (dense 3): train only on [1, 2].
    np.testing.assert_array_equal(sp.train[u1], [1, 2])
    u2 = ds.user_ids.index("u2")
    np.testing.assert_array_equal(sp.train[u2], [5])  # history of its only (test) row
    for ex in (sp.valid, sp.test):
        for e in range(len(ex)):
            assert ex.targets[e] not in set(sp.train[ex.users[e]][len(ex.history[e]) :])
    assert sp.summary()["train_examples"] == 1
    lines = describe(ds)
    assert "HTML-debris titles: 1" in lines


def test_leave_one_out_split():
    ds = data.Dataset(
        "t", data.ItemTable([""] + list("abcde"), [""] + list("ABCDE")), ["u", "v"],
        Ragged.from_rows([[1, 2, 3, 4], [5, 1]]),
    )  # fmt: skip
    sp = data.split(ds)
    np.testing.assert_array_equal(sp.train[0], [1, 2])
    np.testing.assert_array_equal(sp.train[1], [5, 1])  # < 3 items: train only
    np.testing.assert_array_equal(sp.valid.targets, [3])
    np.testing.assert_array_equal(sp.test.targets, [4])
    np.testing.assert_array_equal(sp.test.history[0], [1, 2, 3])
    assert sp.report.counts == {"users with < 3 interactions (train only, not evaluated)": 1}


BAD_INPUTS = {
    "ml-100k": (
        {"u.data": U_DATA.replace("1\t12\t5\t200", "1\t12\tfive\t200"), "u.item": U_ITEM},
        "u.data",
        5,
    ),
    "amazon-games-2014": ({"Video.txt": "1 5\n1 3\n2\n"}, "Video.txt", 3),
    "x-recbole": ({"x.inter": "user_id:token\titem_id:token\n7\t1\n8\n"}, "x.inter", 3),
    "yelp-p5": ({"sequential_data.txt": "1 1 2\r\n2 3 x4\r\n"}, "sequential_data.txt", 2),
    "amazon-sports-2014": ({"sequential_data.txt": "1 1 2\n2 3\n1 4\n"}, "sequential_data.txt", 3),
}


def test_p5_sequential_format(tmp_path):
    files = {
        "sequential_data.txt": "1 1 2 3\r\n2 4 1\r\n3\r\n",  # CRLF; user 3 has no items
        "datamaps.json": json.dumps({"id2item": {"1": "A1", "2": "B2", "3": "C3", "4": "D4"}}),
    }
    ds = data.load("amazon-sports-2014", write(tmp_path / "s", files))
    assert ds.user_ids == ["1", "2"] and ds.items.original_ids == ["", "1", "2", "3", "4"]
    np.testing.assert_array_equal(ds.sequences[1], [4, 1])  # file order = time order
    assert ds.items.fields["asin"][4] == "D4"
    assert ds.report.counts["users without items (skipped)"] == 1
    del files["datamaps.json"]  # optional; any folder in this format via --format=p5
    ds = data.load("my-p5", write(tmp_path / "o", files), fmt="p5")
    assert ds.num_items == 4 and ds.num_interactions == 5 and "asin" not in ds.items.fields


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_corrupt_line_names_file_and_line(tmp_path, name):
    files, bad_file, line = BAD_INPUTS[name]
    folder = write(tmp_path / "d", files)
    fmt = "recbole" if name == "x-recbole" else None
    with pytest.raises(data.DataFormatError, match=rf"{re.escape(bad_file)}:{line}:"):
        data.load(name, folder, fmt=fmt)


def test_corrupt_json_and_csv_name_file_and_line(tmp_path):
    folder = write(
        tmp_path / "s", {"S.inter.json": '{"0": [0, 1],\n "1": [2,, 0]}', "S.item.json": "{}"}
    )
    with pytest.raises(data.DataFormatError, match=r"S\.inter\.json:2:"):
        data.load("amazon-scientific-2018", folder)
    folder = amazon_folder(tmp_path)
    text = (folder / "test.csv").read_text().splitlines(keepends=True)
    text[2] = text[2].replace('"[4]"', '"[4"')
    (folder / "test.csv").write_text("".join(text))
    with pytest.raises(data.DataFormatError, match=r"test\.csv:3:"):
        data.load("amazon-cds-vinyl-2018", folder)


def test_cache_is_reused_and_rebuilt_when_source_changes(tmp_path):
    folder = write(tmp_path / "ml", {"u.data": U_DATA, "u.item": U_ITEM})
    first = data.load("ml-100k", folder)
    cached = list((tmp_path / "cache" / "processed").iterdir())
    assert len(cached) == 1 and (cached[0] / "manifest.json").exists()
    again = data.load("ml-100k", folder)
    np.testing.assert_array_equal(again.sequences.values, first.sequences.values)
    assert again.items.titles == first.items.titles and again.report.counts == first.report.counts
    (folder / "u.data").write_text(U_DATA + "4\t13\t5\t1\n")
    changed = data.load("ml-100k", folder)
    assert changed.num_users == 4 and changed.report.counts == {}


@pytest.mark.parametrize(
    "damage",
    [
        lambda entry: (entry / "data.npz").write_bytes((entry / "data.npz").read_bytes()[:300]),
        lambda entry: (entry / "items.json").write_text('{"user_ids": ["1"'),
        lambda entry: (entry / "items.json").write_text('{"user_ids": []}'),
    ],
    ids=["truncated_npz", "truncated_items", "missing_key"],
)
def test_damaged_cache_entry_is_rebuilt_with_a_warning(tmp_path, caplog, damage):
    folder = amazon_folder(tmp_path)
    first = data.load("amazon-cds-vinyl-2018", folder)
    (entry,) = (tmp_path / "cache" / "processed").iterdir()
    damage(entry)
    again = data.load("amazon-cds-vinyl-2018", folder)
    assert f"data cache {entry} is damaged" in caplog.text
    np.testing.assert_array_equal(again.sequences.values, first.sequences.values)
    np.testing.assert_array_equal(
        again.examples["test"].history.values, first.examples["test"].history.values
    )
    assert again.items.titles == first.items.titles
    caplog.clear()
    data.load("amazon-cds-vinyl-2018", folder)  # the rebuilt entry is read without a warning
    assert "damaged" not in caplog.text
    assert sorted(p.name for p in entry.iterdir()) == ["data.npz", "items.json", "manifest.json"]


_KILLED_REBUILD = """
import os, signal, sys
import numpy as np
from eval import data
def savez_then_die(path, **arrays):  # half of data.npz on disk, then kill -9
    with open(path, "wb") as f:
        f.write(b"PK" + b"x" * 100)
    os.kill(os.getpid(), signal.SIGKILL)
np.savez = savez_then_die
data.load("amazon-cds-vinyl-2018", sys.argv[1])
"""


def test_rebuild_killed_mid_write_is_redone(tmp_path, caplog):
    folder = amazon_folder(tmp_path)
    first = data.load("amazon-cds-vinyl-2018", folder)
    (entry,) = (tmp_path / "cache" / "processed").iterdir()
    (entry / "data.npz").write_bytes(b"truncated")  # damaged: the next load rebuilds it
    env = {**os.environ, "LLM4REC_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_REBUILD, str(folder)], env=env, capture_output=True
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (entry / "manifest.json").exists()  # the killed rebuild left no complete entry
    again = data.load("amazon-cds-vinyl-2018", folder)
    np.testing.assert_array_equal(again.sequences.values, first.sequences.values)
    assert sorted(p.name for p in entry.iterdir()) == ["data.npz", "items.json", "manifest.json"]


def test_amazon_examples_roundtrip_through_cache(tmp_path):
    folder = amazon_folder(tmp_path)
    a = data.load("amazon-cds-vinyl-2018", folder)
    b = data.load("amazon-cds-vinyl-2018", folder)
    for split in ("valid", "test"):
        np.testing.assert_array_equal(
            a.examples[split].history.values, b.examples[split].history.values
        )
        np.testing.assert_array_equal(
            a.examples[split].target_timestamps, b.examples[split].target_timestamps
        )


def test_unknown_dataset_and_missing_dir_errors(tmp_path):
    with pytest.raises(ValueError, match="--dataset='nope'"):
        data.load("nope", tmp_path)
    with pytest.raises(FileNotFoundError, match="--data_dir"):
        data.load("ml-100k", tmp_path / "missing")


def test_padding_and_prefix_examples():
    rows = Ragged.from_rows([[1, 2, 3], [4, 5]])
    np.testing.assert_array_equal(examples.pad(rows, 2, "left"), [[2, 3], [4, 5]])
    np.testing.assert_array_equal(examples.pad(rows, 4, "right"), [[1, 2, 3, 0], [4, 5, 0, 0]])
    src = examples.prefix_source(rows, max_len=2)
    assert len(src) == 3  # (1->2), (1,2->3), (4->5)
    np.testing.assert_array_equal(src.arrays["history"], [[0, 1], [1, 2], [0, 4]])
    np.testing.assert_array_equal(src.arrays["target"], [2, 3, 5])
    recent = examples.prefix_source(
        Ragged.from_rows([[1, 2, 3, 4], [5, 6]]), max_len=2, max_targets=2
    )
    np.testing.assert_array_equal(recent.arrays["target"], [3, 4, 6])  # each row's last 2 targets
    np.testing.assert_array_equal(recent.arrays["history"], [[1, 2], [2, 3], [0, 5]])
    win = examples.window_source(rows, max_len=3)
    np.testing.assert_array_equal(win.arrays["inputs"], [[1, 2, 0], [4, 0, 0]])
    np.testing.assert_array_equal(win.arrays["targets"], [[2, 3, 0], [5, 0, 0]])


def test_batches_are_seeded_reshuffled_and_resumable():
    src = examples.ArraySource({"x": np.arange(10)})
    a = [b["x"] for b in examples.batches(src, 3, seed=1, num_epochs=2)]
    b = [b["x"] for b in examples.batches(src, 3, seed=1, num_epochs=2)]
    assert len(a) == 6 and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert len(set(np.concatenate(a[:3]).tolist())) == 9  # no repeats within an epoch
    assert not np.array_equal(np.concatenate(a[:3]), np.concatenate(a[3:]))  # reshuffled
    resumed = [b["x"] for b in examples.batches(src, 3, seed=1, num_epochs=2, start_batch=4)]
    assert all(np.array_equal(x, y) for x, y in zip(resumed, a[4:], strict=True))
    other = [b["x"] for b in examples.batches(src, 3, seed=2, num_epochs=1)]
    assert not all(np.array_equal(x, y) for x, y in zip(other, a, strict=False))


def test_length_buckets_batch_similar_lengths_cut_to_width_and_resume():
    rng = np.random.default_rng(0)
    lengths = rng.choice([2, 5, 9, 20], 200).astype(np.int32)
    ids = np.where(np.arange(20)[None, :] < lengths[:, None], 1 + np.arange(200)[:, None], 0)
    src = examples.ArraySource({"ids": ids, "lengths": lengths})
    buckets = ([8, 16, 20], "lengths", ("ids",))
    first = list(examples.batches(src, 16, seed=1, num_epochs=2, buckets=buckets))
    per_epoch = examples.BatchSource(src, 16, seed=1, shuffle=True, drop_remainder=True,
                                     num_epochs=None, buckets=buckets).batches_per_epoch  # fmt: skip
    assert len(first) == 2 * per_epoch
    for b in first:
        width = b["ids"].shape[1]
        assert width in (8, 16, 20) and (b["lengths"] <= width).all()
        assert width == 8 or (b["lengths"] > {16: 8, 20: 16}[width]).all()  # one bucket per batch
        assert (b["ids"][np.arange(len(b["ids"])), b["lengths"] - 1] != 0).all()  # nothing cut
    seen = np.concatenate([b["ids"][:, 0] for b in first[:per_epoch]])
    assert len(seen) == len(set(seen)) > 200 - 3 * 16  # each example at most once an epoch
    assert {b["ids"].shape[1] for b in first[:per_epoch]} == {8, 16, 20}  # buckets interleaved
    resumed = list(examples.batches(src, 16, seed=1, num_epochs=2, buckets=buckets, start_batch=5))
    for a, b in zip(first[5:], resumed, strict=True):
        np.testing.assert_array_equal(a["ids"], b["ids"])
    with pytest.raises(ValueError, match="exceeds the widest"):
        examples.BatchSource(src, 16, seed=1, shuffle=True, drop_remainder=True, num_epochs=1,
                             buckets=([8, 16], "lengths", ("ids",)))  # fmt: skip


# The counts stated in ../shared/data/README.md.
SHARED_COUNTS = {
    "ml-100k": (943, 1682, 100_000),
    "amazon-games-2014": (31_013, 23_715, 287_107),
    "amazon-scientific-2018": (8_317, 4_344, 58_492),
    "amazon-sports-2014": (35_598, 18_357, 296_337),
    "yelp-p5": (30_431, 20_033, 316_354),
}


@pytest.mark.parametrize("name", sorted(SHARED_COUNTS))
def test_shared_datasets_match_published_counts(name):
    ds = data.load(name, shared_data(name))
    assert describe(ds)[-1] == "users={} items={} interactions={}".format(*SHARED_COUNTS[name])


def test_shared_amazon_cds_examples_and_quirks():
    ds = data.load("amazon-cds-vinyl-2018", shared_data("amazon-cds-vinyl-2018"))
    assert ds.num_items == 5841
    assert len(ds.examples["valid"]) == 6156 and len(ds.examples["test"]) == 6157
    assert len(np.unique(ds.examples["test"].users)) == 1723
    lines = describe(ds)
    assert "distinct titles: 5377" in lines and "HTML-debris titles: 29" in lines
    assert not any("disagrees" in line for line in lines)  # every row's history is consistent


def test_eval_examples_take_keeps_every_field():
    ex = EvalExamples(
        np.array([7, 8, 9]),
        Ragged.from_rows([[1], [2, 3], [4]]),
        np.array([5, 6, 7]),
        Ragged.from_rows([[10], [20, 30], [40]]),
        np.array([11, 31, 41]),
    )
    sub = ex.take(np.array([2, 1]))
    assert (
        list(sub.users) == [9, 8]
        and list(sub.targets) == [7, 6]
        and list(sub.target_timestamps) == [41, 31]
    )
    assert [list(sub.history[i]) for i in range(2)] == [[4], [2, 3]]
    assert [list(sub.history_timestamps[i]) for i in range(2)] == [[40], [20, 30]]
