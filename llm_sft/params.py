"""HF safetensors checkpoints <-> ``llm_sft.model.Qwen`` parameters.

One explicit key table (``hf_key_table``) maps every HF tensor name to its NNX state path
and says whether it is a transposed Linear weight (HF stores [out, in], Flax [in, out]).
Loading builds the model abstractly (``nnx.eval_shape``) and fills each parameter straight
from the memory-mapped file, optionally sharded over a mesh, so no random init or full
host copy of the model is made.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors.numpy import save_file

from eval.distributed import to_host
from eval.errors import MissingFileError
from llm_sft.model import ModelConfig, Qwen
from llm_sft.sharding import named_sharding

StatePath = tuple[str | int, ...]

_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


def hf_key_table(cfg: ModelConfig) -> dict[str, tuple[StatePath, bool]]:
    """HF tensor name -> (NNX state path, transpose) for every parameter of ``cfg``."""
    table: dict[str, tuple[StatePath, bool]] = {
        "model.embed_tokens.weight": (("embed_tokens", "embedding"), False),
        "model.norm.weight": (("norm", "scale"), False),
    }
    if not cfg.tie_word_embeddings:
        table["lm_head.weight"] = (("lm_head", "kernel"), True)
    for i in range(cfg.num_layers):
        hf, fx = f"model.layers.{i}.", ("layers", i)
        for name in ("input_layernorm", "post_attention_layernorm"):
            table[f"{hf}{name}.weight"] = ((*fx, name, "scale"), False)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            table[f"{hf}mlp.{proj}.weight"] = ((*fx, "mlp", proj, "kernel"), True)
        for proj, has_bias in (
            ("q_proj", cfg.qkv_bias),
            ("k_proj", cfg.qkv_bias),
            ("v_proj", cfg.qkv_bias),
            ("o_proj", cfg.o_bias),
        ):
            table[f"{hf}self_attn.{proj}.weight"] = ((*fx, "self_attn", proj, "kernel"), True)
            if has_bias:
                table[f"{hf}self_attn.{proj}.bias"] = ((*fx, "self_attn", proj, "bias"), False)
        if cfg.qk_norm:
            for norm in ("q_norm", "k_norm"):
                table[f"{hf}self_attn.{norm}.weight"] = ((*fx, "self_attn", norm, "scale"), False)
    return table


def read_safetensors(path: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (name, memory-mapped array) from one ``.safetensors`` file; bf16 via ml_dtypes."""
    path = Path(path)
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        array = data[start:end].view(_SAFETENSORS_DTYPES[info["dtype"]])
        yield name, array.reshape(info["shape"])


def checkpoint_files(ckpt_dir: str | Path) -> list[Path]:
    """The safetensors files of an HF checkpoint folder (sharded via the index, or single)."""
    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / _INDEX).exists():
        weight_map = json.loads((ckpt_dir / _INDEX).read_text())["weight_map"]
        return [ckpt_dir / name for name in sorted(set(weight_map.values()))]
    if (ckpt_dir / _SINGLE).exists():
        return [ckpt_dir / _SINGLE]
    raise MissingFileError(f"{ckpt_dir}: no {_SINGLE} or {_INDEX}")


def _place(array: np.ndarray, spec: Any, mesh: Mesh | None) -> jax.Array:
    if mesh is None:
        return jnp.asarray(array)
    sharding = named_sharding(mesh, spec or ())
    # Each device reads only its slice of the (memory-mapped) array; works multi-host.
    return jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])


def load_hf(
    path: str | Path, dtype: Any = jnp.float32, param_dtype: Any = None, mesh: Mesh | None = None
) -> tuple[Qwen, ModelConfig]:
    """Loads an HF Qwen2/Qwen3 checkpoint folder (config.json + safetensors).

    Args:
      path: checkpoint folder.
      dtype: compute dtype; ``param_dtype`` (default ``dtype``) is the storage dtype.
      mesh: if given, each parameter is placed with its NamedSharding on this mesh.
    """
    path = Path(path)
    config = ModelConfig.from_hf_config(path / "config.json", dtype=dtype, param_dtype=param_dtype)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen(config, rngs=nnx.Rngs(0))))
    variables = dict(nnx.to_flat_state(state))
    table = hf_key_table(config)
    unexpected = []
    for file in checkpoint_files(path):
        for name, array in read_safetensors(file):
            if name not in table:
                if not (name == "lm_head.weight" and config.tie_word_embeddings):
                    unexpected.append(name)
                continue
            state_path, transpose = table.pop(name)
            var = variables[state_path]
            array = array.T if transpose else array
            if array.shape != var.shape:
                raise ValueError(
                    f"{file}: {name} has shape {array.shape}, model expects "
                    f"{var.shape} (after transpose={transpose})"
                )
            var.set_value(
                _place(
                    array.astype(config.param_dtype), var.get_metadata().get("out_sharding"), mesh
                )
            )
    if unexpected or table:
        raise ValueError(
            f"{path}: unexpected tensors {sorted(unexpected)[:10]}, "
            f"missing tensors {sorted(table)[:10]}"
        )
    return nnx.merge(graphdef, state), config


def hf_tensors(model: Qwen, config: ModelConfig) -> dict[str, np.ndarray]:
    """{HF tensor name: array in torch's layout} of ``model``, gathered to this host; in a
    multi-process run every process calls it (`eval.distributed.to_host`)."""
    variables = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    tensors = {}
    for name, (state_path, transpose) in hf_key_table(config).items():
        array = to_host(variables[state_path][...])
        tensors[name] = np.ascontiguousarray(array.T if transpose else array)
    return tensors


def write_hf(
    tensors: dict[str, np.ndarray], config: ModelConfig, out_dir: str | Path,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:  # fmt: skip
    """Writes ``tensors`` (`hf_tensors`) as an HF checkpoint (safetensors, sharded above
    ``max_shard_bytes``, plus config.json from ``config``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    shard_bytes = 0
    for name, array in tensors.items():
        if shards[-1] and shard_bytes + array.nbytes > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = array
        shard_bytes += array.nbytes
    for stale in [*out_dir.glob("model*.safetensors"), out_dir / _INDEX]:
        stale.unlink(missing_ok=True)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], out_dir / _SINGLE, metadata=metadata)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, out_dir / file, metadata=metadata)
            weight_map.update(dict.fromkeys(shard, file))
        total = sum(a.nbytes for shard in shards for a in shard.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / _INDEX).write_text(json.dumps(index, indent=2))
    (out_dir / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
    return out_dir


def save_hf(
    model: Qwen, config: ModelConfig, out_dir: str | Path, max_shard_bytes: int = 5 * 2**30
) -> Path:
    """Writes ``model`` as an HF checkpoint that ``transformers`` loads with
    ``from_pretrained`` (`hf_tensors`, then `write_hf`)."""
    return write_hf(hf_tensors(model, config), config, out_dir, max_shard_bytes)
