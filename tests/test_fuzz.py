"""Fuzzing every loader: random corruptions of a small valid folder (bytes flipped, lines
truncated, duplicated, reordered, fields dropped, wrong types, huge numbers). A loader
either returns a data set whose counts add up, or raises the project's `UserError`
naming the file; never another exception. `LLM4REC_FUZZ_CASES` sets the cases per format
(default 1,000)."""

import json
import os
import pathlib
import re
import shutil
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny import CSV_HEADER, U_DATA, U_ITEM, csv_row

from eval import data
from eval.data.formats import build_dataset
from eval.data.registry import get_spec
from eval.errors import UserError

CASES = int(os.environ.get("LLM4REC_FUZZ_CASES", "1000"))

_LCREC = {str(u): [(u + k) % 7 for k in range(4)] for u in range(5)}
_BIGREC_VALID = CSV_HEADER + csv_row("u1", [0, 1], 2, 100) + csv_row("u2", [3, 1], 4, 105)
_BIGREC_TEST = CSV_HEADER + csv_row("u1", [0, 1, 2], 3, 110) + csv_row("u2", [3, 1, 4], 0, 210)
# format -> (data set name, --format, {file: bytes})
FOLDERS = {
    "grouplens": ("ml-100k", None, {"u.data": U_DATA, "u.item": U_ITEM}),
    "sasrec": ("amazon-games-2014", None, {"Video.txt": "1 5\n1 3\n1 4\n2 5\n2 1\n2 3\n3 2\n"}),
    "lcrec": (
        "amazon-scientific-2018",
        None,
        {
            "S.inter.json": json.dumps(_LCREC),
            "S.item.json": json.dumps({str(i): {"title": f"t{i}"} for i in range(7)}),
        },
    ),
    "amazon-csv": (
        "amazon-cds-vinyl-2018",
        None,
        {
            "valid.csv": _BIGREC_VALID,
            "test.csv": _BIGREC_TEST,
            "info.txt": "".join(f"title {i}\t{i}\n" for i in range(6)),
        },
    ),
    "recbole": (
        "x",
        "recbole",
        {
            "x.inter": "user_id:token\titem_id:token\ttimestamp:float\n"
            + "".join(f"{u}\t{i}\t{10 * u + i}\n" for u in range(3) for i in range(4)),
            "x.item": "item_id:token\ttitle:token_seq\n"
            + "".join(f"{i}\tt{i}\n" for i in range(4)),
        },
    ),
    "p5": (
        "amazon-sports-2014",
        None,
        {
            "sequential_data.txt": "1 1 2 3\n2 2 3 4 1\n3 4 1 2\n",
            "datamaps.json": json.dumps({"id2item": {str(i): f"A{i}" for i in range(1, 5)}}),
        },
    ),
}
_ODD_TOKENS = ("x", "3.5", "-1", "", "true", "null", "1e309", "9" * 25, "[]", "{}", '"', "NaN")
_TOKEN = re.compile(rb"[^\s,|:\[\]{}\"']+")


@st.composite
def corruptions(draw, files: dict[str, bytes]):
    """{file: corrupted bytes}: one file, one to three edits."""
    name = draw(st.sampled_from(sorted(files)))
    text = files[name]
    for _ in range(draw(st.integers(1, 3))):
        lines = text.splitlines(keepends=True) or [b""]
        kind = draw(st.sampled_from(("flip", "cut", "dup", "swap", "drop", "type", "huge")))
        i = draw(st.integers(0, max(len(text) - 1, 0)))
        j = draw(st.integers(0, len(lines) - 1))
        if kind == "flip" and text:
            text = text[:i] + bytes([draw(st.integers(0, 255))]) + text[i + 1 :]
        elif kind == "cut":
            text = text[:i]
        elif kind == "dup":
            text = b"".join(lines[: j + 1] + lines[j:])
        elif kind == "swap":
            k = draw(st.integers(0, len(lines) - 1))
            lines[j], lines[k] = lines[k], lines[j]
            text = b"".join(lines)
        else:
            tokens = list(_TOKEN.finditer(text))
            if not tokens:
                continue
            m = tokens[draw(st.integers(0, len(tokens) - 1))]
            new = {"drop": b"", "huge": b"9" * 30}.get(kind)
            if new is None:
                new = draw(st.sampled_from(_ODD_TOKENS)).encode()
            text = text[: m.start()] + new + text[m.end() :]
    return {**files, name: text}


def _check(ds, raw_rows: int) -> None:
    """The data set's counts add up with what was read and what the report says."""
    seq = ds.sequences
    assert seq.offsets[0] == 0 and (np.diff(seq.offsets) >= 0).all()
    assert seq.offsets[-1] == len(seq.values) == ds.num_interactions
    assert len(ds.user_ids) == ds.num_users == len(seq.offsets) - 1
    assert ((seq.values >= 1) & (seq.values <= ds.num_items)).all()
    assert all(isinstance(n, int) and n > 0 for n in ds.report.counts.values())
    dropped = ds.report.counts.get(
        "duplicate interactions (same user, item, timestamp; dropped)", 0
    )
    assert raw_rows == ds.num_interactions + dropped
    split = data.split(ds)
    for ex in (split.valid, split.test):
        assert ((ex.targets >= 1) & (ex.targets <= ds.num_items)).all()
    if split.rule == "leave-one-out":
        assert split.summary()["train_interactions"] + 2 * len(split.test) == ds.num_interactions


@pytest.mark.parametrize("fmt", sorted(FOLDERS))
def test_loaders_fail_only_with_user_errors(fmt):
    name, fmt_flag, texts = FOLDERS[fmt]
    files = {k: v.encode("latin-1" if k == "u.item" else "utf-8") for k, v in texts.items()}
    root = pathlib.Path(tempfile.mkdtemp(prefix=f"fuzz-{fmt}-"))
    outcomes = {"loaded": 0, "user error": 0}

    @settings(
        max_examples=CASES, deadline=None, derandomize=True, database=None,
        suppress_health_check=list(HealthCheck),
    )  # fmt: skip
    @given(corruptions(files))
    def case(corrupted):
        folder = root / "d"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        for file, content in corrupted.items():
            (folder / file).write_bytes(content)
        spec = get_spec(name, fmt_flag)
        try:
            raw = spec.read(folder)
            ds = build_dataset(name, raw)
            _check(ds, len(raw.users))
            outcomes["loaded"] += 1
        except UserError as e:
            message = str(e)
            assert "\n" not in message
            assert str(folder) in message or name in message, message
            outcomes["user error"] += 1

    try:
        case()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert outcomes["loaded"] and outcomes["user error"]  # both outcomes were exercised
    print(f"fuzz {fmt}: {outcomes}")
