"""Multi-process runs on `jax.distributed`: start-up, the primary process, meshes, global batches.

Every entrypoint (through `eval.cli.run`) takes `--coordinator_address`, `--num_processes`
and `--process_id`; with them, or inside a cluster JAX detects by itself (SLURM, Open
MPI, a Cloud TPU pod slice), `initialize` joins the processes into one SPMD program
before anything touches a device. `jax.devices()` is then every process's devices, a
mesh spans them all, and the training step is one global program. On XLA:CPU the
cross-process collectives are gloo's. `tools.launch` starts such processes locally.

The run folder is written by the primary process (index 0) only: `run.json`,
`metrics.jsonl`, `result.json`, exports; orbax checkpoints are written by all (each its
shards). Every process loads the data set, but of each training batch it reads only the
rows its devices hold (`process_rows`: the seeded, step-indexed loader picks the same
global batch in every process, and each builds its own rows of it), which
`TrainState.put_batch` joins into one global array
(`jax.make_array_from_process_local_data`); models and constants the processes hold alike
are placed with `place` / `replicate`; evaluation batches are split over the data axis
like training batches and their results gathered (`to_host`). `--mesh` flags
(`parse_mesh`, `make_mesh`, `run_mesh`) lay every device of the run out over named axes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from absl import flags
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from eval.errors import FlagError

flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0 for a multi-process run (with --num_processes, --process_id; "
    "unset inside SLURM / Open MPI / Cloud TPU, where JAX finds them).",
)  # fmt: skip
flags.DEFINE_integer("num_processes", None, "Processes of a multi-process run.", lower_bound=1)
flags.DEFINE_integer(
    "process_id", None, "This process's index (0..num_processes-1).", lower_bound=0
)

# Environment variables by which JAX's cluster detection recognises a multi-process job.
_CLUSTER_SIZE_VARS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")
_TPU_HOSTS_VAR = "TPU_WORKER_HOSTNAMES"


def _in_cluster() -> bool:
    """True inside a multi-process SLURM / Open MPI job or a multi-host Cloud TPU slice."""
    sizes = [os.environ.get(v, "") for v in _CLUSTER_SIZE_VARS]
    many = any(s.isdigit() and int(s) > 1 for s in sizes)
    return many or "," in os.environ.get(_TPU_HOSTS_VAR, "")


def initialize(
    coordinator_address: str | None, num_processes: int | None, process_id: int | None
) -> bool:
    """Joins a multi-process run (see module doc); returns whether one was joined.
    All three arguments, or none of them inside a detected cluster; else nothing happens."""
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
             "process_id": process_id}  # fmt: skip
    if any(v is not None for v in given.values()):
        missing = [f"--{k}" for k, v in given.items() if v is None]
        if missing:
            raise FlagError(f"a multi-process run needs {', '.join(missing)} as well")
        if process_id >= num_processes:
            raise FlagError(f"--process_id={process_id}: must be < --num_processes={num_processes}")
    elif not _in_cluster():
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True


def initialize_from_flags() -> bool:
    """`initialize` with the flags above (parsed)."""
    f = flags.FLAGS
    return initialize(f.coordinator_address, f.num_processes, f.process_id)


def is_primary() -> bool:
    """True in the process that writes the run folder (index 0; the only one alone)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name` (nothing with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def global_array(host: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """The global array `host` (the same on every process) placed by `sharding`: each
    process copies only the slices of its own devices."""
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def rows_of_devices(
    sharding: jax.sharding.Sharding, rows: int, accumulation: int, devices
) -> np.ndarray:
    """The rows of a global [rows, ...] batch, split into `accumulation` micro-batches of
    `rows / accumulation` rows laid out [accumulation, micro, ...] by `sharding`, that
    `devices` hold (ascending)."""
    shape = (accumulation, rows // accumulation)
    held = np.zeros(shape, bool)
    wanted = set(devices)
    for device, index in sharding.devices_indices_map(shape).items():
        if device in wanted:
            held[index] = True
    return np.flatnonzero(held.reshape(-1))


def process_rows(
    mesh: Mesh | None, data_axes: Sequence[str], rows: int, accumulation: int = 1
) -> np.ndarray | None:
    """The rows of a global training batch of `rows` rows that this process's devices
    hold when batches are split over `data_axes` (see `rows_of_devices`): the only rows it
    needs to read. None in a one-process run (every row)."""
    if mesh is None or jax.process_count() == 1:
        return None
    sharding = NamedSharding(mesh, P(None, tuple(data_axes)))
    return rows_of_devices(sharding, rows, accumulation, jax.local_devices())


def place(tree, shardings):
    """`jax.device_put(tree, shardings)` (a tree of shardings, or one for every leaf), also
    onto shardings that span processes: a leaf this process holds whole (the same value
    in every process) is copied from its host copy, each process filling its own devices."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    if isinstance(shardings, jax.sharding.Sharding):  # one sharding for every leaf
        shardings = jax.tree.map(lambda _: shardings, tree)

    def one(leaf, sharding):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return jax.device_put(leaf, sharding)
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            data = global_array(np.asarray(jax.random.key_data(leaf)), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
        return global_array(np.asarray(leaf), sharding)

    return jax.tree.map(one, tree, shardings)


def replicate(tree, mesh: Mesh):
    """Every leaf of `tree` (host or device arrays, the same on every process) whole on
    every device of `mesh`."""
    return place(tree, jax.NamedSharding(mesh, jax.P()))


def to_host(tree):
    """The whole value of every array in `tree` as a host array. When its shards span
    processes this is a collective: every process of the run calls it, in the same order."""

    def whole(x):
        if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(whole, tree)


def parse_mesh(spec: str, axes: Sequence[str]) -> dict[str, int]:
    """`"data:2,model:4"` -> {axis: size} over `axes` (missing axes 1, one may be -1)."""
    sizes = dict.fromkeys(axes, 1)
    for part in filter(None, spec.split(",")):
        name, _, size = part.partition(":")
        if name not in sizes or not size.lstrip("-").isdigit():
            raise FlagError(f"--mesh={spec!r}: expected 'axis:size,...' over {tuple(axes)}")
        sizes[name] = int(size)
    return sizes


def data_parallelism(mesh: Mesh, data_axes: Sequence[str]) -> int:
    """Devices a batch's rows are split over: the product of `mesh`'s `data_axes`."""
    return int(np.prod([mesh.shape[a] for a in data_axes]))


def define_mesh_flag(axes: Sequence[str], example: str) -> None:
    """An entrypoint's `--mesh` over `axes` (read it with `run_mesh`)."""
    flags.DEFINE_string(
        "mesh", None, f"Device mesh over axes {', '.join(axes)}, e.g. {example} (default: one "
        f"device; every device over {axes[0]} in a multi-process run).",
    )  # fmt: skip


def run_mesh(spec: str | None, axes: Sequence[str]) -> Mesh | None:
    """The mesh of a `--mesh` flag over `axes`; unset, none in one process and every
    device on the first axis (data parallel) in a multi-process run."""
    if spec is None and jax.process_count() > 1:
        spec = f"{axes[0]}:-1"
    return make_mesh(parse_mesh(spec, axes)) if spec else None


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh of `devices` (default: every device of the run) with axes `sizes` (Auto
    axes, in that order); one size may be -1: the devices left."""
    devices = list(jax.devices() if devices is None else devices)
    names, shape = list(sizes), list(sizes.values())
    if shape.count(-1) > 1:
        raise FlagError(f"mesh {dict(sizes)}: at most one axis size may be -1")
    if -1 in shape:
        known = int(np.prod([s for s in shape if s != -1]))
        if len(devices) % known:
            raise FlagError(
                f"mesh {dict(sizes)}: {len(devices)} devices are not divisible by {known}"
            )
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise FlagError(
            f"mesh {dict(zip(names, shape, strict=True))} needs {int(np.prod(shape))} devices, "
            f"the run has {len(devices)}"
        )
    axis_types = (AxisType.Auto,) * len(names)
    return jax.make_mesh(tuple(shape), tuple(names), axis_types=axis_types, devices=devices)
