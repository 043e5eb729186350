"""One small table of logical-axis rules maps every parameter, cache and batch onto a (data, fsdp, tensor) mesh."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes it may be split over (in order). A dimension that the mesh axes do not divide stays
# replicated (e.g. a single KV head on a 2-way tensor axis).
LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "experts": ("fsdp",),
    "head_dim": (),
}


def make_mesh(shape: dict[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh; ``shape`` may use -1 once for "all remaining devices"."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [int((shape or {}).get(axis, 1)) for axis in MESH_AXES]
    if shape is None:
        sizes[1] = len(devices)
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one axis may be -1.")
    if -1 in sizes:
        known = int(np.prod([s for s in sizes if s != -1]))
        sizes[sizes.index(-1)] = len(devices) // known
    needed = int(np.prod(sizes))
    if needed > len(devices) or len(devices) % needed:
        raise ValueError(f"mesh shape {dict(zip(MESH_AXES, sizes, strict=True))} needs {needed} devices but "
                         f"{len(devices)} are available; fix config.mesh.")  # fmt: skip
    devices = devices[:needed]  # a smaller mesh than the machine (e.g. a 1-device debug run) uses the first devices
    # Auto axes: shardings are propagated by XLA (jax 0.10 defaults make_mesh to Explicit axes).
    return jax.make_mesh(tuple(sizes), MESH_AXES, devices=devices, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def logical_spec(shape: Sequence[int], axes: Sequence[str | None], mesh: Mesh) -> PartitionSpec:
    """The PartitionSpec of an array with the given logical axes, using each mesh axis at most once."""
    used: set[str] = set()
    spec = []
    for dim, name in zip(shape, axes, strict=True):
        chosen = []
        for mesh_axis in LOGICAL_RULES.get(name, ()) if name else ():
            size = mesh.shape[mesh_axis]
            if mesh_axis in used or size == 1:
                continue
            if dim % (int(np.prod([mesh.shape[a] for a in chosen])) * size) == 0:
                chosen.append(mesh_axis)
        used.update(chosen)
        spec.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
    return PartitionSpec(*spec)


def logical_sharding(shape: Sequence[int], axes: Sequence[str | None], mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_spec(shape, axes, mesh))


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """NamedShardings for every variable of an (abstract) NNX state, from its ``axes`` metadata."""

    def one(variable: nnx.Variable) -> NamedSharding:
        shape = variable.get_value().shape
        axes = variable.get_metadata().get("axes") or (None,) * len(shape)
        return logical_sharding(shape, axes, mesh)

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
