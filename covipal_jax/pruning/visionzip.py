"""VisionZip (Yang et al., CVPR 2025): dominant tokens by CLS attention + merged contextual tokens.

Rule (dvlab-research/VisionZip `visionzip/clip_encoder.py` `CLIPVisionTower_VisionZip.forward`,
`visionzip/utils.py` `CLIPAttention_forward`, `visionzip/main.py`), at the LLaVA feature layer
(CLIP layer -2: `hidden_states[-2]`, `attentions[-2]`, `layers[-2].metric`):
1. Dominant: `cls_attention = attn[:, :, 0, 1:].sum(dim=1)` (CLS row, summed over heads, CLS
   column dropped); the top `dominant_num` patches, plus the CLS token itself
   (`all_indices = cat([0], topk + 1)`); `main.py` passes `dominant_num = dominant - 1`, so the
   CLS token counts towards the dominant budget. Dominant tokens are taken in sequence order
   (`masked_select`): CLS first, then the dominant patches in raster order.
2. Contextual: the R remaining patches (raster order). `metric` = the layer's keys averaged
   over heads (`raw_key_states.mean(1)`), L2-normalized. Targets: every `step`-th remaining
   token, `step = max(1, R // contextual_num)`, the first `contextual_num` of them. Every other
   remaining token goes to its most similar target (`argmax` of the normalized-key dot product,
   first index on ties). Contextual token = target feature + MEAN of its assigned features
   (`target_hidden + bmm(one_hot^T, hidden) / counts.clamp(min=1)`; the target itself is not
   in the mean).
3. Output `cat([dominant_tokens, contextual_tokens])` in tower-feature space, then the projector.
Budget: the official 64-token setting is dominant=54 (CLS + 53 patches), contextual=10
(192: 162+30, 128: 108+20, all 54:10). Here `dominant = round(k * 54 / 64)` (CLS included) and
`contextual = k - dominant`, unless given explicitly.

SigLIP towers (no CLS) follow cokeshao/HoliTom's VisionZip port
(`LLaVA-NeXT/llava/model/multimodal_encoder/siglip_encoder.py`, WRAPPER=visionzip): the
dominant score is the attention each patch receives averaged over heads and ALL queries
(`attn_weights.mean(dim=1).mean(dim=1)`, `PruneContext.mean_attention_received`), metric =
head-averaged keys of the same layer, and every dominant slot is a patch.

Order and positions: with `order="visionzip"` (default, faithful) the tokens enter the LLM as
[CLS, dominant..., contextual...] and `indices` follow that order (CLS -> 0, a contextual token
-> its target's patch index), so `indices` is ascending within each group but not globally.
`order="spatial"` sorts all tokens by index (CLS stays first).

Packed AnyRes images and videos (`PruneContext.views`): VisionZip per view, as the official
LLaVA-NeXT code does (`visionzip_packed`; layout, budget per view, no newline for tiled images,
frames as views for video: see `pruning/visionzip_packed.py`). The official repository has no
SigLIP path; SigLIP views (OneVision) use the HoliTom score above, view by view.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp

from covipal_jax.pruning import visionzip_packed as vzp
from covipal_jax.pruning.base import PreLLMMethod, PruneContext, PruneResult, resolve_keep
from covipal_jax.pruning.registry import register
from covipal_jax.pruning.select import complement_indices, gather_tokens, topk_indices

Array = jax.Array

DOMINANT_FRACTION = (54, 64)  # official 54 dominant + 10 contextual for 64 tokens
ORDERS = ("visionzip", "spatial")


def split_budget(k: int, dominant: int | None = None,
                 contextual: int | None = None) -> tuple[int, int]:
    """(dominant incl. CLS, contextual) for a total of k tokens."""
    if dominant is None and contextual is None:
        dominant = int(round(k * DOMINANT_FRACTION[0] / DOMINANT_FRACTION[1]))
        dominant = max(1, min(k, dominant))
    if dominant is None:
        dominant = k - contextual
    if contextual is None:
        contextual = k - dominant
    if dominant < 0 or contextual < 0 or dominant + contextual != k:
        raise ValueError(f"VisionZip split dominant={dominant} + contextual={contextual} != k={k}")
    return dominant, contextual


def merge_contextual(features: Array, metric: Array, remaining: Array,
                     contextual: int) -> tuple[Array, Array]:
    """VisionZip's contextual merge over the remaining (non-dominant) tokens.

    features: f32[B, n, Dv]; metric: f32[B, n, Hm] (head-averaged keys); remaining: i32[B, R]
    ascending positions of the non-dominant patches. Returns (tokens f32[B, C, Dv],
    target positions i32[B, C]) with C = contextual.
    """
    r = remaining.shape[1]
    if not 1 <= contextual <= r:
        raise ValueError(f"contextual={contextual} outside [1, {r}]")
    step = max(1, r // contextual)
    tgt = list(range(0, r, step))[:contextual]
    tgt_set = set(tgt)
    other = [i for i in range(r) if i not in tgt_set]
    feats = gather_tokens(features.astype(jnp.float32), remaining)     # [B, R, Dv]
    m = gather_tokens(metric.astype(jnp.float32), remaining)
    m = m / jnp.linalg.norm(m, axis=-1, keepdims=True)
    tgt_pos = remaining[:, jnp.array(tgt, jnp.int32)]
    tgt_feat = feats[:, jnp.array(tgt, jnp.int32)]
    if not other:
        return tgt_feat, tgt_pos
    oth = jnp.array(other, jnp.int32)
    sim = jnp.einsum("bmh,bch->bmc", m[:, oth], m[:, jnp.array(tgt, jnp.int32)])
    assign = jax.nn.one_hot(jnp.argmax(sim, axis=-1), contextual, dtype=jnp.float32)
    counts = jnp.maximum(jnp.sum(assign, axis=1), 1.0)[..., None]     # [B, C, 1]
    agg = jnp.einsum("bmc,bmd->bcd", assign, feats[:, oth]) / counts
    return tgt_feat + agg, tgt_pos


def compress(feats: Array, score: Array, keys: Array, cls: Array | None, dom_patches: int,
             ctx_num: int) -> tuple[Array, Array]:
    """One view's VisionZip in tower space: [CLS?, dominant..., contextual...].

    feats f32[B, n, Dv]; score f32[B, n] (CLS attention or mean attention received); keys
    f32[B, n, Hm]; cls f32[B, Dv] | None. Returns (merged f32[B, k, Dv], indices i32[B, k])
    with k = (cls is not None) + dom_patches + ctx_num; the CLS token takes index 0.
    """
    b, n_v, _ = feats.shape
    parts, pos = [], []
    if cls is not None:
        parts.append(cls.astype(jnp.float32)[:, None, :])
        pos.append(jnp.zeros((b, 1), jnp.int32))
    if dom_patches:
        dom_idx = topk_indices(score, dom_patches)
        parts.append(gather_tokens(feats.astype(jnp.float32), dom_idx))
        pos.append(dom_idx)
        remaining = complement_indices(dom_idx, n_v)
    else:
        remaining = jnp.broadcast_to(jnp.arange(n_v, dtype=jnp.int32), (b, n_v))
    if ctx_num:
        ctx_tok, ctx_pos = merge_contextual(feats, keys, remaining, ctx_num)
        parts.append(ctx_tok)
        pos.append(ctx_pos)
    merged = jnp.concatenate(parts, axis=1).astype(feats.dtype)          # [B, k, Dv]
    return merged, jnp.concatenate(pos, axis=1).astype(jnp.int32)


def visionzip(ctx: PruneContext, k: int, *, project: Callable[[Array], Array],
              dominant: int | None = None, contextual: int | None = None,
              order: str = "visionzip") -> PruneResult:
    """VisionZip pre-LLM compression to exactly k projected tokens (see module docstring).

    Needs ctx.vision_features, ctx.vision_keys and either (cls_features, cls_attention) (CLIP)
    or mean_attention_received (SigLIP). `project` maps f32[B, M, Dv] -> f32[B, M, D].
    """
    if order not in ORDERS:
        raise ValueError(f"order {order!r} not in {ORDERS}")
    ctx.require("vision_features", "vision_keys", method="visionzip")
    feats = ctx.vision_features
    b, n_v, _ = feats.shape
    if not 1 <= k <= n_v:
        raise ValueError(f"k={k} outside [1, n_v={n_v}]")
    has_cls = ctx.cls_attention is not None and ctx.cls_features is not None
    if has_cls:
        score = ctx.cls_attention.astype(jnp.float32)
    elif ctx.mean_attention_received is not None:
        score = ctx.mean_attention_received.astype(jnp.float32)
    else:
        raise ValueError("visionzip needs cls_attention + cls_features (CLIP) or "
                         "mean_attention_received (SigLIP) in the PruneContext")
    dom_total, ctx_num = split_budget(k, dominant, contextual)
    dom_patches = dom_total - 1 if has_cls else dom_total
    if dom_patches < 0:
        raise ValueError("with a CLS token the dominant budget must be >= 1")
    merged, indices = compress(feats, score, ctx.vision_keys,
                               ctx.cls_features if has_cls else None, dom_patches, ctx_num)
    if order == "spatial":
        # CLS (index 0, first) stays ahead of a dominant patch 0: argsort is stable.
        perm = jnp.argsort(indices, axis=1, stable=True)
        merged = gather_tokens(merged, perm)
        indices = jnp.take_along_axis(indices, perm, axis=1)
    tokens = project(merged)
    return PruneResult(tokens=tokens, indices=indices, scores=score)


def visionzip_packed(ctx: PruneContext, keep: float | int, *,
                     project: Callable[[Array], Array], dominant: int | None = None,
                     contextual: int | None = None) -> PruneResult:
    """VisionZip per view of a packed AnyRes image / video (`visionzip_packed.py`): every view
    compressed on its own to k_v = `resolve_keep(keep, view_tokens)` tokens (dominant /
    contextual per view), laid out as the official LLaVA-NeXT code does.

    Needs ctx.views (`pruning.views.ViewStats`). Returns C*k_v + 1 tokens (C views), `valid`
    False for padding views and for a tiled image's newline slot; `scores` None.
    """
    views = ctx.views
    if views is None:
        raise ValueError("visionzip on AnyRes / video input needs PruneContext.views (the "
                         "per-view tower statistics: `visual_inputs.packed_context`)")
    if views.images > 1:  # several images per prompt: each image on its own (`per_image`)
        return vzp.per_image(ctx, lambda c: visionzip_packed(
            c, keep, project=project, dominant=dominant, contextual=contextual))
    b, c, n, _ = views.features.shape
    k_v = resolve_keep(keep, vzp.view_tokens(views))
    has_cls = views.cls is not None and views.cls_attention is not None
    if has_cls:
        score = views.cls_attention
    elif views.attention_received is not None:
        score = views.attention_received
    else:
        raise ValueError("visionzip needs per-view cls_attention + cls (CLIP) or "
                         "attention_received (SigLIP) in PruneContext.views")
    dom_total, ctx_num = split_budget(k_v, dominant, contextual)
    dom_patches = dom_total - int(has_cls)
    if dom_patches < 0:
        raise ValueError("with a CLS token the dominant budget must be >= 1")

    def flat(x):
        return None if x is None else x.reshape(b * c, *x.shape[2:])

    merged, pos = compress(flat(views.features), flat(score).astype(jnp.float32),
                           flat(views.keys), flat(views.cls) if has_cls else None,
                           dom_patches, ctx_num)
    tokens = project(merged)
    tokens = tokens.reshape(b, c, k_v, tokens.shape[-1])
    pos = pos.reshape(b, c, k_v)
    if views.kind == vzp.KIND_ANYRES:
        newline = ctx.vision_tokens[:, n]               # the untiled image's newline slot
        out, idx, valid = vzp.assemble_anyres(tokens, pos, views, newline, has_cls,
                                              dom_patches)
    else:
        out, idx, valid = vzp.assemble_video(tokens, pos, views, ctx.vision_tokens[:, -1],
                                             has_cls)
    return PruneResult(tokens=out.astype(ctx.vision_tokens.dtype), indices=idx, scores=None,
                       valid=valid)


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class VisionZipMethod(PreLLMMethod):
    """VisionZip as a method value.

    dominant_frac: share of the budget that is dominant (CLS included), `dominant =
        max(1, min(k, round(k * dominant_frac)))` (config `visionzip_dominant_frac`); None:
        `split_budget`'s default 54/64. dominant: an absolute dominant count (wins).
    order: "visionzip" (official [CLS, dominant..., contextual...]) | "spatial".
    """

    name: ClassVar[str] = "visionzip"
    needs: ClassVar[frozenset[str]] = frozenset(
        {"cls", "cls_attention", "vision_keys", "mean_attention_received", "vision_features"})
    merges: ClassVar[bool] = True
    per_view: ClassVar[bool] = True  # packed input: one VisionZip per view (visionzip_packed)
    config_keys: ClassVar[tuple[str, ...]] = ("visionzip_dominant_frac:dominant_frac",)
    description: ClassVar[str] = "VisionZip: CLS-attention dominant + key-similarity merge"
    dominant_frac: float | None = None
    dominant: int | None = None
    order: str = "visionzip"

    def __post_init__(self):
        super().__post_init__()
        if self.order not in ORDERS:
            raise ValueError(f"order {self.order!r} not in {ORDERS}")

    def dominant_count(self, k: int) -> int | None:
        """The dominant budget (CLS included) for k kept tokens; None: the default split."""
        if self.dominant is not None:
            return int(self.dominant)
        if self.dominant_frac is not None:
            return max(1, min(k, int(round(k * self.dominant_frac))))
        return None

    def kept_layout(self, k: int, has_cls: bool) -> tuple[bool, int]:
        dom_total, _ = split_budget(k, self.dominant_count(k))
        n_plain = k - int(has_cls)
        if self.order == "visionzip":  # [CLS, dominant..., contextual...]
            n_plain = dom_total - int(has_cls)
        return has_cls, n_plain

    def select(self, ctx: PruneContext, k: int, variables: Any = None) -> PruneResult:
        if ctx.project is None:
            raise ValueError("visionzip needs PruneContext.project (the model's projector)")
        if ctx.packed:
            if self.order != "visionzip":
                raise ValueError("visionzip on multi-crop (AnyRes) or video input keeps the "
                                 "official LLaVA-NeXT layout only (order='visionzip')")
            k_v = resolve_keep(self.keep, vzp.view_tokens(ctx.views)) if ctx.views else k
            return visionzip_packed(ctx, self.keep, project=ctx.project,
                                    dominant=self.dominant_count(k_v))
        return visionzip(ctx, k, project=ctx.project, dominant=self.dominant_count(k),
                         order=self.order)
