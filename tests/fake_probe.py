"""A test-only `LayerProbe` built from raw tensors (no model): what prefill offers an in-LLM
method at layer K-1, computed directly from hidden states and two layers' q/k weights.

Conventions (LLaMA as in HF / the official PDrop and SparseVLM code): RMSNorm
`x * rsqrt(mean(x^2) + eps) * w`, q/k projections without bias, rotate-half RoPE on
`positions`, GQA query head n uses kv head n // (N // K), causal by sequence index, padding
keys masked. A query row whose keys are all masked (a padding row) gets NaN probabilities, the
worst case a method must tolerate (it must mask such rows with `where`, not multiply them).

Shapes: B batch, S sequence, D width, N query heads, K kv heads, H head dim, n vision tokens.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LayerQK:
    """One decoder layer's attention inputs: norm f32[D], wq f32[D, N*H], wk f32[D, K*H]."""

    norm: Any
    wq: Any
    wk: Any


def rms_norm(x, w, eps):
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x, positions, theta):
    """x f32[B, S, N, H], positions i32[B, S] -> rotate-half RoPE (HF LLaMA)."""
    h = x.shape[-1]
    inv = 1.0 / (theta ** (np.arange(0, h, 2, dtype=np.float32) / h))
    f = positions.astype(jnp.float32)[..., None] * inv            # [B, S, H/2]
    emb = jnp.concatenate([f, f], axis=-1)[:, :, None, :]         # [B, S, 1, H]
    x1, x2 = x[..., : h // 2], x[..., h // 2:]
    rot = jnp.concatenate([-x2, x1], axis=-1)
    return x * jnp.cos(emb) + rot * jnp.sin(emb)


@dataclasses.dataclass
class FakeProbe:
    """LayerProbe at layer K-1.

    hidden: f32[B, S, D] input of layer K-1; out: f32[B, S, D] its output (input of layer K);
    prev / next: layer K-1's / layer K's `LayerQK`; seq_mask bool[B, S]; positions i32[B, S];
    vision_index i32[B, n]; text_mask bool[B, S]; last_index i32[B].
    Extensions beyond base.LayerProbe (used by SparseVLM; see the methods report):
    input_embeds f32[B, S0, D] the LLM input (layer 0) of the unpruned sequence and
    input_vision_index i32[B, n_v] its vision rows.
    """

    hidden: Any
    out: Any
    prev: LayerQK
    next: LayerQK
    seq_mask: Any
    positions: Any
    vision_index: Any
    text_mask: Any
    last_index: Any
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    eps: float = 1e-6
    final_norm: Any = None
    input_embeds: Any = None
    input_vision_index: Any = None

    @property
    def n_vision(self) -> int:
        return self.vision_index.shape[1]

    def _qk(self, x, w: LayerQK):
        b, s, _ = x.shape
        h = rms_norm(x, w.norm, self.eps)
        q = (h @ w.wq).reshape(b, s, self.num_heads, self.head_dim)
        k = (h @ w.wk).reshape(b, s, self.num_kv_heads, self.head_dim)
        return rope(q, self.positions, self.rope_theta), rope(k, self.positions, self.rope_theta)

    def attention_rows(self, rows, *, layer: str = "previous"):
        if layer not in ("previous", "next"):
            raise ValueError(layer)
        x, w = (self.hidden, self.prev) if layer == "previous" else (self.out, self.next)
        q, k = self._qk(jnp.asarray(x), w)
        rows = jnp.asarray(rows, jnp.int32)
        qr = jnp.take_along_axis(q, rows[:, :, None, None], axis=1)   # [B, R, N, H]
        g = self.num_heads // self.num_kv_heads
        kr = jnp.repeat(k, g, axis=2)                                  # [B, S, N, H]
        logits = jnp.einsum("brnh,bsnh->bnrs", qr, kr) / np.sqrt(self.head_dim)
        s = x.shape[1]
        allowed = (jnp.arange(s)[None, None, :] <= rows[:, :, None]) & \
            jnp.asarray(self.seq_mask)[:, None, :]                       # [B, R, S]
        logits = jnp.where(allowed[:, None], logits, -jnp.inf)
        return jax.nn.softmax(logits, axis=-1)

    def vision_columns(self, x):
        idx = jnp.asarray(self.vision_index)
        idx = idx.reshape(idx.shape[:1] + (1,) * (x.ndim - 2) + idx.shape[1:])
        return jnp.take_along_axis(x, jnp.broadcast_to(idx, x.shape[:-1] + idx.shape[-1:]),
                                   axis=-1)

    def keys(self):
        return self._qk(jnp.asarray(self.hidden), self.prev)[1]

    def next_hidden(self):
        return jnp.asarray(self.out)

    def next_hidden_normed(self):
        return rms_norm(jnp.asarray(self.out), self.final_norm, self.eps)


def random_layer(rng: np.random.Generator, d: int, n: int, kv: int, h: int,
                 scale: float = 1.0) -> LayerQK:
    return LayerQK(norm=(1.0 + 0.1 * rng.normal(size=(d,))).astype(np.float32),
                   wq=(scale * rng.normal(size=(d, n * h)) / np.sqrt(d)).astype(np.float32),
                   wk=(scale * rng.normal(size=(d, kv * h)) / np.sqrt(d)).astype(np.float32))


def left_padded_layout(prefix: list[int], suffix: list[int], n: int, s: int):
    """Masks for B left-padded prompts [pad, prefix_b text, n vision, suffix_b text] of length s.

    Returns seq_mask bool[B, s], text_mask bool[B, s], vision_index i32[B, n],
    positions i32[B, s] (contiguous, pads 0), last_index i32[B] (= s - 1).
    """
    b = len(prefix)
    seq_mask = np.zeros((b, s), bool)
    vis = np.zeros((b, n), np.int32)
    for i, (p, q) in enumerate(zip(prefix, suffix)):
        length = p + n + q
        if length > s:
            raise ValueError("sequence too long")
        start = s - length
        seq_mask[i, start:] = True
        vis[i] = start + p + np.arange(n)
    is_vis = np.zeros((b, s), bool)
    is_vis[np.arange(b)[:, None], vis] = True
    text_mask = seq_mask & ~is_vis
    positions = np.maximum(np.cumsum(seq_mask, axis=1) - 1, 0).astype(np.int32)
    return seq_mask, text_mask, vis, positions, np.full((b,), s - 1, np.int32)
