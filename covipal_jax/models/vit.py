"""The vision towers: CLIP ViT (LLaVA-1.5) and SigLIP (LLaVA-OneVision), as HF computes them.

Letters: B batch, P patches (+CLS), D tower width, N heads, H head dim, F MLP width.

CLIP: patch conv (no bias) -> [CLS; patches] + positions -> pre-LayerNorm -> pre-LN encoder
layers with quick_gelu. SigLIP: patch conv (bias) + positions, no CLS, no pre-LN, gelu-tanh.
LLaVA takes HF's `hidden_states[feature_layer]` (never the post-LayerNorm; its params are kept
so every checkpoint key has a home), and drops CLS under the "default" select strategy.

Pruning baselines read two extra signals at the feature layer, recomputed from that layer's
own queries and keys (one row for CLS, so no attention matrix is kept anywhere else):
`cls_attention` (VisionZip's dominant-token score) and `keys` (VisionZip's merge metric).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from covipal_jax.models import attention as attn_lib
from covipal_jax.models.config import VisionConfig
from covipal_jax.models.layers import LayerStack, activation, dense, layer_norm

Array = jax.Array
ACT = ("act_batch", "act_length", "act_embed")


@flax.struct.dataclass
class VisionOutput:
    """What the tower hands to the projector and to pruning methods.

    features: f32[B, n_v, D]   the selected hidden state (CLS dropped under "default").
    cls: f32[B, D] | None      the CLS hidden state at the feature layer (CLIP only).
    cls_attention: f32[B, N, n_v] | None   CLS -> patch attention per head at the feature layer.
    attention_received: f32[B, n_v] | None mean attention each patch receives (all queries,
                                           all heads) at the feature layer.
    keys: f32[B, n_v, N, H] | None         the feature layer's keys of the patch tokens.
    """

    features: Array
    cls: Array | None = None
    cls_attention: Array | None = None
    attention_received: Array | None = None
    keys: Array | None = None


class VisionLayer(nn.Module):
    """One pre-LN encoder layer (CLIP and SigLIP share it)."""

    cfg: VisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention: str = "auto"  # see `attention.IMPLS`

    def setup(self):
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n, h = c.num_heads, c.head_dim
        self.ln1 = layer_norm(c.layer_norm_eps, "vision_embed", **kw)
        self.ln2 = layer_norm(c.layer_norm_eps, "vision_embed", **kw)
        qkv_names = ("vision_embed", "vision_heads", "head_dim")
        self.q = dense((n, h), qkv_names, **kw)
        self.k = dense((n, h), qkv_names, **kw)
        self.v = dense((n, h), qkv_names, **kw)
        self.o = dense(c.hidden_size, ("vision_heads", "head_dim", "vision_embed"), axis=(-2, -1),
                       **kw)
        self.fc1 = dense(c.intermediate_size, ("vision_embed", "vision_mlp"), **kw)
        self.fc2 = dense(c.hidden_size, ("vision_mlp", "vision_embed"), **kw)

    def qk(self, x: Array) -> tuple[Array, Array]:
        """Queries and keys of this layer for input x: f32[B, P, N, H] each."""
        h = self.ln1(x)
        return self.q(h), self.k(h)

    def __call__(self, x: Array, carry: Any = None) -> tuple[Array, Any]:
        h = self.ln1(x)
        a = attn_lib.attention(self.q(h), self.k(h), self.v(h), impl=self.attention)
        x = x + self.o(a)
        x = nn.with_logical_constraint(x, ACT)
        h = activation(self.cfg.act)(self.fc1(self.ln2(x)))
        x = x + self.fc2(h)
        return nn.with_logical_constraint(x, ACT), carry


class VisionTower(nn.Module):
    cfg: VisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan: bool = True
    remat: str = "none"
    attention: str = "auto"  # see `attention.IMPLS` (llava.py passes the config's switch)

    def setup(self):
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        p = c.patch_size
        self.patch_embed = nn.Conv(
            c.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=not c.has_cls,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.normal(0.02), (None, None, None, "vision_embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                   ("vision_embed",)), **kw)
        if c.has_cls:
            self.class_embedding = self.param(
                "class_embedding", nn.with_logical_partitioning(
                    nn.initializers.normal(0.02), ("vision_embed",)),
                (c.hidden_size,), self.param_dtype)
            self.pre_layernorm = layer_norm(c.layer_norm_eps, "vision_embed", **kw)
        self.pos_embedding = self.param(
            "pos_embedding", nn.with_logical_partitioning(
                nn.initializers.normal(0.02), (None, "vision_embed")),
            (c.num_positions, c.hidden_size), self.param_dtype)
        self.layers = LayerStack(
            make_layer=lambda: VisionLayer(c, **kw, attention=self.attention, parent=None), num_layers=c.num_layers,
            init_args=lambda: ((jnp.zeros((1, 1, c.hidden_size), self.dtype),), {}),
            scan=self.scan, remat=self.remat)
        self.post_layernorm = layer_norm(c.layer_norm_eps, "vision_embed", **kw)

    def embed(self, pixels: Array) -> Array:
        """pixels f32[B, H, W, 3] (NHWC, normalized) -> f32[B, P, D] (HF hidden_states[0])."""
        x = self.patch_embed(pixels.astype(self.dtype))
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        if self.cfg.has_cls:
            cls = jnp.broadcast_to(self.class_embedding.astype(self.dtype),
                                   (x.shape[0], 1, x.shape[-1]))
            x = jnp.concatenate([cls, x], axis=1)
        x = x + self.pos_embedding.astype(self.dtype)[None]
        if self.cfg.has_cls:
            x = self.pre_layernorm(x)
        return nn.with_logical_constraint(x, ACT)

    def __call__(self, pixels: Array, *, with_stats: bool = False) -> VisionOutput:
        """pixels f32[B, H, W, 3] -> VisionOutput (see class docstring)."""
        c = self.cfg
        x = self.embed(pixels)
        n_run = c.num_run_layers
        if self.is_initializing():
            self.post_layernorm(x)  # create its params; LLaVA never applies it
        x, _ = self.layers(x, start=0, stop=n_run - 1)
        stats = {}
        if with_stats:
            stats = self._attention_stats(x, n_run - 1)
        x, _ = self.layers(x, start=n_run - 1, stop=n_run)
        cls = x[:, 0] if c.has_cls else None
        feats = x[:, 1:] if (c.has_cls and c.select_strategy == "default") else x
        return VisionOutput(features=feats, cls=cls, **stats)

    def _attention_stats(self, x: Array, layer: int) -> dict[str, Array]:
        """Recompute layer `layer`'s attention signals from its input x: f32[B, P, D]."""
        c = self.cfg
        params = self.layers.layer_params(layer)
        q, k = VisionLayer(c, self.dtype, self.param_dtype, parent=None).apply(
            {"params": params}, x, method=VisionLayer.qk)
        drop = 1 if c.has_cls else 0
        # Mean attention received over all queries and heads: [B, P] (one P x P map, one layer).
        probs = attn_lib.attention_rows(q, k, mask_rows=None)  # [B, N, P, P]
        received = probs.mean(axis=(1, 2))[:, drop:]
        out = dict(attention_received=received, keys=k[:, drop:].astype(jnp.float32))
        if c.has_cls:
            out["cls_attention"] = probs[:, :, 0, 1:]
        return out
