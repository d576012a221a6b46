"""CoViPAL's Plug-and-Play Pruning Module (PPM): scores vision tokens in the context of the text.

Paper (arXiv 2508.17243, Fig. 1): S = p_theta(H_v, H_t), a lightweight, model-agnostic
classifier over the projected vision tokens H_v and the text tokens H_t; the LLM keeps
I = TopK(S, r * n_v) before its first layer. The paper does not publish the architecture;
this one is covipal_jax's design:

    H_v f32[B, N, D] --LN--Dense(D->d)--+ pos[B, N, d] --\
    H_t f32[B, T, D] --LN--Dense(D->d)--+ type_emb[d] ---+--> num_layers x Block --> LN
                                                               --> Dense(d->1) --> S[B, N]
    Block (pre-LN): v += MHA(q = LN1(v), kv = LN1([t ; v]), key mask = [text_mask ; valid])
                    v += MLP(LN2(v))          (text tokens are keys/values only, never updated)

Positional information (`PPMConfig.position`):
- "layout" (the default): computed from the slots' layout `coords (kind, row, col)`
  (`pruning/ppm_layout.py`): `Dense(F_in -> d)(Fourier features of the view / frame index and
  the normalized row, col) + kind_embedding[kind]` (base view, crop grid, newline, frame).
  Any N: one PPM serves single images (coords built from the h x w grid), AnyRes images and
  videos; padding slots (`valid` False) are no keys and get score -inf.
- "table": a learned table pos_embedding[n_v, d] (PPM artifacts of format 1): runs only on
  inputs of exactly n_v tokens.

Letters: B batch, T text length, D LLM width, d PPM width (`width`), N PPM heads, H PPM head
dim, F PPM MLP width, L PPM layers. Compute is f32 whatever the input dtype (bf16 inputs are
upcast). Params carry logical axis names (`embed` on the LLM-width side of the input
projections, `ppm_embed`, `ppm_heads`, `head_dim`, `ppm_mlp`, and `layers` on the stacked
blocks).

Default size (d=512, 2 layers, 8 heads, MLP x4) for a 7B LLM (D=4096, n_v=576):
~10.8M params (0.16% of LLaMA-7B's 6.74e9) and ~11.6 GFLOPs with T=64 (0.43% of the pruned
prefill at r=0.25); see `ppm_param_count`, `ppm_flops`, `llm_prefill_flops`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from covipal_jax.models import attention as attention_lib
from covipal_jax.models.layers import dense, kernel_init, layer_norm, zeros_init
from covipal_jax.pruning import ppm_layout
from covipal_jax.pruning.base import PreLLMMethod, PruneContext, PruneResult
from covipal_jax.pruning.registry import register
from covipal_jax.pruning.select import gather_tokens, masked_select

Array = jax.Array
POSITIONS = ("layout", "table")
@dataclasses.dataclass(frozen=True)
class PPMConfig:
    """PPM hyperparameters. `d_model` (LLM width D) is static; `n_v` is the base model's
    single-view token count (the only length a "table" PPM runs on; a "layout" PPM runs on any
    N). `pos_freqs` / `index_freqs`: Fourier frequencies of the layout encoding.
    `attention`: the backend the blocks' attention is traced with (`models.attention.IMPLS`;
    "auto" picks by platform and length, as the LLaVA's `attention`). A runtime choice, like
    the LLaVA's: `to_dict` (what exports and resume metadata record) leaves it out. The FLOP
    counters use "xla": XLA's cost analysis counts a blockwise loop's body once."""

    n_v: int
    d_model: int
    width: int = 512
    num_layers: int = 2
    num_heads: int = 8
    mlp_ratio: int = 4
    dropout: float = 0.0
    ln_eps: float = 1e-6
    position: str = "layout"
    pos_freqs: int = 6
    index_freqs: int = 4
    attention: str = "auto"

    RUNTIME: ClassVar[tuple[str, ...]] = ("attention",)

    def __post_init__(self):
        if self.attention not in attention_lib.IMPLS:
            raise ValueError(f"PPMConfig.attention must be one of {attention_lib.IMPLS}, "
                             f"got {self.attention!r}")
        if self.position not in POSITIONS:
            raise ValueError(f"PPMConfig.position must be one of {POSITIONS}, "
                             f"got {self.position!r}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} not divisible by num_heads {self.num_heads}")
        for f in ("n_v", "d_model", "width", "num_layers", "num_heads", "mlp_ratio",
                  "pos_freqs"):
            if getattr(self, f) < 1:
                raise ValueError(f"PPMConfig.{f} must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        """The architecture fields (what an export or a resumed run must agree on)."""
        d = dataclasses.asdict(self)
        for f in self.RUNTIME:
            d.pop(f)
        return d

    def with_attention(self, impl: str) -> "PPMConfig":
        return dataclasses.replace(self, attention=impl)

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def mlp_width(self) -> int:
        return self.width * self.mlp_ratio

    @property
    def layout_features(self) -> int:
        """F_in: the layout encoding's input features (0 for a "table" PPM)."""
        if self.position != "layout":
            return 0
        return ppm_layout.num_features(self.pos_freqs, self.index_freqs)


def _init(names, stddev=0.02):
    return kernel_init(names, stddev)


def _dense(features, names, name, axis=-1):
    """Real-shape kernels (see `models.layers.Dense`): valid logical names under any mesh."""
    return dense(features, names, axis=axis, name=name)


def _ln(eps, axis_name, name):
    return layer_norm(eps, axis_name, jnp.float32, jnp.float32, name=name)


class PPMBlock(nn.Module):
    """One pre-LN block: vision queries attend to [text ; vision], then an MLP."""

    cfg: PPMConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, v: Array, t: Array, key_valid: Array):
        """v: f32[B, n_v, d]; t: f32[B, T, d]; key_valid: bool[B, T + n_v] (False: padding).

        The attention goes through `models.attention` where it would be long (an AnyRes image
        or a video: n_v in the thousands): blockwise on CPU, the splash kernel on TPU, never
        the [B, N, n_v, T + n_v] scores. Short inputs (and dropout on the probabilities in
        training) take the explicit softmax below, the same numbers as always."""
        c = self.cfg
        deterministic = self.deterministic
        ln1 = _ln(c.ln_eps, "ppm_embed", "ln1")
        hv = ln1(v)
        kv_in = jnp.concatenate([ln1(t), hv], axis=1)                      # [B, S, d]
        qkv_names = ("ppm_embed", "ppm_heads", "head_dim")
        q = _dense((c.num_heads, c.head_dim), qkv_names, "q")(hv)          # [B, n_v, N, H]
        k = _dense((c.num_heads, c.head_dim), qkv_names, "k")(kv_in)       # [B, S, N, H]
        val = _dense((c.num_heads, c.head_dim), qkv_names, "v")(kv_in)
        impl, _ = attention_lib.resolve_impl(c.attention, q, k)
        if impl == "xla" or (c.dropout > 0 and not deterministic):
            key_bias = jnp.where(key_valid, 0.0, -jnp.inf)[:, None, None, :].astype(jnp.float32)
            logits = jnp.einsum("btnh,bsnh->bnts", q, k) / jnp.sqrt(c.head_dim).astype(q.dtype)
            probs = jax.nn.softmax(logits + key_bias, axis=-1)
            probs = nn.Dropout(c.dropout)(probs, deterministic=deterministic)
            att = jnp.einsum("bnts,bsnh->btnh", probs, val)
        else:
            att = attention_lib.attention(q, k, val, mask=attention_lib.Mask(key_valid=key_valid),
                                          impl=impl)
        att = _dense(c.width, ("ppm_heads", "head_dim", "ppm_embed"), "o", axis=(-2, -1))(att)
        v = v + nn.Dropout(c.dropout)(att, deterministic=deterministic)

        h = _ln(c.ln_eps, "ppm_embed", "ln2")(v)
        h = _dense(c.mlp_width, ("ppm_embed", "ppm_mlp"), "fc1")(h)
        h = nn.with_logical_constraint(jax.nn.gelu(h, approximate=False),
                                       ("act_batch", "act_length", "ppm_mlp"))
        h = _dense(c.width, ("ppm_mlp", "ppm_embed"), "fc2")(h)
        v = v + nn.Dropout(c.dropout)(h, deterministic=deterministic)
        return nn.with_logical_constraint(v, ("act_batch", "act_length", "ppm_embed")), None


class PPM(nn.Module):
    """The Plug-and-Play Pruning Module: `apply(params, H_v, H_t, text_mask) -> S f32[B, N]`.

    Param tree: in_norm_v, in_norm_t (LayerNorm over D), v_proj, t_proj (Dense D->d),
    "layout": pos_proj (Dense F_in->d), kind_embedding [4, d]; "table": pos_embedding [n_v, d];
    text_type_embedding [d], blocks/ (stacked [L, ...]: ln1, q, k, v, o, ln2, fc1, fc2),
    final_norm, head (Dense d->1).
    """

    cfg: PPMConfig

    @nn.compact
    def __call__(self, vision_tokens: Array, text_embeds: Array, text_mask: Array,
                 deterministic: bool = True, *, coords: Array | None = None,
                 valid: Array | None = None) -> Array:
        """vision_tokens: [B, N, D]; text_embeds: [B, T, D]; text_mask: bool[B, T];
        coords: i32[B, N, 3] (kind, row, col) per slot, None for a plain image (an
        `ppm_layout.default_grid(N)` grid); valid: bool[B, N] real slots (None: all, or
        coords' kind != -1).

        Returns scores f32[B, N], -inf on invalid slots. Padded text (text_mask False) and
        invalid slots have no influence on the other scores.
        """
        c = self.cfg
        b, n_v, dm = vision_tokens.shape
        if dm != c.d_model or (c.position == "table" and n_v != c.n_v):
            want = f"n_v={c.n_v}" if c.position == "table" else "N"
            raise ValueError(f"vision_tokens {vision_tokens.shape} != (B, {want}, "
                             f"d_model={c.d_model})"
                             + (" (a position='table' PPM of format 1 runs only on its n_v "
                                "tokens; retrain with position='layout' for other layouts)"
                                if c.position == "table" and dm == c.d_model else ""))
        if text_embeds.shape[-1] != c.d_model:
            raise ValueError(f"text_embeds width {text_embeds.shape[-1]} != {c.d_model}")
        if coords is not None and coords.shape != (b, n_v, 3):
            raise ValueError(f"coords {coords.shape} != (B, N, 3) = {(b, n_v, 3)}")
        if valid is None and coords is not None:
            valid = coords[..., 0] != ppm_layout.KIND_INVALID
        vmask = jnp.ones((b, n_v), bool) if valid is None else valid.astype(bool)
        xv = vision_tokens.astype(jnp.float32)
        xt = text_embeds.astype(jnp.float32)
        text_mask = text_mask.astype(bool)
        # Zero the padded text / slots so nothing non-finite there can leak through 0 * inf.
        xt = jnp.where(text_mask[..., None], xt, 0.0)
        if valid is not None:
            xv = jnp.where(vmask[..., None], xv, 0.0)

        v = _dense(c.width, ("embed", "ppm_embed"), "v_proj")(_ln(c.ln_eps, "embed",
                                                                  "in_norm_v")(xv))
        t = _dense(c.width, ("embed", "ppm_embed"), "t_proj")(_ln(c.ln_eps, "embed",
                                                                  "in_norm_t")(xt))
        if c.position == "table":
            pos = self.param("pos_embedding", _init((None, "ppm_embed")), (c.n_v, c.width),
                             jnp.float32)[None]
        else:
            if coords is None:
                coords = ppm_layout.single_image_coords(b, ppm_layout.default_grid(n_v))
            kind, feats = ppm_layout.layout_features(coords, c.pos_freqs, c.index_freqs)
            table = self.param("kind_embedding", zeros_init((None, "ppm_embed")),
                               (ppm_layout.NUM_KINDS, c.width), jnp.float32)
            pos = _dense(c.width, (None, "ppm_embed"), "pos_proj")(feats)
            pos = pos + jnp.take(table, kind, axis=0)
        typ = self.param("text_type_embedding", _init(("ppm_embed",)), (c.width,),
                         jnp.float32)
        v = nn.with_logical_constraint(v + pos, ("act_batch", "act_length", "ppm_embed"))
        t = nn.with_logical_constraint(t + typ, ("act_batch", "act_length", "ppm_embed"))

        key_valid = jnp.concatenate([text_mask, vmask], axis=1)

        blocks = nn.scan(
            PPMBlock, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast, nn.broadcast), length=c.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"})(c, deterministic, name="blocks")
        v, _ = blocks(v, t, key_valid)

        v = _ln(c.ln_eps, "ppm_embed", "final_norm")(v)
        s = _dense(1, ("ppm_embed", None), "head")(v)[..., 0].astype(jnp.float32)
        return s if valid is None else jnp.where(vmask, s, -jnp.inf)


def context_layout(ctx: PruneContext) -> tuple[Array | None, Array | None]:
    """(coords, valid) the PPM reads from a `PruneContext`: the packed layout as is; a plain
    image gets its (h, w) = `ctx.grid` coords (or `default_grid(n_v)` when grid is unset)."""
    if ctx.coords is not None or ctx.valid is not None:
        return ctx.coords, ctx.valid
    h, w = ctx.grid
    grid = (h, w) if h * w == ctx.n_v else ppm_layout.default_grid(ctx.n_v)
    return ppm_layout.single_image_coords(ctx.batch, grid), None


# ----------------------------------------------------------------------------- the method

def ppm(ctx: PruneContext, k: int, *, module: PPM, variables: Any,
        project: Any = None, keep: float | int = 1.0) -> PruneResult:
    """CoViPAL pre-LLM pruning: scores = PPM(H_v, H_t), keep TopK(scores, k), gather H_v.

    `module` is a `PPM`, `variables` its `{"params": ...}`. `project` is unused (the PPM
    scores the already projected tokens). On a packed buffer (`ctx.valid`) the top-k is
    `select.masked_select` (padding never kept, newlines kept, per-example budget from `keep`).
    A "layout" PPM reads the slots' coords (`context_layout`), so one PPM serves single images,
    AnyRes images and videos; a "table" PPM (format-1 artifacts) runs only on exactly its n_v
    tokens.
    """
    del project
    c = module.cfg
    if c.position == "table":
        scores = module.apply(variables, ctx.vision_tokens, ctx.text_embeds, ctx.text_mask,
                              valid=ctx.valid)
    else:
        coords, valid = context_layout(ctx)
        scores = module.apply(variables, ctx.vision_tokens, ctx.text_embeds, ctx.text_mask,
                              coords=coords, valid=valid)
    idx, kept = masked_select(ctx, scores, k, keep)
    return PruneResult(tokens=gather_tokens(ctx.vision_tokens, idx), indices=idx,
                       scores=scores, valid=kept)


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class PPMMethod(PreLLMMethod):
    """CoViPAL's PPM as a method value: `ppm` its architecture (static, part of the jit key),
    `ppm_checkpoint` the exported PPM directory `load_variables` reads (config key of the same
    name). Its variables `{"params": ...}` travel separately, as a pytree argument of prefill.
    """

    name: ClassVar[str] = "ppm"
    trainable: ClassVar[bool] = True
    config_keys: ClassVar[tuple[str, ...]] = ("ppm_checkpoint",)
    description: ClassVar[str] = "CoViPAL PPM: learned text-conditioned scores, top-k"
    ppm: PPMConfig | None = None
    ppm_checkpoint: str = ""

    def module(self) -> "PPM":
        if self.ppm is None:
            raise ValueError("pruning.method='ppm' needs a trained PPM: set "
                             "pruning.ppm_checkpoint (or PPMMethod(ppm=PPMConfig(...)))")
        return PPM(self.ppm)

    def dense(self) -> "PPMMethod":
        return self if self.ppm is None else dataclasses.replace(
            self, ppm=self.ppm.with_attention("xla"))

    def load_variables(self, model_cfg: Any) -> "tuple[PPMMethod, Any]":
        """Reads `ppm_checkpoint` (checked against the base model `model_cfg`)."""
        from covipal_jax.weights import ppm_io  # weights/ imports this module

        if not self.ppm_checkpoint:
            raise ValueError("pruning.method='ppm' needs --config.pruning.ppm_checkpoint=DIR "
                             "(a PPM exported by `python -m covipal_jax.train`)")
        module, variables, _ = ppm_io.load_ppm(self.ppm_checkpoint, model_cfg)
        return dataclasses.replace(self, ppm=module.cfg), variables

    def select(self, ctx: PruneContext, k: int, variables: Any = None) -> PruneResult:
        if variables is None:
            raise ValueError("pruning.method='ppm' needs trained PPM variables "
                             "(pruning.ppm_checkpoint)")
        return ppm(ctx, k, module=self.module(), variables=variables, keep=self.keep)


# ----------------------------------------------------------------------------- cost model

def ppm_param_count(cfg: PPMConfig) -> int:
    """Analytic parameter count of `PPM(cfg)` (equals the initialized tree's size)."""
    dm, d, f, n_l = cfg.d_model, cfg.width, cfg.mlp_width, cfg.num_layers
    inputs = 2 * (2 * dm) + 2 * (dm * d + d)          # two input LayerNorms + two projections
    if cfg.position == "table":
        embeds = cfg.n_v * d + d                       # vision positions + text type
    else:                                              # kind table + pos_proj + text type
        embeds = ppm_layout.NUM_KINDS * d + (cfg.layout_features * d + d) + d
    block = (2 * d                                     # ln1
             + 3 * (d * d + d)                         # q, k, v (bias [N, H] = d)
             + (d * d + d)                             # o
             + 2 * d                                   # ln2
             + (d * f + f) + (f * d + d))              # fc1, fc2
    head = 2 * d + (d + 1)                             # final LN + scalar head
    return inputs + embeds + n_l * block + head


def ppm_flops(cfg: PPMConfig, n_v: int, t: int) -> int:
    """Matmul FLOPs (2 x MACs) of one PPM forward for n_v vision and t text tokens.

    Counts the input projections, the layout encoding's projection ("layout" PPMs), per layer
    q/o on vision, k/v on text + vision, the attention scores and the weighted sum (n_v
    queries x (t + n_v) keys), the MLP, and the head.
    Norms, softmax and biases are ignored (O(n d), negligible).
    """
    dm, d, f, n_l = cfg.d_model, cfg.width, cfg.mlp_width, cfg.num_layers
    s = t + n_v
    proj = 2 * (n_v + t) * dm * d
    per_layer = (2 * n_v * d * d                       # q
                 + 2 * 2 * s * d * d                   # k, v
                 + 2 * 2 * n_v * s * d                 # q k^T and probs @ v
                 + 2 * n_v * d * d                     # o
                 + 2 * 2 * n_v * d * f)                # fc1, fc2
    head = 2 * n_v * d
    layout = 2 * n_v * cfg.layout_features * d        # pos_proj ("layout" PPMs)
    return proj + layout + n_l * per_layer + head


def llm_param_count(num_layers: int = 32, d_model: int = 4096, mlp: int = 11008,
                    num_heads: int = 32, num_kv_heads: int | None = None,
                    head_dim: int | None = None, vocab: int = 32000,
                    tied_embeddings: bool = False) -> int:
    """Parameters of a LLaMA-style decoder (defaults: LLaMA-7B / Vicuna-7B, ~6.74e9)."""
    kvh = num_heads if num_kv_heads is None else num_kv_heads
    h = d_model // num_heads if head_dim is None else head_dim
    attn = d_model * num_heads * h * 2 + d_model * kvh * h * 2
    layer = attn + 3 * d_model * mlp + 2 * d_model
    emb = vocab * d_model * (1 if tied_embeddings else 2)
    return num_layers * layer + emb + d_model


def llm_prefill_flops(seq_len: int, num_layers: int = 32, d_model: int = 4096,
                      mlp: int = 11008, num_heads: int = 32, num_kv_heads: int | None = None,
                      head_dim: int | None = None, vocab: int = 32000,
                      include_lm_head: bool = True) -> int:
    """Matmul FLOPs (2 x MACs) of a LLaMA-style prefill over `seq_len` tokens.

    Per layer: q/o projections 2*2*S*D*N*H, k/v 2*2*S*D*K*H, attention 2*2*S^2*N*H (the full
    S x S score matrix, the convention of FastV's 4nd^2 + 2n^2d + 2ndm formula; a causal
    kernel does about half), SwiGLU MLP 2*3*S*D*F. Plus the LM head for the last token only
    (prefill needs one next-token distribution). Defaults: LLaMA-7B.
    """
    kvh = num_heads if num_kv_heads is None else num_kv_heads
    h = d_model // num_heads if head_dim is None else head_dim
    s = seq_len
    per_layer = (2 * 2 * s * d_model * num_heads * h
                 + 2 * 2 * s * d_model * kvh * h
                 + 2 * 2 * s * s * num_heads * h
                 + 2 * 3 * s * d_model * mlp)
    head = 2 * d_model * vocab if include_lm_head else 0
    return num_layers * per_layer + head
