r"""Add semantic-ID tokens to an HF Qwen checkpoint and its tokenizer.

  python -m llm_sft.add_sid_tokens --hf_checkpoint=DIR [--tokenizer_dir=DIR] \
      --semantic_ids=INDEX.json [--codebook_size=K] --out=DIR

Writes to --out an HF checkpoint (safetensors + config.json) and tokenizer that
`transformers` loads: `<|sid_start|>`, `<|sid_end|>` and every code of every level of the
index (`llm_sft.sid_tokens`), each a single token; embedding and LM-head rows grown, new
rows from the mean and covariance of the existing ones, existing rows bit-identical.
"""

from __future__ import annotations

from pathlib import Path

from absl import flags

from eval import cli
from eval.data.formats import read_index
from eval.io import atomic_dir
from llm_sft.data import load_tokenizer
from llm_sft.params import load_hf, save_hf
from llm_sft.sid_tokens import STRUCTURAL, expand_vocabulary


def run(
    hf_checkpoint: str,
    semantic_ids: str,
    out: str,
    tokenizer_dir: str | None = None,
    codebook_size: int | None = None,
    noise: float = 1e-9,
    seed: int = 0,
) -> dict:
    """Expands the checkpoint's vocabulary (see module doc); returns a summary."""
    codes = read_index(semantic_ids)
    tokenizer = load_tokenizer(tokenizer_dir or hf_checkpoint)
    model, config = load_hf(hf_checkpoint)
    old_tokens, old_vocab = len(tokenizer), config.vocab_size
    model, ids = expand_vocabulary(model, tokenizer, codes, codebook_size, noise=noise, seed=seed)
    with atomic_dir(out) as tmp:
        save_hf(model, model.config, tmp)
        tokenizer.save_pretrained(str(tmp))
    return {
        "out": str(Path(out)),
        "tokens_added": len(tokenizer) - old_tokens,
        "structural": len(STRUCTURAL),
        "levels": codes.shape[1],
        "codebook_size": (len(ids) - len(STRUCTURAL)) // codes.shape[1],
        "tokenizer_size": [old_tokens, len(tokenizer)],
        "vocab_size": [old_vocab, model.config.vocab_size],
    }


def _define_flags() -> None:
    flags.DEFINE_string("hf_checkpoint", None, "HF Qwen2/Qwen3 checkpoint folder.", required=True)
    flags.DEFINE_string("tokenizer_dir", None, "Tokenizer folder (default: --hf_checkpoint).")
    flags.DEFINE_string(
        "semantic_ids", None, "Index json {item: ['<a_1>', ...]} (rqvae, LC-Rec).", required=True
    )
    flags.DEFINE_integer("codebook_size", None, "Codes per level (default: largest code + 1).")
    flags.DEFINE_float("noise", 1e-9, "Scale of the covariance of new rows' noise.")
    flags.DEFINE_integer("seed", 0, "Seed of the new rows' noise.")
    flags.DEFINE_string("out", None, "Output checkpoint + tokenizer folder.", required=True)


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    s = run(f.hf_checkpoint, f.semantic_ids, f.out, f.tokenizer_dir, f.codebook_size, f.noise,
            f.seed)  # fmt: skip
    print(
        f"added {s['tokens_added']} tokens ({s['structural']} structural + {s['levels']} x "
        f"{s['codebook_size']} codes): tokenizer {s['tokenizer_size'][0]} -> "
        f"{s['tokenizer_size'][1]}, vocab_size {s['vocab_size'][0]} -> {s['vocab_size'][1]}; "
        f"wrote {s['out']}"
    )


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
