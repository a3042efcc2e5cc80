"""Parsers for the raw file formats, each producing a `RawData` (interactions + item metadata).

Every parser checks each line and raises `DataFormatError` naming the file and line of the
first bad record. `build_dataset` turns `RawData` into the canonical `Dataset`.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import json
import pathlib
import re

import numpy as np

from eval.data.dataset import Dataset, DropReport, EvalExamples, ItemTable, Ragged


class DataFormatError(ValueError):
    """A raw data file does not follow its format; the message names the file and line."""


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


def _int(path, lineno, value, line) -> int:
    try:
        return int(value)
    except ValueError:
        try:
            as_float = float(value)
        except ValueError:
            raise _fail(path, lineno, f"expected an integer, got {value!r}", line) from None
        if not as_float.is_integer():
            raise _fail(path, lineno, f"expected an integer, got {value!r}", line) from None
        return int(as_float)


def _float(path, lineno, value, line) -> float:
    try:
        return float(value)
    except ValueError:
        raise _fail(path, lineno, f"expected a number, got {value!r}", line) from None


def _lines(path: pathlib.Path, encoding: str = "utf-8"):
    """(1-based line number, line) for non-empty lines of a text file."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing")
    with open(path, encoding=encoding, newline="") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield lineno, line.rstrip("\r\n")


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
            raw.item_meta[fields[0]] = {
                "title": fields[1].strip(),
                "release_date": fields[2],
                "genres": ", ".join(genres),
            }
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
            raw.item_meta[fields[0]] = {
                "title": fields[1].strip(),
                "genres": fields[2].replace("|", ", "),
            }
        return raw
    if (data_dir / "ratings.csv").exists():
        raw = _interaction_table(
            data_dir / "ratings.csv", ",", ("user", "item", "rating", "timestamp"), skip_header=True
        )
        path = data_dir / "movies.csv"
        with open(path, encoding="utf-8", newline="") as f:
            for lineno, fields in enumerate(csv.reader(f), 1):
                if lineno == 1:
                    continue
                if len(fields) != 3:
                    raise _fail(path, lineno, "expected 3 CSV fields", ",".join(fields))
                raw.item_meta[fields[0]] = {
                    "title": fields[1].strip(),
                    "genres": fields[2].replace("|", ", "),
                }
        return raw
    if list(data_dir.glob("*.inter")):
        return read_recbole(data_dir)
    raise FileNotFoundError(
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
        _int(path, lineno, fields[0], line)
        _int(path, lineno, fields[1], line)
        raw.users.append(fields[0])
        raw.items.append(fields[1])
    return raw


def read_p5(data_dir: pathlib.Path) -> RawData:
    """P5 / S3-Rec sequential format: `sequential_data.txt`, one line per user,
    `user item item ...` (1-based ids, time order), plus optional `datamaps.json`
    (`id2item`: the original ids, kept as the item field `asin`). A repeated user line is
    an error; a user line without items is counted and skipped."""
    path = data_dir / "sequential_data.txt"
    raw, seen = RawData([], []), {}
    for lineno, line in _lines(path):
        fields = line.split()
        for value in fields:
            _int(path, lineno, value, line)
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
        id2item = _load_json(maps_path).get("id2item", {})
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
        raise FileNotFoundError(
            f"{data_dir}: expected exactly one {pattern} file, found {len(found)}"
        )
    return found[0]


def _load_json(path: pathlib.Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def read_lcrec(data_dir: pathlib.Path) -> RawData:
    """LC-Rec/LETTER JSON: `*.inter.json` {user: [item, ...]} in time order + `*.item.json`."""
    inter_path = _single(data_dir, "*.inter.json")
    inter = _load_json(inter_path)
    raw = RawData([], [])
    for user, items in inter.items():
        if not isinstance(items, list) or not all(isinstance(i, int | str) for i in items):
            raise DataFormatError(f"{inter_path}: user {user!r}: expected a list of item ids")
        raw.users.extend([str(user)] * len(items))
        raw.items.extend(str(i) for i in items)
    item_paths = sorted(data_dir.glob("*.item.json"))
    if item_paths:
        for item, meta in _load_json(item_paths[0]).items():
            if not isinstance(meta, dict):
                raise DataFormatError(f"{item_paths[0]}: item {item!r}: expected an object")
            raw.item_meta[str(item)] = {k: _clean_text(str(v)) for k, v in meta.items() if v}
    return raw


def read_index_json(path: pathlib.Path) -> dict[str, list[str]]:
    """A semantic-ID index `{item: ["<a_1>", "<b_2>", ...]}` (LC-Rec/LETTER `*.index.json`)."""
    index = _load_json(path)
    for item, codes in index.items():
        if not isinstance(codes, list) or not all(re.fullmatch(r"<[a-z]_\d+>", c) for c in codes):
            raise DataFormatError(f"{path}: item {item!r}: expected a list like ['<a_1>', '<b_2>']")
    return index


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
        if raw.timestamps is not None:
            raw.timestamps.append(_int(inter_path, lineno, fields[cols["timestamp"]], line))
        if raw.ratings is not None:
            raw.ratings.append(_float(inter_path, lineno, fields[cols["rating"]], line))
    item_path = inter_path.with_suffix(".item")
    if item_path.exists():
        header, rows = _atomic(item_path)
        names = [name.split(":")[0] for name in header]
        title_col = next((n for n in ("title", "movie_title", "item_title") if n in names), None)
        for _, fields, _ in rows:
            meta = {n: v for n, v in zip(names, fields, strict=True) if n != "item_id" and v}
            if title_col:
                meta["title"] = meta.pop(title_col, "")
            raw.item_meta[fields[names.index("item_id")]] = meta
    return raw


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


def read_amazon_csv(data_dir: pathlib.Path) -> RawData:
    """BIGRec/D3 Amazon CSV: `valid.csv`/`test.csv` rows (history -> next item) + `info.txt`.

    Each user's sequence is rebuilt from the rows: the history of the user's earliest row,
    then every row's target in time order. Rows whose history disagrees with the rebuilt
    sequence are counted in the report. The rows themselves become evaluation examples.
    """
    raw = RawData([], [], [], [])
    info = data_dir / "info.txt"
    titles: dict[str, str] = {}
    for lineno, line in _lines(info):
        title, sep, item = line.rpartition("\t")
        if not sep:
            raise _fail(info, lineno, "expected 'title<TAB>item_id'", line)
        _int(info, lineno, item, line)
        titles[item.strip()] = title.strip()
    events: dict[str, dict[tuple, None]] = {}
    asins: dict[str, str] = {}
    for split in ("valid", "test"):
        path = data_dir / f"{split}.csv"
        if not path.exists():
            continue
        rows = raw.examples.setdefault(
            split, {"users": [], "history": [], "history_ts": [], "target": [], "ts": []}
        )
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or tuple(header[: len(_CSV_COLUMNS)]) != _CSV_COLUMNS:
                raise DataFormatError(f"{path}:1: expected header {','.join(_CSV_COLUMNS)}")
            for fields in reader:
                lineno = reader.line_num
                line = ",".join(fields)
                if len(fields) != len(header):
                    raise _fail(path, lineno, f"expected {len(header)} CSV fields", line)
                row = dict(zip(header, fields, strict=True))
                hist = _literal_list(path, lineno, row["history_item_id"], line)
                hist_ts = _literal_list(path, lineno, row["history_timestamp"], line)
                hist_asins = _literal_list(path, lineno, row["item_asins"], line)
                if not (len(hist) == len(hist_ts) == len(hist_asins)):
                    raise _fail(path, lineno, "history list columns differ in length", line)
                target = str(_int(path, lineno, row["item_id"], line))
                ts = _int(path, lineno, row["timestamp"], line)
                hist = [str(int(h)) for h in hist]
                user = row["user_id"]
                for item, t in zip(hist, hist_ts, strict=True):
                    events.setdefault(user, {})[(int(t), item, "h")] = None
                events.setdefault(user, {})[(ts, target, "t")] = None
                asins.update(zip(hist, hist_asins, strict=True))
                asins[target] = row["item_asin"]
                rows["users"].append(user)
                rows["history"].append(hist)
                rows["history_ts"].append([int(t) for t in hist_ts])
                rows["target"].append(target)
                rows["ts"].append(ts)
    if not raw.examples:
        raise FileNotFoundError(f"{data_dir}: neither valid.csv nor test.csv found")
    _rebuild_sequences(raw, raw.examples)
    for item, title in titles.items():
        raw.item_meta[item] = {"title": title, "asin": asins.get(item, "")}
    unknown = {i for rows in raw.examples.values() for i in rows["target"]} - set(titles)
    raw.report.add("targets without an info.txt title", len(unknown))
    return raw


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


def _literal_list(path, lineno, value, line) -> list:
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        raise _fail(
            path, lineno, f"expected a Python list literal, got {value[:60]!r}", line
        ) from None
    if not isinstance(parsed, list):
        raise _fail(path, lineno, "expected a list", line)
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
) -> Dataset:
    """Canonical `Dataset` from `RawData`: dense ids, chronological per-user sequences.

    Interactions are ordered per user by timestamp (stable: ties keep file order). Items listed
    in the metadata but never interacted with stay in the catalogue when `keep_unused_items`
    (counted in the report). Everything filtered is counted by reason.
    """
    report = DropReport()
    report.merge(raw.report)
    users = np.asarray(raw.users, dtype=object)
    items = np.asarray(raw.items, dtype=object)
    keep = np.ones(len(users), dtype=bool)
    ratings = np.asarray(raw.ratings, dtype=np.float32) if raw.ratings is not None else None
    if min_rating is not None:
        if ratings is None:
            raise ValueError(f"--min_rating: data set {name!r} has no ratings")
        below = ratings < min_rating
        report.add(f"interactions with rating < {min_rating}", int(below.sum()))
        keep &= ~below
    if k_core:
        keep = _k_core(users, items, keep, k_core, report)
    order = np.arange(len(users))[keep]
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
    return (0, int(original_id), "") if original_id.lstrip("-").isdigit() else (1, 0, original_id)


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
