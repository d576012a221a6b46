"""The PPM's layout-aware positional information: one encoding for single images, AnyRes
images and videos, whatever the number of vision tokens N.

Letters: B batch, N vision slots (any length: 729 for a single view, a padded AnyRes bucket,
F*p*p + 1 for a video), F_in Fourier features (`num_features`).

Every slot carries `coords i32[B, N, 3] = (kind, row, col)` (`PruneContext.coords`,
`models/anyres.py` kinds, `inference/visual_inputs.KIND_FRAME`): kind 0 base view, 1 AnyRes
crop grid (row, col on the merged, unpadded and possibly downsampled crop map: the crop index
is implicit in it), 2 `image_newline`, 3 video frame (row = frame * p + r), -1 padding. A
single image gets (0, i // w, i % w) (`single_image_coords`).

From the coords, per example and without any shape that depends on the data:
- the view / frame index t: the frame for kind 3 (p = the frames' column count, pooled frames
  are p x p), the frame count for the newline after a video, 0 otherwise;
- the position inside the view, normalized to [0, 1] by that kind's extent in this example
  (y = (r + 0.5) / rows, x = (c + 0.5) / cols): a 27 x 27 base view, a 14 x 14 pooled frame
  and a 60 x 80 crop map all span the same unit square, so a PPM trained on single images
  reads an AnyRes crop map or a video frame as an image of another resolution. Newlines sit
  at x = 1 (the right edge) of their row.

Features (F_in = 4 * pos_freqs + 2 * index_freqs): sin / cos(pi 2^j y), sin / cos(pi 2^j x),
j < pos_freqs, and sin / cos(t / 64^(i / index_freqs)), i < index_freqs. The PPM adds
`Dense(F_in -> d)(features) + kind_embedding[kind]` to its vision tokens; the kind table starts
at zero, so kinds never seen in training (a crop grid, frames, after single-image training)
start as plain positions of the unit square and a single-image PPM transfers.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array

KIND_INVALID, KIND_BASE, KIND_GRID, KIND_NEWLINE, KIND_FRAME = -1, 0, 1, 2, 3
NUM_KINDS = 4
INDEX_PERIOD = 64.0


def num_features(pos_freqs: int, index_freqs: int) -> int:
    return 4 * pos_freqs + 2 * index_freqs


def default_grid(n: int) -> tuple[int, int]:
    """(h, w) of an n-token single view: the most square factorization (h <= w)."""
    h = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return h, n // h


def single_image_coords(batch: int, grid: tuple[int, int]) -> Array:
    """i32[B, h*w, 3]: (KIND_BASE, i // w, i % w) per token of a plain h x w image."""
    h, w = grid
    i = jnp.arange(h * w, dtype=jnp.int32)
    c = jnp.stack([jnp.zeros_like(i), i // w, i % w], axis=-1)
    return jnp.broadcast_to(c[None], (batch, h * w, 3))


def _extent(kind: Array, x: Array, k: int) -> Array:
    """f32[B, 1]: max(x) + 1 over the slots of kind k (>= 1)."""
    m = jnp.max(jnp.where(kind == k, x, -1), axis=1, keepdims=True) + 1
    return jnp.maximum(m, 1).astype(jnp.float32)


def layout_geometry(coords: Array) -> tuple[Array, Array, Array, Array]:
    """coords i32[B, N, 3] -> (kind i32[B, N] in [0, NUM_KINDS), index f32[B, N],
    y f32[B, N], x f32[B, N]) (y, x in [0, 1]); padding slots get kind 0 (callers mask them)."""
    kind, row, col = coords[..., 0], coords[..., 1], coords[..., 2]
    p = _extent(kind, col, KIND_FRAME)                                   # frame side
    is_frame = kind == KIND_FRAME
    rowf = row.astype(jnp.float32)
    frame = jnp.floor(rowf / p)
    has_frames = jnp.any(is_frame, axis=1, keepdims=True)
    r_in = jnp.where(is_frame, rowf - frame * p, rowf)
    rows = jnp.where(is_frame, p, jnp.where(kind == KIND_BASE, _extent(kind, row, KIND_BASE),
                                            _extent(kind, row, KIND_GRID)))
    cols = jnp.where(is_frame, p, jnp.where(kind == KIND_BASE, _extent(kind, col, KIND_BASE),
                                            _extent(kind, col, KIND_GRID)))
    y = jnp.clip((r_in + 0.5) / rows, 0.0, 1.0)
    x = jnp.clip((col.astype(jnp.float32) + 0.5) / cols, 0.0, 1.0)
    is_nl = kind == KIND_NEWLINE
    x = jnp.where(is_nl, 1.0, x)
    y = jnp.where(is_nl & has_frames, 1.0, y)
    index = jnp.where(is_frame | (is_nl & has_frames), frame, 0.0)
    kind = jnp.clip(kind, 0, NUM_KINDS - 1)
    return kind.astype(jnp.int32), index, y, x


def layout_features(coords: Array, pos_freqs: int, index_freqs: int) -> tuple[Array, Array]:
    """coords i32[B, N, 3] -> (kind i32[B, N], features f32[B, N, F_in]) (module docstring)."""
    kind, index, y, x = layout_geometry(coords)
    f = jnp.pi * (2.0 ** jnp.arange(pos_freqs, dtype=jnp.float32))
    w = INDEX_PERIOD ** (-jnp.arange(index_freqs, dtype=jnp.float32) / max(index_freqs, 1))
    ay, ax, at = y[..., None] * f, x[..., None] * f, index[..., None] * w
    feats = jnp.concatenate([jnp.sin(ay), jnp.cos(ay), jnp.sin(ax), jnp.cos(ax),
                             jnp.sin(at), jnp.cos(at)], axis=-1)
    return kind, feats
