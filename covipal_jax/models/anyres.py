"""AnyRes feature packing (LLaVA-NeXT, LLaVA-OneVision) and OneVision video pooling, static shapes.

Letters: B images, C views per image (crop bucket: base view + crops, padded), g tower grid side
(n = g*g tokens per view), D width, N packed length (static per bucket), F frames, p pooled side.

transformers' `pack_image_features` (per image, variable length):
  base = view 0 (g*g tokens); the crops form a (rows*g, cols*g) feature map, row-major over crops
  then patches; `unpad_image` cuts the zero padding of the processor back off (to the original
  aspect ratio, centred); OneVision then bilinearly downsamples it when it exceeds
  `anyres_max_N` (`ratio = sqrt(h*w / (N*g*g)) > 1.1` -> `(int(h // ratio), int(w // ratio))`);
  `image_newline` is appended to every row; sequence = base ++ rows (h x (w + 1) row-major).
  Untiled views (OneVision multi-image) are `base ++ [newline]`.

Here the same sequence is a *prefix* of a fixed-length buffer `f32[B, N, D]` with a validity mask
(valid = the first `g*g + out_h * (out_w + 1)` slots). Each slot computes its own source: slot t of
the grid part is row `t // (out_w + 1)`, column `t % (out_w + 1)` (the last column: newline), read
with torch's bilinear rule (`align_corners=False`, source clamped at 0) from the unpadded map
offset by the padding, i.e. a gather from the crop features (no boolean indexing, no shapes that
depend on the image). With no downsampling the bilinear weights are exactly (1, 0): a copy.
The integers that depend on the image (padding, unpadded and output sizes) are computed on the
host by `pack_plan` with HF's own Python arithmetic (so `round(.., 7)`, `//` on floats and the
1.1 threshold agree bit for bit) and travel as `plan i32[B, 8]`:

    (rows, cols, top, left, src_h, src_w, out_h, out_w)

A flat prefix (rather than a 2-D (H, W+1) grid) keeps N at the real maximum of the bucket: for
OneVision's 6x6 pinpoints a 2-D buffer would hold 162 x 163 slots, the packed maximum is far less.
`coords i32[B, N, 3]` = (kind, row, col) per slot, kind 0 base / 1 grid / 2 newline / -1 invalid:
the layout a position-aware pruner (PPM) reads.

Use (one compiled program per crop bucket C):

    proc = data.anyres.AnyResConfig.for_model(cfg)
    x = data.anyres.preprocess(images, proc)                  # pixels f32[B, C, H, W, 3]
    plan = pack_plan(x.layout, cfg.vision.grid[0], cfg.anyres_max_crops)
    cap = bucket_capacity(cfg, x.pixels.shape[1])
    logits, mask = Llava(cfg).apply(params, x.pixels, plan, ids, mask,
                                    method=Llava.forward_anyres, capacity=cap)

Video (OneVision `get_video_features`): every frame through the tower and projector, then
`apply_pooling`: bilinear resize g x g -> ceil(g/2) x ceil(g/2) (27 -> 14: 196 tokens), frames
concatenated, and ONE `image_newline` after the last frame (HF appends one per video, not per
frame): `f32[B, F*p*p + 1, D]`.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

PLAN_FIELDS = ("rows", "cols", "top", "left", "src_h", "src_w", "out_h", "out_w")
KIND_INVALID, KIND_BASE, KIND_GRID, KIND_NEWLINE = -1, 0, 1, 2


def parse_aspect_ratio(vision_aspect_ratio: str | int | None) -> int:
    """HF's `vision_aspect_ratio` ("anyres_max_9") -> 9; "anyres" / None / 0 -> 0 (no cap)."""
    if not vision_aspect_ratio:
        return 0
    if isinstance(vision_aspect_ratio, int):
        return vision_aspect_ratio
    s = str(vision_aspect_ratio)
    if s == "anyres":
        return 0
    if not s.startswith("anyres_max_") or not s[len("anyres_max_"):].isdigit():
        raise ValueError(f"vision_aspect_ratio {s!r}: expected 'anyres' or 'anyres_max_<N>'")
    return int(s[len("anyres_max_"):])


# ---- host side: HF's integer geometry -------------------------------------------------------
def unpadded_size(rows: int, cols: int, height: int, width: int,
                  grid: int) -> tuple[int, int, int, int]:
    """HF `unpad_image` on a (rows*g, cols*g) map of an image (height, width):
    (top, left, src_h, src_w) of the kept region."""
    ch, cw = rows * grid, cols * grid
    if width / height > cw / ch:
        new_h = int(round(height * (cw / width), 7))
        pad = (ch - new_h) // 2
        return pad, 0, ch - 2 * pad, cw
    new_w = int(round(width * (ch / height), 7))
    pad = (cw - new_w) // 2
    return 0, pad, ch, cw - 2 * pad


def downsampled_size(h: int, w: int, grid: int, max_crops: int) -> tuple[int, int]:
    """OneVision's anyres_max_N: the output size of an (h, w) unpadded map (N = 0: no cap)."""
    if not max_crops or h == 0 or w == 0:
        return h, w
    ratio = math.sqrt(h * w / (max_crops * grid ** 2))
    if ratio > 1.1:
        return int(h // ratio), int(w // ratio)
    return h, w


def plan_one(layout: Iterable[int], grid: int, max_crops: int = 0) -> tuple[int, ...]:
    """layout (rows, cols, height, width) -> the 8 plan integers (see the module docstring)."""
    rows, cols, height, width = (int(x) for x in layout)
    if rows == 0 or cols == 0:  # untiled view: base ++ [newline]
        return (0, 0, 0, 0, 0, 0, 1, 0)
    top, left, sh, sw = unpadded_size(rows, cols, height, width, grid)
    oh, ow = downsampled_size(sh, sw, grid, max_crops)
    return (rows, cols, top, left, sh, sw, oh, ow)


def pack_plan(layout: np.ndarray, grid: int, max_crops: int = 0) -> np.ndarray:
    """layout i32[B, 4] (from `data.anyres`) -> plan i32[B, 8]."""
    layout = np.asarray(layout)
    if layout.ndim != 2 or layout.shape[-1] != 4:
        raise ValueError(f"layout must be i32[B, 4] (rows, cols, height, width), got "
                         f"{layout.shape}")
    return np.asarray([plan_one(x, grid, max_crops) for x in layout], np.int32)


def packed_lengths(plan: np.ndarray, grid: int) -> np.ndarray:
    """i32[B]: HF's `feature_lens` (valid packed tokens per image)."""
    plan = np.asarray(plan)
    return (grid * grid + plan[:, 6] * (plan[:, 7] + 1)).astype(np.int32)


def grid_capacity(grids: Iterable[tuple[int, int]], grid: int, max_crops: int = 0,
                  untiled: bool = True) -> int:
    """Static length of the grid part: the most `out_h * (out_w + 1)` any image can need with
    these crop layouts (enumerates every unpadded size HF can produce)."""
    best = 1 if untiled else 0
    for rows, cols in grids:
        ch, cw = rows * grid, cols * grid
        sizes = [(ch, w) for w in range(0, cw + 1)] + [(h, cw) for h in range(0, ch + 1)]
        for h, w in sizes:
            oh, ow = downsampled_size(h, w, grid, max_crops)
            best = max(best, oh * (ow + 1))
    return best


def packed_length(grids: Iterable[tuple[int, int]], grid: int, max_crops: int = 0) -> int:
    """N: the static packed length for images with these crop layouts."""
    return grid * grid + grid_capacity(grids, grid, max_crops)


# ---- from a model config / a Hugging Face config ----------------------------------------------
# transformers' defaults when a config.json omits `image_grid_pinpoints`.
HF_DEFAULT_PINPOINTS = {
    "llava_next": ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)),
    "llava_onevision": tuple((384 * r, 384 * c) for r in range(1, 7) for c in range(1, 7)),
}


def crop_grids(cfg) -> tuple[tuple[int, int], ...]:
    """The crop layouts (rows, cols) of a LlavaConfig's `image_grid_pinpoints`."""
    s = cfg.vision.image_size
    if not cfg.image_grid_pinpoints:
        raise ValueError("this model config has no image_grid_pinpoints (not an AnyRes model)")
    return tuple(sorted({(h // s, w // s) for h, w in cfg.image_grid_pinpoints}))


def capacity(cfg, grids: Iterable[tuple[int, int]] | None = None) -> int:
    """Static grid capacity for a LlavaConfig (all its layouts, or the given bucket's)."""
    grids = crop_grids(cfg) if grids is None else tuple(grids)
    return grid_capacity(grids, cfg.vision.grid[0], cfg.anyres_max_crops)


def bucket_capacity(cfg, num_views: int) -> int:
    """Static grid capacity for a crop bucket of `num_views` views (base + crops): the layouts
    with `1 + rows*cols <= num_views`. One compilation per bucket: (num_views, this)."""
    if num_views < 1:
        raise ValueError(f"num_views must be >= 1, got {num_views}")
    grids = [g for g in crop_grids(cfg) if 1 + g[0] * g[1] <= num_views]
    return grid_capacity(grids, cfg.vision.grid[0], cfg.anyres_max_crops)


def hf_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    """LlavaConfig fields of a transformers `config.json` dict that `weights` does not map:
    image_newline, image_grid_pinpoints, anyres_max_crops, video_token_id.

    For `llava` (1.5): no AnyRes. `llava_next`: pinpoints, no downsampling (HF NeXT has none).
    `llava_onevision`: pinpoints, `vision_aspect_ratio` ("anyres_max_9"), `video_token_index`.
    """
    mt = hf.get("model_type")
    if mt not in HF_DEFAULT_PINPOINTS:
        return dict(image_newline=False)
    pins = hf.get("image_grid_pinpoints") or HF_DEFAULT_PINPOINTS[mt]
    out = dict(image_newline=True, image_grid_pinpoints=tuple(tuple(int(x) for x in p)
                                                              for p in pins))
    if mt == "llava_onevision":
        out["anyres_max_crops"] = parse_aspect_ratio(hf.get("vision_aspect_ratio")
                                                     or "anyres_max_9")
        out["video_token_id"] = int(hf.get("video_token_id", hf.get("video_token_index", 151647)))
    return out


# ---- device side ---------------------------------------------------------------------------
def _source(dst: Array, in_size: Array, out_size: Array) -> tuple[Array, Array, Array]:
    """torch `upsample_bilinear2d` (align_corners=False) source taps for output index `dst`:
    (i0, i1, lambda1), all broadcast like `dst`; sizes may be traced."""
    scale = in_size.astype(jnp.float32) / jnp.maximum(out_size, 1).astype(jnp.float32)
    src = jnp.maximum(scale * (dst.astype(jnp.float32) + 0.5) - 0.5, 0.0)
    i0 = src.astype(jnp.int32)  # src >= 0: truncation is floor
    i1 = i0 + (i0 < in_size - 1).astype(jnp.int32)
    return i0, i1, src - i0.astype(jnp.float32)


def _pack_one(feats: Array, newline: Array, plan: Array, grid: int, capacity: int):
    """One image: feats f32[C, g*g, D], newline f32[D], plan i32[8] ->
    (f32[g*g + capacity, D], valid bool[...], coords i32[..., 3])."""
    rows, cols, top, left, sh, sw, oh, ow = (plan[i] for i in range(8))
    del rows
    t = jnp.arange(capacity, dtype=jnp.int32)
    width = ow + 1
    r, c = t // width, t % width
    valid = t < oh * width
    is_nl = c == ow
    y0, y1, ly = _source(r, sh, oh)
    x0, x1, lx = _source(jnp.minimum(c, jnp.maximum(ow - 1, 0)), sw, ow)
    flat = feats.reshape(-1, feats.shape[-1])  # f32[C*g*g, D]
    n = grid * grid

    def take(y, x):
        yy, xx = top + y, left + x
        crop = 1 + (yy // grid) * cols + xx // grid
        idx = crop * n + (yy % grid) * grid + xx % grid
        idx = jnp.where(valid & ~is_nl, idx, 0)
        return jnp.take(flat, jnp.clip(idx, 0, flat.shape[0] - 1), axis=0)

    lx, ly = lx[:, None], ly[:, None]
    val = ((1.0 - ly) * ((1.0 - lx) * take(y0, x0) + lx * take(y0, x1))
           + ly * ((1.0 - lx) * take(y1, x0) + lx * take(y1, x1)))
    val = jnp.where(is_nl[:, None], newline[None].astype(val.dtype), val)
    val = jnp.where(valid[:, None], val, 0.0)
    base = feats[0]
    out = jnp.concatenate([base, val.astype(base.dtype)], axis=0)
    kind = jnp.where(valid, jnp.where(is_nl, KIND_NEWLINE, KIND_GRID), KIND_INVALID)
    i = jnp.arange(n, dtype=jnp.int32)
    coords = jnp.concatenate([
        jnp.stack([jnp.full((n,), KIND_BASE, jnp.int32), i // grid, i % grid], -1),
        jnp.stack([kind, jnp.where(valid, r, -1), jnp.where(valid, c, -1)], -1)], axis=0)
    mask = jnp.concatenate([jnp.ones((n,), bool), valid])
    return out, mask, coords


def pack_image_features(feats: Array, newline: Array, plan: Array, *, grid: int,
                        capacity: int) -> tuple[Array, Array, Array]:
    """Per-view projected features -> HF's packed AnyRes sequence, as a masked prefix.

    feats f32[B, C, g*g, D] (view 0 the base view); newline f32[D]; plan i32[B, 8] from
    `pack_plan`; capacity (static) from `grid_capacity`.
    Returns (packed f32[B, N, D], valid bool[B, N], coords i32[B, N, 3]), N = g*g + capacity;
    the valid slots are a prefix and equal HF's `pack_image_features` output in order.
    """
    if feats.ndim != 4 or feats.shape[2] != grid * grid:
        raise ValueError(f"feats must be f32[B, C, {grid * grid}, D], got {feats.shape}")
    fn = lambda f, p: _pack_one(f, newline, p, grid, capacity)  # noqa: E731
    return jax.vmap(fn)(feats, jnp.asarray(plan, jnp.int32))


def pool_frames(feats: Array, grid: int) -> Array:
    """OneVision `apply_pooling`: f32[..., g*g, D] -> f32[..., p*p, D], p = ceil(g / 2),
    torch bilinear (align_corners=False, no antialias)."""
    p = -(-grid // 2)
    i0, i1, lam = _source(jnp.arange(p), jnp.int32(grid), jnp.int32(p))
    x = feats.reshape(*feats.shape[:-2], grid, grid, feats.shape[-1])
    lam = lam.astype(x.dtype)
    rows = (1.0 - lam)[:, None, None] * jnp.take(x, i0, axis=-3) \
        + lam[:, None, None] * jnp.take(x, i1, axis=-3)           # [..., p, g, D]
    cols = (1.0 - lam)[:, None] * jnp.take(rows, i0, axis=-2) \
        + lam[:, None] * jnp.take(rows, i1, axis=-2)              # [..., p, p, D]
    return cols.reshape(*feats.shape[:-2], p * p, feats.shape[-1])


def pack_video_features(feats: Array, newline: Array, *, grid: int) -> Array:
    """OneVision `get_video_features` after the projector: f32[B, F, g*g, D] ->
    f32[B, F*p*p + 1, D] (frames pooled, concatenated, one newline at the end)."""
    b = feats.shape[0]
    pooled = pool_frames(feats, grid)
    pooled = pooled.reshape(b, -1, pooled.shape[-1])
    nl = jnp.broadcast_to(newline.astype(pooled.dtype), (b, 1, pooled.shape[-1]))
    return jnp.concatenate([pooled, nl], axis=1)


def mask_invalid_slots(seq_mask: Array, is_vision: Array, start: Array,
                       valid: Array) -> tuple[Array, Array]:
    """After splicing a padded packed span of N slots at `start`: drop its invalid slots.

    seq_mask bool[B, L], is_vision bool[B, L] (the splice's), start i32[B] first vision index,
    valid bool[B, N]. Returns (mask bool[B, L] with invalid vision slots False, positions
    i32[B, L] = `cumsum(mask) - 1` clamped at 0): the LLM then sees exactly HF's compact
    sequence (invalid slots are never attended to and take no position).
    """
    j = jnp.arange(seq_mask.shape[1], dtype=jnp.int32)[None, :]
    src = jnp.clip(j - start.astype(jnp.int32)[:, None], 0, valid.shape[1] - 1)
    mask = jnp.where(is_vision, jnp.take_along_axis(valid, src, axis=1), seq_mask)
    positions = jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)
    return mask, positions.astype(jnp.int32)
