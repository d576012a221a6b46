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


KIND_NEWLINE = 2  # `models.anyres.KIND_NEWLINE` (coords[..., 0] of an `image_newline` slot)


def example_budget(keep: float | int, k: int, valid: Array) -> Array:
    """Per-example number of tokens the LLM sees out of the static k: i32[B].

    keep a ratio r: `max(1, round(r * n_valid))` (the ratio of THIS example's real tokens, not
    of the padded bucket length); a count: `min(keep, n_valid)`; both clipped to [1, k].
    valid bool[B, N]. Rounding is half-to-even like `resolve_keep`.
    """
    n_valid = jnp.sum(valid, axis=-1).astype(jnp.float32)
    if isinstance(keep, float):
        b = jnp.maximum(jnp.round(keep * n_valid), 1.0)
    else:
        b = jnp.minimum(float(keep), n_valid)
    return jnp.clip(b, 1, k).astype(jnp.int32)


def masked_topk(scores: Array, k: int, valid: Array | None = None, forced: Array | None = None,
                budget: Array | None = None) -> tuple[Array, Array]:
    """Top-k over the allowed slots of a padded buffer, static shapes.

    scores f32[B, N] (higher = kept); valid bool[B, N] (None: all) — invalid slots are ranked
    after every valid one and are never returned as valid; forced bool[B, N] (None: none) —
    valid slots ranked before every other (the `image_newline` slots); budget i32[B] (None: k)
    — how many of the k the example really keeps (the best `budget[b]` by rank).

    Returns (idx i32[B, k] ascending, kept bool[B, k]): `kept` is False for a slot that is
    invalid or beyond the example's budget (prefill masks it out). Ties go to the lower index.
    """
    b, n = scores.shape
    if not 1 <= k <= n:
        raise ValueError(f"k={k} outside [1, {n}]")
    s = scores.astype(jnp.float32)
    # lexicographic rank: (forced, valid, score); finite scores stay ordered inside each class
    s = jnp.where(jnp.isfinite(s), s, jnp.where(s > 0, 3e38, -3e38))
    cls = jnp.zeros((b, n), jnp.int32)
    if valid is not None:
        cls = cls + valid.astype(jnp.int32)
        if forced is not None:
            cls = cls + (forced & valid).astype(jnp.int32)
    elif forced is not None:
        cls = cls + forced.astype(jnp.int32)
    order = jnp.lexsort((-jnp.arange(n)[None, :].repeat(b, 0), s, cls), axis=-1)[:, ::-1]
    top = order[:, :k].astype(jnp.int32)                     # by rank, best first
    ok = jnp.ones((b, k), bool)
    if valid is not None:
        ok = jnp.take_along_axis(valid, top, axis=1)
    if budget is not None:
        ok = ok & (jnp.arange(k)[None, :] < budget[:, None])
    perm = jnp.argsort(top, axis=-1)
    return (jnp.take_along_axis(top, perm, axis=1),
            jnp.take_along_axis(ok, perm, axis=1))


def masked_select(ctx, scores: Array, k: int, keep: float | int) -> tuple[Array, Array | None]:
    """A method's top-k on a `PruneContext`: on a plain image `topk_indices` (kept None); on a
    packed buffer (`ctx.valid` / `ctx.coords`) `masked_topk` with the newline slots forced,
    invalid slots excluded and the per-example budget `example_budget(keep, k, valid)`.

    The budget counts every token the LLM sees, newlines included (the sequence is then
    exactly T - 1 + k long; a budget below the newline count keeps newlines only).
    Returns (idx i32[B, k] ascending, kept bool[B, k] | None).
    """
    if not ctx.packed:
        return topk_indices(scores, k), None
    valid = ctx.valid if ctx.valid is not None else jnp.ones(scores.shape, bool)
    forced = None if ctx.coords is None else ctx.coords[..., 0] == KIND_NEWLINE
    budget = example_budget(keep, k, valid)
    if getattr(ctx, "groups", None) is not None:
        return grouped_topk(scores, k, ctx.groups, ctx.num_groups, valid, forced, budget)
    return masked_topk(scores, k, valid, forced, budget)


def group_quota(budget: Array, present: Array) -> Array:
    """Split each example's budget i32[B] evenly over its present groups bool[B, G]:
    i32[B, G] (the first `budget % count` present groups get one more; absent groups 0)."""
    count = jnp.maximum(jnp.sum(present, axis=-1), 1).astype(jnp.int32)[:, None]
    order = jnp.cumsum(present.astype(jnp.int32), axis=-1) - 1          # rank among present
    q = budget[:, None] // count + (order < budget[:, None] % count)
    return jnp.where(present, q, 0).astype(jnp.int32)


def grouped_topk(scores: Array, k: int, groups: Array, num_groups: int, valid: Array,
                 forced: Array | None = None, budget: Array | None = None
                 ) -> tuple[Array, Array]:
    """`masked_topk` with the budget split over groups (per image / per frame budgets).

    groups i32[B, N] in [0, G) (G = num_groups, static); the example's budget i32[B] (None: k)
    is split evenly over the groups holding a valid slot (`group_quota`) and each group keeps
    its best `quota[g]` slots by the same rank as `masked_topk` (forced, valid, score; ties to
    the lower index). A group with fewer valid slots than its quota keeps them all (the rest of
    its quota is not moved to other groups). Returns (idx i32[B, k] ascending, kept bool[B, k]).
    """
    b, n = scores.shape
    if not 1 <= k <= n:
        raise ValueError(f"k={k} outside [1, {n}]")
    budget = jnp.full((b,), k, jnp.int32) if budget is None else budget.astype(jnp.int32)
    # global rank of every slot (0 = best), from masked_topk's ordering over all N slots
    s = scores.astype(jnp.float32)
    s = jnp.where(jnp.isfinite(s), s, jnp.where(s > 0, 3e38, -3e38))
    cls = valid.astype(jnp.int32) + (jnp.zeros_like(valid) if forced is None
                                      else (forced & valid)).astype(jnp.int32)
    rank_order = jnp.lexsort((-jnp.arange(n)[None, :].repeat(b, 0), s, cls), axis=-1)[:, ::-1]
    rank = jnp.argsort(rank_order, axis=-1).astype(jnp.int32)           # [B, N]
    g = jnp.clip(groups.astype(jnp.int32), 0, num_groups - 1)
    # rank inside the group: sort by (group, rank), position minus the group's first position
    key = g * n + rank
    by_group = jnp.argsort(key, axis=-1)
    sorted_g = jnp.take_along_axis(g, by_group, axis=1)
    first = jax.vmap(lambda sg: jnp.searchsorted(sg, jnp.arange(num_groups), side="left"))(
        sorted_g).astype(jnp.int32)                                     # [B, G]
    pos_in_sorted = jnp.argsort(by_group, axis=-1).astype(jnp.int32)
    in_group = pos_in_sorted - jnp.take_along_axis(first, g, axis=1)
    present = jnp.zeros((b, num_groups), jnp.int32).at[jnp.arange(b)[:, None], g].max(
        valid.astype(jnp.int32)) > 0
    quota = group_quota(budget, present)
    chosen = valid & (in_group < jnp.take_along_axis(quota, g, axis=1))
    # chosen slots first (at most budget <= k of them), then the rest (kept False)
    return masked_topk(scores, k, chosen, None)
