"""Static-shape selection utilities: top-k, gather, keep masks (the top-k arithmetic of methods).

Sequence assembly (splice, positions, in-LLM keep indices) lives with the model in
`covipal_jax.models.multimodal`; `splice` and `in_llm_keep_indices` are re-exported here.

Shapes: `B` batch, `N` candidates, `k` kept, `D` width, `T` text length, `L` spliced length.
Everything here is index arithmetic with static shapes (no boolean indexing), so it jits once
per (shape, k) and works with traced data (scores, image positions).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from covipal_jax.models.multimodal import (POSITION_MODES, in_llm_keep_indices,  # noqa: F401
                                           splice)

Array = jax.Array


def topk_indices(scores: Array, k: int) -> Array:
    """Indices of the `k` largest scores per row, sorted ascending (original order).

    scores: f32[B, N] -> i32[B, k]. Ties are broken deterministically towards the lower index
    (`lax.top_k` returns the lower index first among equal values). NaN scores rank highest
    (as in `lax.top_k`); callers should not pass NaNs.
    """
    n = scores.shape[-1]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} outside [1, {n}]")
    _, idx = jax.lax.top_k(scores, k)
    return jnp.sort(idx, axis=-1).astype(jnp.int32)


def gather_tokens(x: Array, idx: Array) -> Array:
    """x: f32[B, N, D], idx: i32[B, k] -> f32[B, k, D] (rows of x in the order of idx)."""
    return jnp.take_along_axis(x, idx[..., None].astype(jnp.int32), axis=1)


def keep_mask(idx: Array, n: int) -> Array:
    """idx: i32[B, k] -> bool[B, n], True at the kept positions."""
    b = idx.shape[0]
    return jnp.zeros((b, n), bool).at[jnp.arange(b)[:, None], idx].set(True)


def complement_indices(idx: Array, n: int) -> Array:
    """The positions NOT in idx, ascending: i32[B, k] -> i32[B, n - k] (idx must be unique)."""
    mask = keep_mask(idx, n)
    order = jnp.argsort(mask, axis=-1, stable=True)  # False (not kept) first, in index order
    return order[:, : n - idx.shape[1]].astype(jnp.int32)


def slice_span(x: Array, start: Array, length: int, axis: int = 1) -> Array:
    """Per-row dynamic slice: x[b, ..., start[b] : start[b] + length, ...] along `axis`.

    x: [B, ...]; start: i32[B] (may be traced); `length` static. The span must lie inside x
    (dynamic_slice clamps otherwise).
    """
    ax = axis % x.ndim
    return jax.vmap(lambda r, s: jax.lax.dynamic_slice_in_dim(r, s, length, axis=ax - 1))(
        x, start.astype(jnp.int32))
