r"""Qwen throughput: `llm_sft` (JAX) vs HF transformers (PyTorch), same weights and batch.

  python -m tools.bench_llm [--config=PATH/config.json] [--num_layers=N] [--batch_size=4] \
      [--prompt_len=64] [--new_tokens=16] [--dtype=float32]

Writes a random-init checkpoint of the config with `transformers` (`save_pretrained`),
loads it in both frameworks and times, as medians of repeats: forward tokens/s (a
left-padded batch), greedy decode tokens/s (new tokens over the KV cache), 4-beam search
seconds per call, and one LoRA (r 8, q/v) train step in seconds (PEFT on the PyTorch
side, AdamW on the adapters; each side's own causal-LM loss: `token_loss_sums` of the
`llm_sft` trainer, HF's `labels=` loss). Default config: Qwen2.5-0.5B's shape with 4 layers (the
full 24 with --num_layers=0). Prints the table with the devices named.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from flax import nnx

from eval import cli
from eval.allocator import active_allocator, reexec_with_tcmalloc
from llm_sft.data import IGNORE
from llm_sft.generate import generate
from llm_sft.lora import LoRAConfig, LoRAParam, apply_lora
from llm_sft.params import load_hf
from llm_sft.trainer import token_loss_sums
from tools.timing import cpu_threads, median_seconds

# Qwen2.5-0.5B(-Instruct)'s config.json, so the benchmark runs without ../shared.
QWEN25_05B = dict(
    architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=151936, hidden_size=896,
    intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
    max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
    hidden_act="silu", bos_token_id=151643, eos_token_id=151645, torch_dtype="bfloat16",
)  # fmt: skip


def write_checkpoint(config: dict, out: Path, dtype: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    hf_config = AutoConfig.for_model(**config)
    AutoModelForCausalLM.from_config(hf_config, dtype=getattr(torch, dtype)).save_pretrained(out)


def batch(vocab: int, b: int, t: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded ids/mask: row i has t - 4 i real tokens."""
    lengths = np.maximum(t - 4 * np.arange(b), 1)
    mask = (np.arange(t)[None] >= t - lengths[:, None]).astype(np.int64)
    ids = np.where(mask, np.random.default_rng(0).integers(1, vocab, (b, t)), 0)
    return ids, mask


def bench_jax(ckpt: Path, ids, mask, new_tokens: int, dtype: str, repeats: int) -> dict[str, float]:
    model, cfg = load_hf(ckpt, dtype=jnp.dtype(dtype))
    ids_j, mask_j = jnp.asarray(ids), jnp.asarray(mask)
    forward = nnx.jit(lambda m, i, a: m(i, attention_mask=a)[0])
    run = lambda f: lambda: jax.block_until_ready(f())  # noqa: E731
    fwd = run(lambda: forward(model, ids_j, mask_j))
    greedy = run(lambda: generate(model, ids_j, mask_j, max_new_tokens=new_tokens).sequences)
    beam = run(lambda: generate(model, ids_j, mask_j, max_new_tokens=new_tokens, method="beam", num_beams=4,
                                ).sequences)  # fmt: skip

    apply_lora(
        model, LoRAConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj")), rngs=nnx.Rngs(1)
    )
    optimizer = nnx.Optimizer(model, optax.adamw(1e-4), wrt=LoRAParam)

    labels = jnp.where(mask_j > 0, ids_j, IGNORE)

    @nnx.jit
    def lora_step(model, optimizer, ids, mask):
        def loss_fn(model):  # the trainer's loss: mean next-token cross-entropy on real tokens
            logits, _ = model(ids, attention_mask=mask)
            total, count = token_loss_sums(logits, labels)
            return total / count

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, LoRAParam))(model)
        optimizer.update(model, grads)
        return loss

    train = run(lambda: lora_step(model, optimizer, ids_j, mask_j))
    out = {}
    for name, fn in (("forward", fwd), ("greedy", greedy), ("beam", beam), ("lora", train)):
        fn()  # compile
        out[name] = median_seconds(fn, repeats)
    return out


def bench_torch(
    ckpt: Path, ids, mask, new_tokens: int, dtype: str, repeats: int
) -> dict[str, float]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(cpu_threads())
    hf = AutoModelForCausalLM.from_pretrained(
        ckpt, dtype=getattr(torch, dtype), attn_implementation="sdpa"
    ).eval()
    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
    gen = dict(attention_mask=mask_t, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
               eos_token_id=None, do_sample=False, temperature=None, top_k=None, top_p=None)  # fmt: skip

    def fwd():
        with torch.no_grad():
            hf(input_ids=ids_t, attention_mask=mask_t)

    def greedy():
        with torch.no_grad():
            hf.generate(ids_t, **gen)

    def beam():
        with torch.no_grad():
            hf.generate(ids_t, num_beams=4, **gen)

    peft_model = get_peft_model(
        hf, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    )
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)

    labels = ids_t.masked_fill(mask_t == 0, -100)

    def lora():
        peft_model.train()
        loss = peft_model(
            input_ids=ids_t, attention_mask=mask_t, labels=labels
        ).loss  # HF's causal-LM loss
        opt.zero_grad()
        loss.backward()
        opt.step()

    out = {}
    for name, fn in (("forward", fwd), ("greedy", greedy), ("beam", beam), ("lora", lora)):
        fn()  # warm-up
        out[name] = median_seconds(fn, repeats)
    return out


def _define_flags() -> None:
    flags.DEFINE_string("config", None, "HF config.json (default: Qwen2.5-0.5B's, built in).")
    flags.DEFINE_integer("num_layers", 4, "Override num_hidden_layers (0: keep the config's).")
    flags.DEFINE_integer("batch_size", 4, "Prompts per batch.")
    flags.DEFINE_integer("prompt_len", 64, "Padded prompt length.")
    flags.DEFINE_integer("new_tokens", 16, "Tokens generated per prompt (no early EOS).")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Params and compute dtype.")
    flags.DEFINE_integer("repeats", 3, "Timed repeats (the median is reported).")


def main(argv):
    del argv
    f = flags.FLAGS
    import torch

    config = json.loads(Path(f.config).read_text()) if f.config else dict(QWEN25_05B)
    if f.num_layers:
        config["num_hidden_layers"] = f.num_layers
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp)
        write_checkpoint(config, ckpt, f.dtype)
        ids, mask = batch(config["vocab_size"], f.batch_size, f.prompt_len)
        j = bench_jax(ckpt, ids, mask, f.new_tokens, f.dtype, f.repeats)
        t = bench_torch(ckpt, ids, mask, f.new_tokens, f.dtype, f.repeats)
    b, n = f.batch_size, f.new_tokens
    print(f"device: JAX {jax.devices()[0].device_kind} ({jax.default_backend()}), PyTorch {torch.__version__} CPU, "
          f"{cpu_threads()} threads, allocator {active_allocator()}; {config['model_type']} hidden {config['hidden_size']} x "
          f"{config['num_hidden_layers']} layers, vocab {config['vocab_size']}, {f.dtype}; batch {b} x {f.prompt_len} "
          f"(left-padded), {n} new tokens; medians of {f.repeats}")  # fmt: skip
    rows = [
        ("forward tokens/s", int(mask.sum()) / j["forward"], int(mask.sum()) / t["forward"], True),
        ("greedy decode tokens/s", b * n / j["greedy"], b * n / t["greedy"], True),
        ("4-beam search s/call", j["beam"], t["beam"], False),
        ("LoRA train step s", j["lora"], t["lora"], False),
    ]
    print("| measure | JAX | PyTorch | JAX speed-up |\n|---|---|---|---|")
    for name, jv, tv, higher_is_better in rows:
        speedup = jv / tv if higher_is_better else tv / jv
        print(f"| {name} | {jv:.3g} | {tv:.3g} | {speedup:.2f}x |")


if __name__ == "__main__":
    reexec_with_tcmalloc()
    _define_flags()
    cli.run(main)
