"""Multi-crop (AnyRes) images and videos as prefill inputs: the packed visual input and its
`PruneContext`.

Letters: B batch, C views per image (crop bucket), F frames, H = W view side, N packed length
(static per bucket), D width, T text bucket, g tower grid side, p pooled frame side.

A visual input is a pytree passed where prefill takes `pixels` (so `decoding.Generator` and
`sampler.first_token_fn` jit it unchanged); its static fields (the bucket capacity) are part of
the jit key, so a program compiles once per (crop bucket, text bucket, k):

- `AnyResImage(pixels f32[B, C, H, W, 3], plan i32[B, 8], capacity)`: `Llava.encode_anyres`
  packs HF's sequence (base view, unpadded crop rows each ending in `image_newline`) as the
  valid prefix of a buffer of N = g*g + capacity slots; placeholder `cfg.image_token_id`.
- `Video(frames f32[B, F, H, W, 3])`: `Llava.encode_video` (frames pooled to p*p tokens each,
  one `image_newline` after the last frame): N = F*p*p + 1 slots, all valid; placeholder
  `cfg.video_token_id`.

Pruning sees the whole packed buffer at once (a global top-k over the base view, the crops and
the frames); `PruneContext.valid` marks the real slots and `coords (kind, row, col)` the layout
(`models/anyres.py` kinds, plus `KIND_FRAME` here: row = frame * p + r).
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from covipal_jax.models import anyres
from covipal_jax.models.llava import Llava
from covipal_jax.pruning import views as views_lib
from covipal_jax.pruning.base import PruneContext, PruningMethod
from covipal_jax.pruning.views import ViewStats

Array = jax.Array

KIND_FRAME = 3
# PruneContext fields a packed input does not provide (tower statistics of a single view)
_UNSUPPORTED_NEEDS = frozenset({"cls", "cls_attention", "vision_keys",
                                "mean_attention_received", "vision_features"})


@flax.struct.dataclass
class AnyResImage:
    """One AnyRes image per row: pixels f32[B, C, H, W, 3] (view 0 the base view, padding
    views zero), plan i32[B, 8] (`models.anyres.pack_plan`), capacity (static,
    `anyres.bucket_capacity(cfg, C)`)."""

    pixels: Array
    plan: Array
    capacity: int = flax.struct.field(pytree_node=False)

    @property
    def batch(self) -> int:
        return self.pixels.shape[0]

    def num_slots(self, cfg) -> int:
        g = cfg.vision.grid[0]
        return g * g + self.capacity


@flax.struct.dataclass
class Video:
    """One OneVision video per row: frames f32[B, F, H, W, 3]."""

    frames: Array

    @property
    def batch(self) -> int:
        return self.frames.shape[0]

    def num_slots(self, cfg) -> int:
        p = -(-cfg.vision.grid[0] // 2)
        return self.frames.shape[1] * p * p + 1


def is_packed(x: Any) -> bool:
    return isinstance(x, (AnyResImage, Video))


def placeholder_id(cfg, visual: Any) -> int:
    """The prompt token a visual input replaces."""
    if isinstance(visual, Video):
        if cfg.video_token_id is None or cfg.video_token_id < 0:
            raise ValueError("this model config has no video_token_id (not a video model)")
        return int(cfg.video_token_id)
    return int(cfg.image_token_id)


def video_coords(batch: int, frames: int, p: int) -> Array:
    """i32[B, F*p*p + 1, 3]: (KIND_FRAME, frame * p + r, c) per pooled token, then
    (KIND_NEWLINE, F * p, 0) for the final newline."""
    t = jnp.arange(frames * p * p, dtype=jnp.int32)
    f, r, c = t // (p * p), (t % (p * p)) // p, t % p
    body = jnp.stack([jnp.full_like(t, KIND_FRAME), f * p + r, c], axis=-1)
    nl = jnp.asarray([[anyres.KIND_NEWLINE, frames * p, 0]], jnp.int32)
    return jnp.broadcast_to(jnp.concatenate([body, nl], axis=0)[None],
                            (batch, frames * p * p + 1, 3))


def encode_packed(model: Llava, params: Any, visual: Any) -> tuple[Array, Array, Array]:
    """visual -> (tokens f32[B, N, D], valid bool[B, N], coords i32[B, N, 3])."""
    cfg = model.cfg
    if not cfg.image_newline:
        raise ValueError("AnyRes / video inputs need a model with image_newline "
                         "(LLaVA-NeXT / OneVision configs)")
    if isinstance(visual, AnyResImage):
        return model.apply(params, visual.pixels, visual.plan, capacity=visual.capacity,
                           method=Llava.encode_anyres)
    if isinstance(visual, Video):
        vis = model.apply(params, visual.frames, method=Llava.encode_video)
        b, n = vis.shape[:2]
        p = -(-cfg.vision.grid[0] // 2)
        return vis, jnp.ones((b, n), bool), video_coords(b, visual.frames.shape[1], p)
    raise TypeError(f"not a packed visual input: {type(visual).__name__}")


def encode_packed_views(model: Llava, params: Any, visual: Any
                        ) -> tuple[Array, Array, Array, ViewStats]:
    """`encode_packed` plus the tower statistics of every view (`pruning.views.ViewStats`:
    AnyRes base view + crops, C = the bucket's views; video: F frames), one tower pass."""
    cfg = model.cfg
    if not cfg.image_newline:
        raise ValueError("AnyRes / video inputs need a model with image_newline "
                         "(LLaVA-NeXT / OneVision configs)")
    if isinstance(visual, AnyResImage):
        tokens, valid, coords, out = model.apply(params, visual.pixels, visual.plan,
                                                 capacity=visual.capacity,
                                                 method=Llava.encode_anyres_stats)
        plan = jnp.asarray(visual.plan, jnp.int32)
        n_views = jnp.where(plan[:, 0] > 0, 1 + plan[:, 0] * plan[:, 1], 1)
        view_valid = jnp.arange(visual.pixels.shape[1])[None, :] < n_views[:, None]
        kind = views_lib.KIND_ANYRES
    elif isinstance(visual, Video):
        tokens, out = model.apply(params, visual.frames, method=Llava.encode_video_stats)
        b, n = tokens.shape[:2]
        p = -(-cfg.vision.grid[0] // 2)
        valid, coords = jnp.ones((b, n), bool), video_coords(b, visual.frames.shape[1], p)
        plan, view_valid = None, jnp.ones(visual.frames.shape[:2], bool)
        kind = views_lib.KIND_VIDEO
    else:
        raise TypeError(f"not a packed visual input: {type(visual).__name__}")
    cls_att = None if out.cls_attention is None else out.cls_attention.sum(axis=2)
    stats = ViewStats(features=out.features, keys=out.keys.mean(axis=3), view_valid=view_valid,
                      cls=out.cls, cls_attention=cls_att,
                      attention_received=out.attention_received, plan=plan, kind=kind,
                      grid=cfg.vision.grid[0])
    return tokens, valid, coords, stats


def packed_context(model: Llava, params: Any, visual: Any, ids: Array, mask: Array,
                   method: PruningMethod, rng: Array | None = None
                   ) -> tuple[PruneContext, Array, Array]:
    """The `PruneContext` of a packed visual input (tokens, valid, coords, text), the text
    embeddings f32[B, T, D] and the placeholder positions i32[B].

    ids i32[B, T] left-padded with one placeholder per row (`placeholder_id`); mask bool[B, T].
    Methods that read tower statistics of one view (CLS attention, keys, ...) are refused
    here with a clear error, unless they prune per view (`per_view = True`, VisionZip): those
    get `ctx.views` (`encode_packed_views`).
    """
    cfg = model.cfg
    missing = sorted(method.needs & _UNSUPPORTED_NEEDS)
    per_view = bool(getattr(method, "per_view", False))  # prunes each view (VisionZip)
    if missing and not per_view:
        raise ValueError(f"pruning method {method.name!r} reads {missing} of a single view; "
                         "not available on AnyRes / video input yet")
    token = placeholder_id(cfg, visual)
    views = None
    if missing:
        tokens, valid, coords, views = encode_packed_views(model, params, visual)
    else:
        tokens, valid, coords = encode_packed(model, params, visual)
    text_ids = jnp.where(ids == token, cfg.image_token_id, ids)
    text = model.apply(params, text_ids, method=Llava.embed_text)
    pos = jnp.argmax(ids == token, axis=-1).astype(jnp.int32)
    ctx = PruneContext(vision_tokens=tokens, text_embeds=text, text_mask=mask & (ids != token),
                       rng=rng, valid=valid, coords=coords, views=views)
    return ctx, text, pos
