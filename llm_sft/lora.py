"""LoRA adapters for ``llm_sft.model.Qwen``, numerically identical to HF ``peft`` LoRA.

``apply_lora`` replaces chosen projections (``q_proj`` ... ``down_proj``) by
``LoRALinear``: ``y = base(x) + dropout(x) @ A @ B * alpha / r``, with A [in, r]
kaiming-uniform (PEFT's init, bound ``1 / sqrt(in)``) and B [r, out] zeros. The adapter
weights are ``LoRAParam`` variables (a ``Param`` subtype), so ``nnx.Optimizer(...,
wrt=LoRAParam)`` trains only them. ``merge_lora`` folds them into the base kernels and
restores plain ``nnx.Linear`` modules (so ``save_hf`` writes a normal checkpoint);
``export_peft`` writes an adapter folder that ``peft.PeftModel.from_pretrained`` loads;
``load_peft`` reads such a folder back onto a base model.

Targets follow PEFT's ``target_modules`` rule: a list of names (``"q_proj"`` or the short
``"q"``) matches that projection in every layer; a single string is a regular expression
that must fully match the module path (HF naming, e.g. ``model.layers.3.mlp.up_proj``).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from eval.distributed import to_host
from llm_sft.model import Qwen
from llm_sft.sharding import mesh_active

LoRAParam = nnx.LoRAParam
PROJECTIONS = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Rank, scaling (``alpha / r``, PEFT's default), input dropout and target modules."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str = ("q_proj", "v_proj")

    def __post_init__(self):
        if self.r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not isinstance(self.target_modules, str):
            names = tuple(n if n.endswith("_proj") else f"{n}_proj" for n in self.target_modules)
            unknown = sorted(set(names) - set(PROJECTIONS))
            if unknown or not names:
                raise ValueError(
                    f"LoRA target_modules {list(self.target_modules)}: unknown {unknown}; "
                    f"choose from {sorted(PROJECTIONS)} (or pass one regex string)"
                )
            object.__setattr__(self, "target_modules", names)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class LoRALinear(nnx.Module):
    """``base(x) + dropout(x) @ lora_a @ lora_b * scaling`` around an ``nnx.Linear``."""

    def __init__(
        self,
        base: nnx.Linear,
        config: LoRAConfig,
        *,
        rngs: nnx.Rngs,
        random_b: bool = False,
    ):
        d_in, d_out = base.in_features, base.out_features
        in_spec, out_spec = base.kernel.get_metadata().get("out_sharding") or (None, None)
        self.base = base
        self.scaling = config.scaling
        self.dtype = base.dtype
        bound = 1.0 / np.sqrt(d_in)  # kaiming_uniform_(a=sqrt(5)) on PEFT's [r, in] weight
        a = jax.random.uniform(rngs.params(), (d_in, config.r), jnp.float32, -bound, bound)
        if random_b:  # Test-only: a non-zero update so interop tests are not trivial.
            b = jax.random.normal(rngs.params(), (config.r, d_out), jnp.float32) * 0.1
        else:
            b = jnp.zeros((config.r, d_out), jnp.float32)
        eager = mesh_active()
        self.lora_a = LoRAParam(a, out_sharding=(in_spec, None), eager_sharding=eager)
        self.lora_b = LoRAParam(b, out_sharding=(None, out_spec), eager_sharding=eager)
        self.dropout = nnx.Dropout(config.dropout, rngs=rngs) if config.dropout > 0 else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x if self.dropout is None else self.dropout(x)
        dtype = self.dtype or x.dtype
        delta = (h.astype(dtype) @ self.lora_a[...].astype(dtype)) @ self.lora_b[...].astype(dtype)
        return self.base(x) + delta * jnp.asarray(self.scaling, dtype)

    def merged(self) -> nnx.Linear:
        """The base Linear with ``A @ B * scaling`` added to its kernel (in fp32)."""
        kernel = self.base.kernel
        update = (self.lora_a[...] @ self.lora_b[...]) * self.scaling
        kernel.set_value((kernel[...].astype(jnp.float32) + update).astype(kernel.dtype))
        return self.base


def hf_module_path(layer: int, proj: str) -> str:
    """HF module name of projection ``proj`` in decoder layer ``layer``."""
    return f"model.layers.{layer}.{PROJECTIONS[proj]}.{proj}"


def select_targets(num_layers: int, target_modules: Sequence[str] | str) -> list[tuple[int, str]]:
    """(layer, projection) pairs chosen by names or by a full-match regex over HF paths."""
    pairs = [(i, p) for i in range(num_layers) for p in PROJECTIONS]
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        chosen = [(i, p) for i, p in pairs if pattern.fullmatch(hf_module_path(i, p))]
    else:
        chosen = [(i, p) for i, p in pairs if p in target_modules]
    if not chosen:
        raise ValueError(f"LoRA target_modules {target_modules!r} match no projection")
    return chosen


def apply_lora(model: Qwen, config: LoRAConfig, *, rngs: nnx.Rngs, random_b: bool = False) -> Qwen:
    """Wraps the target projections of ``model`` (in place) in ``LoRALinear``; returns it."""
    for i, proj in select_targets(model.config.num_layers, config.target_modules):
        parent = getattr(model.layers[i], PROJECTIONS[proj])
        base = getattr(parent, proj)
        if isinstance(base, LoRALinear):
            raise ValueError(f"{hf_module_path(i, proj)} already has a LoRA adapter")
        setattr(parent, proj, LoRALinear(base, config, rngs=rngs, random_b=random_b))
    return model


def _adapters(model: Qwen) -> list[tuple[int, str, LoRALinear]]:
    return [
        (i, proj, getattr(getattr(layer, PROJECTIONS[proj]), proj))
        for i, layer in enumerate(model.layers)
        for proj in PROJECTIONS
        if isinstance(getattr(getattr(layer, PROJECTIONS[proj]), proj), LoRALinear)
    ]


def merge_lora(model: Qwen) -> Qwen:
    """Folds every adapter into its base kernel (in place) and unwraps it; returns ``model``."""
    for i, proj, adapter in _adapters(model):
        setattr(getattr(model.layers[i], PROJECTIONS[proj]), proj, adapter.merged())
    return model


def peft_files(
    model: Qwen, config: LoRAConfig, base_model_name_or_path: str = ""
) -> tuple[dict[str, np.ndarray], dict]:
    """(tensors, adapter_config) of ``model``'s adapters in PEFT's layout, gathered to this
    host (in a multi-process run every process calls it: `eval.distributed.to_host`).

    Weights are transposed to torch's [out, in] (``lora_A.weight`` [r, in],
    ``lora_B.weight`` [out, r]). ``target_modules`` is the list of projection names when
    every layer is adapted, else the exact list of adapted module paths.
    """
    adapters = _adapters(model)
    if not adapters:
        raise ValueError("peft_files: the model has no LoRA adapters (see apply_lora)")
    tensors = {}
    for i, proj, adapter in adapters:
        prefix = f"base_model.model.{hf_module_path(i, proj)}"
        for name, weight in (("lora_A", adapter.lora_a), ("lora_B", adapter.lora_b)):
            tensors[f"{prefix}.{name}.weight"] = np.ascontiguousarray(
                to_host(weight[...]).T, np.float32
            )
    names = sorted({proj for _, proj, _ in adapters})
    if len(adapters) == len(names) * model.config.num_layers:
        targets = names
    else:
        targets = [hf_module_path(i, proj) for i, proj, _ in adapters]
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or None,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    return tensors, adapter_config


def write_peft(tensors: dict[str, np.ndarray], adapter_config: dict, out_dir: str | Path) -> Path:
    """Writes `peft_files`' output as ``adapter_model.safetensors`` + ``adapter_config.json``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out_dir / "adapter_model.safetensors", metadata={"format": "pt"})
    (out_dir / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return out_dir


def export_peft(
    model: Qwen, config: LoRAConfig, out_dir: str | Path, base_model_name_or_path: str = ""
) -> Path:
    """Writes ``model``'s adapter folder that ``peft.PeftModel.from_pretrained`` loads
    (`peft_files`, then `write_peft`)."""
    return write_peft(*peft_files(model, config, base_model_name_or_path), out_dir)


def load_peft(model: Qwen, adapter_dir: str | Path) -> Qwen:
    """Applies the PEFT LoRA adapter in ``adapter_dir`` (``export_peft``'s layout) to
    ``model`` in place (dropout off, for inference); returns it. Call ``merge_lora`` to
    fold it into the base kernels."""
    adapter_dir = Path(adapter_dir)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    targets = cfg["target_modules"]
    if not isinstance(targets, str) and any("." in t for t in targets):
        targets = "|".join(re.escape(t) for t in targets)  # exact module paths
    config = LoRAConfig(r=cfg["r"], alpha=cfg["lora_alpha"], target_modules=targets if isinstance(targets, str) else tuple(targets))  # fmt: skip
    apply_lora(model, config, rngs=nnx.Rngs(0))
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    for i, proj, adapter in _adapters(model):
        prefix = f"base_model.model.{hf_module_path(i, proj)}"
        for name, var in (("lora_A", adapter.lora_a), ("lora_B", adapter.lora_b)):
            key = f"{prefix}.{name}.weight"
            if key not in tensors:
                raise ValueError(f"{adapter_dir}: adapter has no tensor {key}")
            value = np.ascontiguousarray(tensors[key].T).astype(np.float32)
            if value.shape != var.shape:
                raise ValueError(f"{adapter_dir}: {key} has shape {value.T.shape}, expected {var.shape[::-1]}")  # fmt: skip
            var.set_value(jnp.asarray(value))
    return model
