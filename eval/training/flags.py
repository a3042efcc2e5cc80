"""The flags every training entrypoint shares, defined once with one meaning.

    define_training_flags({"learning_rate": 1e-3, ...})   # in an entrypoint's _define_flags()
    values = training_flag_values()                          # in its main()

Defaults policy: an entrypoint passes its model's defaults (the value shown by --help);
`None` means "the preset's value" where the entrypoint has presets. `--max_steps` (when
set) overrides `--num_epochs` (the HF Trainer meaning); `--eval_every` counts steps and
defaults to once per epoch; `--patience` counts evaluations and defaults to never.
`total_steps` and `eval_every_steps` turn them into the loop's numbers.

`RANGES` is the allowed range of every numeric flag, by name, in every entrypoint
(`eval.cli.run` registers the checks: `--batch_size=0` fails at start-up, naming the flag).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from absl import flags

from eval.data.registry import FORMATS


@dataclasses.dataclass(frozen=True)
class Range:
    """Allowed values of a numeric flag; unset (None) is always allowed."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself excluded
    high_open: bool = False
    all_value: int | None = None  # one more allowed value meaning "all" (e.g. -1)

    def allows(self, value: float | None) -> bool:
        if value is None or value == self.all_value:
            return True
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        text = " and ".join(parts)
        return f"{self.all_value} (all) or {text}" if self.all_value is not None else text


_COUNT, _POSITIVE, _NON_NEGATIVE = Range(1), Range(0, low_open=True), Range(0)
_FRACTION = Range(0, 1, high_open=True)
RANGES: dict[str, Range] = {
    **dict.fromkeys(
        (
            "batch_size", "eval_batch_size", "per_device_train_batch_size",
            "gradient_accumulation_steps", "num_epochs", "max_steps", "eval_every", "patience",
            "log_every", "seeds", "max_seq_len", "max_length", "max_items", "max_targets",
            "max_valid", "num_negatives", "embedding_dim", "num_blocks", "num_heads",
            "attention_dim", "linear_dim", "ffn_multiplier", "softmax_chunk", "window_stride",
            "num_buckets", "num_items", "codebook_size", "num_levels", "code_dim", "d_model",
            "d_ff", "head_dim", "num_layers", "num_user_buckets", "beam_size", "num_beams",
            "lora_r", "max_eval_examples", "k_core", "ffn_dim", "prompt_max_steps",
        ),
        _COUNT,
    ),
    **dict.fromkeys(("learning_rate", "temperature", "lora_alpha"), _POSITIVE),
    **dict.fromkeys(
        ("weight_decay", "warmup_steps", "max_grad_norm", "beta", "gamma", "noise", "user_buckets",
         "stochastic_length_alpha"),
        _NON_NEGATIVE,
    ),
    **dict.fromkeys(
        ("dropout_rate", "dropout", "lora_dropout", "item_dropout", "b1", "b2"), _FRACTION
    ),
    **dict.fromkeys(("gbce_t", "warmup_ratio", "final_lr_ratio"), Range(0, 1)),
    **dict.fromkeys(
        ("max_train_examples", "max_examples", "max_valid_examples"), Range(1, all_value=-1)
    ),
}  # fmt: skip


def validate_ranges(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Registers the `RANGES` check of every defined flag named there (checked when absl
    parses: `flag --batch_size=0: must be >= 1`)."""
    for name, allowed in RANGES.items():
        if name in flag_values:
            flags.register_validator(
                name, allowed.allows, f"must be {allowed.describe()}", flag_values=flag_values
            )


_FLAGS: dict[str, tuple[Callable, str]] = {
    "dataset": (flags.DEFINE_string, "Registered data set name, or any name with --format."),
    "data_dir": (flags.DEFINE_string, "Folder with the data set's raw files."),
    "out": (
        flags.DEFINE_string,
        "Run folder (run.json, metrics.jsonl, checkpoints/{latest,best}, result.json); "
        "rerunning the same command resumes from the last checkpoint.",
    ),
    "overwrite": (flags.DEFINE_bool, "Start over in an existing --out (deletes its run)."),
    "learning_rate": (flags.DEFINE_float, "Peak learning rate."),
    "num_epochs": (flags.DEFINE_integer, "Epochs (an upper bound under early stopping)."),
    "max_steps": (flags.DEFINE_integer, "Optimizer steps; when set, overrides --num_epochs."),
    "eval_every": (
        flags.DEFINE_integer,
        "Validate and checkpoint every this many steps (default: once per epoch).",
    ),
    "patience": (
        flags.DEFINE_integer,
        "Stop after this many validations without improvement (default: never).",
    ),
    "batch_size": (flags.DEFINE_integer, "Training examples per optimizer step."),
    "seed": (flags.DEFINE_integer, "Seed of initialisation, data order, dropout and sampling."),
}
NAMES = tuple(_FLAGS)
# The shared flags that are also fields (same names) of every trainer's config.
CONFIG_FIELDS = (
    "learning_rate",
    "num_epochs",
    "max_steps",
    "eval_every",
    "patience",
    "batch_size",
    "seed",
)


def config_defaults(config: Any) -> dict[str, Any]:
    """{name: value} of the `CONFIG_FIELDS` a config (dataclass) has: its flag defaults."""
    return {k: getattr(config, k) for k in CONFIG_FIELDS if hasattr(config, k)}


def define_training_flags(
    defaults: Mapping[str, Any], *, skip: Iterable[str] = (), required: Iterable[str] = ()
) -> None:
    """Defines every shared flag except `skip`, with `defaults` (missing: None)."""
    skip, required = set(skip), set(required)
    for name, (define, help_) in _FLAGS.items():
        if name in skip:
            continue
        default = defaults.get(name, False if define is flags.DEFINE_bool else None)
        define(name, default, help_, required=name in required and default is None)
    if "dataset" not in skip:
        flags.DEFINE_enum("format", None, sorted(FORMATS), "Parser of an unregistered data set.")


def training_flag_values(skip: Iterable[str] = ()) -> dict[str, Any]:
    """{name: value} of the shared flags (after absl parsed them), `format` included."""
    f = flags.FLAGS
    names = [n for n in (*NAMES, "format") if n not in set(skip) and n in f]
    return {n: getattr(f, n) for n in names}


def config_flag_values() -> dict[str, Any]:
    """{name: value} of the defined `CONFIG_FIELDS` flags, to build a trainer's config."""
    return {n: getattr(flags.FLAGS, n) for n in CONFIG_FIELDS if n in flags.FLAGS}


def total_steps(steps_per_epoch: int, num_epochs: int, max_steps: int | None) -> int:
    """`max_steps` when set, else `num_epochs` epochs."""
    return max_steps if max_steps is not None else num_epochs * steps_per_epoch


def eval_every_steps(eval_every: int | None, steps_per_epoch: int) -> int:
    """`eval_every` when set, else once per epoch."""
    return eval_every if eval_every is not None else steps_per_epoch


def _field_flag(name: str, hint: Any, help_: str) -> None:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]  # Optional[X]
    if typing.get_origin(hint) is typing.Literal:
        flags.DEFINE_enum(name, None, [str(a) for a in typing.get_args(hint)], help_)
    elif hint is bool:
        flags.DEFINE_bool(name, None, help_)
    elif hint is int:
        flags.DEFINE_integer(name, None, help_)
    elif hint is float:
        flags.DEFINE_float(name, None, help_)
    elif hint is str:
        flags.DEFINE_string(name, None, help_)
    else:
        raise TypeError(f"--{name}: no flag type for a config field of type {hint}")


def define_field_flags(*configs: type, skip: Iterable[str] = ()) -> list[str]:
    """One override flag per field of the config dataclasses (default None: keep the
    preset's value), typed from the field's annotation (Literal -> enum); the shared
    `CONFIG_FIELDS` and `skip` excepted. Returns the names defined."""
    skip = set(skip) | set(CONFIG_FIELDS)
    owners: dict[str, list[str]] = {}
    hints: dict[str, Any] = {}
    for config in configs:
        types_ = typing.get_type_hints(config)
        for field in dataclasses.fields(config):
            if field.name not in skip:
                owners.setdefault(field.name, []).append(config.__name__)
                hints.setdefault(field.name, types_[field.name])
    for name, classes in owners.items():
        _field_flag(name, hints[name], f"Override the preset's {name} ({', '.join(classes)}).")
    return list(owners)
