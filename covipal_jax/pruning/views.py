"""Per-view tower statistics of a packed visual input (AnyRes views, video frames).

Letters: B batch, C views per row (AnyRes: base view + crops of the bucket, padded; video:
frames), n = g*g tower tokens per view, Dv tower width, Hv tower head dim.

A packed buffer (`inference/visual_inputs.py`) no longer has one h x w grid per image, so the
single-view fields of `PruneContext` (`vision_features`, `cls_attention`, ...) do not apply.
Methods that work per view, as VisionZip's official LLaVA-NeXT code does, read these instead
(`PruneContext.views`); `visual_inputs.packed_context` fills it for methods with
`per_view = True`.

Several images per row (`visual_inputs.MultiImage`, P images of C_1 views each): the views of
all images side by side, C = P * C_1 (image p's views at [p*C_1, (p+1)*C_1)), `plan`
i32[B, P, 8], `images` = P; `split_images` turns that into B*P single-image rows (each one an
AnyRes image, so a per-view method runs per image unchanged) and `join_images` back.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array

KIND_ANYRES = "anyres"
KIND_VIDEO = "video"


@flax.struct.dataclass
class ViewStats:
    """Tower statistics of every view of a packed input (at the LLaVA feature layer).

    features:      f32[B, C, n, Dv]  what the projector consumes (CLS removed).
    keys:          f32[B, C, n, Hv]  the feature layer's keys averaged over heads (VisionZip's
        `metric`), CLS row removed.
    cls:           f32[B, C, Dv] | None  the CLS hidden state (CLIP; None for SigLIP).
    cls_attention: f32[B, C, n] | None  CLS -> patch attention summed over heads (CLIP).
    attention_received: f32[B, C, n] | None  attention each patch receives, mean over heads and
        queries (the SigLIP score).
    view_valid:    bool[B, C]  real views (AnyRes: `1 + rows*cols` views, or 1 untiled;
        video: every frame).
    plan:          i32[B, 8] | None  `models.anyres.pack_plan` (AnyRes); None for video;
        i32[B, P, 8] when `images` > 1.
    kind:          "anyres" | "video" (static).
    grid:          g, the tower grid side (static).
    images:        P, images per row (static; > 1 only for several images per prompt).
    """

    features: Array
    keys: Array
    view_valid: Array
    cls: Array | None = None
    cls_attention: Array | None = None
    attention_received: Array | None = None
    plan: Array | None = None
    kind: str = flax.struct.field(pytree_node=False, default=KIND_ANYRES)
    grid: int = flax.struct.field(pytree_node=False, default=0)
    images: int = flax.struct.field(pytree_node=False, default=1)

    @property
    def num_views(self) -> int:
        return self.features.shape[1]

    @property
    def image_valid(self) -> Array:
        """bool[B, P]: real images (an image is real iff its base view is)."""
        b, c = self.view_valid.shape
        return self.view_valid.reshape(b, self.images, c // self.images)[:, :, 0]


_PER_VIEW = ("features", "keys", "view_valid", "cls", "cls_attention", "attention_received")


def join_images(stats: ViewStats, images: int) -> ViewStats:
    """B*P single-image rows (views [B*P, C_1, ...], plan i32[B*P, 8]) -> B rows of P images
    (views [B, P*C_1, ...], plan i32[B, P, 8], `images` = P)."""
    def join(x):
        return None if x is None else x.reshape(x.shape[0] // images, -1, *x.shape[2:])

    plan = None if stats.plan is None else stats.plan.reshape(-1, images, stats.plan.shape[-1])
    return stats.replace(plan=plan, images=images,
                         **{f: join(getattr(stats, f)) for f in _PER_VIEW})


def split_images(stats: ViewStats) -> ViewStats:
    """The inverse of `join_images`: B*P rows of one image each (`images` = 1)."""
    p = stats.images

    def split(x):
        return None if x is None else x.reshape(x.shape[0] * p, x.shape[1] // p, *x.shape[2:])

    plan = None if stats.plan is None else stats.plan.reshape(-1, stats.plan.shape[-1])
    return stats.replace(plan=plan, images=1, **{f: split(getattr(stats, f)) for f in _PER_VIEW})


def repeat_rows(x: Array | None, p: int) -> Array | None:
    """x [B, ...] -> [B*P, ...], each row repeated P times (row-major, as `split_images`)."""
    return None if x is None else jnp.repeat(x, p, axis=0)
