"""Data sets by name: which parser reads them, and how they are described and evaluated."""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable

from eval.data import formats


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """How to read one named data set and what its items are called in prompts."""

    name: str
    reader: Callable[[pathlib.Path], formats.RawData]
    noun: str = "items"
    description: str = ""
    # Files whose content identifies the source (hashed for the cache manifest).
    source_globs: tuple[str, ...] = ("*",)
    # The published evaluation protocol: "full" ranking or "sampled" (100 negatives, SASRec).
    protocol: str = "full"
    # History length sequential models read at the `full` budget (the literature's choice:
    # 200 on MovieLens, 50 on the sparse Amazon sets as SASRec and the HSTU reference do).
    max_seq_len: int = 200


FORMATS: dict[str, Callable[[pathlib.Path], formats.RawData]] = {
    "grouplens": formats.read_grouplens,
    "sasrec": formats.read_sasrec,
    "lcrec": formats.read_lcrec,
    "amazon-csv": formats.read_amazon_csv,
    "recbole": formats.read_recbole,
    "p5": formats.read_p5,
}

DATASETS: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec) -> DatasetSpec:
    """Add a named data set (see WORKSPACE.md, 'Adding a data set')."""
    DATASETS[spec.name] = spec
    return spec


_MOVIELENS = ("u.data", "u.item", "*.dat", "ratings.csv", "movies.csv", "*.inter", "*.item")
for _name in ("ml-100k", "ml-1m", "ml-20m"):
    register(
        DatasetSpec(
            _name, formats.read_grouplens, "movies", f"MovieLens {_name[3:].upper()}", _MOVIELENS
        )
    )
register(
    DatasetSpec(
        "amazon-games-2014",
        formats.read_sasrec,
        "video games",
        "Amazon Video Games 2014 (SASRec's Games)",
        ("*.txt",),
        "sampled",
        50,
    )
)
register(
    DatasetSpec(
        "amazon-scientific-2018",
        formats.read_lcrec,
        "industrial and scientific products",
        "Amazon Industrial & Scientific 2018 (LC-Rec JSON)",
        ("*.inter.json", "*.item.json"),
        max_seq_len=50,
    )
)
register(
    DatasetSpec(
        "amazon-cds-vinyl-2018",
        formats.read_amazon_csv,
        "CDs or vinyl",
        "Amazon CDs & Vinyl 2018 (BIGRec/D3 CSV)",
        ("valid.csv", "test.csv", "info.txt"),
        max_seq_len=50,
    )
)
_P5 = ("sequential_data.txt", "datamaps.json")
register(
    DatasetSpec(
        "amazon-sports-2014",
        formats.read_p5,
        "sports and outdoors products",
        "Amazon Sports & Outdoors 2014, 5-core, P5 / S3-Rec preprocessing (TIGER, RecGPT)",
        _P5,
        max_seq_len=50,
    )
)
register(
    DatasetSpec(
        "yelp-p5",
        formats.read_p5,
        "businesses",
        "Yelp, 5-core, P5 preprocessing (RecGPT)",
        _P5,
        max_seq_len=50,
    )
)


def get_spec(name: str, fmt: str | None = None) -> DatasetSpec:
    """The spec of a registered name, or an ad-hoc one for `fmt` (one of FORMATS)."""
    if fmt:
        if fmt not in FORMATS:
            raise ValueError(f"--format={fmt!r}: unknown; choose one of {sorted(FORMATS)}")
        return DatasetSpec(name, FORMATS[fmt])
    if name not in DATASETS:
        raise ValueError(
            f"--dataset={name!r}: unknown; registered: {sorted(DATASETS)} "
            f"(or pass --format={'|'.join(FORMATS)} for other data)"
        )
    return DATASETS[name]
