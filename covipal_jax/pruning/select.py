"""Static-shape selection utilities: top-k, gather, keep masks, and splicing vision into text.

Shapes: `B` batch, `N` candidates, `k` kept, `D` width, `T` text length, `L` spliced length.
Everything here is index arithmetic with static shapes (no boolean indexing), so it jits once
per (shape, k) and works with traced data (scores, image positions).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

POSITION_MODES = ("contiguous", "original")


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


def _text_positions(text_mask: Array) -> Array:
    return jnp.maximum(jnp.cumsum(text_mask.astype(jnp.int32), axis=-1) - 1, 0)


def splice(text_embeds: Array, text_mask: Array, image_pos: Array, vis: Array,
           vis_positions: Array | None = None, positions_mode: str = "contiguous",
           n_v: int | None = None) -> tuple[Array, Array, Array, Array]:
    """Replace the single image placeholder of each prompt by `k` vision tokens.

    text_embeds: f32[B, T, D] left-padded prompt embeddings; text_mask: bool[B, T];
    image_pos: i32[B] index of the placeholder in each row (traced is fine); vis: f32[B, k, D];
    vis_positions: i32[B, k] source patch index of each vision token (needed for "original").

    Returns (seq f32[B, L, D], mask bool[B, L], positions i32[B, L], is_vision bool[B, L]) with
    L = T - 1 + k. Layout of row b: text[:p], vis, text[p+1:], p = image_pos[b].
    Positions:
    - "contiguous": `cumsum(mask) - 1`, pads clamped to 0 (the sequence as the LLM sees it).
    - "original": positions as if all n_v vision tokens were present: text before the image
      keeps its text position; vision token j gets `pos(placeholder) + vis_positions[j]`;
      text after the image gets `pos(placeholder) + n_v + offset` (offset 0 for the first
      token after the placeholder). With k = n_v and vis_positions = arange both modes agree.
    """
    if positions_mode not in POSITION_MODES:
        raise ValueError(f"positions_mode {positions_mode!r} not in {POSITION_MODES}")
    b, t, d = text_embeds.shape
    k = vis.shape[1]
    if vis.shape[0] != b or vis.shape[2] != d:
        raise ValueError(f"vis {vis.shape} does not match text_embeds {text_embeds.shape}")
    length = t - 1 + k
    p = image_pos.astype(jnp.int32)[:, None]                      # [B, 1]
    j = jnp.arange(length, dtype=jnp.int32)[None, :]              # [1, L]
    is_vis = (j >= p) & (j < p + k)                               # [B, L]
    src_text = jnp.clip(jnp.where(j < p, j, j - k + 1), 0, t - 1)  # [B, L]
    src_vis = jnp.clip(j - p, 0, k - 1)                           # [B, L]

    text_part = jnp.take_along_axis(text_embeds, src_text[..., None], axis=1)
    vis_part = jnp.take_along_axis(vis.astype(text_embeds.dtype), src_vis[..., None], axis=1)
    seq = jnp.where(is_vis[..., None], vis_part, text_part)
    mask = jnp.where(is_vis, True, jnp.take_along_axis(text_mask, src_text, axis=1))

    if positions_mode == "contiguous":
        positions = jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)
    else:
        if vis_positions is None or n_v is None:
            raise ValueError('positions_mode="original" needs vis_positions and n_v')
        tpos = _text_positions(text_mask)                          # [B, T]
        base = jnp.take_along_axis(tpos, p, axis=1)                # [B, 1] placeholder position
        text_pos = jnp.take_along_axis(tpos, src_text, axis=1)
        text_pos = jnp.where(j >= p + k, text_pos + n_v - 1, text_pos)
        vis_pos = base + jnp.take_along_axis(vis_positions.astype(jnp.int32), src_vis, axis=1)
        positions = jnp.where(is_vis, vis_pos, text_pos)
    return seq, mask, positions.astype(jnp.int32), is_vis


def in_llm_keep_indices(image_start: Array, vis_idx: Array, n_v: int, length: int) -> Array:
    """Sequence indices an in-LLM method keeps: every text position plus the kept vision ones.

    image_start: i32[B] index of the first vision token in the (unpruned) sequence of length
    `length`; vis_idx: i32[B, k] kept vision tokens (0-based within the image span, ascending).
    Returns i32[B, length - n_v + k], ascending: the `keep_indexs` of FastV / DART (text before
    the image, the kept image tokens, the text after). Gather hidden states, masks and
    position ids with it (FastV and DART keep the original position ids of the kept tokens:
    `position_ids = keep_indexs`).
    """
    k = vis_idx.shape[1]
    out_len = length - n_v + k
    p = image_start.astype(jnp.int32)[:, None]
    j = jnp.arange(out_len, dtype=jnp.int32)[None, :]
    src_vis = jnp.clip(j - p, 0, k - 1)
    vis_src = p + jnp.take_along_axis(vis_idx.astype(jnp.int32), src_vis, axis=1)
    return jnp.where(j < p, j, jnp.where(j < p + k, vis_src, j + n_v - k)).astype(jnp.int32)
