"""Blocked (flash-style) attention in plain JAX: online softmax over key blocks.

Letters: B batch, T queries, S keys, N query heads, K kv heads, G = N / K, H head dim,
Q query block, C key block (chunk).

`chunked_attention` never builds the [B, N, T, S] score matrix. Queries are split into blocks
of `block_q` (a `lax.map`, so one block's work is live at a time); for each query block a
`lax.scan` walks the key blocks of `block_k` keys with the running max `m`, running sum `l` and
running output `acc` (f32), as in FlashAttention. Peak memory is O(B N Q C) scores plus
O(B Q N H) accumulators, instead of O(B N T S).

Causal key blocks entirely after the last query of a block are skipped (`lax.cond`: XLA:CPU
runs only the taken branch), so causal prefill costs about half the full product. The mask is
rebuilt per (query block, key block) from `q_index` and `key_valid`, with the same semantics as
`attention.causal_mask` (a query always sees itself, so padded rows stay finite).

It is differentiable (scan + cond); the key-block body is rematerialized (`jax.checkpoint`), so
the backward pass keeps only the per-block carries, never the probabilities.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
NEG = -1e30  # finite: fully masked blocks must not produce inf - inf = nan (values or grads)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def chunked_attention(q: Array, k: Array, v: Array, *, q_index: Array | None,
                      key_valid: Array | None, bias: Array | None = None,
                      block_q: int = 256, block_k: int = 512) -> Array:
    """softmax(q k^T / sqrt(H) + bias, masked) v, blockwise.

    q: [B, T, N, H]; k, v: [B, S, K, H]; q_index: i32[T] key-axis index of each query (causal
    mask) or None (bidirectional); key_valid: bool[B, S] or None (all keys valid);
    bias: f32[B, S] additive per-key bias or None. Returns [B, T, N, H] in q's dtype.
    """
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    if n % kh:
        raise ValueError(f"query heads {n} not a multiple of kv heads {kh}")
    g = n // kh
    bq = min(block_q, _round_up(t, 8))
    bk = min(block_k, _round_up(s, 8))
    tp, sp = _round_up(t, bq), _round_up(s, bk)
    nq, nk = tp // bq, sp // bk
    causal = q_index is not None

    kv_valid = jnp.ones((b, s), bool) if key_valid is None else key_valid
    kv_valid = jnp.pad(kv_valid, ((0, 0), (0, sp - s)))  # padded keys: invalid
    kb = jnp.zeros((b, sp), jnp.float32) if bias is None else jnp.pad(
        bias.astype(jnp.float32), ((0, 0), (0, sp - s)))
    hv = v.shape[-1]
    # Heads-major layouts, so both products are plain batched matmuls over (B, K):
    # q [nq, B, K, G*Q, H] (scaled); k [nk, B, K, C, H]; v [nk, B, K, C, Hv].
    qs = (q * (1.0 / jnp.sqrt(jnp.float32(h))).astype(q.dtype))
    qp = jnp.pad(qs, ((0, 0), (0, tp - t), (0, 0), (0, 0))).reshape(b, nq, bq, kh, g, h)
    qp = qp.transpose(1, 0, 3, 4, 2, 5).reshape(nq, b, kh, g * bq, h)

    def kv_blocks(x, d):
        x = jnp.pad(x, ((0, 0), (0, sp - s), (0, 0), (0, 0))).reshape(b, nk, bk, kh, d)
        return x.transpose(1, 0, 3, 2, 4)

    kp, vp = kv_blocks(k.astype(q.dtype), h), kv_blocks(v.astype(q.dtype), hv)
    validb = jnp.moveaxis(kv_valid.reshape(b, nk, bk), 1, 0)  # [nk, B, C]
    biasb = jnp.moveaxis(kb.reshape(b, nk, bk), 1, 0)
    if causal:
        qi = jnp.asarray(q_index, jnp.int32)
        # Padded query rows continue the index; their output is cut off below.
        qi = jnp.concatenate([qi, qi[-1] + 1 + jnp.arange(tp - t, dtype=jnp.int32)])
    else:
        qi = jnp.zeros((tp,), jnp.int32)
    qib = qi.reshape(nq, bq)

    def key_step(carry, xs, qblk, qidx):
        m, l, acc = carry  # [B, K, G*Q], [B, K, G*Q], [B, K, G*Q, Hv] (f32)
        j, kblk, vblk, valid, kbias = xs
        key_pos = j * bk + jnp.arange(bk, dtype=jnp.int32)  # [C]

        def compute(_):
            sc = jnp.einsum("bkmh,bkch->bkmc", qblk, kblk, preferred_element_type=jnp.float32)
            sc = (sc + kbias[:, None, None, :]).reshape(b, kh, g, bq, bk)
            ok = valid[:, None, :]  # [B, 1, C]
            if causal:
                see = key_pos[None, :] <= qidx[:, None]  # [Q, C]
                diag = key_pos[None, :] == qidx[:, None]
                ok = (see[None] & ok) | diag[None]  # [B, Q, C]
            ok = ok[:, None, None]  # [B, 1, 1, Q or 1, C]
            sc = jnp.where(ok, sc, NEG)
            m_new = jnp.maximum(m, sc.max(-1).reshape(b, kh, g * bq))
            p = jnp.where(ok, jnp.exp(sc - m_new.reshape(b, kh, g, bq, 1)), 0.0)
            p = p.reshape(b, kh, g * bq, bk)
            alpha = jnp.exp(m - m_new)
            l_new = alpha * l + p.sum(-1)
            pv = jnp.einsum("bkmc,bkch->bkmh", p.astype(vblk.dtype), vblk,
                            preferred_element_type=jnp.float32)
            return m_new, l_new, acc * alpha[..., None] + pv

        if causal:  # a key block wholly after the block's last query holds no visible key
            carry = jax.lax.cond(j * bk <= qidx.max(), compute, lambda _: (m, l, acc), None)
        else:
            carry = compute(None)
        return carry, None

    def query_block(xs):
        qblk, qidx = xs  # [B, K, G*Q, H], [Q]
        init = (jnp.full((b, kh, g * bq), NEG, jnp.float32),
                jnp.zeros((b, kh, g * bq), jnp.float32),
                jnp.zeros((b, kh, g * bq, hv), jnp.float32))
        body = jax.checkpoint(lambda c, x: key_step(c, x, qblk, qidx))
        (m, l, acc), _ = jax.lax.scan(
            body, init, (jnp.arange(nk, dtype=jnp.int32), kp, vp, validb, biasb))
        l = jnp.where(l == 0.0, 1.0, l)  # rows with no visible key (cut-off padding) stay 0
        return (acc / l[..., None]).astype(q.dtype)

    out = jax.lax.map(query_block, (qp, qib))  # [nq, B, K, G*Q, Hv]
    out = out.reshape(nq, b, kh, g, bq, hv).transpose(1, 0, 4, 2, 3, 5)
    return out.reshape(b, tp, n, hv)[:, :t]
