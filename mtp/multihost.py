"""Host-side helpers for runs over many JAX processes (one per host): a value gathered to every host, a barrier,
a count summed over hosts. Each is a collective: every process calls it, in the same order. On one process they
cost nothing."""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils


def host_value(x) -> np.ndarray:
    """The full value of one (possibly globally sharded) array on this host: an all-gather when it spans
    processes; gathering one tensor at a time bounds host memory."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def barrier(name: str) -> None:
    """Waits until every process gets here (e.g. until process 0 has written a file the others read)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"mtp: {name}")


def sum_over_processes(count: int) -> int:
    """A host-side count (each process counting its own share of the data) summed over all processes."""
    if jax.process_count() == 1:
        return int(count)
    return int(np.sum(multihost_utils.process_allgather(np.asarray(count, np.int64))))
