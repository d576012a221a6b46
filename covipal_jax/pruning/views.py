"""Per-view tower statistics of a packed visual input (AnyRes views, video frames).

Letters: B batch, C views per row (AnyRes: base view + crops of the bucket, padded; video:
frames), n = g*g tower tokens per view, Dv tower width, Hv tower head dim.

A packed buffer (`inference/visual_inputs.py`) no longer has one h x w grid per image, so the
single-view fields of `PruneContext` (`vision_features`, `cls_attention`, ...) do not apply.
Methods that work per view, as VisionZip's official LLaVA-NeXT code does, read these instead
(`PruneContext.views`); `visual_inputs.packed_context` fills it for methods with
`per_view = True`.
"""
from __future__ import annotations

import flax.struct
import jax

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
    plan:          i32[B, 8] | None  `models.anyres.pack_plan` (AnyRes); None for video.
    kind:          "anyres" | "video" (static).
    grid:          g, the tower grid side (static).
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

    @property
    def num_views(self) -> int:
        return self.features.shape[1]
