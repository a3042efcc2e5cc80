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

Then packing on semantic-ID training data (`llm_sft.sid_data`: a synthetic catalogue, or
`--sid_dataset --sid_data_dir --semantic_ids`): the padding share and the trained tokens/s of
full fine-tuning steps (`llm_sft.trainer.Trainer`, a small Qwen3) with one example per row
(trimmed to its length bucket, as the trainer does) and with first-fit-decreasing packing.
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

from eval import cli, data
from eval.allocator import active_allocator, reexec_with_tcmalloc
from eval.data.formats import RawData, build_dataset, read_item_codes
from llm_sft import data as sft_data
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


def sid_examples(dataset: str | None, data_dir: str | None, semantic_ids: str | None, n: int):
    """Tokenized multi-task SID examples (at most `n`) and the tokenizer."""
    from llm_sft.sid_data import SIDTasks, task_examples, tokenize_tasks
    from llm_sft.sid_tokens import add_tokens, sid_vocabulary

    rng = np.random.default_rng(0)
    if dataset:
        ds = data.load(dataset, data_dir)
        codes = read_item_codes(semantic_ids, ds)
    else:  # 2,000 users over 1,000 items with 3-level IDs, lengths 3..40
        users = [u for u in range(2000) for _ in range(rng.integers(3, 41))]
        raw = RawData([str(u) for u in users], [str(i) for i in rng.integers(1, 1001, len(users))])
        raw.item_meta = {
            str(i): {"title": f"product {i} " + "word " * int(rng.integers(1, 12))}
            for i in range(1, 1001)
        }
        ds = build_dataset("synthetic", raw)
        codes = rng.integers(0, 256, (ds.num_items + 1, 3))
    ex = task_examples(ds, data.split(ds), codes, SIDTasks(), "items").sample(n, 0)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = sft_data.train_bpe_tokenizer(ex.input + ex.response, 2000, tmp)
    add_tokens(tokenizer, sid_vocabulary(codes[1:]))
    return tokenize_tasks(ex, tokenizer, template="chat", max_length=256), tokenizer


def _pass_seconds(trainer, steps: list[dict], repeats: int) -> float:
    """Median seconds of one pass of train steps over `steps`, after a compiling pass."""

    def one_pass():
        for i, batch in enumerate(steps):
            loss = trainer.train_step(batch, i)["loss"]
        jax.block_until_ready(loss)

    one_pass()  # compiles each bucket width once
    return median_seconds(one_pass, repeats)


def bench_packing(
    ex, tokenizer, rows_per_step: int, repeats: int
) -> dict[str, tuple[float, float]]:
    """{layout: (padding share, trained tokens/s)} for padded and packed rows."""
    from llm_sft.model import ModelConfig
    from llm_sft.sharding import make_mesh
    from llm_sft.trainer import TrainConfig, Trainer, init_model

    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    config = ModelConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=32, tie_word_embeddings=True)  # fmt: skip
    pad, width = tokenizer.pad_token_id, 256
    layouts = {"one example per row": sft_data.padded_arrays(ex, width, pad),
               "packed (first-fit decreasing)": sft_data.packed_arrays(ex, width, pad)}  # fmt: skip
    out = {}
    for name, arrays in layouts.items():
        train = TrainConfig(per_device_train_batch_size=rows_per_step, max_steps=10**6)
        trainer = Trainer(init_model(config, 0, mesh), mesh, train, len(arrays["input_ids"]))
        steps = [sft_data.trim_to_bucket({k: v[i : i + rows_per_step] for k, v in arrays.items()},
                                         sft_data.buckets_for(width), "right")
                 for i in range(0, len(arrays["input_ids"]) - rows_per_step + 1, rows_per_step)]  # fmt: skip
        real = sum(int((b["attention_mask"] > 0).sum()) for b in steps)
        slots = sum(b["attention_mask"].size for b in steps)
        seconds = _pass_seconds(trainer, steps, repeats)
        out[name] = (1 - real / slots, real / seconds)
    return out


def _define_flags() -> None:
    flags.DEFINE_string("config", None, "HF config.json (default: Qwen2.5-0.5B's, built in).")
    flags.DEFINE_integer("num_layers", 4, "Override num_hidden_layers (0: keep the config's).")
    flags.DEFINE_integer("batch_size", 4, "Prompts per batch.")
    flags.DEFINE_integer("prompt_len", 64, "Padded prompt length.")
    flags.DEFINE_integer("new_tokens", 16, "Tokens generated per prompt (no early EOS).")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Params and compute dtype.")
    flags.DEFINE_integer("repeats", 3, "Timed repeats (the median is reported).")
    flags.DEFINE_string("sid_dataset", None, "Data set of the packing line (default: synthetic).")
    flags.DEFINE_string("sid_data_dir", None, "Its folder.")
    flags.DEFINE_string("semantic_ids", None, "Its index json.")
    flags.DEFINE_integer("sid_examples", 1000, "SID examples of the packing line.")


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
    ex, tokenizer = sid_examples(f.sid_dataset, f.sid_data_dir, f.semantic_ids, f.sid_examples)
    packing = bench_packing(ex, tokenizer, 16, f.repeats)
    print(
        f"\npacking: {len(ex)} SID examples ({f.sid_dataset or 'synthetic'}), rows of 256 tokens, "
        f"16 rows per step, Qwen3 hidden 128 x 2 layers, full fine-tuning; medians of {f.repeats}"
    )
    print("| layout | padding share | trained tokens/s |\n|---|---|---|")
    for name, (share, tps) in packing.items():
        print(f"| {name} | {share:.1%} | {tps:.4g} |")
    (_, a), (_, b) = packing.values()
    print(f"packed / one per row tokens/s: {b / a:.2f}x")


if __name__ == "__main__":
    reexec_with_tcmalloc()
    _define_flags()
    cli.run(main)
