"""Attention: the fused path, the recomputed-rows path, masks and an additive key bias.

Letters: B batch, T queries, S keys, N query heads, K kv heads, G = N / K, H head dim.

- `attend`: softmax(q k^T / sqrt(H) + bias) v through `jax.nn.dot_product_attention`, which
  lowers to a fused kernel where the backend has one (cuDNN on GPU; XLA fuses on TPU/CPU). It
  never hands back the probabilities, so nothing downstream depends on them.
- `attention_rows`: the probabilities of a FEW query rows, recomputed from q and k. FastV's
  selection and the PPM's stage-1 target need them at one layer only; the full T x S matrix is
  never materialized for the other layers (PDrop's trick).
- `key_bias`: an additive bias per key (e.g. `log p` of the PPM's keep probability on vision
  keys in stage-2 training), broadcast over heads and queries.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
NEG_INF = -1e30


def causal_mask(query_index: Array, key_valid: Array) -> Array:
    """bool[B, T, S]: query t (at cache index `query_index[t]`) may see key s.

    query_index: i32[T] absolute indices of the queries in the key axis.
    key_valid: bool[B, S] keys that hold a real token.
    A query always sees itself, so padded query rows stay finite (their output is ignored).
    """
    s = jnp.arange(key_valid.shape[-1])
    causal = s[None, :] <= query_index[:, None]  # [T, S]
    diag = s[None, :] == query_index[:, None]
    return (causal[None] & key_valid[:, None, :]) | diag[None]


def bidirectional_mask(key_valid: Array, t: int) -> Array:
    """bool[B, T, S] for encoders: every query sees every valid key."""
    return jnp.broadcast_to(key_valid[:, None, :], key_valid.shape[:1] + (t,) + key_valid.shape[1:])


def attend(q: Array, k: Array, v: Array, mask: Array | None, bias: Array | None = None,
           implementation: str | None = "xla") -> Array:
    """Scaled dot-product attention with grouped kv heads.

    q: [B, T, N, H]; k, v: [B, S, K, H]; mask: bool[B, T, S] or None;
    bias: f32[B, S] additive per-key bias or None. Returns [B, T, N, H].
    """
    m = None if mask is None else mask[:, None, :, :]  # [B, 1, T, S]
    b = None if bias is None else bias[:, None, None, :].astype(q.dtype)
    if implementation in ("xla", "cudnn", None):
        return jax.nn.dot_product_attention(q, k, v, bias=b, mask=m,
                                            implementation=implementation)
    raise ValueError(f"unknown attention implementation {implementation!r}")


def attention_rows(q_rows: Array, k: Array, mask_rows: Array | None,
                   bias: Array | None = None) -> Array:
    """Softmax attention probabilities of a few query rows, f32[B, N, R, S].

    q_rows: [B, R, N, H] (already RoPE'd); k: [B, S, K, H]; mask_rows: bool[B, R, S];
    bias: f32[B, S]. Computed in f32.
    """
    b, r, n, h = q_rows.shape
    kh = k.shape[2]
    q = q_rows.astype(jnp.float32).reshape(b, r, kh, n // kh, h)
    logits = jnp.einsum("brkgh,bskh->bkgrs", q, k.astype(jnp.float32)) / jnp.sqrt(h)
    logits = logits.reshape(b, n, r, k.shape[1])
    if bias is not None:
        logits = logits + bias[:, None, None, :].astype(jnp.float32)
    if mask_rows is not None:
        logits = jnp.where(mask_rows[:, None], logits, NEG_INF)
    return jax.nn.softmax(logits, axis=-1)
