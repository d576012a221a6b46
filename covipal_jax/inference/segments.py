"""KV-cache segments of a prefill: one per decoder-layer range (in-LLM pruning has one per
stage), each with its own key-validity mask and decode offset.

Letters: B batch, L prompt length, D width, K KV heads, S cache length, H head dim.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from covipal_jax.models.config import LlavaConfig
from covipal_jax.models.decoder import init_cache
from covipal_jax.models.llava import Llava

Array = jax.Array


@flax.struct.dataclass
class Segment:
    """A KV cache for the decoder layers [start, stop).

    cache: {"k", "v": [stop - start, B, K, S, H] (heads-major)}; key_valid: bool[B, S]; base: the number of
    prompt tokens in this segment (decode step t writes at index base + t); offset: subtracted
    from the decode position in this segment's layers (in-LLM "contiguous" positions: the
    vision tokens dropped before it, n_v - k_s, the official PDrop `position_ids - dropped`).
    """

    cache: dict
    key_valid: Array
    start: int = flax.struct.field(pytree_node=False)
    stop: int = flax.struct.field(pytree_node=False)
    base: int = flax.struct.field(pytree_node=False)
    offset: int = flax.struct.field(pytree_node=False, default=0)


@flax.struct.dataclass
class PrefillOutput:
    """last_logits f32[B, V] (next-token logits); segments: KV caches; next_position i32[B];
    kept i32[B, k] source patch index of each kept vision token; scores f32[B, n_v] or None."""

    last_logits: Array
    segments: tuple
    next_position: Array
    kept: Array
    scores: Array | None = None


def pad_valid(seq_mask: Array, extra: int) -> Array:
    return jnp.concatenate([seq_mask, jnp.zeros(seq_mask.shape[:1] + (extra,), bool)], axis=1)


def run_segment(model, params, x, positions, seq_mask, start, stop, extra, offset=0):
    """Run layers [start, stop) over a prompt x [B, L, D] into a fresh cache of L + extra."""
    cfg: LlavaConfig = model.cfg
    key_valid = pad_valid(seq_mask, extra)
    cache = init_cache(cfg, x.shape[0], x.shape[1] + extra, num_layers=stop - start)
    h, cache = model.apply(params, x, method=Llava.run, positions=positions,
                           key_valid=key_valid, cache=cache, cache_index=0, start=start,
                           stop=stop)
    return h, Segment(cache, key_valid, start, stop, x.shape[1], offset)


def merge_segments(a: Segment, b: Segment) -> Segment:
    """Two adjacent segments over the same sequence -> one."""
    cache = jax.tree.map(lambda x, y: jnp.concatenate([x, y], axis=0), a.cache, b.cache)
    return Segment(cache, a.key_valid, a.start, b.stop, a.base, a.offset)
