"""VisionZip on packed visual inputs: per view, laid out as the official LLaVA-NeXT code does.

Letters: B batch, C views (AnyRes: base view + crops of the bucket; video: F frames), n = g*g
tower tokens per view, k_v tokens kept per view, D LLM width, N packed slots, p pooled side.

Official rule (dvlab-research/VisionZip `visionzip/llava_arch.py`
`prepare_inputs_labels_for_multimodal_visionzip` + `restore_image_features_sorted`,
`visionzip/clip_encoder.py`): every view of an AnyRes image (base view and each crop) goes
through the tower as one batch and is compressed ON ITS OWN to the same k_v tokens
[CLS, dominant..., contextual...] (`visionzip.compress`), then projected. An image is
- tiled (`image_feature.shape[0] > 1`): `cat(base, crop_dominant, crop_cls, crop_contextual)`:
  the base view's k_v tokens in VisionZip order; the dominant patches of all crops put back
  on the combined (rows*g, cols*g) crop grid and read in raster order over that grid (crops
  row-major, as HF/LLaVA pack them); the CLS token of every crop (crop order); the contextual
  tokens of every crop (crop order). The official code neither unpads the crop grid nor adds
  `image_newline` here (it writes `grid_with_newline = restored_features` and selects from it):
  dominant patches in the processor's padding area stay, and there is NO newline token.
- untiled (one view, OneVision multi-image): the view's k_v tokens, then `image_newline`.
The official code hard-codes LLaVA-NeXT's 24 x 24 grid; here g is the model's.

The budget is per view (the official `dominant` / `contextual` arguments are per view: 54 + 10
= 64 tokens for each of the 5 views of LLaVA-NeXT's 320-token setting): k_v =
`resolve_keep(keep, g*g)` for AnyRes views. A row with V real views sees exactly V * k_v
tokens (+ 1 newline when untiled); the static output length is C * k_v + 1 (padding views and
the newline of a tiled image come back invalid, `PruneResult.valid`).

Video: the official repository has no video path. Each frame is treated as a view
(VisionZip on the frame's g x g tower tokens, k_v = `resolve_keep(keep, p*p)`, i.e. the ratio
applies to the p*p pooled tokens the frame contributes unpruned, a count is per frame), the
frames' k_v tokens follow each other in frame order, then the video's one `image_newline`;
OneVision's 2x2 bilinear pooling is not applied to the kept tokens (a sparse set has no grid
to pool). Static length F * k_v + 1, all valid.

Indices (`PruneResult.indices`, reported as `kept`): a packed slot per token, so every real
token points at a real slot: base-view patches their slot, CLS tokens slot 0 (VisionZip's
"CLS -> 0"), crop patches the slot of their unpadded cell (clamped into the unpadded region
and scaled to OneVision's downsampled grid when it is downsampled; a patch in the padding area
has no slot of its own and takes the nearest), contextual tokens their target patch's slot,
video patches the pooled cell that holds them.

Several images per prompt (`visual_inputs.MultiImage`, `ViewStats.images` = P > 1): each image
is one AnyRes input of its own (OneVision: untiled, one view + its newline, when a prompt has
several), so VisionZip runs per image exactly as above (`per_image`: the B*P images as rows)
and the images' outputs follow each other in image order, indices into image p's slots
[p*n1, (p+1)*n1); absent (padding) images contribute nothing (all their tokens invalid).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from covipal_jax.pruning.base import PruneContext, PruneResult
from covipal_jax.pruning.select import gather_tokens
from covipal_jax.pruning.views import KIND_ANYRES, ViewStats, repeat_rows, split_images

Array = jax.Array


def _crop_slot(yy: Array, xx: Array, plan: Array, g: int) -> Array:
    """Packed slot of combined-grid cells (yy, xx) i32[B, M] for plan i32[B, 8]."""
    top, left, sh, sw, oh, ow = (plan[:, i][:, None] for i in range(2, 8))
    y = jnp.clip(yy - top, 0, jnp.maximum(sh - 1, 0))
    x = jnp.clip(xx - left, 0, jnp.maximum(sw - 1, 0))
    r = (y * oh) // jnp.maximum(sh, 1)
    c = (x * ow) // jnp.maximum(sw, 1)
    return g * g + r * (ow + 1) + c


def assemble_anyres(tokens: Array, pos: Array, views: ViewStats, newline: Array,
                    has_cls: bool, dom_patches: int) -> tuple[Array, Array, Array]:
    """Per-view VisionZip outputs -> the official LLaVA-NeXT sequence, static shapes.

    tokens f32[B, C, k_v, D] (projected, [CLS?, dominant..., contextual...] per view); pos
    i32[B, C, k_v] patch index in the view (CLS 0); newline f32[B, D] (the packed
    `image_newline` token). Returns (tokens f32[B, C*k_v + 1, D], indices i32[B, C*k_v + 1]
    packed slots, valid bool[B, C*k_v + 1]).
    """
    b, c, k_v, d = tokens.shape
    g = views.grid
    plan = views.plan
    rows, cols = plan[:, 0], jnp.maximum(plan[:, 1], 1)
    tiled = rows > 0
    ok = views.view_valid[:, 1:] & tiled[:, None]                        # [B, C-1]
    i0 = int(has_cls)
    ci = jnp.arange(c - 1, dtype=jnp.int32)[None, :]
    cr, cc = ci // cols[:, None], ci % cols[:, None]                     # [B, C-1]

    def on_grid(p):  # i32[B, C-1, m] -> combined-grid (yy, xx), flattened [B, (C-1)*m]
        yy = cr[..., None] * g + p // g
        xx = cc[..., None] * g + p % g
        return yy.reshape(b, -1), xx.reshape(b, -1)

    def flat(x):
        return x.reshape(b, -1, *x.shape[3:])

    parts = [(tokens[:, 0], pos[:, 0], jnp.ones((b, k_v), bool))]       # base view
    # dominant crop patches, raster order over the combined crop grid
    dp = pos[:, 1:, i0:i0 + dom_patches]
    yy, xx = on_grid(dp)
    d_ok = jnp.repeat(ok, dom_patches, axis=1)
    key = jnp.where(d_ok, yy * (cols * g)[:, None] + xx, jnp.iinfo(jnp.int32).max)
    perm = jnp.argsort(key, axis=1, stable=True)
    slot = jnp.take_along_axis(_crop_slot(yy, xx, plan, g), perm, axis=1)
    parts.append((gather_tokens(flat(tokens[:, 1:, i0:i0 + dom_patches]), perm), slot,
                  jnp.take_along_axis(d_ok, perm, axis=1)))
    if has_cls:  # the crops' CLS tokens, crop order
        parts.append((tokens[:, 1:, 0], jnp.zeros((b, c - 1), jnp.int32), ok))
    n_ctx = k_v - i0 - dom_patches
    if n_ctx:  # the crops' contextual tokens, crop order
        yy, xx = on_grid(pos[:, 1:, i0 + dom_patches:])
        parts.append((flat(tokens[:, 1:, i0 + dom_patches:]), _crop_slot(yy, xx, plan, g),
                      jnp.repeat(ok, n_ctx, axis=1)))
    parts.append((newline[:, None], jnp.full((b, 1), g * g, jnp.int32), ~tiled[:, None]))
    out = jnp.concatenate([p[0] for p in parts], axis=1)
    valid = jnp.concatenate([p[2] for p in parts], axis=1)
    idx = jnp.where(valid, jnp.concatenate([p[1] for p in parts], axis=1), 0)
    return out, idx.astype(jnp.int32), valid


def assemble_video(tokens: Array, pos: Array, views: ViewStats, newline: Array,
                   has_cls: bool) -> tuple[Array, Array, Array]:
    """Per-frame VisionZip outputs -> frames in order, then the newline: tokens f32[B, F, k_v,
    D], pos i32[B, F, k_v] -> (f32[B, F*k_v + 1, D], slots i32[B, F*k_v + 1], valid)."""
    b, f, k_v, d = tokens.shape
    g = views.grid
    p = -(-g // 2)
    cell = ((pos // g) * p // g) * p + (pos % g) * p // g
    slot = jnp.arange(f, dtype=jnp.int32)[None, :, None] * (p * p) + cell
    if has_cls:
        slot = slot.at[:, :, 0].set(jnp.arange(f, dtype=jnp.int32)[None, :] * (p * p))
    out = jnp.concatenate([tokens.reshape(b, f * k_v, d), newline[:, None]], axis=1)
    idx = jnp.concatenate([slot.reshape(b, f * k_v), jnp.full((b, 1), f * p * p, jnp.int32)],
                          axis=1)
    valid = jnp.concatenate([jnp.repeat(views.view_valid, k_v, axis=1),
                             jnp.ones((b, 1), bool)], axis=1)
    return out, jnp.where(valid, idx, 0).astype(jnp.int32), valid


def view_tokens(views: ViewStats) -> int:
    """How many LLM tokens one view contributes unpruned (the per-view budget's base): g*g
    for an AnyRes view, p*p for a video frame."""
    if views.kind == KIND_ANYRES:
        return views.grid * views.grid
    p = -(-views.grid // 2)
    return p * p


def per_image(ctx: PruneContext, fn: Callable[[PruneContext], PruneResult]) -> PruneResult:
    """A single-image per-view VisionZip `fn` on several images per row (ctx.views.images =
    P): every image as its own row (vision tokens f32[B*P, n1, D], `views.split_images`),
    then the P results side by side: tokens f32[B, P*k1, D], indices i32[B, P*k1] into the
    row's N = P*n1 slots (image p's offset by p*n1), valid bool[B, P*k1] (False for every
    token of an absent image); k1 = one image's static output length."""
    views = ctx.views
    p, b, n = views.images, ctx.batch, ctx.n_v
    n1 = n // p

    def rows(x):  # [B, P*m, ...] -> [B*P, m, ...]
        return None if x is None else x.reshape(b * p, x.shape[1] // p, *x.shape[2:])

    sub = ctx.replace(vision_tokens=rows(ctx.vision_tokens), valid=rows(ctx.valid),
                      coords=rows(ctx.coords), views=split_images(views), groups=None,
                      num_groups=0, text_embeds=repeat_rows(ctx.text_embeds, p),
                      text_mask=repeat_rows(ctx.text_mask, p), rng=None)
    res = fn(sub)
    k1 = res.indices.shape[1]
    offset = (jnp.arange(p, dtype=jnp.int32) * n1)[None, :, None]
    idx = (res.indices.reshape(b, p, k1) + offset).reshape(b, p * k1)
    valid = jnp.ones((b * p, k1), bool) if res.valid is None else res.valid
    valid = (valid.reshape(b, p, k1) & views.image_valid[:, :, None]).reshape(b, p * k1)
    return PruneResult(tokens=res.tokens.reshape(b, p * k1, res.tokens.shape[-1]),
                       indices=idx.astype(jnp.int32), scores=None, valid=valid)
