"""In-LLM top-k on a `LayerProbe`, plain or packed (AnyRes / video).

On a single image (`probe.vision_valid` None) this is `select.topk_indices`. On a packed input
prefill fills the probe's `vision_valid` bool[B, n] (real slots still seen by the LLM),
`vision_forced` bool[B, n] (`image_newline` slots) and `vision_budget` i32[B]; the top-k is then
`select.masked_topk`: padding / already-dropped slots are ranked after every real one and never
returned as kept, newlines are kept first and counted in k (the house rule of
`select.masked_select`), and each example keeps `vision_budget[b]` of the static k.

Letters: B batch, n current vision tokens, k kept.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from covipal_jax.pruning.base import InLLMResult
from covipal_jax.pruning.select import masked_topk, topk_indices

Array = jax.Array


def is_packed(probe) -> bool:
    """Whether the probe comes from a packed visual input (validity / budget to honour)."""
    return getattr(probe, "vision_valid", None) is not None


def probe_masks(probe) -> tuple[Array, Array, Array]:
    """(valid bool[B, n], forced bool[B, n] (newlines, valid only), budget i32[B]) of a
    packed probe; forced / budget default to none / all valid slots."""
    valid = probe.vision_valid.astype(bool)
    forced = getattr(probe, "vision_forced", None)
    forced = jnp.zeros_like(valid) if forced is None else forced.astype(bool) & valid
    budget = getattr(probe, "vision_budget", None)
    if budget is None:
        budget = jnp.sum(valid, axis=-1).astype(jnp.int32)
    return valid, forced, budget.astype(jnp.int32)


def probe_topk(probe, scores: Array, k: int, budget: Array | None = None
               ) -> Array | InLLMResult:
    """Keep the k best current vision tokens by scores f32[B, n] (higher = kept).

    Plain probe: i32[B, k] ascending. Packed probe: `InLLMResult(kept=i32[B, k] ascending,
    valid=bool[B, k])`, valid False for a slot that is padding / dropped or beyond the
    example's budget (`budget` i32[B] overrides `probe.vision_budget`).
    """
    if not is_packed(probe):
        return topk_indices(scores, k)
    valid, forced, b = probe_masks(probe)
    b = b if budget is None else budget
    idx, ok = masked_topk(jnp.where(valid, scores, -jnp.inf), k, valid, forced,
                          jnp.clip(b, 1, k))
    return InLLMResult(kept=idx, valid=ok)
