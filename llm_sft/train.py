r"""Supervised fine-tuning of Qwen on BIGRec-style recommendation prompts (full or LoRA).

  python -m llm_sft.train --dataset=ml-100k --data_dir=DIR --hf_checkpoint=QWEN_DIR \
      --lora --lora_r=8 --mesh=data:1,fsdp:-1,tensor:1 --out=runs/sft
  python -m llm_sft.train --dataset=ml-100k --data_dir=DIR --init=random \
      --model_config=tiny.json --out=runs/tiny        # trains a BPE tokenizer too

``--out`` is an ``eval.training`` run folder: ``checkpoints/{latest,best}`` (orbax; a rerun
of the command resumes, a finished run is left alone), ``metrics.jsonl`` + TensorBoard,
then ``<out>/adapter`` (PEFT adapter, LoRA) or ``<out>/hf`` (HF checkpoint, full
fine-tuning) of the state with the lowest validation loss, each with the tokenizer, and
``<out>/result.json``. ``<out>/run.json`` records what ``python -m llm_sft.evaluate
--run=<out>`` needs: the flags (data set, base checkpoint, prompt settings, LoRA config)
and, in ``info``, the model config, tokenizer and export folder.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging
from flax import nnx

from eval import cli, data
from eval.allocator import reexec_with_tcmalloc
from eval.data.examples import ArraySource
from eval.distributed import barrier, is_primary, parse_mesh
from eval.errors import ConfigError, FlagError, MissingFileError
from eval.io import atomic_dir
from eval.training import RunDir, input_path
from eval.training.flags import (
    config_defaults,
    config_flag_values,
    define_training_flags,
    training_flag_values,
)
from eval.training.optim import SCHEDULES
from llm_sft import data as sft_data
from llm_sft.lora import LoRAConfig, LoRAParam, apply_lora, peft_files, write_peft
from llm_sft.model import ModelConfig, Qwen
from llm_sft.params import hf_tensors, load_hf, write_hf
from llm_sft.sharding import MESH_AXES, make_mesh
from llm_sft.trainer import TrainConfig, Trainer, init_model

RUN_OUTPUTS = ("tokenizer", "adapter", "hf")  # besides eval.training's, removed by --overwrite
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MAX_HISTORY = 10  # history items per prompt (BIGRec), see llm_sft.data.tokenize_examples


def parse_targets(flag: str) -> tuple[str, ...] | str:
    """``--lora_target_modules``: comma-separated names, or ``re:<regex>`` (PEFT rule)."""
    return flag[3:] if flag.startswith("re:") else tuple(filter(None, flag.split(",")))


def build_examples(
    ds: data.Dataset, split: data.Split, tokenizer, *, template: str, max_length: int,
    max_train_examples: int = -1, max_eval_examples: int = -1, seed: int = 0,
) -> tuple[sft_data.SFTExamples, sft_data.SFTExamples]:  # fmt: skip
    """Tokenized train prefixes and validation examples (optionally subsampled, seeded)."""
    noun = sft_data.item_noun(ds.name)
    rng = np.random.default_rng(seed)
    out = []
    for (histories, targets), limit in (
        (sft_data.train_histories(split.train, MAX_HISTORY), max_train_examples),
        ((split.valid.history, split.valid.targets), max_eval_examples),
    ):
        if 0 <= limit < len(targets):
            rows = np.sort(rng.choice(len(targets), limit, replace=False))
            histories, targets = histories.take(rows), targets[rows]
        out.append(
            sft_data.tokenize_examples(
                histories,
                targets,
                ds.items.titles,
                noun,
                tokenizer,
                template=template,
                max_length=max_length,
                max_history=MAX_HISTORY,
            )  # fmt: skip
        )
    return out[0], out[1]


def load_model(
    hf_checkpoint: str | None, model_config: str | None, dtype: Any, param_dtype: Any, seed: int,
    mesh: Any,
) -> tuple[Qwen, ModelConfig]:  # fmt: skip
    """The HF checkpoint's model, or a random init (`seed`) of the `model_config` file."""
    if hf_checkpoint:
        return load_hf(hf_checkpoint, dtype=dtype, param_dtype=param_dtype, mesh=mesh)
    config = ModelConfig.from_hf_config(model_config, dtype=dtype, param_dtype=param_dtype)
    return init_model(config, seed, mesh), config


def resolve_tokenizer(tokenizer_dir, hf_checkpoint, ds: data.Dataset, vocab_size: int, out: Path):
    """`--tokenizer_dir`'s, else the checkpoint's, else a BPE trained on the data set's
    titles (saved under `out/tokenizer` by the primary process; a resumed run reuses it)."""
    for folder in (tokenizer_dir, hf_checkpoint):
        if folder and (Path(folder) / "tokenizer_config.json").exists():
            return sft_data.load_tokenizer(folder)
    if tokenizer_dir:
        raise MissingFileError(f"--tokenizer_dir={tokenizer_dir}: no tokenizer_config.json")
    trained = out / "tokenizer"
    if is_primary() and not (trained / "tokenizer_config.json").exists():
        noun = sft_data.item_noun(ds.name)
        titles = ds.items.titles[1:]
        corpus = [sft_data.ALPACA_TEMPLATE, *sft_data.instruction_and_input(titles[:20], noun)]
        sft_data.train_bpe_tokenizer(corpus * 10 + list(titles), vocab_size, trained)
    barrier("llm_sft.tokenizer")
    return sft_data.load_tokenizer(trained)


def run(
    *,
    dataset: str,
    data_dir: str,
    out: str,
    train: TrainConfig,
    lora: LoRAConfig | None,
    hf_checkpoint: str | None = None,
    model_config: str | None = None,
    tokenizer_dir: str | None = None,
    mesh: str = "data:1,fsdp:-1,tensor:1",
    dtype: str = "float32",
    prompt_template: str = "alpaca",
    padding_side: str = "right",
    train_on_inputs: bool = False,
    max_length: int = 512,
    pack: bool = False,
    max_train_examples: int = -1,
    max_eval_examples: int = 512,
    fmt: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Loads data and model, fine-tunes, exports; returns the summary written to result.json.

    `out` is an `eval.training` run folder: a rerun resumes, a finished run returns its result.
    """
    if not hf_checkpoint and not model_config:
        raise ValueError("pass --hf_checkpoint=DIR or --init=random --model_config=FILE.json")
    config = {
        "dataset": dataset, "data_dir": input_path(data_dir), "format": fmt, "hf_checkpoint": input_path(hf_checkpoint),
        "model_config": input_path(model_config), "tokenizer_dir": input_path(tokenizer_dir), "dtype": dtype,
        "prompt_template": prompt_template, "padding_side": padding_side, "train_on_inputs": train_on_inputs,
        "max_length": max_length, "max_history": MAX_HISTORY, "pack": pack,
        "max_train_examples": max_train_examples, "max_eval_examples": max_eval_examples,
        "train": dataclasses.asdict(train), "lora": dataclasses.asdict(lora) if lora else None,
    }  # fmt: skip
    with RunDir(
        out, "llm_sft", config, info={"mesh": mesh}, overwrite=overwrite, outputs=RUN_OUTPUTS
    ) as rd:
        if rd.result is not None:
            logging.info("--out=%s is a finished run; its result.json is kept", rd.path)
            return rd.result
        device_mesh = make_mesh(**parse_mesh(mesh, MESH_AXES))
        compute = DTYPES[dtype]
        # LoRA keeps the frozen base in the compute dtype; full fine-tuning stores fp32 masters.
        param_dtype = compute if lora else jnp.float32
        model, model_cfg = load_model(
            hf_checkpoint, model_config, compute, param_dtype, train.seed, device_mesh
        )
        ds = data.load(dataset, data_dir, fmt=fmt)
        ds.require_text("BIGRec's title generation")
        split = data.split(ds)
        tokenizer = resolve_tokenizer(
            tokenizer_dir, hf_checkpoint, ds, model_cfg.vocab_size, rd.path
        )
        if len(tokenizer) > model_cfg.vocab_size:
            raise ConfigError(
                f"tokenizer has {len(tokenizer)} tokens > vocab_size={model_cfg.vocab_size} of "
                f"{hf_checkpoint or model_config}"
            )
        rd.info |= {
            "model_config": model_cfg.to_hf_dict(),
            "tokenizer": input_path(tokenizer.name_or_path),
            "export": None,
        }
        rd.write_run()
        train_ex, valid_ex = build_examples(
            ds, split, tokenizer, template=prompt_template, max_length=max_length,
            max_train_examples=max_train_examples, max_eval_examples=max_eval_examples, seed=train.seed,
        )  # fmt: skip
        if not len(train_ex):
            raise FlagError(
                f"--max_length={max_length}: no training example fits ({train_ex.dropped} "
                "dropped as too long even with one history item; raise --max_length)"
            )
        pad = tokenizer.pad_token_id
        if pack:
            train_arrays = sft_data.packed_arrays(train_ex, max_length, pad, train_on_inputs)
            padding_side = "right"
        else:
            train_arrays = sft_data.padded_arrays(
                train_ex, max_length, pad, padding_side, train_on_inputs
            )
        valid_arrays = sft_data.padded_arrays(
            valid_ex, max_length, pad, padding_side, train_on_inputs
        )
        if lora:
            model = apply_lora(
                model, lora, rngs=nnx.Rngs(params=train.seed, dropout=train.seed + 1)
            )
        trainer = Trainer(
            model, device_mesh, train, len(train_arrays["input_ids"]),
            nnx.Param if lora is None else LoRAParam,
        )  # fmt: skip
        info = trainer.fit(
            ArraySource(train_arrays), valid_arrays if len(valid_ex) else None,
            buckets=sft_data.buckets_for(max_length), padding_side=padding_side, run=rd, progress=progress,
        )  # fmt: skip
        final = trainer.model()
        export_dir = rd.path / ("adapter" if lora else "hf")
        # Every process gathers the weights (a collective); the primary writes them.
        files = (
            peft_files(final, lora, hf_checkpoint or "") if lora else hf_tensors(final, model_cfg)
        )
        if rd.primary:
            with atomic_dir(export_dir) as tmp:  # weights + tokenizer, renamed into place together
                if lora:
                    write_peft(*files, tmp)
                else:
                    write_hf(files, model_cfg, tmp)
                tokenizer.save_pretrained(str(tmp))
        rd.info["export"] = str(export_dir.resolve())
        rd.write_run()
        summary = {
            "steps": info.steps, "best_step": info.best_step, "stopped_early": info.stopped_early,
            "train_examples": len(train_ex), "train_rows": len(train_arrays["input_ids"]),
            "dropped_too_long": train_ex.dropped, "valid_examples": len(valid_ex),
            "eval_loss": info.valid.get("loss"), "export": str(export_dir), "devices": jax.device_count(),
        }  # fmt: skip
        rd.write_result(summary)
        return summary


def define_model_flags() -> None:
    """Where the model and tokenizer come from (`model_source` reads them back)."""
    flags.DEFINE_string("hf_checkpoint", None, "HF Qwen2/Qwen3 checkpoint folder to fine-tune.")
    flags.DEFINE_enum("init", "hf", ["hf", "random"], "Start from --hf_checkpoint or random init.")
    flags.DEFINE_string("model_config", None, "HF config.json for --init=random.")
    flags.DEFINE_string(
        "tokenizer_dir",
        None,
        "HF tokenizer folder (default: the checkpoint's, else a trained BPE).",
    )


def model_source() -> dict[str, str | None]:
    """{hf_checkpoint, model_config, tokenizer_dir} of the `define_model_flags` flags, the
    one `--init` does not use set to None."""
    f = flags.FLAGS
    if f.init == "random" and not f.model_config:
        raise FlagError("--init=random needs --model_config=FILE.json")
    if f.init == "hf" and not f.hf_checkpoint:
        raise FlagError("--init=hf needs --hf_checkpoint=DIR")
    return {
        "hf_checkpoint": f.hf_checkpoint if f.init == "hf" else None,
        "model_config": f.model_config if f.init == "random" else None,
        "tokenizer_dir": f.tokenizer_dir,
    }


def _define_flags() -> None:
    f = flags
    t = TrainConfig()
    define_training_flags(
        {"dataset": "ml-100k", **config_defaults(t)},
        skip=("batch_size",), required=("data_dir", "out"),
    )  # fmt: skip
    define_model_flags()
    f.DEFINE_integer("warmup_steps", t.warmup_steps, "Linear warmup steps.")
    f.DEFINE_float(
        "warmup_ratio", t.warmup_ratio, "Warmup as a fraction of the steps (if warmup_steps=0)."
    )
    f.DEFINE_float("weight_decay", t.weight_decay, "AdamW weight decay (matrices only).")
    f.DEFINE_float("max_grad_norm", t.max_grad_norm, "Global-norm gradient clipping (0: off).")
    f.DEFINE_integer(
        "per_device_train_batch_size",
        t.per_device_train_batch_size,
        "Rows per data-parallel device per micro-batch.",
    )
    f.DEFINE_integer(
        "gradient_accumulation_steps",
        t.gradient_accumulation_steps,
        "Micro-batches per optimizer step.",
    )
    f.DEFINE_enum("schedule", t.schedule, list(SCHEDULES), "LR decay after warmup.")
    f.DEFINE_enum("dtype", "float32", list(DTYPES), "Compute dtype (LoRA: also the frozen base).")
    f.DEFINE_enum("padding_side", "right", ["left", "right"], "Padding side of batches.")
    f.DEFINE_bool("train_on_inputs", False, "Also train on prompt tokens.")
    f.DEFINE_enum("prompt_template", "alpaca", list(sft_data.TEMPLATES), "Prompt format.")
    f.DEFINE_integer("max_length", 512, "Max tokens per example (oldest history dropped first).")
    f.DEFINE_bool("pack", False, "Pack several examples per row (segment ids).")
    f.DEFINE_bool(
        "group_by_length", t.group_by_length,
        "Draw each batch from one length bucket (fewer padding columns; --padding_side=right).",
    )  # fmt: skip
    f.DEFINE_integer("max_train_examples", -1, "Subsample the training prefixes (-1: all).")
    f.DEFINE_integer("max_eval_examples", 512, "Subsample the validation examples (-1: all).")
    f.DEFINE_bool("lora", True, "Train LoRA adapters (else full fine-tuning).")
    f.DEFINE_integer("lora_r", 8, "LoRA rank.")
    f.DEFINE_float("lora_alpha", 16.0, "LoRA alpha (scaling alpha / r).")
    f.DEFINE_float("lora_dropout", 0.05, "Dropout on the LoRA input.")
    f.DEFINE_string(
        "lora_target_modules",
        "q_proj,v_proj",
        "Names (q,k,v,o,gate,up,down or *_proj) or re:<regex>.",
    )
    f.DEFINE_string("mesh", "data:1,fsdp:-1,tensor:1", "Mesh sizes, e.g. data:2,fsdp:2,tensor:2.")
    f.DEFINE_integer("log_every", t.log_every, "Log the train loss every N steps.")


def main(argv):
    del argv
    f = flags.FLAGS
    if f.group_by_length and f.padding_side != "right":
        raise FlagError("--group_by_length needs --padding_side=right (rows cut to a bucket width)")
    source = model_source()
    shared = training_flag_values(skip=("batch_size",))
    train = TrainConfig(
        **config_flag_values(),
        **{k: getattr(f, k) for k in (
            "schedule", "warmup_steps", "warmup_ratio", "weight_decay", "max_grad_norm",
            "per_device_train_batch_size", "gradient_accumulation_steps", "log_every",
            "group_by_length",
        )},
    )  # fmt: skip
    lora = (
        LoRAConfig(f.lora_r, f.lora_alpha, f.lora_dropout, parse_targets(f.lora_target_modules))
        if f.lora
        else None
    )
    summary = run(
        dataset=shared["dataset"], data_dir=shared["data_dir"], out=shared["out"], train=train, lora=lora,
        **source, mesh=f.mesh, dtype=f.dtype,
        prompt_template=f.prompt_template, padding_side=f.padding_side,
        train_on_inputs=f.train_on_inputs, max_length=f.max_length, pack=f.pack,
        max_train_examples=f.max_train_examples, max_eval_examples=f.max_eval_examples,
        fmt=shared["format"], overwrite=shared["overwrite"],
    )  # fmt: skip
    print(" ".join(f"{k}={v}" for k, v in summary.items()))


if __name__ == "__main__":
    reexec_with_tcmalloc()
    _define_flags()
    cli.run(main)
