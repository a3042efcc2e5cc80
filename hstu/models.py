"""The model registry of `hstu`: model kinds, their configs and every published preset.

A preset names its model (`--preset` implies `--model`): `config_from_preset` builds the
config of that model with overrides, `build_model` the module. Adding a model to this
package is one `MODELS` line plus its `PRESETS` beside its class.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

from flax import nnx

from eval.errors import FlagError
from hstu import model as hstu_model
from hstu import recgpt, sasrec
from hstu.losses import next_item_loss


class ModelSpec(NamedTuple):
    module: type[nnx.Module]
    config: type
    loss: Callable = next_item_loss  # (model, batch, rng) -> (loss, aux)


MODELS: dict[str, ModelSpec] = {
    "hstu": ModelSpec(hstu_model.HSTU, hstu_model.HSTUConfig),
    "sasrec": ModelSpec(sasrec.SASRec, sasrec.SASRecConfig),
    "recgpt": ModelSpec(recgpt.RecGPT, recgpt.RecGPTConfig, recgpt.loss),
}
PRESETS: dict[str, dict[str, Any]] = {**hstu_model.PRESETS, **sasrec.PRESETS, **recgpt.PRESETS}


def preset(name: str) -> dict[str, Any]:
    """The preset `name`: {"model": kind, "arch": config fields, "train": TrainConfig fields}."""
    if name not in PRESETS:
        raise FlagError(f"--preset={name!r}: unknown; known: {sorted(PRESETS)}")
    return PRESETS[name]


def config_fields(kind: str) -> set[str]:
    """Names of the config fields of model `kind` (num_items included)."""
    return {f.name for f in dataclasses.fields(MODELS[kind].config)}


def config_from_preset(name: str, **overrides: Any) -> tuple[str, Any]:
    """(model kind, config) of preset `name` with the non-None `overrides` applied."""
    spec = preset(name)
    kind = spec["model"]
    fields = {**spec["arch"], **{k: v for k, v in overrides.items() if v is not None}}
    unknown = set(fields) - config_fields(kind)
    if unknown:
        raise FlagError(f"--preset={name} ({kind}) has no setting {sorted(unknown)}")
    return kind, MODELS[kind].config(**fields)


def model_kind(cfg: Any) -> str:
    """The registry name of a config's model."""
    for kind, spec in MODELS.items():
        if isinstance(cfg, spec.config):
            return kind
    raise TypeError(f"no registered model takes a {type(cfg).__name__}")


def build_model(cfg: Any, seed: int = 0) -> nnx.Module:
    """The model of config `cfg`, initialised from `seed`."""
    return MODELS[model_kind(cfg)].module(cfg, rngs=nnx.Rngs(seed))
