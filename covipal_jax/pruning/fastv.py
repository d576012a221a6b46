"""FastV (Chen et al., ECCV 2024): drop the image tokens least attended by the last token.

Rule (pkunlp-icler/FastV, `src/transformers/src/transformers/models/llama/modeling_llama.py`,
the in-place path of `LlamaModel.forward`): at decoder layer K (prefill only), take the
attention probabilities of layer K-1 (`layer_outputs[1]`, shape [B, N, L, L]), average them over
heads (`torch.mean(attn, dim=1)`), take the row of the LAST token (`[-1]`), restrict it to the
image span `[image_start, image_start + n_v)`, and keep the `round(n_v * (1 - R))` image tokens
with the highest attention (`topk(...)`), in original order (`keep_indexs.sort()`). The kept
tokens keep their original position ids (`position_ids = keep_indexs.unsqueeze(0)`).
Defaults: K = 2, R = 0.5 (the paper's headline setting; K=2, R=0.75 is also common).

`FastV` (the registered method value) asks prefill's `LayerProbe` for that one row: the
attention of the last prompt token at layer K-1 (recomputed, so the main pass stays fused),
restricted to the vision columns; `keep_by_attention` takes the top-k. With left padding every
row ends at the same index, so "the last token" is index L-1 for all.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from covipal_jax.pruning.base import InLLMMethod, InLLMResult, resolve_keep
from covipal_jax.pruning.probe_select import probe_topk
from covipal_jax.pruning.registry import register
from covipal_jax.pruning.select import topk_indices

Array = jax.Array

DEFAULT_LAYER = 2        # K: prune after layer K-1, i.e. before layer K
DEFAULT_DROP_RATIO = 0.5  # R


def fastv_keep(n_v: int, drop_ratio: float = DEFAULT_DROP_RATIO) -> int:
    """FastV's kept count `round(n_v * (1 - R))` for a drop ratio R in [0, 1)."""
    if not 0.0 <= drop_ratio < 1.0:
        raise ValueError(f"FastV drop ratio R={drop_ratio} outside [0, 1)")
    return resolve_keep(1.0 - drop_ratio, n_v)


def keep_by_attention(image_attention: Array, k: int) -> Array:
    """Kept image tokens, ascending: the top-k of the head-averaged last-token attention.

    image_attention: f32[B, N, n_v] per head, or f32[B, n_v] already averaged over heads.
    Returns i32[B, k] in [0, n_v).
    """
    a = image_attention.astype(jnp.float32)
    if a.ndim == 3:
        a = jnp.mean(a, axis=1)
    if a.ndim != 2:
        raise ValueError(f"image_attention must be [B, N, n_v] or [B, n_v], got {a.shape}")
    return topk_indices(a, k)


select_in_llm = keep_by_attention  # the pre-method-value name


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class FastV(InLLMMethod):
    """FastV at layer `layer` (K, default 2): one stage."""

    name: ClassVar[str] = "fastv"
    description: ClassVar[str] = "FastV: top-k by last-token attention at layer K-1"
    layer: int = DEFAULT_LAYER

    def select_in_llm(self, probe, k: int, stage: int) -> Array | InLLMResult:
        """On a packed AnyRes / video input the whole packed buffer is the image span: one
        top-k over every slot, padding never kept, newlines kept and counted in k
        (`probe_select.probe_topk`)."""
        rows = probe.last_index[:, None].astype(jnp.int32)
        probs = probe.attention_rows(rows, layer="previous")[:, :, 0]      # [B, N, S]
        scores = jnp.mean(probe.vision_columns(probs).astype(jnp.float32), axis=1)
        return probe_topk(probe, scores, k)


def last_row_attention(q_last: Array, keys: Array, key_mask: Array | None = None,
                       scale: float | None = None) -> Array:
    """Softmax attention of one query per row over all keys (PDrop-style recomputation).

    q_last: f32[B, N, H] the last token's post-RoPE query at layer K-1; keys: f32[B, S, K, H]
    post-RoPE keys of that layer (GQA: N = K * G, query head n uses kv head n // G, as HF's
    `repeat_kv`); key_mask: bool[B, S] (False = padding). The last token attends to every
    earlier key, so no causal mask is needed. Returns f32[B, N, S].
    """
    b, n, h = q_last.shape
    kv = keys.shape[2]
    if n % kv:
        raise ValueError(f"{n} query heads not a multiple of {kv} kv heads")
    g = n // kv
    scale = h ** -0.5 if scale is None else scale
    q = q_last.astype(jnp.float32).reshape(b, kv, g, h)
    logits = jnp.einsum("bkgh,bskh->bkgs", q, keys.astype(jnp.float32)) * scale
    if key_mask is not None:
        logits = jnp.where(key_mask[:, None, None, :], logits, -jnp.inf)
    return jax.nn.softmax(logits, axis=-1).reshape(b, n, keys.shape[1])
