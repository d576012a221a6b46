"""DivPrune (Alvar et al., CVPR 2025): keep the most diverse k projected vision tokens.

Pre-LLM, training-free, text-agnostic. Official rule (vbdi/divprune @799e2d9,
`LLaVA/llava/model/llava_arch.py`, `LlavaMetaForCausalLM.pairwise_cosine_similarity` and
`.DivPrune`, called from `prepare_inputs_labels_for_multimodal` on the projected image tokens
`new_input_embeds[0][SYS_TOKEN_LEN : SYS_TOKEN_LEN + img_feature_len]`):

    D = 1 - cos(H_v, H_v)                         # cosine distance, f32[n_v, n_v]
    s_0 = argmax_j  second-smallest_i D[i, j]      # `topk(D, 2, dim=0, largest=False).values[1]`
    s_t = argmax_j  min_{i < t} D[s_i, j]          # max-min (farthest-point) greedy
    k   = int(round(ratio * n_v))                 # `threshold_terms`
    kept = sorted(s)                              # `keep_indexs.sort()`

Here the running minimum is carried over the `lax.fori_loop` steps (one row of D per step, so
a static k compiles once per (n_v, k)); `jnp.argmax` breaks ties towards the lower index as
`torch.argmax` does. One deliberate difference: a token already chosen is masked out of later
argmaxes. The official loop does not mask them, but a chosen token's own distance is 0 so it
can only be re-picked when every remaining token duplicates a chosen one (all distances 0),
where the official code would return a duplicate index and fewer than k distinct tokens.

The official code runs on batch element 0 only (`new_input_embeds[0]`) with a fixed image
offset (35); here every example is scored independently on `ctx.vision_tokens`.
Positions: LLaVA-1.5 passes `position_ids=None`, so the pruned sequence is renumbered
contiguously (the default `positions="contiguous"`).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from covipal_jax.pruning import registry
from covipal_jax.pruning.base import PreLLMMethod, PruneContext, PruneResult
from covipal_jax.pruning.select import KIND_NEWLINE, gather_tokens, masked_select

Array = jax.Array


def cosine_distance(x: Array) -> Array:
    """f32[B, N, D] -> f32[B, N, N]: `1 - (x / |x|) @ (x / |x|)^T` (official
    `pairwise_cosine_similarity`: `matrix / matrix.norm(dim=1, keepdim=True)`, no epsilon;
    an all-zero token gives NaN there, here it is treated as distance 1 to everything)."""
    x = x.astype(jnp.float32)
    norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
    xn = x / jnp.where(norm > 0, norm, 1.0)
    return 1.0 - jnp.einsum("bnd,bmd->bnm", xn, xn)


def divprune_order(dist: Array, k: int) -> Array:
    """The greedy max-min picks in selection order: f32[B, N, N] -> i32[B, k].

    dist[b, i, j]: distance from token i to token j (columns are scored, as the official
    `dim=0` reductions do).
    """
    b, n, _ = dist.shape
    if not 1 <= k <= n:
        raise ValueError(f"DivPrune: k={k} outside [1, {n}]")
    cols = jnp.swapaxes(dist, 1, 2)                     # cols[b, j, i] = dist[b, i, j]
    if n > 1:
        # second-smallest entry of each column (the smallest is normally the token itself)
        first_scores = -jax.lax.top_k(-cols, 2)[0][..., 1]  # f32[B, N]
    else:
        first_scores = jnp.zeros((b, 1), jnp.float32)
    first = jnp.argmax(first_scores, axis=-1).astype(jnp.int32)
    return _greedy(dist, first, k)


@registry.register
@dataclasses.dataclass(frozen=True, kw_only=True)
class DivPrune(PreLLMMethod):
    """DivPrune: k projected vision tokens by greedy max-min cosine diversity, ascending.

    `keep`: a ratio (the official `SUBSET_RATIO`, e.g. 0.098 for 56 of 576) or a count.
    """

    name = "divprune"
    description = "DivPrune: max-min cosine diversity over the projected tokens (pre-LLM)"

    def select(self, ctx: PruneContext, k: int, variables=None) -> PruneResult:
        """ctx.vision_tokens f32[B, n_v, D] -> k tokens f32[B, k, D], indices i32[B, k]
        ascending, scores f32[B, n_v] (the selection rank: k - t for the t-th pick, 0 for
        tokens not kept)."""
        del variables
        b, n_v = ctx.vision_tokens.shape[:2]
        if ctx.packed:
            return self._select_packed(ctx, k)
        order = divprune_order(cosine_distance(ctx.vision_tokens), k)
        idx = jnp.sort(order, axis=-1)
        rank = jnp.zeros((b, n_v), jnp.float32).at[jnp.arange(b)[:, None], order].set(
            jnp.arange(k, 0, -1, dtype=jnp.float32)[None, :])
        return PruneResult(tokens=gather_tokens(ctx.vision_tokens, idx), indices=idx,
                           scores=rank)

    def _select_packed(self, ctx: PruneContext, k: int) -> PruneResult:
        """On a packed buffer: the greedy runs over the content slots only (valid, not
        `image_newline`; the others sit at distance 0 from everything so they are never
        picked while a content slot remains, and are excluded from the first pick), then
        `masked_select` keeps the newlines and the first picks up to the example's budget
        (a prefix of the greedy order, so the result is the greedy on the budget)."""
        b, n_v = ctx.vision_tokens.shape[:2]
        valid = ctx.valid if ctx.valid is not None else jnp.ones((b, n_v), bool)
        content = valid
        if ctx.coords is not None:
            content = content & (ctx.coords[..., 0] != KIND_NEWLINE)
        dist = cosine_distance(ctx.vision_tokens)
        pair = content[:, :, None] & content[:, None, :]
        # non-content rows/columns: distance 0 (never preferred), first pick: -inf below
        dist = jnp.where(pair, dist, 0.0)
        kk = min(k, n_v)
        order = divprune_order_masked(dist, kk, content)
        rank = jnp.full((b, n_v), -1.0, jnp.float32).at[jnp.arange(b)[:, None], order].set(
            jnp.arange(kk, 0, -1, dtype=jnp.float32)[None, :])
        rank = jnp.where(content, rank, -2.0)
        idx, kept = masked_select(ctx, rank, k, self.keep)
        return PruneResult(tokens=gather_tokens(ctx.vision_tokens, idx), indices=idx,
                           scores=rank, valid=kept)


def divprune_order_masked(dist: Array, k: int, allowed: Array) -> Array:
    """`divprune_order` restricted to `allowed` bool[B, N] columns (a first pick and every
    later pick among allowed slots while any is left): f32[B, N, N] -> i32[B, k]."""
    b, n, _ = dist.shape
    cols = jnp.swapaxes(dist, 1, 2)
    if n > 1:
        big = jnp.where(allowed[:, None, :], cols, jnp.inf)          # only allowed rows i
        first_scores = -jax.lax.top_k(-big, 2)[0][..., 1]
    else:
        first_scores = jnp.zeros((b, 1), jnp.float32)
    first_scores = jnp.where(allowed & jnp.isfinite(first_scores), first_scores, -jnp.inf)
    first = jnp.argmax(first_scores, axis=-1).astype(jnp.int32)
    return _greedy(dist, first, k, allowed)


def _greedy(dist: Array, first: Array, k: int, allowed: Array | None = None) -> Array:
    """The max-min loop both orders share: from the first picks i32[B], repeatedly take the
    unchosen slot farthest (max of min distance) from the chosen ones; with `allowed`
    bool[B, N], disallowed slots rank below every allowed one. f32[B, N, N] -> i32[B, k]."""
    b, n, _ = dist.shape
    rows = jnp.arange(b)
    picks = jnp.zeros((b, k), jnp.int32).at[:, 0].set(first)
    chosen = jnp.zeros((b, n), bool).at[rows, first].set(True)
    min_dist = dist[rows, first]                        # f32[B, N]: min over chosen rows

    def step(t, carry):
        picks, chosen, min_dist = carry
        ranked = min_dist if allowed is None else jnp.where(allowed, min_dist, -1e30)
        nxt = jnp.argmax(jnp.where(chosen, -jnp.inf, ranked), axis=-1).astype(jnp.int32)
        picks = picks.at[:, t].set(nxt)
        chosen = chosen.at[rows, nxt].set(True)
        min_dist = jnp.minimum(min_dist, dist[rows, nxt])
        return picks, chosen, min_dist

    picks, _, _ = jax.lax.fori_loop(1, k, step, (picks, chosen, min_dist))
    return picks
