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
- `MultiImage(pixels f32[B, P, C, H, W, 3], plan i32[B, P, 8], image_valid bool[B, P],
  capacity)`: up to P images per prompt (OneVision multi-image, `data.anyres.preprocess_multi`:
  a row with one image is tiled, a row with several gives each one untiled view, base + one
  newline); image p is packed like an `AnyResImage` into slots [p*n1, (p+1)*n1), n1 =
  g*g + capacity, N = P*n1; the row's p-th `<image>` placeholder takes image p's tokens.

`budget` (static, every input): "global" (default; one top-k over the whole buffer),
"per_image" (the example's budget split evenly over its images, a top-k inside each) or
"per_frame" (videos: split over the frames; the final newline counts with the last frame).

Pruning sees the whole packed buffer at once (a global top-k over the base view, the crops and
the frames); `PruneContext.valid` marks the real slots and `coords (kind, row, col)` the layout
(`models/anyres.py` kinds, plus `KIND_FRAME` here: row = frame * p + r).
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from covipal_jax.models import anyres
from covipal_jax.models import multimodal as mm
from covipal_jax.models.llava import Llava
from covipal_jax.pruning import views as views_lib
from covipal_jax.pruning.base import PruneContext, PruningMethod
from covipal_jax.pruning.views import ViewStats

Array = jax.Array

KIND_FRAME = 3
BUDGETS = ("global", "per_image", "per_frame")
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
    budget: str = flax.struct.field(pytree_node=False, default="global")

    @property
    def batch(self) -> int:
        return self.pixels.shape[0]

    def num_slots(self, cfg) -> int:
        g = cfg.vision.grid[0]
        return g * g + self.capacity


@flax.struct.dataclass
class MultiImage:
    """Up to P images per row: pixels f32[B, P, C, H, W, 3], plan i32[B, P, 8] (absent images:
    an untiled plan), image_valid bool[B, P] (a prefix per row), capacity (static, per image)."""

    pixels: Array
    plan: Array
    image_valid: Array
    capacity: int = flax.struct.field(pytree_node=False)
    budget: str = flax.struct.field(pytree_node=False, default="global")

    @property
    def batch(self) -> int:
        return self.pixels.shape[0]

    @property
    def max_images(self) -> int:
        return self.pixels.shape[1]

    def image_slots(self, cfg) -> int:
        """n1: slots per image."""
        g = cfg.vision.grid[0]
        return g * g + self.capacity

    def num_slots(self, cfg) -> int:
        return self.max_images * self.image_slots(cfg)

    @classmethod
    def from_layout(cls, cfg, pixels, layout, image_valid, budget: str = "global"
                    ) -> "MultiImage":
        """From `data.anyres.preprocess_multi`'s arrays (host): pixels f32[B, P, C, H, W, 3],
        layout i32[B, P, 4], image_valid bool[B, P]; the plan and the bucket capacity are
        computed here (`models.anyres.pack_plan` / `bucket_capacity`)."""
        layout = np.asarray(layout)
        b, n_img = layout.shape[:2]
        plan = anyres.pack_plan(layout.reshape(b * n_img, 4), cfg.vision.grid[0],
                                cfg.anyres_max_crops).reshape(b, n_img, 8)
        cap = anyres.bucket_capacity(cfg, int(np.shape(pixels)[2]))
        return cls(pixels, plan, np.asarray(image_valid, bool), cap, budget)

    def num_real_tokens(self, cfg) -> np.ndarray:
        """i32[B]: valid packed tokens of each row (HF's sequence length of its images)."""
        b, n_img = np.shape(self.plan)[:2]
        lens = anyres.packed_lengths(np.asarray(self.plan).reshape(b * n_img, 8),
                                     cfg.vision.grid[0]).reshape(b, n_img)
        return (lens * np.asarray(self.image_valid)).sum(-1).astype(np.int32)


@flax.struct.dataclass
class Video:
    """One OneVision video per row: frames f32[B, F, H, W, 3]."""

    frames: Array
    budget: str = flax.struct.field(pytree_node=False, default="global")

    @property
    def batch(self) -> int:
        return self.frames.shape[0]

    def num_slots(self, cfg) -> int:
        p = -(-cfg.vision.grid[0] // 2)
        return self.frames.shape[1] * p * p + 1


def is_packed(x: Any) -> bool:
    return isinstance(x, (AnyResImage, Video, MultiImage))


def num_images(visual: Any) -> int:
    """P: the static number of placeholders per row (1 except `MultiImage`)."""
    return visual.max_images if isinstance(visual, MultiImage) else 1


def image_counts(visual: Any) -> Array:
    """i32[B]: placeholders (images) of each row."""
    if isinstance(visual, MultiImage):
        return jnp.sum(visual.image_valid, axis=-1).astype(jnp.int32)
    return jnp.ones((visual.batch,), jnp.int32)


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


def _image_rows(visual: MultiImage) -> tuple[Array, Array]:
    """A `MultiImage` as B*P AnyRes rows: (pixels f32[B*P, C, H, W, 3], plan i32[B*P, 8])."""
    b, n_img, c = visual.pixels.shape[:3]
    return (visual.pixels.reshape(b * n_img, c, *visual.pixels.shape[3:]),
            jnp.asarray(visual.plan, jnp.int32).reshape(b * n_img, -1))


def _join_images(visual: MultiImage, tokens: Array, valid: Array, coords: Array
                 ) -> tuple[Array, Array, Array]:
    """Per-image packed buffers (f32[B*P, n1, D], bool[B*P, n1], i32[B*P, n1, 3]) -> one row
    buffer of N = P*n1 slots; absent images' slots invalid."""
    b, n_img = visual.image_valid.shape
    n1 = tokens.shape[1]
    valid = valid.reshape(b, n_img, n1) & visual.image_valid[:, :, None]
    valid = valid.reshape(b, n_img * n1)
    coords = jnp.where(valid[..., None], coords.reshape(b, n_img * n1, 3),
                       jnp.asarray([anyres.KIND_INVALID, -1, -1], jnp.int32))
    return tokens.reshape(b, n_img * n1, -1), valid, coords


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
    if isinstance(visual, MultiImage):
        return _join_images(visual, *model.apply(
            params, *_image_rows(visual), capacity=visual.capacity,
            method=Llava.encode_anyres))
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
    elif isinstance(visual, MultiImage):   # every image as an AnyRes row, then joined
        pixels, plan = _image_rows(visual)
        tokens, valid, coords, out = model.apply(params, pixels, plan, capacity=visual.capacity,
                                                 method=Llava.encode_anyres_stats)
        tokens, valid, coords = _join_images(visual, tokens, valid, coords)
        n_views = jnp.where(plan[:, 0] > 0, 1 + plan[:, 0] * plan[:, 1], 1)
        view_valid = jnp.arange(pixels.shape[1])[None, :] < n_views[:, None]
        view_valid = view_valid & visual.image_valid.reshape(-1)[:, None]
        kind = views_lib.KIND_ANYRES
    else:
        raise TypeError(f"not a packed visual input: {type(visual).__name__}")
    cls_att = None if out.cls_attention is None else out.cls_attention.sum(axis=2)
    stats = ViewStats(features=out.features, keys=out.keys.mean(axis=3), view_valid=view_valid,
                      cls=out.cls, cls_attention=cls_att,
                      attention_received=out.attention_received, plan=plan, kind=kind,
                      grid=cfg.vision.grid[0])
    if isinstance(visual, MultiImage):
        stats = views_lib.join_images(stats, visual.max_images)
    return tokens, valid, coords, stats


def unsupported_reason(method: PruningMethod) -> str | None:
    """Why `method` cannot prune a packed input (AnyRes image, several images, video), or None:
    it reads tower statistics of one view (CLS attention, keys, ...) and does not prune per
    view (`per_view = True`, VisionZip: per view, per image of a multi-image prompt). In-LLM
    methods run on every packed input (one selection over all images / crops / frames;
    `prefill.prefill_packed`)."""
    missing = sorted(method.needs & _UNSUPPORTED_NEEDS)
    if missing and not getattr(method, "per_view", False):
        return (f"pruning method {method.name!r} reads {missing} of a single view; not "
                "available on AnyRes / video input")
    return None


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
    why = unsupported_reason(method)
    if why:
        raise ValueError(why)
    missing = sorted(method.needs & _UNSUPPORTED_NEEDS)
    token = placeholder_id(cfg, visual)
    views = None
    if missing:
        tokens, valid, coords, views = encode_packed_views(model, params, visual)
    else:
        tokens, valid, coords = encode_packed(model, params, visual)
    text_ids = jnp.where(ids == token, cfg.image_token_id, ids)
    text = model.apply(params, text_ids, method=Llava.embed_text)
    if isinstance(visual, MultiImage):
        pos = mm.image_positions(ids, token, visual.max_images)
    else:
        pos = jnp.argmax(ids == token, axis=-1).astype(jnp.int32)
    groups, n_groups = budget_groups(cfg, visual, coords)
    ctx = PruneContext(vision_tokens=tokens, text_embeds=text, text_mask=mask & (ids != token),
                       rng=rng, valid=valid, coords=coords, groups=groups, num_groups=n_groups,
                       views=views)
    return ctx, text, pos


def slot_images(cfg, visual: Any, n: int) -> Array:
    """i32[N]: the image (placeholder) index of each packed slot."""
    if isinstance(visual, MultiImage):
        return jnp.arange(n, dtype=jnp.int32) // visual.image_slots(cfg)
    return jnp.zeros((n,), jnp.int32)


def budget_groups(cfg, visual: Any, coords: Array) -> tuple[Array | None, int]:
    """(groups i32[B, N] | None, G): the budget groups of `visual.budget` (None: global)."""
    mode = getattr(visual, "budget", "global")
    if mode not in BUDGETS:
        raise ValueError(f"budget {mode!r} not in {BUDGETS}")
    if mode == "global":
        return None, 0
    b, n = coords.shape[:2]
    if mode == "per_image":
        g = jnp.broadcast_to(slot_images(cfg, visual, n)[None], (b, n))
        return g, num_images(visual)
    if not isinstance(visual, Video):
        raise ValueError('budget="per_frame" needs a video input')
    f = visual.frames.shape[1]
    p = -(-cfg.vision.grid[0] // 2)
    return jnp.clip(coords[..., 1] // p, 0, f - 1).astype(jnp.int32), f


def splice_all(cfg, visual: Any, ctx: PruneContext, text: Array, mask: Array, pos: Array
               ) -> tuple[Array, Array, Array, Array, Array]:
    """Every slot of the packed buffer at its placeholder: the unpruned sequence an in-LLM
    method starts from (`in_llm.run_in_llm`).

    text f32[B, T, D], mask bool[B, T], pos i32[B] or i32[B, P] (`packed_context`). Returns
    (seq f32[B, L, D], seq_mask bool[B, L] (invalid slots masked out), positions i32[B, L]
    contiguous over what the LLM sees (HF's sequence), is_vision bool[B, L], vision_index
    i32[B, N] the sequence index of each slot, ascending), L = T - 1 + N. With several images
    the slots sit in P spans separated by text (an absent image's slots, all invalid, follow
    the row's last image).
    """
    n = ctx.n_v
    valid = jnp.ones((ctx.batch, n), bool) if ctx.valid is None else ctx.valid
    img = jnp.broadcast_to(slot_images(cfg, visual, n)[None], (ctx.batch, n))
    seq, seq_mask, positions, is_vis = mm.splice_packed(
        text, mask, pos, image_counts(visual), ctx.vision_tokens, img, valid, "contiguous")
    vision_index = jnp.argsort(~is_vis, axis=1, stable=True)[:, :n].astype(jnp.int32)
    return seq, seq_mask, positions, is_vis, vision_index


def splice_selected(cfg, visual: Any, ctx: PruneContext, text: Array, mask: Array, pos: Array,
                    indices: Array, tokens: Array, kept_valid: Array, positions_mode: str
                    ) -> tuple[Array, Array, Array]:
    """The selected tokens f32[B, k, D] (slots indices i32[B, k] ascending, kept_valid
    bool[B, k]) spliced at the placeholders pos (i32[B] or i32[B, P]): (seq f32[B, L, D],
    seq_mask bool[B, L], positions i32[B, L]), L = T - 1 + k. Positions "contiguous" (over
    what the LLM sees) or "original" (as if every valid slot of every image were kept)."""
    n = ctx.n_v
    img_of_slot = slot_images(cfg, visual, n)
    vis_image = jnp.take(img_of_slot, indices)
    n_img = num_images(visual)
    v = ctx.valid.astype(jnp.int32).reshape(ctx.batch, n_img, n // n_img)
    rank = (jnp.cumsum(v, axis=-1) - 1).reshape(ctx.batch, n)
    seq, seq_mask, positions, _ = mm.splice_packed(
        text, mask, pos, image_counts(visual), tokens, vis_image, kept_valid, positions_mode,
        vis_rank=jnp.take_along_axis(rank, indices, axis=1), image_len=v.sum(-1))
    return seq, seq_mask, positions
