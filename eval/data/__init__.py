"""Data sets, splits and training examples shared by every package."""

from eval.data.cache import default_cache_dir, load
from eval.data.dataset import Dataset, DropReport, EvalExamples, ItemTable, Ragged
from eval.data.formats import DataFormatError
from eval.data.registry import DATASETS, FORMATS, DatasetSpec, register
from eval.data.splits import Split, split

__all__ = [
    "DATASETS", "FORMATS", "DataFormatError", "Dataset", "DatasetSpec", "DropReport", "EvalExamples",
    "ItemTable", "Ragged", "Split", "default_cache_dir", "load", "register", "split",
]  # fmt: skip
