"""Bad input and bad flags: a one-line error naming the file and line (or the flag), or a
counted change in the report, never a silent change or a traceback from deep inside."""

import json
import logging
import os
import re
import subprocess
import sys

import pytest
from absl import flags
from tiny import U_DATA, U_ITEM, amazon_folder, write

from eval import data
from eval.data.formats import read_index
from eval.errors import DataFormatError, FlagError, MissingFileError, UserError
from eval.training.flags import RANGES, Range, define_training_flags, validate_ranges
from llm_sft.model import ModelConfig
from rqvae.tiger_trainer import load_index

GAMES = "amazon-games-2014"
SCIENTIFIC = "amazon-scientific-2018"
CDS = "amazon-cds-vinyl-2018"


def _corrupt(folder, name, old: bytes, new: bytes):
    path = folder / name
    path.write_bytes(path.read_bytes().replace(old, new, 1))
    return folder


def _ml(tmp_path, u_data=U_DATA):
    return write(tmp_path / "ml", {"u.data": u_data, "u.item": U_ITEM})


def _scientific(tmp_path, inter: str, item: str | None = "{}"):
    files = {"S.inter.json": inter} | ({"S.item.json": item} if item is not None else {})
    return write(tmp_path / "s", files)


# name -> (folder builder, data set, --format, error regex)
ERRORS = {
    "non-UTF-8 byte in u.data": (
        lambda t: _corrupt(_ml(t), "u.data", b"\t11\t", b"\t1\xff\t"), "ml-100k", None,
        r"u\.data:2:4: byte 0xff is not valid utf-8",
    ),
    "non-UTF-8 byte in Video.txt": (
        lambda t: _corrupt(write(t / "g", {"Video.txt": "1 5\n1 3\n"}), "Video.txt", b"3", b"\x80"),
        GAMES, None, r"Video\.txt:2:3: byte 0x80",
    ),
    "non-UTF-8 byte in *.inter.json": (
        lambda t: _corrupt(_scientific(t, '{"0": [0, 1],\n "1": [2, 0]}'), "S.inter.json",
                           b'"1"', b'"\xc3"'),
        SCIENTIFIC, None, r"S\.inter\.json:2:3: byte 0xc3 is not valid UTF-8",
    ),
    "non-UTF-8 byte in info.txt": (
        lambda t: _corrupt(amazon_folder(t), "info.txt", b"title 3", b"title \xff"), CDS, None,
        r"info\.txt:4:7: byte 0xff",
    ),
    "non-UTF-8 byte in valid.csv": (
        lambda t: _corrupt(amazon_folder(t), "valid.csv", b"u1", b"u\xfe"), CDS, None,
        r"valid\.csv:2:2: byte 0xfe",
    ),
    "timestamp 1e23": (
        lambda t: _ml(t, U_DATA.replace("\t300\n", "\t1e23\n")), "ml-100k", None,
        r"u\.data:1: expected an integer, got '1e23'",
    ),
    "huge integer timestamp": (
        lambda t: _ml(t, U_DATA.replace("\t300\n", "\t" + "9" * 30 + "\n")), "ml-100k", None,
        r"u\.data:1: integer '9+' is outside the 64-bit range",
    ),
    "string in a BIGRec history list": (
        lambda t: _corrupt(amazon_folder(t), "test.csv", b'"[4]"', b"\"['abc']\""), CDS, None,
        r"test\.csv:3: expected an integer, got 'abc'",
    ),
    "top-level JSON list": (
        lambda t: _scientific(t, "[[0, 1], [2, 0]]"), SCIENTIFIC, None,
        r"S\.inter\.json: expected a JSON object at the top level, got list",
    ),
    "truncated single-line JSON": (
        lambda t: _scientific(t, '{"0": [0, 1], "1": [2, '), SCIENTIFIC, None,
        r"S\.inter\.json:1:24: invalid JSON: Expecting value \(is the file truncated\?\)",
    ),
    "repeated JSON key": (
        lambda t: _scientific(t, '{"0": [0, 1], "0": [2, 0]}'), SCIENTIFIC, None,
        r"S\.inter\.json: key '0' appears twice",
    ),
    "item id 3.0 in Video.txt": (
        lambda t: write(t / "g", {"Video.txt": "12 5\n12 3.0\n"}), GAMES, None,
        r"Video\.txt:2: expected an integer, got '3\.0'",
    ),
    "float history id in a BIGRec CSV": (
        lambda t: _corrupt(amazon_folder(t), "test.csv", b'"[4]"', b'"[1234.7]"'), CDS, None,
        r"test\.csv:3: expected an integer, got 1234\.7",
    ),
    "item id true in *.inter.json": (
        lambda t: _scientific(t, '{"0": [0, true]}'), SCIENTIFIC, None,
        r"S\.inter\.json: user '0': expected a list of item ids .*got \[0, true\]",
    ),
    "BIGRec folder without test.csv": (
        lambda t: _drop(amazon_folder(t), "test.csv"), CDS, None,
        r"test\.csv: missing; the BIGRec CSV split needs valid\.csv and test\.csv",
    ),
    "ml-1m pointed at ml-100k files": (
        _ml, "ml-1m", None, r"--dataset=ml-1m expects ratings\.dat or ml-1m\.inter, found \['u",
    ),
    "empty u.data": (
        lambda t: _ml(t, ""), "ml-100k", None, r"ml: no interactions in \['u\.data', 'u\.item'\]",
    ),

    "no user with 3 interactions": (
        lambda t: write(t / "g", {"Video.txt": "1 5\n1 3\n2 5\n"}), GAMES, None,
        r"no user has >= 3 interactions, so none can be evaluated .*longest sequence 2",
    ),
}  # fmt: skip


def _drop(folder, name):
    (folder / name).unlink()
    return folder


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_bad_input_is_a_user_error_naming_file_and_line(tmp_path, case):
    build, name, fmt, pattern = ERRORS[case]
    with pytest.raises(UserError, match=pattern) as e:
        data.split(data.load(name, build(tmp_path), fmt=fmt))
    assert "\n" not in str(e.value)


def test_changes_are_counted_in_the_report(tmp_path):
    dup = "1\t10\t5\t300\n" * 3
    ds = data.load("ml-100k", _ml(tmp_path, U_DATA + dup))
    assert ds.report.counts["duplicate interactions (same user, item, timestamp; dropped)"] == 3
    assert ds.num_interactions == 6
    kept = data.load("ml-100k", tmp_path / "ml", duplicates="keep", use_cache=False)
    assert kept.num_interactions == 9

    folder = amazon_folder(tmp_path)
    with open(folder / "info.txt", "a") as f:
        f.write("a second title\t3\n")
    ds = data.load(CDS, folder)
    assert ds.report.counts["duplicate item ids in info.txt (first title kept)"] == 1
    assert ds.items.titles[ds.items.original_ids.index("3")] == "title 3"

    ds = data.load(SCIENTIFIC, _scientific(tmp_path, '{"0": [0, 1, 2]}', item=None))
    assert any("no *.item.json" in line and "every title is empty" in line
               for line in ds.report.lines())  # fmt: skip


def test_filters_that_leave_nothing_say_what_they_dropped(tmp_path):
    with pytest.raises(DataFormatError, match=r"ml-100k: no interactions left \(6 read; .*"
                       r"interactions with rating < 6: 6"):  # fmt: skip
        data.load("ml-100k", _ml(tmp_path), min_rating=6)


def test_leave_one_out_over_a_bigrec_folder_is_asked_for(tmp_path):
    folder = _drop(amazon_folder(tmp_path), "test.csv")
    ds = data.load(CDS, folder, fmt="amazon-csv-loo")
    assert data.split(ds).rule == "leave-one-out" and not ds.examples


def test_index_and_config_files(tmp_path, caplog):
    index = tmp_path / "x.index.json"
    index.write_text('{"0": ["<a_1>", "<b_2>"], "1": ["<a_3>"')
    with pytest.raises(DataFormatError, match=r"x\.index\.json:1:40: invalid JSON"):
        read_index(index)
    config = tmp_path / "config.json"
    config.write_text('{\n  "model_type": "qwen2",\n  "vocab_size": 12')
    with pytest.raises(DataFormatError, match=r"config\.json:3:\d+: invalid JSON"):
        ModelConfig.from_hf_config(config)
    config.write_text('{"model_type": "llama"}')
    with pytest.raises(UserError, match=r"config\.json: model_type='llama'"):
        ModelConfig.from_hf_config(config)

    ds = data.load(GAMES, write(tmp_path / "g", {"Video.txt": "1 1\n1 2\n"}))
    index.write_text(json.dumps({"0": ["<a_1>", "<b_2>"], "1": ["<a_3>", "<b_5000>"]}))
    with pytest.raises(
        DataFormatError, match=r"<b_5000> \(item 1\) is outside --codebook_size=256"
    ):
        load_index(index, ds, codebook_size=256)
    with caplog.at_level(logging.INFO, logger="absl"):
        assert load_index(index, ds)[2].tolist() == [3, 5000]
    assert "codebook size 5001 inferred from the largest code <b_5000>" in caplog.text


def _parse(args: list[str], **defaults):
    fv = flags.FlagValues()
    for name, value in defaults.items():
        kind = flags.DEFINE_float if isinstance(value, float) else flags.DEFINE_integer
        kind(name, value, "", flag_values=fv)
    validate_ranges(fv)
    fv(["prog", *args])
    return fv


@pytest.mark.parametrize(
    "arg, message",
    [
        ("--learning_rate=-0.01", "flag --learning_rate=-0.01: must be > 0"),
        ("--learning_rate=0", "flag --learning_rate=0.0: must be > 0"),
        ("--num_negatives=0", "flag --num_negatives=0: must be >= 1"),
        ("--max_steps=0", "flag --max_steps=0: must be >= 1"),
        ("--eval_every=0", "flag --eval_every=0: must be >= 1"),
        ("--batch_size=0", "flag --batch_size=0: must be >= 1"),
        ("--batch_size=-4", "flag --batch_size=-4: must be >= 1"),
        ("--max_seq_len=0", "flag --max_seq_len=0: must be >= 1"),
        ("--max_length=0", "flag --max_length=0: must be >= 1"),
        ("--dropout_rate=1", "flag --dropout_rate=1.0: must be >= 0 and < 1"),
        ("--max_train_examples=0", "flag --max_train_examples=0: must be -1 (all) or >= 1"),
    ],
)
def test_numeric_flags_are_range_checked(arg, message):
    name = arg[2:].split("=")[0]
    default = 0.5 if name in ("learning_rate", "dropout_rate") else None
    with pytest.raises(flags.IllegalFlagValueError, match=re.escape(message)):
        _parse([arg], **{name: default})
    assert _parse([], **{name: default})[name].value == default  # unset stays allowed


def test_ranges():
    assert all(any(r.allows(v) for v in (1, 0.5, 0)) for r in RANGES.values())
    assert Range(1, all_value=-1).allows(-1) and not Range(1, all_value=-1).allows(0)
    fraction = Range(0, 1, high_open=True)
    assert fraction.allows(0) and not fraction.allows(1) and fraction.describe() == ">= 0 and < 1"


def test_shared_training_flags_have_ranges():
    fv = flags.FlagValues()
    saved, flags.FLAGS = flags.FLAGS, fv  # define_training_flags defines on flags.FLAGS
    try:
        define_training_flags({"learning_rate": 1e-3, "batch_size": 8})
    finally:
        flags.FLAGS = saved
    numeric = [n for n, f in fv._flags().items() if type(f.parser).__name__ != "ArgumentParser"]
    assert set(numeric) - {"overwrite", "format"} <= set(RANGES)


def _run(module: str, *args: str, env: dict | None = None):
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120,
        env={**os.environ, "LLM4REC_ALLOCATOR": "system", **(env or {})},
    )  # fmt: skip


def test_entrypoints_print_one_line_errors(tmp_path):
    folder = _ml(tmp_path, U_DATA.replace("1\t12\t5\t200", "1\t12\t5\t2e3"))
    args = ("--dataset=ml-100k", f"--data_dir={folder}")
    out = _run("eval.data.stats", *args)
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines() == [
        f"error: {folder / 'u.data'}:5: expected an integer, got '2e3': '1\\t12\\t5\\t2e3'"
    ]
    out = _run("eval.data.stats", *args, "--traceback")
    assert out.returncode == 1 and "Traceback (most recent call last)" in out.stderr
    assert "DataFormatError" in out.stderr

    out = _run("eval.data.stats", *args, "--k_core=0")
    assert out.returncode == 2
    assert out.stderr.splitlines() == ["error: flag --k_core=0: must be >= 1 (see --helpfull)"]
    out = _run("hstu.train", *args, f"--out={tmp_path / 'run'}", "--max_steps=0")
    assert out.returncode == 2 and not (tmp_path / "run").exists()
    assert out.stderr.splitlines() == ["error: flag --max_steps=0: must be >= 1 (see --helpfull)"]
    out = _run("llm_sft.train", *args, f"--out={tmp_path / 'sft'}", "--group_by_length",
               "--padding_side=left")  # fmt: skip
    assert out.returncode == 2 and not (tmp_path / "sft").exists()
    assert out.stderr.splitlines() == [
        "error: --group_by_length needs --padding_side=right (rows cut to a bucket width)"
    ]


def test_error_types_keep_their_builtin_bases():
    assert issubclass(DataFormatError, ValueError) and issubclass(FlagError, ValueError)
    assert issubclass(MissingFileError, FileNotFoundError)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        data.load("ml-100k", "/nonexistent/folder")
