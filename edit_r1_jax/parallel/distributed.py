"""Multi-controller start-up and the host <-> global array moves the loop needs.

Every host runs the same program over one global mesh. Each host holds only its share of a batch
(``host_slice``); ``to_global`` stitches the shares into a global array sharded over the batch axes, and
``gather`` brings small per-sample results (rewards, row ids) back to every host in global order.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from edit_r1_jax.parallel import rules

log = logging.getLogger(__name__)


def initialize(coordinator: str = "", num_processes: int = 0, process_id: int = -1) -> None:
    """Start jax.distributed when the environment asks for several processes; no-op for one process.

    Sources, first match wins: explicit arguments (config.distributed), env EDIT_R1_COORDINATOR /
    EDIT_R1_NUM_PROCESSES / EDIT_R1_PROCESS_ID (plain ssh launcher), then jax's own detection (TPU pods,
    SLURM, Open MPI) when EDIT_R1_DISTRIBUTED=auto (set by tools/tpu/pod.sh: TPU VMs carry no variable that
    says so) or SLURM variables are present.
    """
    coordinator = coordinator or os.environ.get("EDIT_R1_COORDINATOR", "")
    num_processes = num_processes or int(os.environ.get("EDIT_R1_NUM_PROCESSES", "0"))
    process_id = process_id if process_id >= 0 else int(os.environ.get("EDIT_R1_PROCESS_ID", "-1"))
    if coordinator:
        if num_processes <= 0 or process_id < 0:
            raise ValueError("distributed: a coordinator address needs num_processes and process_id "
                             "(EDIT_R1_NUM_PROCESSES, EDIT_R1_PROCESS_ID)")
        if os.environ.get("JAX_PLATFORMS", "") == "cpu":  # CPU processes need a collectives backend
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    elif "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()
    elif os.environ.get("EDIT_R1_DISTRIBUTED") == "auto":
        jax.distributed.initialize()
    else:
        return
    log.info("distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())


def host_slice(global_size: int) -> slice:
    """This host's contiguous share of a global batch of ``global_size`` samples."""
    n = jax.process_count()
    if global_size % n:
        raise ValueError(f"global batch {global_size} is not divisible by the process count {n}")
    per = global_size // n
    return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


def batch_sharding(mesh, ndim: int) -> NamedSharding:
    """Leading axis over the batch mesh axes (data x fsdp), the rest replicated."""
    return NamedSharding(mesh, rules.partition_spec(("batch",) + (None,) * (ndim - 1), mesh=mesh))


def to_global(mesh, local_tree):
    """Host-local batch shares (numpy, leading axis = local batch) -> global arrays sharded over the batch."""

    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)

    return jax.tree.map(one, local_tree)


def shard_host_batch(mesh, x) -> jax.Array:
    """The same whole batch on every host (numpy) -> a global array sharded over the batch axes, each process
    filling only its own devices (evaluation: every process reads the same rows; ``to_global`` takes shares)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, batch_sharding(mesh, x.ndim), lambda idx: x[idx])


def to_local(global_tree):
    """Global batch-sharded arrays -> this host's share as numpy (inverse of ``to_global``)."""

    def one(x):
        if jax.process_count() == 1:
            return np.asarray(x)
        return np.asarray(multihost_utils.global_array_to_host_local_array(x, x.sharding.mesh, x.sharding.spec))

    return jax.tree.map(one, global_tree)


def gather(local: np.ndarray) -> np.ndarray:
    """Concatenate every host's share (host order = global order); identical result on every host."""
    if jax.process_count() == 1:
        return np.asarray(local)
    return np.asarray(multihost_utils.process_allgather(np.asarray(local), tiled=True))


def gather_global(x) -> np.ndarray:
    """A global array (any sharding, possibly spanning other processes' devices) -> the whole array as numpy on
    every host. Use once per result, for small per-sample values or where a host-side consumer needs it."""
    if jax.process_count() == 1 or getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def replicate(mesh, tree):
    """Put a host pytree on every device of ``mesh`` unsharded (same values on every host)."""
    return jax.device_put(tree, NamedSharding(mesh, jax.sharding.PartitionSpec()))
