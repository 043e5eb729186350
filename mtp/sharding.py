"""One small table of logical-axis rules maps every parameter, cache and batch onto a (data, fsdp, tensor) mesh."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mtp.errors import UserError

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
# An array that a mesh axis cannot split is copied to every device along that axis. Above this size per device the
# copy is refused: a shard that large was meant to make the model fit (e.g. a 262k-row vocabulary table on a 3-way
# tensor axis), while every weight of a layer of the small models, and a single KV head of the large ones, is far
# below it.
MAX_REPLICATED_BYTES = 64 * 2**20

# Logical axis -> mesh axes it may be split over (in order). A dimension that the mesh axes do not divide stays
# replicated (e.g. a single KV head on a 2-way tensor axis), with a warning.
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
        raise UserError(f"mesh shape {shape}: at most one axis may be -1; fix config.mesh.")
    if -1 in sizes:
        known = int(np.prod([s for s in sizes if s != -1]))
        sizes[sizes.index(-1)] = len(devices) // known
    needed = int(np.prod(sizes))
    if needed > len(devices) or len(devices) % needed:
        raise UserError(
            f"mesh shape {dict(zip(MESH_AXES, sizes, strict=True))} needs {needed} devices but "
            f"{len(devices)} are available; fix config.mesh."
        )
    devices = devices[:needed]  # a smaller mesh than the machine (e.g. a 1-device debug run) uses the first devices
    # Auto axes: shardings are propagated by XLA (jax 0.10 defaults make_mesh to Explicit axes).
    return jax.make_mesh(tuple(sizes), MESH_AXES, devices=devices, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def _layout(
    shape: Sequence[int], axes: Sequence[str | None], mesh: Mesh
) -> tuple[PartitionSpec, list[tuple[int, str]]]:
    """The PartitionSpec (each mesh axis used at most once), and the (dimension, mesh axis) pairs that a rule asks
    for but that do not divide, so the array is replicated over that mesh axis."""
    used: set[str] = set()
    spec, undivided = [], []
    for i, (dim, name) in enumerate(zip(shape, axes, strict=True)):
        chosen = []
        for mesh_axis in LOGICAL_RULES.get(name, ()) if name else ():
            size = mesh.shape[mesh_axis]
            if mesh_axis in used or size == 1:
                continue
            if dim % (int(np.prod([mesh.shape[a] for a in chosen])) * size) == 0:
                chosen.append(mesh_axis)
            else:
                undivided.append((i, mesh_axis))
        used.update(chosen)
        spec.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
    # An axis one dimension could not take may still split another (e.g. fsdp on embed when experts do not divide).
    return PartitionSpec(*spec), [(i, a) for i, a in undivided if a not in used]


def _replicated(name: str, shape: Sequence[int], why: str) -> str:
    return f"{name} {list(shape)}: {why}, so every device along that mesh axis holds a full copy"


def _place(
    shape: Sequence[int], axes: Sequence[str | None], mesh: Mesh, name: str, dtype, max_replicated_bytes: int
) -> tuple[PartitionSpec, str | None]:
    """The spec, and why a dimension was left replicated (None if none was); refuses a large array left so."""
    spec, undivided = _layout(shape, axes, mesh)
    if not undivided:
        return spec, None
    why = ", ".join(f"{axes[i]}={shape[i]} is not divisible by mesh axis {a}={mesh.shape[a]}" for i, a in undivided)
    used = [a for entry in spec if entry for a in ((entry,) if isinstance(entry, str) else entry)]
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize // int(np.prod([mesh.shape[a] for a in used]))
    if nbytes > max_replicated_bytes:
        raise UserError(
            f"{_replicated(name, shape, why)} ({nbytes / 2**20:.0f} MiB per device, over the "
            f"{max_replicated_bytes / 2**20:.0f} MiB an array left unsplit may take). Choose mesh axis sizes that "
            "divide it (config.mesh), or raise max_replicated_bytes."
        )
    return spec, why


def logical_spec(
    shape: Sequence[int],
    axes: Sequence[str | None],
    mesh: Mesh,
    *,
    name: str | None = None,
    dtype=np.float32,
    max_replicated_bytes: int = MAX_REPLICATED_BYTES,
) -> PartitionSpec:
    """The PartitionSpec of an array with the given logical axes, using each mesh axis at most once.

    A dimension that its mesh axes do not divide stays replicated: refused for an array over
    ``max_replicated_bytes`` per device, and logged when the array has a ``name``.
    """
    spec, why = _place(shape, axes, mesh, name or "an array", dtype, max_replicated_bytes)
    if why and name:
        log.warning("%s.", _replicated(name, shape, why))
    return spec


def logical_sharding(shape: Sequence[int], axes: Sequence[str | None], mesh: Mesh, **kwargs) -> NamedSharding:
    return NamedSharding(mesh, logical_spec(shape, axes, mesh, **kwargs))


def state_shardings(state: nnx.State, mesh: Mesh, *, max_replicated_bytes: int = MAX_REPLICATED_BYTES) -> nnx.State:
    """NamedShardings for every variable of an (abstract) NNX state, from its ``axes`` metadata.

    What a mesh axis cannot split is refused when large (see ``logical_spec``), else logged once per kind (e.g.
    the single KV head of every layer on a 2-way tensor axis: one warning naming the first, and how many more).
    """
    replicated: dict[str, list[tuple[str, tuple[int, ...]]]] = {}  # why -> (name, shape) of each variable

    def one(path, variable: nnx.Variable) -> NamedSharding:
        value = variable.get_value()
        axes = variable.get_metadata().get("axes") or (None,) * len(value.shape)
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        spec, why = _place(value.shape, axes, mesh, name, value.dtype, max_replicated_bytes)
        if why:
            replicated.setdefault(why, []).append((name, value.shape))
        return NamedSharding(mesh, spec)

    shardings = jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    for why, variables in replicated.items():
        more = f" (and {len(variables) - 1} more like it)" if len(variables) > 1 else ""
        log.warning("%s%s.", _replicated(*variables[0], why), more)
    return shardings


def constrain_batch(x: jax.Array) -> jax.Array:
    """Activations split over the batch (as the batch is) when traced under a mesh (``use_abstract_mesh``).

    Without it XLA may propagate the parameters' fsdp split onto the activations' width, leaving every device a
    quarter of the width of a quarter of the batch: 4x the intended activation memory.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    axes = tuple(a for a in LOGICAL_RULES["batch"] if a in mesh.axis_names)
    if x.shape[0] % int(np.prod([mesh.shape[a] for a in axes])):
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(axes))


def constrain_replicated(x: jax.Array) -> jax.Array:
    """One whole copy per device, fetched once when traced under a mesh (e.g. a table several loops read)."""
    if jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec())
