"""Device mesh, batch sharding and multi-host start-up.

Every primitive in `engine/` runs on a `jax.sharding.Mesh` with two named axes:

* ``data``: rows of a stream (tokens, training examples) are split along it; results are
  reduced over it (psum / centred merges), so they do not depend on its size.
* ``feature``: large dictionaries (SAE features, rows of a decoder) are split along it by the
  pairwise-similarity primitives.

The mesh uses ``AxisType.Auto`` so that `jax.jit` with `NamedSharding` in/out shardings
behaves as classic GSPMD (the JAX 0.10 default of Explicit axes would make every intermediate
sharding part of the type).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"
FEATURE = "feature"

_distributed_started = False


def make_mesh(
    data: int = -1, feature: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """Builds a ``(data, feature)`` mesh.

    Args:
      data: size of the data axis; -1 takes every device not used by ``feature``.
      feature: size of the feature axis.
      devices: devices to use (default: all of ``jax.devices()``). Pass ``jax.devices()[:1]``
        to run the same program on one device.

    Returns:
      A `Mesh` with axis names ``("data", "feature")`` and Auto axis types.
    """
    devices = list(jax.devices() if devices is None else devices)
    if feature < 1:
        raise ValueError(f"mesh feature axis must be >= 1, got {feature}")
    if data == -1:
        if len(devices) % feature:
            raise ValueError(f"mesh: {len(devices)} devices are not divisible by feature={feature}")
        data = len(devices) // feature
    if data < 1 or data * feature > len(devices):
        raise ValueError(
            f"mesh data={data} x feature={feature} needs {data * feature} devices, "
            f"{len(devices)} available"
        )
    grid = np.asarray(devices[: data * feature], dtype=object).reshape(data, feature)
    auto = jax.sharding.AxisType.Auto
    return Mesh(grid, (DATA, FEATURE), axis_types=(auto, auto))


def mesh_from_config(cfg: Any) -> Mesh:
    """Builds a mesh from a config with optional ``mesh_data`` / ``mesh_feature`` fields."""
    return make_mesh(
        data=int(getattr(cfg, "mesh_data", -1)), feature=int(getattr(cfg, "mesh_feature", 1))
    )


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy on every device."""
    return NamedSharding(mesh, P())


def data_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Sharding that splits the leading axis over ``data`` and replicates the rest."""
    return NamedSharding(mesh, P(DATA, *([None] * (ndim - 1))))


def check_divisible(mesh: Mesh, rows: int, what: str = "batch") -> None:
    """Raises a one-line error when ``rows`` cannot be split evenly over the data axis."""
    n = mesh.shape[DATA]
    if rows % n:
        raise ValueError(
            f"{what} of {rows} rows is not divisible by the mesh data axis ({n} "
            f"devices); choose a multiple of {n}"
        )


def shard_batch(mesh: Mesh, tree: Any) -> Any:
    """Puts a pytree of host arrays on the mesh, split along the leading (row) axis.

    Every process passes the same GLOBAL rows (all processes run the same deterministic
    stream); in a multi-process run each keeps only its contiguous slice and the global array
    is assembled with `jax.make_array_from_process_local_data`. This costs redundant host
    reads but needs no per-process stream bookkeeping, so resume stays exact.
    """

    def put(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.ndim == 0:
            return jax.device_put(x, replicated(mesh))
        sharding = data_sharding(mesh, x.ndim)
        check_divisible(mesh, x.shape[0])
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        per = x.shape[0] // jax.process_count()
        lo = jax.process_index() * per
        return jax.make_array_from_process_local_data(
            sharding, np.asarray(x[lo : lo + per]), global_shape=x.shape
        )

    return jax.tree.map(put, tree)


def replicate(mesh: Mesh, tree: Any, copy: bool = False) -> Any:
    """Puts a pytree on every device of the mesh.

    With ``copy=True`` the result never aliases the caller's buffers (use it before passing
    the tree to a jitted function that donates its arguments).
    """
    if copy:
        # `may_alias=False` is not honoured when the source lives on one device of the mesh
        # (JAX 0.10 reuses that buffer for the device-0 shard), so copy explicitly: one
        # compiled copy of the whole tree (a per-leaf eager copy compiles one per shape).
        return _copy_tree(jax.device_put(tree, replicated(mesh)))
    return jax.device_put(tree, replicated(mesh))


@jax.jit
def _copy_tree(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.numpy.array(x, copy=True), tree)


def is_primary() -> bool:
    """True in process 0: the only process that writes results, logs, plots and files
    other than orbax checkpoints (which orbax coordinates across processes itself)."""
    return jax.process_index() == 0


def agree(value: bool) -> bool:
    """Process 0's answer to a host-side question (does this file exist? is this step done?),
    on every process.

    Every process must take the same branch whenever the branch runs collectives (a sharded
    jit over the global mesh), or the processes wait on each other forever; answers read from
    a shared filesystem can differ between processes while process 0 is writing.
    """
    if jax.process_count() == 1:
        return bool(value)
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(bool(value))))


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier ``name`` (no-op in one process): used
    after process 0 writes a file that the others then read."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def gather(tree: Any) -> Any:
    """Brings a (possibly sharded, possibly multi-host) pytree back to host numpy arrays."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


def maybe_initialize_distributed(
    enabled: bool,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Calls `jax.distributed.initialize` once, only when asked.

    Single-host runs and tests never call it. With all arguments None, JAX auto-detects the
    cluster (SLURM, TPU pods, Open MPI).

    Returns:
      True when the distributed runtime was started by this call or earlier.
    """
    global _distributed_started
    if not enabled:
        return False
    if not _distributed_started:
        # Longer than JAX's defaults (100 s heartbeat, 300 s shutdown barrier): on a loaded
        # machine a process can go quiet, or reach the exit barrier minutes before process 0
        # has written the plots and report, and the defaults then abort both processes (seen
        # once in a full test suite on 2 shared cores).
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            heartbeat_timeout_seconds=300,
            shutdown_timeout_seconds=900,
        )
        _distributed_started = True
        logging.info(
            "jax.distributed: process %d of %d, %d local / %d global devices",
            jax.process_index(),
            jax.process_count(),
            jax.local_device_count(),
            jax.device_count(),
        )
    return True


def machine_memory_bytes(mesh: Mesh | None = None) -> int:
    """Memory of the machine the arrays live on: the smallest device's ``bytes_limit`` on
    accelerators, physical RAM (``/proc/meminfo``-equivalent ``sysconf``) on CPU."""
    devices = list(np.asarray(mesh.devices).flat) if mesh is not None else jax.devices()
    if devices and devices[0].platform != "cpu":
        limits = []
        for d in devices:
            stats = d.memory_stats() or {}
            if "bytes_limit" in stats:
                limits.append(int(stats["bytes_limit"]))
        if limits:
            return min(limits)
    import os

    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def default_memory_budget(mesh: Mesh | None = None, fraction: float = 0.5) -> int:
    """Bytes a big pass may use by default: ``fraction`` of `machine_memory_bytes` (half
    leaves room for the process, the page cache of the data and other jobs)."""
    return int(fraction * machine_memory_bytes(mesh))
