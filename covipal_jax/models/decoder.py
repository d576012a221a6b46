"""The language model: LLaMA (LLaVA-1.5's Vicuna) and Qwen2 (LLaVA-OneVision), with a KV cache.

Letters: B batch, T queries, S cache/key length, D width, N query heads, K kv heads, H head
dim, F MLP width, V vocab, L layers.

Pre-norm layers: RMSNorm -> grouped-query attention with RoPE (rotate_half, as HF; Qwen2 adds
q/k/v biases) -> residual -> RMSNorm -> SwiGLU -> residual. The KV cache is an explicit pytree
`{"k": [L, B, K, S, H], "v": [L, B, K, S, H]}` (heads-major, so the decode step's dots read it
without a transpose on XLA:CPU) passed in and out (no mutable collections), so
prefill, decode, and in-LLM pruning (a cache for each layer range) are plain functions.

The decoder knows nothing of pruning. It offers what pruning and training need:
`run(x, ..., start, stop)` for any layer range, `attention_rows(...)` to recompute a few rows
of one layer's attention, and an additive per-key `bias` that every layer applies.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from covipal_jax.models import attention as attn_lib
from covipal_jax.models.config import LlavaConfig, TextConfig
from covipal_jax.models.layers import LayerStack, RMSNorm, dense, rope

Array = jax.Array
ACT = ("act_batch", "act_length", "act_embed")
ACT_HEADS = ("act_batch", "act_length", "act_heads", None)
ACT_MLP = ("act_batch", "act_length", "act_mlp")


class DecoderLayer(nn.Module):
    cfg: TextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention: str = "auto"  # see `attention.IMPLS`
    out_first: bool = False   # kernels stored [*out, *in] (`layers.Dense.out_first`)

    def setup(self):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, out_first=self.out_first)
        self.input_norm = RMSNorm(c.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
        self.post_attn_norm = RMSNorm(c.rms_norm_eps, dtype=self.dtype,
                                      param_dtype=self.param_dtype)
        self.q = dense((c.num_heads, c.head_dim), ("embed", "heads", "head_dim"),
                       use_bias=c.qkv_bias, **kw)
        self.k = dense((c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"),
                       use_bias=c.qkv_bias, **kw)
        self.v = dense((c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"),
                       use_bias=c.qkv_bias, **kw)
        self.o = dense(c.hidden_size, ("heads", "head_dim", "embed"), axis=(-2, -1),
                       use_bias=False, **kw)
        self.gate = dense(c.intermediate_size, ("embed", "mlp"), use_bias=False, **kw)
        self.up = dense(c.intermediate_size, ("embed", "mlp"), use_bias=False, **kw)
        self.down = dense(c.hidden_size, ("mlp", "embed"), use_bias=False, **kw)

    def qkv(self, x: Array, positions: Array) -> tuple[Array, Array, Array]:
        """x f32[B, T, D] -> q [B, T, N, H], k, v [B, T, K, H] (q, k RoPE'd)."""
        h = self.input_norm(x)
        theta = self.cfg.rope_theta
        q = rope(self.q(h), positions, theta)
        k = rope(self.k(h), positions, theta)
        return (nn.with_logical_constraint(q, ACT_HEADS), k, self.v(h))

    def _cached_attention(self, q, k, v, ck, cv, mask, cache_index, bias):
        """Attention of q [B, T, N, H] against the updated heads-major cache ck, cv [B, K, S, H].

        A prefill into a fresh cache (cache_index the Python int 0) attends over its own T new
        keys k, v [B, T, K, H] (the later slots are causally masked anyway); one query row
        (decode) reads the heads-major cache directly; anything else transposes it back."""
        t = q.shape[1]
        if isinstance(cache_index, int) and cache_index == 0:
            sub = attn_lib.Mask(mask.q_index, None if mask.key_valid is None
                                else mask.key_valid[:, :t], mask.q_offset)
            return attn_lib.attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=sub,
                                      bias=None if bias is None else bias[:, :t],
                                      impl=self.attention)
        if t == 1:
            name, _ = attn_lib.resolve_impl(self.attention, q, jnp.swapaxes(ck, 1, 2),
                                            mask=mask, bias=bias)
            if name == "xla":
                return attn_lib.decode_attention(q, ck.astype(q.dtype), cv.astype(q.dtype),
                                                 mask=mask, bias=bias)
        kk, vv = (jnp.swapaxes(c, 1, 2).astype(q.dtype) for c in (ck, cv))
        return attn_lib.attention(q, kk, vv, mask=mask, bias=bias, impl=self.attention)

    def __call__(self, x: Array, cache: dict | None, *, positions: Array, mask: attn_lib.Mask,
                 cache_index: Array | int = 0, bias: Array | None = None):
        """One layer.

        x: f32[B, T, D]; positions: i32[B, T]; mask: `attention.Mask` (queries' cache indices
        and bool[B, S] key validity);
        cache: {"k", "v": [B, K, S, H]} (heads-major) or None (then S = T); bias: f32[B, S]
        or None.
        Returns (x, updated cache).
        """
        q, k, v = self.qkv(x, positions)
        if cache is None:
            a = attn_lib.attention(q, k, v, mask=mask, bias=bias, impl=self.attention)
        else:
            # The cache is heads-major [B, K, S, H]: the decode dots read it without a transpose.
            idx = (0, 0, cache_index, 0)
            hm = lambda t: jnp.swapaxes(t, 1, 2).astype(cache["k"].dtype)  # [B, K, T, H]
            ck = jax.lax.dynamic_update_slice(cache["k"], hm(k), idx)
            cv = jax.lax.dynamic_update_slice(cache["v"], hm(v), idx)
            cache = {"k": ck, "v": cv}
            a = self._cached_attention(q, k, v, ck, cv, mask, cache_index, bias)
        x = x + self.o(a)
        x = nn.with_logical_constraint(x, ACT)
        h = self.post_attn_norm(x)
        h = nn.with_logical_constraint(jax.nn.silu(self.gate(h)) * self.up(h), ACT_MLP)
        x = x + self.down(h)
        return nn.with_logical_constraint(x, ACT), cache


class Decoder(nn.Module):
    """Embedding, the layer stack, final norm and LM head."""

    cfg: LlavaConfig

    def setup(self):
        c, t = self.cfg, self.cfg.text
        kw = dict(dtype=c.compute_dtype, param_dtype=c.weight_dtype)
        self.embed = nn.Embed(
            t.vocab_size, t.hidden_size, embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(0.02), ("vocab", "embed")), **kw)
        out_first = c.decoder_kernels == "out_in"
        layer = lambda: DecoderLayer(t, attention=attention_backend(c), out_first=out_first,
                                     **kw, parent=None)
        self.layers = LayerStack(
            make_layer=layer, num_layers=t.num_layers,
            init_args=lambda: ((jnp.zeros((1, 1, t.hidden_size), c.compute_dtype), None),
                               dict(positions=jnp.zeros((1, 1), jnp.int32),
                                    mask=attn_lib.Mask.causal(0, 1, jnp.ones((1, 1), bool)))),
            scan=c.scan_layers, remat=c.remat_policy)
        self.final_norm = RMSNorm(t.rms_norm_eps, **kw)
        if not t.tie_word_embeddings:
            self.lm_head = dense(t.vocab_size, ("embed", "vocab"), use_bias=False,
                                 out_first=out_first, **kw)

    # -- pieces -------------------------------------------------------------------------------

    def embed_tokens(self, ids: Array) -> Array:
        """ids i32[B, T] -> f32[B, T, D]."""
        return nn.with_logical_constraint(self.embed(ids), ACT)

    def logits(self, h: Array) -> Array:
        """Final norm + LM head: f32[B, T, D] -> f32[B, T, V] (f32 logits)."""
        h = self.final_norm(h)
        if self.cfg.text.tie_word_embeddings:
            out = self.embed.attend(h)
        else:
            out = self.lm_head(h)
        return nn.with_logical_constraint(out.astype(jnp.float32),
                                          ("act_batch", "act_length", "act_vocab"))

    def run(self, x: Array, *, positions: Array, key_valid: Array, cache: dict | None = None,
            cache_index: Array | int = 0, bias: Array | None = None, start: int = 0,
            stop: int | None = None) -> tuple[Array, dict | None]:
        """Layers [start, stop) on x: f32[B, T, D].

        key_valid: bool[B, S] which keys hold real tokens (S = T without a cache, else the
        cache size; for a cache it must already mark the T new slots). cache: {"k","v":
        [L', B, K, S, H]} for exactly the L' = stop - start layers run. Queries sit at cache
        indices `cache_index + arange(T)`.
        """
        mask = attn_lib.Mask.causal(cache_index, x.shape[1], key_valid)
        return self.layers(x, cache, start=start, stop=stop, positions=positions, mask=mask,
                           cache_index=cache_index, bias=bias)

    def attention_rows(self, x: Array, *, layer: int, positions: Array, key_valid: Array,
                       rows: Array, bias: Array | None = None) -> Array:
        """Recompute the attention probabilities of a few query rows at `layer`.

        x: f32[B, S, D] the INPUT of that layer for the whole sequence (no cache);
        rows: i32[B, R] query indices. Returns f32[B, N, R, S].
        """
        params = self.layers.layer_params(layer)
        c = self.cfg
        q, k, _ = DecoderLayer(c.text, c.compute_dtype, c.weight_dtype, parent=None).apply(
            {"params": params}, x, positions, method=DecoderLayer.qkv)
        q_rows = jnp.take_along_axis(q, rows[:, :, None, None], axis=1)
        s = jnp.arange(x.shape[1])
        mask_rows = (s[None, None, :] <= rows[:, :, None]) & key_valid[:, None, :]
        return attn_lib.attention_rows(q_rows, k, mask_rows, bias)

    def layer_keys(self, x: Array, *, layer: int, positions: Array) -> Array:
        """Keys of `layer` for its input x: f32[B, S, K, H] (DART's key-norm pivots)."""
        params = self.layers.layer_params(layer)
        c = self.cfg
        _, k, _ = DecoderLayer(c.text, c.compute_dtype, c.weight_dtype, parent=None).apply(
            {"params": params}, x, positions, method=DecoderLayer.qkv)
        return k

    def __call__(self, ids: Array, positions: Array, key_valid: Array) -> Array:
        """Text-only forward (used for init): ids i32[B, T] -> logits f32[B, T, V]."""
        h, _ = self.run(self.embed_tokens(ids), positions=positions, key_valid=key_valid)
        return self.logits(h)


def attention_backend(cfg: LlavaConfig) -> str:
    """`cfg.attention`, or the legacy `cfg.attention_impl` when that was set and this is auto."""
    if cfg.attention == "auto" and cfg.attention_impl != "xla":
        return "cudnn" if cfg.attention_impl == "cudnn" else "xla"
    return cfg.attention


def init_cache(cfg: LlavaConfig, batch: int, size: int, num_layers: int | None = None,
               dtype: Any = None) -> dict:
    """A zeroed KV cache {"k", "v": [L, B, K, S, H]} (heads-major)."""
    t = cfg.text
    n = t.num_layers if num_layers is None else num_layers
    shape = (n, batch, t.num_kv_heads, size, t.head_dim)
    dtype = cfg.compute_dtype if dtype is None else dtype
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


CACHE_AXES = ("layers", "cache_batch", "cache_heads", "cache_length", None)
