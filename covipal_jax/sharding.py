"""Device meshes, logical-axis rules, and placing pytrees on them.

A config's `mesh` gives sizes for the axes `data`, `fsdp`, `tensor` (one may be -1: all
remaining devices). Parameters and activations carry logical axis names (see CONTRIBUTING.md);
`config.logical_axis_rules` maps them to mesh axes. Meshes use `AxisType.Auto` explicitly, so
`nn.with_logical_constraint` acts as a sharding hint for the compiler rather than an assert.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis name -> mesh axes. Parameters: `embed`-like dims are FSDP-sharded, head / MLP /
# vocab dims tensor-parallel. Activations: batch over (data, fsdp), heads and MLP over tensor.
LOGICAL_AXIS_RULES = (
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("embed", "fsdp"),
    ("vision_embed", "fsdp"),
    ("mlp", "tensor"),
    ("vision_mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vision_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("cache_batch", ("data", "fsdp")),
    ("cache_length", None),
    ("cache_heads", "tensor"),
    ("ppm_embed", None),
    ("ppm_mlp", None),
    ("ppm_heads", None),
)
Rules = Sequence[tuple[str, Any]]


def mesh_shape(sizes: dict[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolve `{data: -1, fsdp: 2, tensor: 1}` against the device count."""
    shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
    if shape.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, shape))}")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"{num_devices} devices not divisible by fixed mesh axes {known}")
        shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
                         f"have {num_devices}")
    return tuple(shape)


def make_mesh(sizes: dict[str, int] | Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with explicit `AxisType.Auto` axes."""
    sizes = dict(sizes.to_dict() if hasattr(sizes, "to_dict") else sizes)
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(sizes, len(devices))
    if len(devices) == len(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(shape),
                             devices=devices)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
                axis_types=(AxisType.Auto,) * len(shape))


def rules_tuple(rules: Rules) -> tuple[tuple[str, Any], ...]:
    """Normalize rules from a ConfigDict (lists) into hashable tuples."""
    out = []
    for name, axes in rules:
        if isinstance(axes, list):
            axes = tuple(axes)
        out.append((name, axes))
    return tuple(out)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Enter the mesh and the logical-axis rules (activations' constraints read both)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules_tuple(rules)):
        yield


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for a tree with `nn.LogicallyPartitioned` leaves (abstract or real).

    Unboxed leaves (no logical names) are replicated.
    """
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules_tuple(rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading axis over (data, fsdp), the rest replicated: for inputs and labels."""
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def abstract_params(init_fn, *args) -> Any:
    """`jax.eval_shape` of an init function: the boxed parameter tree at zero memory."""
    return jax.eval_shape(init_fn, *args)


def init_sharded(init_fn, rng: jax.Array, mesh: Mesh, rules: Rules) -> tuple[Any, Any]:
    """Initialize parameters directly into their shardings (never a full host copy).

    Returns (unboxed params, their NamedShardings).
    """
    abstract = jax.eval_shape(init_fn, rng)
    shardings = logical_shardings(abstract, mesh, rules)
    with use_mesh(mesh, rules):
        params = jax.jit(lambda r: nn.unbox(init_fn(r)), out_shardings=shardings)(rng)
    return params, shardings


def put_batch(mesh: Mesh, local: Any) -> Any:
    """Per-host slices (leading batch axis) -> global arrays sharded over (data, fsdp)."""
    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)
    return jax.tree.map(put, local)
