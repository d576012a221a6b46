"""The trainer's state and batches as abstract, sharded shapes (`jax.eval_shape`, no memory).

The one description of what the PPM trainer feeds its jitted step, used by the trainer (to
build and restore its state, to shard its batches) and by `tools/aot.py` (to compile the same
step for a TPU topology without running it: MaxText's `train_compile` pattern):

    state  {"step": i32[], "params": PPM params (f32), "opt_state": optax state}
    frozen the LLaVA params, floats cast to `train.frozen_dtype`
    batch  {"pixels": f32[B, S, S, 3], "ids": i32[B, T], "mask": bool[B, T],
            "loss_mask": bool[B, T], "weight": f32[B]}

Every optimizer leaf that mirrors a parameter (Adam's mu / nu) takes the parameter's sharding;
counts and the step are replicated; batches are sharded over (data, fsdp) on their leading axis.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from covipal_jax import sharding
from covipal_jax.data.packed_rows import VISUAL_KEYS as _PACKED_KEYS

# rank of each batch entry (leading axis: the batch, sharded over (data, fsdp))
_BATCH_NDIM = {"pixels": 4, "anyres_pixels": 5, "anyres_plan": 2, "frames": 5,
               "multi_pixels": 6, "multi_plan": 3, "image_valid": 2, "ids": 2,
               "mask": 2, "loss_mask": 2, "weight": 1}
BATCH_KEYS = tuple(_BATCH_NDIM)
_VISUAL_KEYS = {None: ("pixels",), "": ("pixels",), **_PACKED_KEYS}


def batch_keys(packed: str | None = None) -> tuple[str, ...]:
    """The keys of a train batch: one base view per example (`pixels`), or the packed
    AnyRes (`anyres_pixels`, `anyres_plan`) / video (`frames`) / multi-image (`multi_pixels`,
    `multi_plan`, `image_valid`) rows of `config.data.packed` (`data.packed_rows`)."""
    if packed not in _VISUAL_KEYS:
        raise ValueError(f'data.packed must be "anyres" | "video" | "multi" | unset, '
                         f'got {packed!r}')
    return _VISUAL_KEYS[packed] + ("ids", "mask", "loss_mask", "weight")


def sds(x: Any, sharding_: Any = None, dtype: Any = None) -> jax.ShapeDtypeStruct:
    """ShapeDtypeStruct of `x` (optionally another sharding / dtype)."""
    return jax.ShapeDtypeStruct(x.shape, dtype or x.dtype, sharding=sharding_)


def abstract_params(init_fn, mesh, rules, dtype: Any = None) -> tuple[Any, Any]:
    """(unboxed ShapeDtypeStructs carrying NamedShardings, the shardings) of a boxed init
    function `rng -> variables`; floats cast to `dtype` when given. `mesh=None`: unsharded."""
    with nn.logical_axis_rules(()):
        boxed = jax.eval_shape(lambda: init_fn(jax.random.key(0)))
    shardings = sharding.logical_shardings(boxed, mesh, rules) if mesh is not None else None
    unboxed = nn.unbox(boxed)

    def cast(x):
        return dtype if (dtype is not None and jnp.issubdtype(x.dtype, jnp.floating)) \
            else x.dtype
    if shardings is None:
        return jax.tree.map(lambda x: sds(x, None, cast(x)), unboxed), None
    return jax.tree.map(lambda x, s: sds(x, s, cast(x)), unboxed, shardings), shardings


def _keystr(path) -> tuple:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def state_shardings(abstract_state: Any, param_shardings: Any, mesh) -> Any:
    """Shardings for `{"step", "params", "opt_state"}`: every optimizer leaf that mirrors a
    parameter (same key path suffix and shape, e.g. Adam's mu / nu) takes its sharding, the
    rest (counts, step) are replicated."""
    rep = NamedSharding(mesh, P())
    flat_p, _ = jax.tree_util.tree_flatten_with_path(abstract_state["params"])
    flat_s = jax.tree.leaves(param_shardings)
    by_path = {_keystr(p): (x.shape, s) for (p, x), s in zip(flat_p, flat_s)}

    def pick(path, leaf):
        keys = _keystr(path)
        for i in range(len(keys)):
            hit = by_path.get(keys[i:])
            if hit is not None and hit[0] == leaf.shape:
                return hit[1]
        return rep

    opt = jax.tree_util.tree_map_with_path(pick, abstract_state["opt_state"])
    return {"step": rep, "params": param_shardings, "opt_state": opt}


def abstract_state(params: Any, param_shardings: Any, tx, mesh) -> tuple[Any, Any]:
    """(abstract train state with shardings, its shardings) for PPM `params` (arrays or
    ShapeDtypeStructs) under the optax transformation `tx`. `mesh=None`: unsharded."""
    p = jax.tree.map(lambda x: sds(x), params)
    state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": p,
             "opt_state": jax.eval_shape(tx.init, p)}
    if mesh is None:
        return state, None
    shard = state_shardings(state, param_shardings, mesh)
    return jax.tree.map(lambda x, s: sds(x, s), state, shard), shard


def abstract_frozen(params: Any, dtype: Any) -> Any:
    """The frozen LLaVA params as the train step sees them (floats in `dtype`)."""
    dtype = jnp.dtype(dtype)
    return jax.tree.map(
        lambda x: sds(x, getattr(x, "sharding", None),
                      dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype), params)


def batch_shapes(batch: int, text_len: int, image_size: int) -> dict[str, tuple[tuple, Any]]:
    """{key: (shape, dtype)} of one global train batch."""
    return {"pixels": ((batch, image_size, image_size, 3), jnp.float32),
            "ids": ((batch, text_len), jnp.int32),
            "mask": ((batch, text_len), jnp.bool_),
            "loss_mask": ((batch, text_len), jnp.bool_),
            "weight": ((batch,), jnp.float32)}


def batch_shardings(mesh, keys: tuple[str, ...] | None = None) -> dict[str, NamedSharding]:
    """The train batch's shardings (`keys`: `batch_keys(...)`, default one base view per
    example): leading axis over (data, fsdp)."""
    return {k: sharding.batch_sharding(mesh, _BATCH_NDIM[k]) for k in keys or batch_keys()}


def abstract_batch(batch: int, text_len: int, image_size: int, mesh=None) -> dict:
    """ShapeDtypeStructs of one global train batch (sharded when `mesh`)."""
    sh = batch_shardings(mesh) if mesh is not None else {}
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sh.get(k))
            for k, (shape, dtype) in batch_shapes(batch, text_len, image_size).items()}


def data_parallelism(mesh) -> int:
    """How many ways the batch is split: the product of the data and fsdp mesh axes."""
    return int(mesh.shape["data"] * mesh.shape["fsdp"])


def batch_geometry(mesh, batch_size: int, hosts: int, max_len: int, n_v: int) -> tuple[int, int]:
    """(global batch, training sequence length = text max_len - 1 + n_v vision tokens); the
    batch must split over the mesh's data x fsdp axes and over the hosts."""
    dp, gb = data_parallelism(mesh), int(batch_size)
    if gb % dp or gb % hosts:
        raise ValueError(f"train.batch_size={gb} must be divisible by the data x fsdp mesh "
                         f"axes ({dp}) and the number of hosts ({hosts})")
    return gb, int(max_len) - 1 + n_v


def fitting_batch(batch: int, mesh, hosts: int = 1) -> int:
    """The smallest batch >= `batch` divisible by the mesh's data x fsdp axes and `hosts`."""
    import math

    m = math.lcm(data_parallelism(mesh), int(hosts))
    return max(m, -(-int(batch) // m) * m)


def guarded_update(state: dict, loss: Any, grads: Any, tx: Any) -> tuple[dict, dict]:
    """One optimizer step on `state` ({"step", "params", "opt_state"}) that keeps the old state
    when the loss or the gradient norm is not finite. Returns (new state, metrics: grad_norm,
    param_norm, ok) for the trainers (the PPM step, PDrop* fine-tuning)."""
    gnorm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
    new = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
    new = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
    return new, dict(grad_norm=gnorm, param_norm=optax.tree.norm(new["params"]),
                     ok=ok.astype(jnp.float32))
