"""A model and its optimizer as the pytrees one jitted, donated train step takes.

`TrainState` splits an NNX model into trainable params (`wrt`: every `nnx.Param`, or
`LoRAParam` for adapters), frozen params (not differentiated, not checkpointed: rebuilt
from their source) and the rest (EMA statistics, RNG counters, ...), plus the
`nnx.Optimizer` state. With a mesh every piece is placed by `shardings` (default: the
variables' partition metadata) and the batch is split over `data_axes`.

The step (`train_step`) computes the gradient of the task's loss
`loss(model, batch, rng) -> (loss, aux)`, accumulated over micro-batches with
`lax.scan` when `gradient_accumulation_steps` > 1. A loss that returns `aux["weight"]`
is a sum over that many targets (tokens): the step's loss and gradient are the sums over
micro-batches divided by the total weight, i.e. the mean over every target of the step.
Otherwise each micro-batch loss is a mean and the step averages them.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from eval.distributed import place, process_rows, replicate

LossFn = Callable[[nnx.Module, dict[str, jax.Array], jax.Array], tuple[jax.Array, dict]]
AfterUpdate = Callable[[nnx.Module, dict], None]


class _Static:
    """A pytree made hashable (treedef + leaves), to pass shardings as a static jit argument."""

    def __init__(self, tree):
        self.leaves, self.treedef = jax.tree.flatten(tree)
        self._hash = hash((self.treedef, tuple(self.leaves)))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return other is self or (
            isinstance(other, _Static)
            and self.treedef == other.treedef
            and self.leaves == other.leaves
        )

    def tree(self):
        return jax.tree.unflatten(self.treedef, self.leaves)


def _keys_to_data(tree):
    """Typed PRNG keys -> raw uint32 data (orbax stores plain arrays)."""

    def convert(x):
        return jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x

    return jax.tree.map(convert, tree)


def _fresh(tree):
    """New Variable objects at the current trace level (NNX refuses to mutate Variables
    created at an outer one, e.g. inside `lax.scan`)."""
    return jax.tree.map(lambda x: x, tree)


def _scalars(aux: dict) -> dict[str, jax.Array]:
    return {k: v for k, v in aux.items() if k != "weight" and jnp.ndim(v) == 0}


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(1, 3, 4))
def _train_step(defs, params, frozen, rest, opt_state, constants, batch, key):
    """One optimizer step; `batch` leaves are [accumulation, micro, ...] when accumulating."""
    graphdef, opt_def, filters, loss_fn, accumulation, after_update, shardings = defs
    wrt = filters[0]

    def grads_of(params, rest, micro, key):
        model = nnx.merge(graphdef, *_fresh((params, frozen, rest)))

        def objective(model):
            return loss_fn(model, {**micro, **constants}, key)

        (loss, aux), grads = nnx.value_and_grad(
            objective, argnums=nnx.DiffState(0, wrt), has_aux=True
        )(model)
        return loss, aux, grads, nnx.split(model, *filters)[3]

    if accumulation == 1:
        loss, aux, grads, rest = grads_of(params, rest, batch, key)
        weight = aux.get("weight", jnp.ones(()))
        scalar_aux = _scalars(aux)
    else:

        def micro(carry, xs):
            grad_sum, loss_sum, weight_sum, rest = carry
            mb, i = xs
            loss, aux, g, rest = grads_of(params, rest, mb, jax.random.fold_in(key, i))
            w = aux.get("weight", jnp.ones(()))
            carry = (jax.tree.map(jnp.add, grad_sum, g), loss_sum + loss, weight_sum + w, rest)
            return carry, aux

        zeros = jax.tree.map(jnp.zeros_like, params)
        init = (zeros, jnp.zeros(()), jnp.zeros(()), rest)
        (grads, loss, weight, rest), aux = jax.lax.scan(
            micro, init, (batch, jnp.arange(accumulation))
        )
        scalar_aux = {k: v.mean() for k, v in _scalars(aux).items()}
    if "weight" in aux or accumulation > 1:  # sums over micro-batches / targets -> means
        weight = jnp.maximum(weight.astype(jnp.float32), 1e-30)
        grads = jax.tree.map(lambda g: g / weight.astype(g.dtype), grads)
        loss = loss / weight
    model = nnx.merge(graphdef, params, frozen, rest)
    optimizer = nnx.merge(opt_def, opt_state)
    optimizer.update(model, grads)
    if after_update is not None:
        after_update(model, aux)
    _, params, _, rest = nnx.split(model, *filters)
    opt_state = nnx.state(optimizer)
    if shardings is not None:
        params, rest, opt_state = jax.lax.with_sharding_constraint(
            (params, rest, opt_state), shardings.tree()
        )
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **scalar_aux}
    if "weight" in aux:
        metrics["weight"] = weight
    return params, rest, opt_state, metrics


class TrainState:
    """The split model + optimizer of one run (see module doc)."""

    def __init__(
        self,
        model: nnx.Module,
        tx: optax.GradientTransformation,
        *,
        wrt: Any = nnx.Param,
        frozen: Any = nnx.Nothing,
        mesh: Mesh | None = None,
        shardings: Callable[[Any], Any] | None = None,
        data_axes: tuple[str, ...] = ("data",),
    ):
        self.mesh, self.data_axes = mesh, data_axes
        self._global_rows: int | None = None  # set by `shard_rows`
        self.filters = (wrt, frozen, ...)
        model.eval()
        self.eval_def = nnx.graphdef(model)
        model.train()
        self.graphdef, params, frozen_state, rest = nnx.split(model, *self.filters)
        if mesh is None:
            self.params, self.frozen, self.rest = params, frozen_state, rest
            self.opt_def, self.opt_state = nnx.split(nnx.Optimizer(model, tx, wrt=wrt))
            self._shardings = None
            return
        sharding_of = shardings or (lambda tree: nnx.get_named_sharding(tree, mesh))
        model_sh = sharding_of((params, frozen_state, rest))
        self.params, self.frozen, self.rest = place((params, frozen_state, rest), model_sh)
        graphdef = self.graphdef

        def init_optimizer(params, frozen, rest):
            return nnx.split(nnx.Optimizer(nnx.merge(graphdef, params, frozen, rest), tx, wrt=wrt))

        with jax.set_mesh(mesh):  # optimizer variables inherit the params' sharding metadata
            self.opt_def, abstract = jax.eval_shape(
                init_optimizer, self.params, self.frozen, self.rest
            )
            opt_sh = sharding_of(abstract)
            self.opt_state = jax.jit(lambda *s: init_optimizer(*s)[1], out_shardings=opt_sh)(
                self.params, self.frozen, self.rest
            )
        self._shardings = _Static((model_sh[0], model_sh[2], opt_sh))

    # -- the step -------------------------------------------------------------------------
    def shard_rows(self, rows: int, accumulation: int = 1) -> np.ndarray | None:
        """The rows of each global training batch of `rows` rows that this process reads
        (`eval.distributed.process_rows`; None: all of them, one process). From this call
        on, `train_step` takes batches of those rows only and assembles the global batch."""
        held = process_rows(self.mesh, self.data_axes, rows, accumulation)
        self._global_rows = None if held is None else rows
        if held is not None:
            logging.info(
                "process %d reads %d of the %d rows of each training batch",
                jax.process_index(), len(held), rows,
            )  # fmt: skip
        return held

    def put_batch(
        self, batch: Mapping[str, np.ndarray], accumulation: int = 1, global_rows: int | None = None
    ) -> dict:
        """Host batch [rows, ...] -> device arrays, [accumulation, rows / accumulation, ...]
        when accumulating, split over the mesh's data axes. The batch is the global one
        (each process of a multi-process run copies its devices' rows), or, with
        `global_rows`, this process's rows of a global batch of that many (`shard_rows`).
        Scalars (0-d leaves, e.g. a schedule's value) are placed whole on every device."""
        if accumulation > 1:
            rows = len(next(iter(batch.values())))
            if rows % accumulation:
                raise ValueError(f"{rows} rows do not split into {accumulation} micro-batches")
            batch = {k: v.reshape(accumulation, -1, *v.shape[1:]) for k, v in batch.items()}
        if self.mesh is None:
            return dict(batch)
        spec = P(None, self.data_axes) if accumulation > 1 else P(self.data_axes)
        sharding = NamedSharding(self.mesh, spec)
        scalars = {k: v for k, v in batch.items() if np.ndim(v) == 0}  # whole on every device
        rows = {k: v for k, v in batch.items() if k not in scalars}
        if global_rows is None:
            rows = place(rows, sharding)
        else:
            lead = (
                (accumulation, global_rows // accumulation) if accumulation > 1 else (global_rows,)
            )
            rows = {
                k: jax.make_array_from_process_local_data(
                    sharding, v, (*lead, *v.shape[len(lead) :])
                )
                for k, v in rows.items()
            }
        return {**rows, **replicate(scalars, self.mesh)}

    def put_constants(self, constants: Mapping[str, Any]) -> dict[str, jax.Array]:
        """A task's constants (`Task.constants`) as the step reads them: whole on every
        device of the mesh (once per fit, not per step)."""
        if self.mesh is None:
            return jax.device_put(dict(constants))
        return replicate(dict(constants), self.mesh)

    def train_step(
        self,
        loss_fn: LossFn,
        batch: Mapping[str, np.ndarray],
        key: jax.Array,
        *,
        constants: Mapping[str, jax.Array] | None = None,
        accumulation: int = 1,
        after_update: AfterUpdate | None = None,
    ) -> dict[str, jax.Array]:
        """One optimizer step; returns device scalars (loss, grad_norm, scalar aux)."""
        args = self._step_args(loss_fn, batch, key, constants, accumulation, after_update)
        with self._on_mesh():
            self.params, self.rest, self.opt_state, metrics = _train_step(*args)
        return metrics

    def lower_train_step(self, loss_fn: LossFn, batch: Mapping[str, np.ndarray],
                         key: jax.Array, **options) -> jax.stages.Lowered:  # fmt: skip
        """The step `train_step` (same arguments) would run, lowered, not run: for its HLO,
        collectives and memory (`.compile().as_text()`, `.compile().memory_analysis()`)."""
        with self._on_mesh():
            return _train_step.lower(*self._step_args(loss_fn, batch, key, **options))

    def _step_args(self, loss_fn, batch, key, constants=None, accumulation=1, after_update=None):
        defs = (
            self.graphdef, self.opt_def, self.filters, loss_fn, accumulation, after_update,
            self._shardings,
        )  # fmt: skip
        state = (self.params, self.frozen, self.rest, self.opt_state)
        batch = self.put_batch(batch, accumulation, self._global_rows)
        return defs, *state, dict(constants or {}), batch, key

    def _on_mesh(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

    # -- models ---------------------------------------------------------------------------
    def model(self, train: bool = False) -> nnx.Module:
        """The current model (eval mode unless `train`), sharing the state's arrays."""
        return nnx.merge(
            self.graphdef if train else self.eval_def, self.params, self.frozen, self.rest
        )

    def update_from(self, model: nnx.Module) -> None:
        """Takes params and rest back from a model changed outside the step (e.g. a hook,
        or weights copied from another run), placed as the state's own on a mesh."""
        _, params, _, rest = nnx.split(model, *self.filters)
        if self.mesh is not None:
            params_sh, rest_sh, _ = self._shardings.tree()
            params, rest = place((params, rest), (params_sh, rest_sh))
        self.params, self.rest = params, rest

    # -- checkpoints ----------------------------------------------------------------------
    def checkpoint(self, with_optimizer: bool = True) -> dict[str, Any]:
        """The saved pytree: trainable params, rest and (for resume) the optimizer state."""
        parts = {"params": self.params, "rest": self.rest}
        if with_optimizer:
            parts["opt_state"] = self.opt_state
        return _keys_to_data({k: nnx.to_pure_dict(v) for k, v in parts.items()})

    def abstract_checkpoint(self, with_optimizer: bool = True) -> dict[str, Any]:
        """Shapes, dtypes and shardings of `checkpoint()`, for an orbax restore."""

        def spec(x):
            sharding = x.sharding if isinstance(x, jax.Array) else None
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

        return jax.tree.map(spec, self.checkpoint(with_optimizer))

    def load_checkpoint(self, tree: dict[str, Any]) -> None:
        """Writes a restored `checkpoint()` pytree back into the state."""
        for name, pure in tree.items():
            current = getattr(self, name)

            def typed(old, new):
                if jax.dtypes.issubdtype(old.dtype, jax.dtypes.prng_key):
                    return jax.random.wrap_key_data(new, impl=jax.random.key_impl(old))
                return new

            nnx.replace_by_pure_dict(current, jax.tree.map(typed, nnx.to_pure_dict(current), pure))
