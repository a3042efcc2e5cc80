"""Checks llm_sft.model.Qwen against HF transformers on one HF checkpoint folder.

  python -m tools.compare_torch --hf_checkpoint=DIR [--dtype=float32] [--prompt=TEXT] \
      [--tolerance=1e-4] [--max_new_tokens=32]

Runs the same left-padded batch (three prefixes of --prompt through the folder's tokenizer,
or random ids if it has none) through both frameworks and prints, as its last line,
``max_abs_logit_diff=<float> greedy_match=<k>/<n>``: the largest logit difference over
non-pad positions and the number of greedy tokens (out of batch * max_new_tokens) that
agree before each row's first disagreement. Exits 1 when the diff exceeds --tolerance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from absl import flags

from eval import cli
from eval.errors import FlagError

DEFAULT_PROMPT = "The quick brown fox jumps over the lazy dog because"


def _batch(ckpt: Path, prompt: str, vocab_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Left-padded (input_ids, attention_mask, pad_id) of three prompt prefixes."""
    prompts = [prompt, prompt[: len(prompt) // 2], prompt[: max(len(prompt) // 4, 1)]]
    if (ckpt / "tokenizer_config.json").exists() or (ckpt / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(ckpt, padding_side="left")
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        enc = tok(prompts, padding=True, return_tensors="np")
        return enc["input_ids"], enc["attention_mask"], tok.pad_token_id
    rng = np.random.default_rng(0)
    lengths = [12, 7, 3]
    mask = np.arange(max(lengths))[None, :] >= max(lengths) - np.array(lengths)[:, None]
    ids = np.where(mask, rng.integers(1, vocab_size, mask.shape), 0)
    return ids.astype(np.int64), mask.astype(np.int64), 0


def compare(
    ckpt: str | Path,
    dtype: str = "float32",
    prompt: str = DEFAULT_PROMPT,
    max_new_tokens: int = 32,
) -> tuple[float, int, int]:
    """Returns (max |logit diff| at non-pad positions, matching greedy tokens, total)."""
    import jax.numpy as jnp
    import torch
    from transformers import AutoModelForCausalLM

    from llm_sft.generate import greedy_generate
    from llm_sft.params import load_hf

    ckpt = Path(ckpt)
    model, config = load_hf(ckpt, dtype=jnp.dtype(dtype))
    hf = AutoModelForCausalLM.from_pretrained(
        ckpt, dtype=getattr(torch, dtype), attn_implementation="eager"
    ).eval()
    ids, mask, pad_id = _batch(ckpt, prompt, config.vocab_size)
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        ref = (
            hf(
                input_ids=torch.from_numpy(ids),
                attention_mask=torch.from_numpy(mask),
                position_ids=torch.from_numpy(positions),
            )
            .logits.float()
            .numpy()
        )
    logits, _ = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    diff = np.abs(np.asarray(logits, np.float32) - ref)[mask > 0]
    max_diff = float(diff.max())

    eos = hf.generation_config.eos_token_id
    with torch.no_grad():
        hf_tokens = hf.generate(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=pad_id,
            repetition_penalty=1.0,
            temperature=None,
            top_k=None,
            top_p=None,
        ).numpy()[:, ids.shape[1] :]
    hf_tokens = np.pad(
        hf_tokens, ((0, 0), (0, max_new_tokens - hf_tokens.shape[1])), constant_values=pad_id
    )
    ours = np.asarray(greedy_generate(model, ids, mask, max_new_tokens, eos, pad_id))
    agree = np.cumprod(ours == hf_tokens, axis=1).sum()
    return max_diff, int(agree), hf_tokens.size


def _define_flags() -> None:
    flags.DEFINE_string("hf_checkpoint", None, "HF checkpoint folder.", required=True)
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Params and compute dtype.")
    flags.DEFINE_string(
        "prompt", DEFAULT_PROMPT,
        "Prompt; the batch holds it and two shorter prefixes.",
    )  # fmt: skip
    flags.DEFINE_float("tolerance", 1e-4, "Maximum allowed |logit diff|.")
    flags.DEFINE_integer("max_new_tokens", 32, "Greedy tokens to compare.")


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise FlagError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    max_diff, agree, total = compare(f.hf_checkpoint, f.dtype, f.prompt, f.max_new_tokens)
    print(f"max_abs_logit_diff={max_diff:.6g} greedy_match={agree}/{total}")
    return 0 if max_diff <= f.tolerance else 1


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
