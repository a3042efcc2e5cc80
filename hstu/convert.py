"""Convert PyTorch HSTU / SASRec / RecGPT state dicts to the Flax NNX models and back.

Torch names are those of the generative-recommenders research HSTU and of
pmixer/SASRec.pytorch, and `tools.baselines.torch_recgpt` (see `tools/baselines/`). CLI:

    python -m hstu.convert --torch_state_dict=model.pt --preset=hstu-ml --out=/tmp/hstu_ckpt \
        [--num_blocks=.. --num_heads=.. --embedding_dim=.. --max_seq_len=.. --num_items=..] \
        [--check_inputs=inputs.npz --check_outputs=outputs.npy]

`--out` writes `config.json` and an orbax checkpoint of `nnx.state(model)` under `state/`.
`--check_inputs` (npz with `ids` [B,N] right-padded, `timestamps` [B,N], `lengths` [B]; RecGPT
also `users` [B]) runs
the converted model in eval mode and writes its per-position embeddings [B,N,D] to
`--check_outputs`.
"""

import dataclasses
import json
import os
from collections.abc import Iterator
from typing import Any

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import flags, logging
from flax import nnx

from eval import cli
from eval.errors import FlagError
from eval.io import atomic_path, atomic_write_json
from hstu.model import HSTUConfig
from hstu.models import MODELS, build_model, config_from_preset, model_kind, preset
from hstu.recgpt import RecGPTConfig
from hstu.sasrec import SASRecConfig

# (torch key, flax path, kind, chunk): kind is "copy", "linear" (transpose) or "conv"
# (Conv1d kernel 1 -> Linear); chunk i takes the i-th third of a fused q/k/v tensor.
Entry = tuple[str, tuple[Any, ...], str, int | None]


def _hstu_entries(cfg: HSTUConfig) -> Iterator[Entry]:
    if not cfg.l2_norm_output or cfg.positions != "start":
        raise ValueError(
            f"the reference HSTU has L2-normalised outputs and positions from the start, not "
            f"l2_norm_output={cfg.l2_norm_output}, positions={cfg.positions!r}"
        )
    yield "_embedding_module._item_emb.weight", ("item_emb", "embedding"), "copy", None
    yield "_input_features_preproc._pos_emb.weight", ("pos_emb", "embedding"), "copy", None
    for i in range(cfg.num_blocks):
        t, f = f"_hstu._attention_layers.{i}.", ("layers", i)
        yield t + "_uvqk", (*f, "uvqk"), "copy", None
        yield t + "_o.weight", (*f, "o", "kernel"), "linear", None
        yield t + "_o.bias", (*f, "o", "bias"), "copy", None
        yield t + "_rel_attn_bias._pos_w", (*f, "rel_attn_bias", "pos_w"), "copy", None
        yield t + "_rel_attn_bias._ts_w", (*f, "rel_attn_bias", "ts_w"), "copy", None


def _layer_norm_entries(t: str, f: tuple[Any, ...]) -> Iterator[Entry]:
    yield t + ".weight", (*f, "scale"), "copy", None
    yield t + ".bias", (*f, "bias"), "copy", None


def _linear_entries(t: str, f: tuple[Any, ...], kind: str = "linear") -> Iterator[Entry]:
    yield t + ".weight", (*f, "kernel"), kind, None
    yield t + ".bias", (*f, "bias"), "copy", None


def _sasrec_entries(cfg: SASRecConfig) -> Iterator[Entry]:
    if cfg.layer_type != "sasrec" or cfg.positions != "start":
        raise ValueError(
            f"the reference SASRec has paper blocks and positions from the start, not "
            f"layer_type={cfg.layer_type!r}, positions={cfg.positions!r}"
        )
    yield "item_emb.weight", ("item_emb", "embedding"), "copy", None
    yield "pos_emb.weight", ("pos_emb", "embedding"), "copy", None
    for i in range(cfg.num_blocks):
        f = ("blocks", i)
        yield from _layer_norm_entries(f"attention_layernorms.{i}", (*f, "attn_norm"))
        for chunk, name in enumerate(("query", "key", "value")):
            yield (
                f"attention_layers.{i}.in_proj_weight",
                (*f, "attn", name, "kernel"),
                "linear",
                chunk,
            )
            yield f"attention_layers.{i}.in_proj_bias", (*f, "attn", name, "bias"), "copy", chunk
        yield from _linear_entries(f"attention_layers.{i}.out_proj", (*f, "attn", "out"))
        yield from _layer_norm_entries(f"forward_layernorms.{i}", (*f, "ffn_norm"))
        yield from _linear_entries(f"forward_layers.{i}.conv1", (*f, "ffn1"), "conv")
        yield from _linear_entries(f"forward_layers.{i}.conv2", (*f, "ffn2"), "conv")
    yield from _layer_norm_entries("last_layernorm", ("last_norm",))


def _recgpt_entries(cfg: RecGPTConfig) -> Iterator[Entry]:
    yield "item_embeddings.weight", ("item_emb", "embedding"), "copy", None
    yield "position_embeddings.weight", ("pos_emb", "embedding"), "copy", None
    if cfg.user_buckets:
        yield "user_embeddings.weight", ("user_emb", "embedding"), "copy", None
    yield "segment_embeddings.weight", ("segment_emb", "embedding"), "copy", None
    for i in range(cfg.num_blocks):
        t, f = f"layers.{i}.", ("blocks", i)
        for name in ("query", "key", "value", "out"):
            yield from _linear_entries(t + f"attention.{name}_projection", (*f, name))
        yield from _layer_norm_entries(t + "norm1", (*f, "attn_norm"))
        yield from _linear_entries(t + "linear1", (*f, "ffn1"))
        yield from _linear_entries(t + "linear2", (*f, "ffn2"))
        yield from _layer_norm_entries(t + "norm2", (*f, "ffn_norm"))
    yield from _linear_entries("output_layer", ("head",))


def _entries(model: nnx.Module) -> list[Entry]:
    """The key table of a model's torch layout (one per registered model)."""
    layouts = {"hstu": _hstu_entries, "sasrec": _sasrec_entries, "recgpt": _recgpt_entries}
    return list(layouts[model_kind(model.cfg)](model.cfg))


def _to_flax(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "linear":
        return x.T
    if kind == "conv":
        return x[:, :, 0].T
    return x


def _to_torch(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "linear":
        return x.T
    if kind == "conv":
        return x.T[:, :, None]
    return x


def _get(tree: dict, path: tuple[Any, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[Any, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def torch_state_dict_to_flax(state_dict: dict[str, Any], model: nnx.Module) -> nnx.Module:
    """Loads a torch state dict (tensors or arrays) into `model` in place; returns it."""
    arrays = {
        k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v)
        for k, v in state_dict.items()
    }
    entries = _entries(model)
    missing = sorted({e[0] for e in entries} - set(arrays))
    if missing:
        raise KeyError(
            f"torch state dict lacks {len(missing)} keys for {type(model).__name__}: {missing[:8]}"
        )
    unused = sorted(set(arrays) - {e[0] for e in entries})
    if unused:
        logging.info("ignoring torch keys: %s", unused)
    state = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(state)
    for key, path, kind, chunk in entries:
        value = arrays[key]
        if chunk is not None:
            value = np.split(value, 3, axis=0)[chunk]
        value = _to_flax(value, kind)
        target = _get(pure, path)
        if value.shape != target.shape:
            raise ValueError(
                f"{key}: torch shape {arrays[key].shape} -> {value.shape} does not "
                f"match flax {'/'.join(map(str, path))} {target.shape}"
            )
        _set(pure, path, jnp.asarray(value, dtype=target.dtype))
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return model


def flax_to_torch_state_dict(model: nnx.Module) -> dict[str, Any]:
    """Returns the torch state dict (`torch.Tensor` values) of a Flax HSTU / SASRec."""
    import torch

    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    parts: dict[str, list] = {}
    for key, path, kind, chunk in _entries(model):
        value = _to_torch(np.asarray(_get(pure, path)), kind)
        parts.setdefault(key, [None, None, None] if chunk is not None else [None])
        parts[key][chunk or 0] = value
    return {k: torch.from_numpy(np.array(np.concatenate(v, axis=0))) for k, v in parts.items()}


def save_checkpoint(model: nnx.Module, out_dir: str) -> None:
    """Writes `config.json` and an orbax checkpoint of `nnx.state(model)` to `out_dir/state`."""
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    kind = model_kind(model.cfg)
    config = {"model": kind, **dataclasses.asdict(model.cfg)}
    atomic_write_json(os.path.join(out_dir, "config.json"), config, indent=2)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(out_dir, "state"), nnx.state(model))
    checkpointer.wait_until_finished()


def load_checkpoint(out_dir: str) -> nnx.Module:
    """Restores a model written by `save_checkpoint`."""
    out_dir = os.path.abspath(out_dir)
    with open(os.path.join(out_dir, "config.json")) as f:
        fields = json.load(f)
    cfg = MODELS[fields.pop("model")].config(**fields)
    graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: build_model(cfg)))
    state = ocp.StandardCheckpointer().restore(os.path.join(out_dir, "state"), abstract_state)
    return nnx.merge(graphdef, state)


# (item table, position table, a per-layer key with {} for the layer) of each torch layout.
_SIZE_KEYS = {
    "hstu": (
        "_embedding_module._item_emb.weight",
        "_input_features_preproc._pos_emb.weight",
        "_hstu._attention_layers.{}._uvqk",
    ),
    "sasrec": ("item_emb.weight", "pos_emb.weight", "attention_layers.{}.in_proj_weight"),
    "recgpt": ("item_embeddings.weight", "position_embeddings.weight", "layers.{}.norm1.weight"),
}


def _infer_sizes(kind: str, arrays: dict[str, Any], num_heads: int) -> dict[str, int]:
    """Architecture sizes readable from a torch state dict's shapes."""
    item, pos, layer = _SIZE_KEYS[kind]
    if item not in arrays or pos not in arrays or layer.format(0) not in arrays:
        return {}  # let torch_state_dict_to_flax report the missing keys
    sizes = {
        "num_items": arrays[item].shape[0] - 1,
        "embedding_dim": arrays[item].shape[1],
        "max_seq_len": arrays[pos].shape[0],
        "num_blocks": sum(layer.format(i) in arrays for i in range(len(arrays))),
    }
    if kind == "hstu":
        hdv = arrays["_hstu._attention_layers.0._o.weight"].shape[1]
        uvqk_cols = arrays[layer.format(0)].shape[1]
        sizes.update(
            linear_dim=hdv // num_heads, attention_dim=(uvqk_cols - 2 * hdv) // (2 * num_heads)
        )
    if kind == "recgpt":
        sizes["ffn_dim"] = arrays["layers.0.linear1.weight"].shape[0]
        users = arrays.get("user_embeddings.weight")
        sizes["user_buckets"] = 0 if users is None else users.shape[0]
    return {k: int(v) for k, v in sizes.items()}


_SIZE_FLAGS = ("num_blocks", "num_heads", "embedding_dim", "max_seq_len", "num_items")


def run(
    torch_state_dict: str,
    preset_name: str,
    out: str | None = None,
    check_inputs: str | None = None,
    check_outputs: str | None = None,
    **overrides: int | None,
) -> nnx.Module:
    """Convert a reference PyTorch state dict; optionally save it and run check inputs."""
    import torch

    if bool(check_inputs) != bool(check_outputs):
        raise FlagError("--check_inputs and --check_outputs go together")
    try:
        spec = preset(preset_name)
    except ValueError as e:
        raise FlagError(str(e)) from None
    state_dict = torch.load(torch_state_dict, map_location="cpu", weights_only=True)
    state_dict = state_dict.get("model_state_dict", state_dict)
    kind = spec["model"]
    num_heads = overrides.get("num_heads") or spec["arch"]["num_heads"]
    # Shapes in the state dict win over the preset; explicit overrides win over both.
    sizes = _infer_sizes(kind, state_dict, num_heads)
    sizes.update({k: v for k, v in overrides.items() if v is not None})
    _, cfg = config_from_preset(preset_name, **sizes)
    model = torch_state_dict_to_flax(state_dict, nnx.eval_shape(lambda: build_model(cfg)))
    logging.info("converted %s (%s)", torch_state_dict, cfg)
    if out:
        save_checkpoint(model, out)
        logging.info("wrote %s", out)
    if check_inputs:
        arrays = np.load(check_inputs)
        outputs = model(
            jnp.asarray(arrays["ids"]),
            jnp.asarray(arrays["timestamps"]),
            jnp.asarray(arrays["lengths"]),
            deterministic=True,
            users=jnp.asarray(arrays["users"]) if "users" in arrays else None,
        )
        with atomic_path(check_outputs.removesuffix(".npy") + ".npy") as tmp:
            np.save(tmp, np.asarray(outputs))
        logging.info("wrote %s %s", check_outputs, outputs.shape)
    return model


def _define_flags() -> None:
    flags.DEFINE_string(
        "torch_state_dict", None, "Torch state dict (.pt) to convert.", required=True
    )
    flags.DEFINE_string(
        "preset", None, "Architecture preset (see hstu.models.PRESETS).", required=True
    )
    flags.DEFINE_integer("num_blocks", None, "Override the preset's number of blocks.")
    flags.DEFINE_integer("num_heads", None, "Override the preset's number of heads.")
    flags.DEFINE_integer("embedding_dim", None, "Override the preset's embedding dim.")
    flags.DEFINE_integer(
        "max_seq_len", None, "Override max_seq_len (default: from the state dict)."
    )
    flags.DEFINE_integer("num_items", None, "Override num_items (default: from the state dict).")
    flags.DEFINE_string("out", None, "Output directory for config.json + orbax checkpoint.")
    flags.DEFINE_string("check_inputs", None, "npz with ids / timestamps / lengths to run.")
    flags.DEFINE_string("check_outputs", None, "Where to write the [B,N,D] outputs (.npy).")


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    run(
        f.torch_state_dict,
        f.preset,
        f.out,
        f.check_inputs,
        f.check_outputs,
        **{k: getattr(f, k) for k in _SIZE_FLAGS},
    )


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
