"""Data sets by name: which parser reads them, and how they are described and evaluated."""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Callable

from eval.data import formats
from eval.errors import DataFormatError, FlagError


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
    # Files of which at least one must exist (glob patterns): what tells this data set's
    # files from another one's read by the same parser (ml-1m's ratings.dat, not u.data).
    signature: tuple[str, ...] = ()

    def read(self, data_dir: pathlib.Path) -> formats.RawData:
        """The raw data in `data_dir`, after checking the folder holds this data set."""
        if self.signature and not any(any(data_dir.glob(g)) for g in self.signature):
            found = sorted(p.name for p in data_dir.iterdir())[:8]
            raise DataFormatError(
                f"{data_dir}: --dataset={self.name} expects {' or '.join(self.signature)}, "
                f"found {found or 'nothing'} (another data set? pass its --dataset name, "
                "or --format=... for unregistered data)"
            )
        raw = self.reader(data_dir)
        if not raw.users:
            files = sorted(p.name for p in data_dir.iterdir() if p.is_file())
            raise DataFormatError(f"{data_dir}: no interactions in {files} (empty files?)")
        return raw


FORMATS: dict[str, Callable[[pathlib.Path], formats.RawData]] = {
    "grouplens": formats.read_grouplens,
    "sasrec": formats.read_sasrec,
    "lcrec": formats.read_lcrec,
    "amazon-csv": formats.read_amazon_csv,
    "amazon-csv-loo": functools.partial(formats.read_amazon_csv, leave_one_out=True),
    "recbole": formats.read_recbole,
    "p5": formats.read_p5,
}

DATASETS: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec) -> DatasetSpec:
    """Add a named data set (see WORKSPACE.md, 'Adding a data set')."""
    DATASETS[spec.name] = spec
    return spec


_MOVIELENS = ("u.data", "u.item", "*.dat", "ratings.csv", "movies.csv", "*.inter", "*.item")
for _name, _ratings in (("ml-100k", "u.data"), ("ml-1m", "ratings.dat"), ("ml-20m", "ratings.csv")):
    register(
        DatasetSpec(
            _name,
            formats.read_grouplens,
            "movies",
            f"MovieLens {_name[3:].upper()}",
            _MOVIELENS,
            signature=(_ratings, f"{_name}.inter"),
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
            raise FlagError(f"--format={fmt!r}: unknown; choose one of {sorted(FORMATS)}")
        return DatasetSpec(name, FORMATS[fmt])
    if name not in DATASETS:
        raise FlagError(
            f"--dataset={name!r}: unknown; registered: {sorted(DATASETS)} "
            f"(or pass --format={'|'.join(FORMATS)} for other data)"
        )
    return DATASETS[name]
