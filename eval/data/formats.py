"""Parsers for the raw file formats, each producing a `RawData` (interactions + item metadata).

Every parser checks each line and raises `DataFormatError` naming the file and line (and
column or byte, where there is one) of the first bad record: bytes are decoded strictly,
ids and numbers parsed strictly (`3.0` is not an integer id), JSON top-level types checked.
Whatever a parser or `build_dataset` drops or normalises is counted in the report (duplicate
item ids: first kept; duplicate interactions: see `build_dataset`). `build_dataset` turns
`RawData` into the canonical `Dataset`.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import json
import math
import pathlib
import re
from collections.abc import Iterator
from typing import Literal

import numpy as np

from eval.data.dataset import Dataset, DropReport, EvalExamples, ItemTable, Ragged
from eval.errors import DataFormatError, FlagError, MissingFileError


@dataclasses.dataclass
class RawData:
    """Interactions in file order with original ids, plus item metadata by original id."""

    users: list[str]
    items: list[str]
    timestamps: list[int] | None = None
    ratings: list[float] | None = None
    item_meta: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    examples: dict[str, dict[str, list]] = dataclasses.field(default_factory=dict)
    report: DropReport = dataclasses.field(default_factory=DropReport)


def _fail(path: pathlib.Path, lineno: int, why: str, line: str) -> DataFormatError:
    return DataFormatError(f"{path}:{lineno}: {why}: {line.rstrip()[:200]!r}")


_INTEGER = re.compile(r"[+-]?[0-9]+")
_INT64 = (-(2**63), 2**63 - 1)


def _int(path, lineno, value, line) -> int:
    """A strict integer: an int literal (or a JSON int) within int64; `3.0`, `1e3`, `true` fail."""
    text = value.strip() if isinstance(value, str) else value
    if isinstance(text, bool) or not (
        isinstance(text, int) or (isinstance(text, str) and _INTEGER.fullmatch(text))
    ):
        raise _fail(path, lineno, f"expected an integer, got {value!r}", line)
    n = int(text)
    if not _INT64[0] <= n <= _INT64[1]:
        raise _fail(path, lineno, f"integer {value!r} is outside the 64-bit range", line)
    return n


def _id(path, lineno, value, line) -> str:
    """A numeric id in canonical form (`007` -> `7`), strictly parsed as `_int`."""
    return str(_int(path, lineno, value, line))


def _float(path, lineno, value, line) -> float:
    try:
        number = float(value)
    except ValueError:
        raise _fail(path, lineno, f"expected a number, got {value!r}", line) from None
    if not math.isfinite(number):
        raise _fail(path, lineno, f"expected a finite number, got {value!r}", line)
    return number


def _decoded(path: pathlib.Path, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    """(1-based line number, line with its ending) of a text file, decoded strictly: a bad
    byte raises `DataFormatError` naming the line and the byte's column."""
    if not path.exists():
        raise MissingFileError(f"{path}: missing")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode(encoding)
            except UnicodeDecodeError as e:
                raise DataFormatError(
                    f"{path}:{lineno}:{e.start + 1}: byte 0x{raw[e.start]:02x} is not valid "
                    f"{encoding} (re-encode the file as {encoding})"
                ) from None


def _lines(path: pathlib.Path, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    """(1-based line number, line) for non-empty lines of a text file."""
    for lineno, line in _decoded(path, encoding):
        if line.strip():
            yield lineno, line.rstrip("\r\n")


def _csv_rows(path: pathlib.Path) -> Iterator[tuple[int, list[str]]]:
    """(line number where the row ends, fields) of a UTF-8 CSV file, strictly decoded."""
    reader = csv.reader(line for _, line in _decoded(path))
    for fields in reader:
        yield reader.line_num, fields


def _item_meta(raw: RawData, path: pathlib.Path, item: str, meta: dict[str, str]) -> None:
    """Adds one item's metadata; a repeated id keeps the first record (counted)."""
    if item in raw.item_meta:
        raw.report.add(f"duplicate item ids in {path.name} (first kept)", 1)
    else:
        raw.item_meta[item] = meta


def _interaction_table(path, sep, columns, encoding="utf-8", skip_header=False) -> RawData:
    """user, item, rating, timestamp rows separated by `sep` (columns names their order)."""
    raw = RawData(
        [], [], [] if "timestamp" in columns else None, [] if "rating" in columns else None
    )
    for lineno, line in _lines(path, encoding):
        if skip_header and lineno == 1:
            continue
        fields = line.split(sep)
        if len(fields) < len(columns):
            raise _fail(path, lineno, f"expected {len(columns)} fields separated by {sep!r}", line)
        row = dict(zip(columns, fields, strict=False))
        raw.users.append(row["user"].strip())
        raw.items.append(row["item"].strip())
        if raw.ratings is not None:
            raw.ratings.append(_float(path, lineno, row["rating"], line))
        if raw.timestamps is not None:
            raw.timestamps.append(_int(path, lineno, row["timestamp"], line))
        if not raw.users[-1] or not raw.items[-1]:
            raise _fail(path, lineno, "empty user or item id", line)
    return raw


def read_grouplens(data_dir: pathlib.Path) -> RawData:
    """GroupLens MovieLens: ml-100k (`u.data`, `u.item`), ml-1m (`*.dat`), ml-20m (`*.csv`)."""
    if (data_dir / "u.data").exists():
        raw = _interaction_table(data_dir / "u.data", "\t", ("user", "item", "rating", "timestamp"))
        for lineno, line in _lines(data_dir / "u.item", "latin-1"):
            fields = line.split("|")
            if len(fields) < 5:
                raise _fail(data_dir / "u.item", lineno, "expected >= 5 '|'-separated fields", line)
            genres = [g for g, flag in zip(ML100K_GENRES, fields[5:], strict=False) if flag == "1"]
            meta = {
                "title": fields[1].strip(),
                "release_date": fields[2],
                "genres": ", ".join(genres),
            }
            _item_meta(raw, data_dir / "u.item", fields[0], meta)
        return raw
    if (data_dir / "ratings.dat").exists():
        raw = _interaction_table(
            data_dir / "ratings.dat", "::", ("user", "item", "rating", "timestamp")
        )
        for lineno, line in _lines(data_dir / "movies.dat", "latin-1"):
            fields = line.split("::")
            if len(fields) != 3:
                raise _fail(
                    data_dir / "movies.dat", lineno, "expected 3 '::'-separated fields", line
                )
            meta = {"title": fields[1].strip(), "genres": fields[2].replace("|", ", ")}
            _item_meta(raw, data_dir / "movies.dat", fields[0], meta)
        return raw
    if (data_dir / "ratings.csv").exists():
        raw = _interaction_table(
            data_dir / "ratings.csv", ",", ("user", "item", "rating", "timestamp"), skip_header=True
        )
        path = data_dir / "movies.csv"
        for row, (lineno, fields) in enumerate(_csv_rows(path)):
            if row == 0:
                continue
            if len(fields) != 3:
                raise _fail(path, lineno, "expected 3 CSV fields", ",".join(fields))
            meta = {"title": fields[1].strip(), "genres": fields[2].replace("|", ", ")}
            _item_meta(raw, path, fields[0], meta)
        return raw
    if list(data_dir.glob("*.inter")):
        return read_recbole(data_dir)
    raise MissingFileError(
        f"{data_dir}: no MovieLens files (u.data + u.item, ratings.dat + movies.dat, "
        "ratings.csv + movies.csv, or RecBole ml-*.inter)"
    )


ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)  # fmt: skip


def read_sasrec(data_dir: pathlib.Path, filename: str | None = None) -> RawData:
    """SASRec's `user item` lines (ids only), each user's lines in time order."""
    path = data_dir / filename if filename else _single(data_dir, "*.txt")
    raw = RawData([], [])
    for lineno, line in _lines(path):
        fields = line.split()
        if len(fields) != 2:
            raise _fail(path, lineno, "expected 'user item'", line)
        raw.users.append(_id(path, lineno, fields[0], line))
        raw.items.append(_id(path, lineno, fields[1], line))
    return raw


def read_p5(data_dir: pathlib.Path) -> RawData:
    """P5 / S3-Rec sequential format: `sequential_data.txt`, one line per user,
    `user item item ...` (1-based ids, time order), plus optional `datamaps.json`
    (`id2item`: the original ids, kept as the item field `asin`). A repeated user line is
    an error; a user line without items is counted and skipped."""
    path = data_dir / "sequential_data.txt"
    raw, seen = RawData([], []), {}
    for lineno, line in _lines(path):
        fields = [_id(path, lineno, value, line) for value in line.split()]
        user, items = fields[0], fields[1:]
        if user in seen:
            raise _fail(path, lineno, f"user {user} already listed on line {seen[user]}", line)
        seen[user] = lineno
        if not items:
            raw.report.add("users without items (skipped)", 1)
            continue
        raw.users.extend([user] * len(items))
        raw.items.extend(items)
    maps_path = data_dir / "datamaps.json"
    if maps_path.exists():
        id2item = read_json(maps_path).get("id2item", {})
        if not isinstance(id2item, dict):
            raise DataFormatError(f"{maps_path}: 'id2item' must map item ids to original ids")
        unknown = set(raw.items) - set(id2item)
        raw.report.add(
            f"items missing from {maps_path.name} id2item (no original id)", len(unknown)
        )
        raw.item_meta = {str(k): {"asin": str(v)} for k, v in id2item.items()}
    return raw


def _single(data_dir: pathlib.Path, pattern: str) -> pathlib.Path:
    found = sorted(data_dir.glob(pattern))
    if len(found) != 1:
        raise MissingFileError(
            f"{data_dir}: expected exactly one {pattern} file, found {len(found)}"
        )
    return found[0]


def _unique_keys(path: pathlib.Path):
    def hook(pairs: list[tuple[str, object]]) -> dict:
        out = dict(pairs)
        if len(out) != len(pairs):
            seen = set()
            key = next(k for k, _ in pairs if k in seen or seen.add(k))
            raise DataFormatError(f"{path}: key {key!r} appears twice in one JSON object")
        return out

    return hook


def read_json(path: str | pathlib.Path, expect: type = dict):
    """A UTF-8 JSON file whose top level is an `expect` (dict or list). Bad bytes, syntax
    (a truncated file) and repeated keys raise `DataFormatError` with line and column."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: missing")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - data.rfind(b"\n", 0, e.start)
        raise DataFormatError(
            f"{path}:{line}:{col}: byte 0x{data[e.start]:02x} is not valid UTF-8 "
            "(re-encode the file as UTF-8)"
        ) from None
    try:
        value = json.loads(text, object_pairs_hook=_unique_keys(path))
    except json.JSONDecodeError as e:
        raise DataFormatError(
            f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg} (is the file truncated?)"
        ) from None
    except RecursionError:
        raise DataFormatError(f"{path}: JSON nested too deeply") from None
    if not isinstance(value, expect):
        raise DataFormatError(
            f"{path}: expected a JSON {'object' if expect is dict else 'array'} at the top "
            f"level, got {type(value).__name__}"
        )
    return value


def read_lcrec(data_dir: pathlib.Path) -> RawData:
    """LC-Rec/LETTER JSON: `*.inter.json` {user: [item, ...]} in time order + `*.item.json`."""
    inter_path = _single(data_dir, "*.inter.json")
    raw = RawData([], [])
    for user, items in read_json(inter_path).items():
        if not isinstance(items, list) or not all(_is_json_id(i) for i in items):
            raise DataFormatError(
                f"{inter_path}: user {user!r}: expected a list of item ids (integers or "
                f"strings), got {json.dumps(items)[:80]}"
            )
        if not items:
            raw.report.add("users without items (skipped)", 1)
        raw.users.extend([user] * len(items))
        raw.items.extend(str(i) for i in items)
    item_paths = sorted(data_dir.glob("*.item.json"))
    if not item_paths:
        raw.report.add(f"no *.item.json in {data_dir} (warning: every title is empty)", 1)
    for item_path in item_paths[:1]:
        for item, meta in read_json(item_path).items():
            if not isinstance(meta, dict):
                raise DataFormatError(f"{item_path}: item {item!r}: expected an object")
            raw.item_meta[item] = {k: _clean_text(str(v)) for k, v in meta.items() if v}
    return raw


def _is_json_id(value: object) -> bool:
    """An item id in JSON: an integer (not a bool) or a non-empty string."""
    return (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, str) and value.strip() != ""
    )


SID_CODE = re.compile(r"<([a-z])_([0-9]{1,9})>")  # one code of a semantic ID: level, value


def index_codes(index: dict[str, list[str]], source: str = "<index>") -> np.ndarray:
    """Semantic-ID index dict -> [N, L] int codes; checks keys 0..N-1, equal lengths and
    level letters (`<a_12>` at level 0, `<b_..>` at level 1, ...)."""
    n = len(index)
    if sorted(index, key=lambda s: int(s) if s.isdigit() else -1) != [str(i) for i in range(n)]:
        raise DataFormatError(f"{source}: keys must be the item indices 0..{n - 1} as strings")
    rows = [index[str(i)] for i in range(n)]
    num_levels = len(rows[0]) if rows and isinstance(rows[0], list) else 0
    codes = np.zeros((n, num_levels), np.int64)
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != num_levels:
            raise DataFormatError(f"{source}: item {i}: expected a list of {num_levels} tokens")
        for j, tok in enumerate(row):
            m = SID_CODE.fullmatch(tok) if isinstance(tok, str) else None
            if m is None or m.group(1) != chr(ord("a") + j):
                raise DataFormatError(
                    f"{source}: item {i} token {j} is {tok!r}, expected '<{chr(ord('a') + j)}_N>'"
                )
            codes[i, j] = int(m.group(2))
    return codes


def read_index(path: str | pathlib.Path) -> np.ndarray:
    """A semantic-ID index file (`rqvae`'s `semantic_ids.json`, LC-Rec / LETTER
    `*.index.json`: `{item: ["<a_1>", "<b_2>", ...]}`) as [N, L] int codes."""
    return index_codes(read_json(path), source=str(path))


def largest_code(codes: np.ndarray) -> str:
    """`<c_250> (item 17)`: the largest code of [N, L] codes and the row holding it."""
    item, level = np.unravel_index(int(codes.argmax()), codes.shape)
    return f"<{chr(ord('a') + int(level))}_{codes.max()}> (item {item})"


def read_item_codes(
    path: str | pathlib.Path, ds: Dataset, codebook_size: int | None = None
) -> np.ndarray:
    """[N + 1, L] codes by dense item id (row 0 zeros) from an index file whose key k is
    the data set's item k (dense id k + 1: `rqvae.train`'s row order, and the original id
    for LC-Rec data); every code must be < `codebook_size` when it is given."""
    codes = read_index(path)
    if len(codes) != ds.num_items:
        raise DataFormatError(f"{path}: {len(codes)} items, but {ds.name} has {ds.num_items}")
    if codebook_size is not None and len(codes) and codes.max() >= codebook_size:
        raise DataFormatError(
            f"{path}: code {largest_code(codes)} is outside --codebook_size={codebook_size} "
            "(a corrupted index, or the wrong --codebook_size)"
        )
    return np.concatenate([np.zeros_like(codes[:1]), codes])


def read_recbole(data_dir: pathlib.Path) -> RawData:
    """RecBole atomic files: `NAME.inter` (+ optional `NAME.item`), typed tab-separated headers."""
    inter_path = _single(data_dir, "*.inter")
    header, rows = _atomic(inter_path)
    cols = {name.split(":")[0]: i for i, name in enumerate(header)}
    for need in ("user_id", "item_id"):
        if need not in cols:
            raise DataFormatError(f"{inter_path}:1: header lacks {need!r}: {header}")
    raw = RawData([], [], [] if "timestamp" in cols else None, [] if "rating" in cols else None)
    for lineno, fields, line in rows:
        raw.users.append(fields[cols["user_id"]])
        raw.items.append(fields[cols["item_id"]])
        if not raw.users[-1].strip() or not raw.items[-1].strip():
            raise _fail(inter_path, lineno, "empty user or item id", line)
        if raw.timestamps is not None:
            raw.timestamps.append(_whole(inter_path, lineno, fields[cols["timestamp"]], line))
        if raw.ratings is not None:
            raw.ratings.append(_float(inter_path, lineno, fields[cols["rating"]], line))
    item_path = inter_path.with_suffix(".item")
    if item_path.exists():
        header, rows = _atomic(item_path)
        names = [name.split(":")[0] for name in header]
        if "item_id" not in names:
            raise DataFormatError(f"{item_path}:1: header lacks 'item_id': {header}")
        title_col = next((n for n in ("title", "movie_title", "item_title") if n in names), None)
        for _, fields, _ in rows:
            meta = {n: v for n, v in zip(names, fields, strict=True) if n != "item_id" and v}
            if title_col:
                meta["title"] = meta.pop(title_col, "")
            if title_col == "movie_title":
                _grouplens_movie(meta)
            _item_meta(raw, item_path, fields[names.index("item_id")], meta)
    return raw


def _grouplens_movie(meta: dict[str, str]) -> None:
    """RecBole's MovieLens item fields as GroupLens has them, so that ml-100k is the same
    data set from either copy: the title with its year (`Toy Story (1995)`; RecBole splits
    off `release_year`) and the genres comma-separated (RecBole's `class`)."""
    year = meta.pop("release_year", "")
    if year.isdigit() and meta["title"]:
        meta["title"] = f"{meta['title']} ({year})"
    if "class" in meta:
        meta["genres"] = ", ".join(meta.pop("class").split())


def _whole(path, lineno, value, line) -> int:
    """A RecBole `timestamp:float`: an integer, or a float with no fractional part."""
    number = _float(path, lineno, value, line)
    if not number.is_integer() or not _INT64[0] <= number <= _INT64[1]:
        raise _fail(path, lineno, f"expected a whole-second timestamp, got {value!r}", line)
    return int(number)


def _atomic(path: pathlib.Path):
    lines = _lines(path)
    try:
        _, first = next(lines)
    except StopIteration:
        raise DataFormatError(f"{path}:1: empty file") from None
    header = first.split("\t")
    rows = []
    for lineno, line in lines:
        fields = line.split("\t")
        if len(fields) != len(header):
            raise _fail(path, lineno, f"expected {len(header)} tab-separated fields", line)
        rows.append((lineno, fields, line))
    return header, rows


_CSV_COLUMNS = (
    "user_id", "item_asins", "item_asin", "history_item_id", "item_id", "history_item_title",
    "item_title", "history_rating", "rating", "history_timestamp", "timestamp",
)  # fmt: skip


def read_amazon_csv(data_dir: pathlib.Path, leave_one_out: bool = False) -> RawData:
    """BIGRec/D3 Amazon CSV: `valid.csv` + `test.csv` rows (history -> next item) + `info.txt`.

    Each user's sequence is rebuilt from the rows: the history of the user's earliest row,
    then every row's target in time order. Rows whose history disagrees with the rebuilt
    sequence are counted in the report. The rows themselves become evaluation examples;
    with `leave_one_out` (`--format=amazon-csv-loo`) they only rebuild the sequences, either
    file may be missing, and the split is leave-one-out.
    """
    raw = RawData([], [], [], [])
    info = data_dir / "info.txt"
    titles: dict[str, str] = {}
    for lineno, line in _lines(info):
        title, sep, item = line.rpartition("\t")
        if not sep:
            raise _fail(info, lineno, "expected 'title<TAB>item_id'", line)
        item = _id(info, lineno, item, line)
        if item in titles:
            raw.report.add("duplicate item ids in info.txt (first title kept)", 1)
        else:
            titles[item] = title.strip()
    asins: dict[str, str] = {}
    examples: dict[str, dict[str, list]] = {}
    for split in ("valid", "test"):
        path = data_dir / f"{split}.csv"
        if not path.exists():
            if leave_one_out:
                continue
            raise MissingFileError(
                f"{path}: missing; the BIGRec CSV split needs valid.csv and test.csv "
                "(--format=amazon-csv-loo rebuilds sequences from the files present and "
                "evaluates leave-one-out)"
            )
        examples[split] = _amazon_csv_rows(path, asins)
    if not examples:
        raise MissingFileError(f"{data_dir}: neither valid.csv nor test.csv found")
    _rebuild_sequences(raw, examples)
    if not leave_one_out:
        raw.examples = examples
    for item, title in titles.items():
        raw.item_meta[item] = {"title": title, "asin": asins.get(item, "")}
    unknown = {i for rows in examples.values() for i in rows["target"]} - set(titles)
    raw.report.add("targets without an info.txt title", len(unknown))
    return raw


def _amazon_csv_rows(path: pathlib.Path, asins: dict[str, str]) -> dict[str, list]:
    """One BIGRec CSV file's rows as example columns; `asins` collects item -> ASIN."""
    rows: dict[str, list] = {"users": [], "history": [], "history_ts": [], "target": [], "ts": []}
    reader = _csv_rows(path)
    _, header = next(reader, (1, None))
    if header is None or tuple(header[: len(_CSV_COLUMNS)]) != _CSV_COLUMNS:
        raise DataFormatError(f"{path}:1: expected header {','.join(_CSV_COLUMNS)}")
    for lineno, fields in reader:
        line = ",".join(fields)
        if len(fields) != len(header):
            raise _fail(path, lineno, f"expected {len(header)} CSV fields", line)
        row = dict(zip(header, fields, strict=True))
        hist = [
            _id(path, lineno, h, line) for h in _literal_list(path, lineno, row, "history_item_id")
        ]
        hist_ts = [
            _int(path, lineno, t, line)
            for t in _literal_list(path, lineno, row, "history_timestamp")
        ]
        hist_asins = _literal_list(path, lineno, row, "item_asins")
        if not (len(hist) == len(hist_ts) == len(hist_asins)):
            raise _fail(path, lineno, "history list columns differ in length", line)
        target = _id(path, lineno, row["item_id"], line)
        asins.update(zip(hist, map(str, hist_asins), strict=True))
        asins[target] = row["item_asin"]
        rows["users"].append(row["user_id"])
        rows["history"].append(hist)
        rows["history_ts"].append(hist_ts)
        rows["target"].append(target)
        rows["ts"].append(_int(path, lineno, row["timestamp"], line))
    return rows


def _rebuild_sequences(raw: RawData, examples: dict[str, dict[str, list]]) -> None:
    """Per user: first row's history, then each row's target, in (timestamp, file) order."""
    by_user: dict[str, list] = {}
    for order, (split, rows) in enumerate(examples.items()):
        for r, user in enumerate(rows["users"]):
            by_user.setdefault(user, []).append((rows["ts"][r], order, r, split))
    mismatched = 0
    for user, entries in by_user.items():
        entries.sort()
        _, _, r0, s0 = entries[0]
        seq = list(examples[s0]["history"][r0])
        ts = list(examples[s0]["history_ts"][r0])
        for t, _, r, split in entries:
            hist = examples[split]["history"][r]
            if hist and seq[-len(hist) :] != hist:
                mismatched += 1
            seq.append(examples[split]["target"][r])
            ts.append(t)
        raw.users.extend([user] * len(seq))
        raw.items.extend(seq)
        raw.timestamps.extend(ts)
    raw.ratings = None
    raw.report.add("example rows whose history disagrees with the rebuilt sequence", mismatched)


def _literal_list(path, lineno, row: dict[str, str], column: str) -> list:
    """The Python list literal in one CSV column (`[1, 2]`, `['B00X', 'B00Y']`)."""
    value, line = row[column], ",".join(row.values())
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise _fail(
            path, lineno, f"{column}: expected a Python list literal, got {value[:60]!r}", line
        ) from None
    if not isinstance(parsed, list):
        raise _fail(path, lineno, f"{column}: expected a list, got {value[:60]!r}", line)
    return parsed


_TAG = re.compile(r"<[^>]+>")


def _clean_text(text: str) -> str:
    return " ".join(text.split())


def is_html_debris(title: str) -> bool:
    """Titles that are scraped HTML rather than a name (e.g. `<span class="a-size-medium`)."""
    return title.lstrip().startswith("<") or bool(_TAG.search(title))


def build_dataset(
    name: str,
    raw: RawData,
    *,
    min_rating: float | None = None,
    k_core: int | None = None,
    keep_unused_items: bool = True,
    duplicates: Literal["drop", "keep"] = "drop",
) -> Dataset:
    """Canonical `Dataset` from `RawData`: dense ids, chronological per-user sequences.

    Interactions are ordered per user by timestamp (stable: ties keep file order). A
    duplicate interaction (same user, item and timestamp) is dropped (`duplicates="drop"`,
    the first kept) or kept (always, when the data ships examples: their histories hold
    the duplicates too); without timestamps a repeat cannot be told from a duplicate,
    so repeated user-item pairs are kept and counted. Items listed in the metadata but never
    interacted with stay in the catalogue when `keep_unused_items` (counted in the report).
    Everything filtered is counted by reason; no interaction left is a `DataFormatError`.
    """
    report = DropReport()
    report.merge(raw.report)
    users = np.asarray(raw.users, dtype=object)
    items = np.asarray(raw.items, dtype=object)
    # Shipped examples carry their own histories, duplicates included: keep them all.
    rule = "shipped" if raw.examples else duplicates
    keep = _duplicate_mask(users, items, raw.timestamps, rule, report)
    ratings = np.asarray(raw.ratings, dtype=np.float32) if raw.ratings is not None else None
    if min_rating is not None:
        if ratings is None:
            raise FlagError(f"--min_rating: data set {name!r} has no ratings")
        below = ratings < min_rating
        report.add(f"interactions with rating < {min_rating}", int(below.sum()))
        keep &= ~below
    if k_core:
        keep = _k_core(users, items, keep, k_core, report)
    order = np.arange(len(users))[keep]
    if not len(order):
        raise DataFormatError(
            f"{name}: no interactions left ({len(users)} read; dropped or changed: "
            f"{'; '.join(report.lines()) or 'nothing'})"
        )
    user_codes, user_index = np.unique(users[order].astype(str), return_inverse=True)
    if raw.timestamps is not None:
        ts = np.asarray(raw.timestamps, dtype=np.int64)[order]
        perm = np.lexsort((order, ts, user_index))
    else:
        ts = None
        perm = np.lexsort((order, user_index))
    order, user_index = order[perm], user_index[perm]

    interacted = set(items[order].tolist())
    unused = set(raw.item_meta) - interacted
    filtered = bool(k_core) or min_rating is not None
    if keep_unused_items and not filtered:
        report.add("catalogue items without interactions (kept)", len(unused))
    else:
        report.add("catalogue items without interactions (dropped)", len(unused))
        unused = set()
    original = sorted(interacted | unused, key=_id_sort_key)
    dense = {orig: i + 1 for i, orig in enumerate(original)}
    no_title = [o for o in original if not raw.item_meta.get(o, {}).get("title")]
    report.add("items without title (kept, empty title)", len(no_title))
    field_names = sorted({k for m in raw.item_meta.values() for k in m} - {"title"})
    table = ItemTable(
        original_ids=[""] + original,
        titles=[""] + [raw.item_meta.get(o, {}).get("title", "") for o in original],
        fields={
            k: [""] + [raw.item_meta.get(o, {}).get(k, "") for o in original] for k in field_names
        },
    )
    seq_items = np.fromiter((dense[i] for i in items[order]), dtype=np.int32, count=len(order))
    counts = np.bincount(user_index, minlength=len(user_codes))
    offsets = np.zeros(len(user_codes) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    ds = Dataset(
        name=name,
        items=table,
        user_ids=user_codes.tolist(),
        sequences=Ragged(seq_items, offsets),
        timestamps=Ragged(ts[perm], offsets) if ts is not None else None,
        ratings=Ragged(ratings[order], offsets) if ratings is not None else None,
        report=report,
    )
    ds.examples = _examples(raw, ds, dense, report)
    return ds


def _id_sort_key(original_id: str):
    numeric = _INTEGER.fullmatch(original_id) and len(original_id) < 19
    return (0, int(original_id), "") if numeric else (1, 0, original_id)


def _examples(raw: RawData, ds: Dataset, dense: dict[str, int], report: DropReport) -> dict:
    user_pos = {u: i for i, u in enumerate(ds.user_ids)}
    out = {}
    for split, rows in raw.examples.items():
        ok = [
            r
            for r in range(len(rows["target"]))
            if rows["users"][r] in user_pos
            and rows["target"][r] in dense
            and all(h in dense for h in rows["history"][r])
        ]
        report.add(f"{split} examples dropped by filters", len(rows["target"]) - len(ok))
        out[split] = EvalExamples(
            users=np.asarray([user_pos[rows["users"][r]] for r in ok], dtype=np.int32),
            history=Ragged.from_rows([[dense[h] for h in rows["history"][r]] for r in ok]),
            targets=np.asarray([dense[rows["target"][r]] for r in ok], dtype=np.int32),
            history_timestamps=Ragged.from_rows(
                [rows["history_ts"][r] for r in ok], dtype=np.int64
            ),
            target_timestamps=np.asarray([rows["ts"][r] for r in ok], dtype=np.int64),
        )
    return out


def _duplicate_mask(users, items, timestamps, rule: str, report: DropReport) -> np.ndarray:
    """Rows to keep under the duplicate rule (see `build_dataset`), counting what it finds."""
    if rule not in ("drop", "keep", "shipped"):
        raise ValueError(f"duplicates={rule!r}: 'drop' or 'keep'")
    keep = np.ones(len(users), dtype=bool)
    if not len(users):
        return keep
    columns = [np.unique(users.astype(str), return_inverse=True)[1]]
    columns.append(np.unique(items.astype(str), return_inverse=True)[1])
    if timestamps is not None:
        columns.append(np.asarray(timestamps, dtype=np.int64))
    order = np.lexsort(columns[::-1])
    rows = np.stack([c[order] for c in columns], 1)
    repeat = np.zeros(len(users), dtype=bool)
    repeat[order[1:]] = (rows[1:] == rows[:-1]).all(1)  # not the first of its group
    n = int(repeat.sum())
    if timestamps is None:
        report.add("repeated user-item pairs (kept: no timestamps to tell them from duplicates)", n)
    elif rule == "drop":
        report.add("duplicate interactions (same user, item, timestamp; dropped)", n)
        keep &= ~repeat
    else:
        why = "as in the shipped examples' histories" if rule == "shipped" else 'duplicates="keep"'
        report.add(f"duplicate interactions (same user, item, timestamp; kept: {why})", n)
    return keep


def _k_core(users, items, keep, k, report: DropReport) -> np.ndarray:
    """Iteratively drop users and items with fewer than k interactions."""
    keep = keep.copy()
    before = int(keep.sum())
    _, u_idx = np.unique(users.astype(str), return_inverse=True)
    _, i_idx = np.unique(items.astype(str), return_inverse=True)
    while True:
        u_cnt = np.bincount(u_idx[keep], minlength=u_idx.max() + 1)
        i_cnt = np.bincount(i_idx[keep], minlength=i_idx.max() + 1)
        bad = keep & ((u_cnt[u_idx] < k) | (i_cnt[i_idx] < k))
        if not bad.any():
            break
        keep &= ~bad
    report.add(f"interactions removed by {k}-core filter", before - int(keep.sum()))
    return keep
