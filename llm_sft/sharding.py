"""Device mesh helpers shared by the LLM model, loader and trainer.

The mesh always has the three axes ``('data', 'fsdp', 'tensor')``. Parameters carry
their partition spec as NNX metadata (``out_sharding``); activations are pinned with
:func:`constrain`, which is a no-op unless a mesh is active (``jax.set_mesh(mesh)``),
so the same model code runs on a single CPU device.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from eval import distributed

MESH_AXES = ("data", "fsdp", "tensor")

Spec = Sequence[str | tuple[str, ...] | None]


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> Mesh:
    """Builds a ('data', 'fsdp', 'tensor') mesh with Auto axes; one size may be -1 (fill)."""
    return distributed.make_mesh(dict(zip(MESH_AXES, (data, fsdp, tensor), strict=True)), devices)


def mesh_active() -> bool:
    """True when a mesh has been activated with ``jax.set_mesh``."""
    return not jax.sharding.get_abstract_mesh().empty


def _restrict(spec: Spec, axis_names: Sequence[str]) -> PartitionSpec:
    """Drops mesh axes that the mesh does not have, so partial meshes work."""

    def keep(entry):
        if entry is None:
            return None
        names = tuple(a for a in ((entry,) if isinstance(entry, str) else entry) if a in axis_names)
        return names if len(names) > 1 else (names[0] if names else None)

    return PartitionSpec(*(keep(e) for e in spec))


def named_sharding(mesh: Mesh, spec: Spec) -> NamedSharding:
    """NamedSharding for ``spec`` on ``mesh`` (axes missing from the mesh are replicated)."""
    return NamedSharding(mesh, _restrict(spec, mesh.axis_names))


def constrain(x: jax.Array, spec: Spec) -> jax.Array:
    """``with_sharding_constraint`` under an active mesh; identity otherwise."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, _restrict(spec, mesh.axis_names))
