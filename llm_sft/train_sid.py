r"""Train a Qwen model to speak semantic IDs: vocabulary expansion, then two stages.

  python -m llm_sft.train_sid --dataset=amazon-scientific-2018 --data_dir=DIR \
      --semantic_ids=DIR/indexes/rqvae_native.index.json --hf_checkpoint=QWEN_DIR --out=runs/sid
  python -m llm_sft.train_sid ... --init=random --model_config=config.json   # CPU-sized test

1. The index's tokens are added to the tokenizer and the model (`llm_sft.sid_tokens`).
2. Training examples are packed into rows of `--max_length` (first-fit decreasing;
   `--nopack`: one per row). Stage 1 trains only the new token rows (`llm_sft.rows`: embedding + untied head; the
   optimizer state is [n, D]) on the multi-task data (`llm_sft.sid_data`).
3. Stage 2 fine-tunes everything (`--stage2=full`) or LoRA adapters plus the new rows
   (`--stage2=lora`: LoRA alone would leave the new rows untrained).
4. The merged model and tokenizer are exported to `<out>/hf`; test metrics
   (`llm_sft.evaluate_sid`, also `python -m llm_sft.evaluate_sid --run=<out>`): per task,
   greedy first-code accuracy / exact match / invalid share, and for sequential
   recommendation item Recall / NDCG over the full item set from constrained beams.

`--recipe=sid-qwen3` holds the published settings (stage 1: 2,000 steps, lr 1e-3, batch 64;
stage 2: AdamW lr 2e-5, cosine to 0.2 x peak, 3% warm-up, weight decay 0.01, 3 epochs);
every one is a flag (`--stage1_*`, and the stage-2 training flags). `<out>` is a run
folder with one run folder per stage (`stage1/`, `stage2/`): rerunning the same command
resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from absl import flags, logging
from flax import nnx

from eval import cli, data
from eval.allocator import reexec_with_tcmalloc
from eval.data.examples import ArraySource
from eval.data.formats import read_item_codes
from eval.distributed import parse_mesh
from eval.errors import FlagError
from eval.io import atomic_dir
from eval.training import RunDir
from eval.training.flags import (
    config_flag_values,
    define_field_flags,
    define_training_flags,
    training_flag_values,
)
from llm_sft import data as sft_data
from llm_sft.data import SFTExamples
from llm_sft.evaluate_sid import evaluate, summary_line
from llm_sft.lora import LoRAConfig, LoRAParam, apply_lora, merge_lora
from llm_sft.model import Qwen
from llm_sft.params import hf_tensors, write_hf
from llm_sft.rows import RowParam, apply_rows, merge_rows
from llm_sft.sharding import MESH_AXES, make_mesh
from llm_sft.sid_data import (
    TASKS,
    SIDTasks,
    sequential_examples,
    task_examples,
    tokenize_tasks,
)
from llm_sft.sid_tokens import expand_vocabulary
from llm_sft.train import (
    define_model_flags,
    load_model,
    model_source,
    resolve_tokenizer,
)
from llm_sft.trainer import RANKING_SELECT, TrainConfig, Trainer, Validate, label_budget

RECIPES: dict[str, dict[str, TrainConfig]] = {
    "sid-qwen3": {
        "stage1": TrainConfig(learning_rate=1e-3, schedule="constant", max_steps=2000,
                              per_device_train_batch_size=64, max_grad_norm=1.0),
        "stage2": TrainConfig(learning_rate=2e-5, schedule="cosine", final_lr_ratio=0.2,
                              warmup_ratio=0.03, weight_decay=0.01, num_epochs=3,
                              per_device_train_batch_size=8),
    },
}  # fmt: skip
STAGE1_FLAGS = {"max_steps": "stage1_steps", "learning_rate": "stage1_learning_rate",
                "per_device_train_batch_size": "stage1_batch_size"}  # fmt: skip


def _fit_stage(name, model, trainable, trains: str, train: TrainConfig, arrays, valid, rd, mesh,
               max_length, overwrite, progress, select=("loss", "min")):  # fmt: skip
    """One stage, in its own run folder `<rd>/<name>` unless `rd` is None (`trains`: what
    it trains); returns (model, its summary). The LM head runs on the scored positions only
    (`max_label_tokens`: the most any training or validation row holds). `valid`, `select`:
    as `Trainer.fit`'s."""
    labels = [a["labels"] for a in (arrays, valid) if isinstance(a, dict)]
    train = dataclasses.replace(train, max_label_tokens=label_budget(*labels))
    config = {"train": dataclasses.asdict(train), "trains": trains}
    folder = RunDir(rd.path / name, "llm_sft.sid", config, overwrite=overwrite) if rd else None
    with folder or contextlib.nullcontext() as stage:
        trainer = Trainer(model, mesh, train, len(arrays["input_ids"]), trainable)
        info = trainer.fit(
            ArraySource(arrays), valid, buckets=sft_data.buckets_for(max_length), run=stage,
            progress=progress, select=select, desc=f"sid {name}",
        )  # fmt: skip
        summary = {
            "steps": info.steps,
            "best_step": info.best_step,
            f"valid_{select[0]}": info.valid.get(select[0]),
            "final_loss": float(np.mean(info.losses[-10:])) if info.losses else None,
            "curve": [[step, value] for step, value in info.curve],  # as result.json holds it
        }
        if stage:
            stage.write_result(summary)
    return trainer.model(), summary


def train_stages(
    model: Qwen, sid_ids: np.ndarray, arrays: dict[str, np.ndarray],
    valid: dict[str, np.ndarray] | None, *, stage1: TrainConfig, stage2: TrainConfig,
    lora_r: int, mesh, max_length: int, rd: RunDir | None = None, overwrite: bool = False,
    progress: bool = True, stage2_valid: Validate | None = None,
) -> tuple[Qwen, dict[str, dict]]:  # fmt: skip
    """Stage 1 (rows `sid_ids` only), then stage 2 (everything, or LoRA r=`lora_r` + the
    rows); returns the merged model and {"stage1", "stage2"} summaries. Both stages select
    on `valid`'s token loss, except that stage 2 selects on `stage2_valid`'s NDCG@10 where
    it is given (a recommender's ranking of validation examples)."""
    fit = dict(arrays=arrays, valid=valid, rd=rd, mesh=mesh, max_length=max_length,
               overwrite=overwrite, progress=progress)  # fmt: skip
    model, s1 = _fit_stage(
        "stage1", apply_rows(model, sid_ids), RowParam, "new token rows", stage1, **fit
    )
    model = merge_rows(model)
    trainable, trains = nnx.Param, "every parameter"
    if lora_r:
        lora = LoRAConfig(r=lora_r, alpha=2.0 * lora_r, target_modules=("q", "k", "v", "o"))
        model = apply_lora(apply_rows(model, sid_ids), lora, rngs=nnx.Rngs(stage2.seed))
        trainable, trains = nnx.Any(LoRAParam, RowParam), f"LoRA r={lora_r} + new token rows"
    if stage2_valid is not None:
        fit |= dict(valid=stage2_valid, select=RANKING_SELECT)
    model, s2 = _fit_stage("stage2", model, trainable, trains, stage2, **fit)
    if lora_r:
        model = merge_rows(merge_lora(model))
    return model, {"stage1": s1, "stage2": s2}


def training_arrays(
    ds: data.Dataset, split: data.Split, codes: np.ndarray, tokenizer, tasks: SIDTasks, *,
    template: str, max_length: int, pack: bool, seed: int,
) -> tuple[dict[str, np.ndarray], SFTExamples]:  # fmt: skip
    """The multi-task training rows (packed, or one example per row) and their examples."""
    noun = sft_data.item_noun(ds.name)
    ex = tokenize_tasks(
        task_examples(ds, split, codes, tasks, noun, seed), tokenizer, template=template,
        max_length=max_length,
    )  # fmt: skip
    if not len(ex):
        raise FlagError(f"--max_length={max_length}: no training example fits")
    layout = sft_data.packed_arrays if pack else sft_data.padded_arrays
    return layout(ex, max_length, tokenizer.pad_token_id), ex


def run(
    *, dataset: str, data_dir: str, semantic_ids: str, out: str, stage1: TrainConfig,
    stage2: TrainConfig, hf_checkpoint: str | None = None, model_config: str | None = None,
    tokenizer_dir: str | None = None, codebook_size: int | None = None, lora_r: int = 0,
    tasks: SIDTasks | None = None, template: str = "chat", max_length: int = 256,
    max_eval_examples: int = 512, num_beams: int = 20, eval_batch_size: int = 8, pack: bool = True,
    mesh: str = "data:1,fsdp:-1,tensor:1", fmt: str | None = None, overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """Both stages, the export and the test metrics (see module doc); returns result.json."""
    if not hf_checkpoint and not model_config:
        raise FlagError("pass --hf_checkpoint=DIR or --init=random --model_config=FILE.json")
    tasks = tasks or SIDTasks()
    paths = {k: str(Path(v).resolve()) if v else None for k, v in (
        ("data_dir", data_dir), ("semantic_ids", semantic_ids), ("hf_checkpoint", hf_checkpoint),
        ("model_config", model_config), ("tokenizer_dir", tokenizer_dir))}  # fmt: skip
    config = {
        "dataset": dataset, "format": fmt, **paths, "codebook_size": codebook_size, "lora_r": lora_r,
        "tasks": dataclasses.asdict(tasks) | {"weights": dict(tasks.weights)}, "template": template,
        "max_length": max_length, "max_eval_examples": max_eval_examples, "num_beams": num_beams, "pack": pack,
        "stage1": dataclasses.asdict(stage1), "stage2": dataclasses.asdict(stage2),
    }  # fmt: skip
    outputs = ("tokenizer", "stage1", "stage2", "hf")
    with RunDir(out, "llm_sft.sid", config, overwrite=overwrite, outputs=outputs) as rd:
        if rd.result is not None:
            logging.info("--out=%s is a finished run; its result.json is kept", rd.path)
            return rd.result
        device_mesh = make_mesh(**parse_mesh(mesh, MESH_AXES))
        ds = data.load(dataset, data_dir, fmt=fmt)
        ds.require_text("the semantic-ID LLM's text-to-ID tasks")
        split = data.split(ds)
        codes = read_item_codes(semantic_ids, ds, codebook_size)
        model, model_cfg = load_model(
            hf_checkpoint, model_config, jnp.float32, jnp.float32, stage2.seed, device_mesh
        )
        tokenizer = resolve_tokenizer(
            tokenizer_dir, hf_checkpoint, ds, model_cfg.vocab_size, rd.path
        )
        model, sid_ids = expand_vocabulary(
            model, tokenizer, codes[1:], codebook_size, seed=stage1.seed
        )
        arrays, train_ex = training_arrays(
            ds, split, codes, tokenizer, tasks, template=template, max_length=max_length,
            pack=pack, seed=stage2.seed,
        )  # fmt: skip
        valid = sequential_examples(
            ds, codes, split.valid.history, split.valid.targets, tasks, sft_data.item_noun(ds.name)
        ).sample(max_eval_examples, stage2.seed)
        valid_arrays = sft_data.padded_arrays(
            tokenize_tasks(valid, tokenizer, template=template, max_length=max_length), max_length,
            tokenizer.pad_token_id,
        )  # fmt: skip
        model, stages = train_stages(
            model, sid_ids, arrays, valid_arrays, stage1=stage1, stage2=stage2, lora_r=lora_r,
            mesh=device_mesh, max_length=max_length, rd=rd, overwrite=overwrite, progress=progress,
        )  # fmt: skip
        tensors = hf_tensors(model, model.config)  # every process gathers (a collective)
        if rd.primary:
            with atomic_dir(rd.path / "hf") as tmp:
                write_hf(tensors, model.config, tmp)
                tokenizer.save_pretrained(str(tmp))
        test = evaluate(
            model, tokenizer, ds, split, codes, tasks=tasks, template=template,
            max_examples=max_eval_examples, num_beams=num_beams, batch_size=eval_batch_size,
            seed=stage2.seed,
        )  # fmt: skip
        result = {
            "dataset": dataset, "semantic_ids": semantic_ids, "train_examples": len(train_ex),
            "dropped_too_long": train_ex.dropped, "sid_tokens": len(sid_ids), **stages,
            "test_examples": test.pop("examples"), **test, "export": str(rd.path / "hf"),
        }  # fmt: skip
        rd.write_result(result)
        return result


def parse_weights(spec: str) -> dict[str, float]:
    """`--task_weights=text_to_sid:1,sequential:2` -> {task: weight} (tasks not named: 0)."""
    weights = {}
    for part in filter(None, spec.split(",")):
        task, _, value = part.partition(":")
        try:
            weights[task] = float(value)
        except ValueError:
            raise FlagError(f"--task_weights={spec!r}: expected task:weight,...") from None
        if task not in TASKS or weights[task] < 0:
            raise FlagError(f"--task_weights={spec!r}: tasks are {TASKS}, weights >= 0")
    return weights


def _define_flags() -> None:
    f = flags
    define_training_flags({}, skip=("batch_size",), required=("dataset", "data_dir", "out"))
    define_field_flags(TrainConfig, skip=("max_label_tokens",))
    f.DEFINE_enum("recipe", "sid-qwen3", sorted(RECIPES), "Published settings of both stages.")
    f.DEFINE_integer("stage1_steps", None, "Stage-1 steps (recipe: 2,000).")
    f.DEFINE_float("stage1_learning_rate", None, "Stage-1 learning rate (recipe: 1e-3).")
    f.DEFINE_integer("stage1_batch_size", None, "Stage-1 rows per device per step (recipe: 64).")
    f.DEFINE_string("semantic_ids", None, "Index json {item: ['<a_1>', ...]}.", required=True)
    f.DEFINE_integer("codebook_size", None, "Codes per level (default: largest code + 1).")
    define_model_flags()
    f.DEFINE_enum("stage2", "full", ["full", "lora"], "Stage 2: every parameter, or LoRA + rows.")
    f.DEFINE_integer("lora_r", 8, "Stage-2 LoRA rank (q, k, v, o; alpha = 2 r).")
    f.DEFINE_string("task_weights", ",".join(f"{t}:1" for t in TASKS), "Task mixture.")
    f.DEFINE_bool("history_titles", False, "Show titles beside history IDs.")
    f.DEFINE_integer("max_length", 256, "Max tokens per example (longer ones are dropped).")
    f.DEFINE_bool("pack", True, "Pack training examples into rows (first-fit decreasing).")
    f.DEFINE_integer("max_eval_examples", 512, "Validation / test examples evaluated (-1: all).")
    f.DEFINE_integer("num_beams", 20, "Constrained beams for sequential recommendation.")
    f.DEFINE_string("mesh", "data:1,fsdp:-1,tensor:1", "Mesh sizes, e.g. data:2,fsdp:2,tensor:2.")


def main(argv):
    del argv
    f = flags.FLAGS
    source = model_source()
    shared = training_flag_values(skip=("batch_size",))
    recipe = RECIPES[f.recipe]
    fields = [x.name for x in dataclasses.fields(TrainConfig) if x.name != "max_label_tokens"]
    stage2 = {k: getattr(f, k) for k in fields if k in f and getattr(f, k) is not None}
    stage2 |= {k: v for k, v in config_flag_values().items() if v is not None}
    stage1 = {
        k: getattr(f, flag) for k, flag in STAGE1_FLAGS.items() if getattr(f, flag) is not None
    }
    result = run(
        dataset=shared["dataset"], data_dir=shared["data_dir"], semantic_ids=f.semantic_ids,
        out=shared["out"], stage1=dataclasses.replace(recipe["stage1"], seed=stage2.get("seed", 0), **stage1),
        stage2=dataclasses.replace(recipe["stage2"], **stage2),
        **source,
        codebook_size=f.codebook_size, lora_r=f.lora_r if f.stage2 == "lora" else 0,
        tasks=SIDTasks(weights=parse_weights(f.task_weights), history_titles=f.history_titles),
        max_length=f.max_length, max_eval_examples=f.max_eval_examples, num_beams=f.num_beams, pack=f.pack,
        mesh=f.mesh, fmt=shared["format"], overwrite=shared["overwrite"],
    )  # fmt: skip
    print(summary_line(result["dataset"], result))


if __name__ == "__main__":
    reexec_with_tcmalloc()
    _define_flags()
    cli.run(main)
