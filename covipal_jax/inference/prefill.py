"""Where vision tokens are pruned: encode -> project -> method -> splice -> decoder prefill.

Letters: B batch, T text bucket, n_v vision tokens per image, k kept, L = T - 1 + n_v (full
sequence), L_k = T - 1 + k (pruned sequence), D width, V vocab.

Every shape here is static: `k` comes from the config (`PruneSpec.k`), never from data, so a
jitted prefill compiles once per (bucket, k).

Two families of methods (see `covipal_jax.pruning`):
- pre-LLM (`ppm`, `visionzip`, `random`, `pool`, `none`): the method picks / merges `k` tokens
  from the projected vision tokens, the LLM sees a sequence of L_k tokens from layer 0 on.
- in-LLM (`fastv`, `dart`): layers [0, K) see all n_v tokens; at layer K the method picks `k`
  from signals of layer K-1 (one recomputed attention row / the keys), the hidden states are
  gathered and layers [K, N) see L - n_v + k tokens. The KV cache has one segment per range.

Two realizations of a pre-LLM keep set:
- "gather" (inference): the LLM really sees only k tokens; prefill FLOPs and KV cache shrink.
- "mask" (training, analysis): all n_v slots stay, the pruned ones are masked out of attention
  (and out of the positions' cumsum), so shapes never change between keep ratios. Both give the
  same logits; `tests/test_prefill.py` checks it.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from covipal_jax import pruning
from covipal_jax.models.config import LlavaConfig
from covipal_jax.models.decoder import init_cache
from covipal_jax.models.llava import Llava, image_positions
from covipal_jax.pruning import select
from covipal_jax.pruning.base import PruneContext, resolve_keep

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class PruneSpec:
    """Static description of how to prune (hashable: part of the jit signature).

    method: registry name; k: kept vision tokens; positions: "contiguous" | "original";
    layer: K for in-LLM methods; options: extra method keyword arguments.
    """

    method: str = "none"
    k: int = 0
    positions: str = "contiguous"
    layer: int = 2
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def from_config(cls, pruning_cfg: Any, n_v: int) -> "PruneSpec":
        """From `config.pruning` (see configs/common.py); validates method and keep."""
        p = pruning_cfg
        info = pruning.get_method(p.method)
        keep = p.keep
        # ConfigDict stores `keep` as a float: a whole number > 1 means a token count.
        if isinstance(keep, float) and keep > 1 and keep.is_integer():
            keep = int(keep)
        k = resolve_keep(keep, n_v)
        if info.name == "none" and k != n_v:
            raise ValueError(f"pruning.method='none' keeps all {n_v} tokens; "
                             f"pruning.keep={p.keep} asks for {k}")
        if p.positions not in ("contiguous", "original"):
            raise ValueError(f"pruning.positions must be contiguous|original, got {p.positions}")
        options: dict[str, Any] = {}
        if info.name == "visionzip" and p.get("visionzip_dominant_frac") is not None:
            options["dominant"] = max(1, min(k, int(round(k * p.visionzip_dominant_frac))))
        if info.name == "dart" and p.get("dart_pivots") is not None:
            half = max(1, int(p.dart_pivots) // 2)
            options.update(num_image_pivots=half, num_text_pivots=half)
        if info.name == "pool" and p.get("pool_mode"):
            options["mode"] = p.pool_mode
        layer = int(p.layer)
        if info.stage == "in_llm" and layer < 1:
            raise ValueError(f"pruning.layer must be >= 1 for in-LLM method {p.method!r}")
        return cls(info.name, k, p.positions, layer, tuple(sorted(options.items())))

    @property
    def info(self) -> pruning.MethodInfo:
        return pruning.get_method(self.method)

    def seq_len(self, text_len: int, n_v: int) -> int:
        """Length of the sequence the (last) decoder layers see."""
        return text_len - 1 + (self.k if self.k else n_v)


@flax.struct.dataclass
class Segment:
    """A KV cache for the decoder layers [start, stop).

    cache: {"k", "v": [stop - start, B, S, K, H]}; key_valid: bool[B, S]; base: the number of
    prompt tokens in this segment (decode step t writes at index base + t).
    """

    cache: dict
    key_valid: Array
    start: int = flax.struct.field(pytree_node=False)
    stop: int = flax.struct.field(pytree_node=False)
    base: int = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class PrefillOutput:
    """last_logits f32[B, V] (next-token logits); segments: KV caches; next_position i32[B];
    kept i32[B, k] source patch index of each kept vision token; scores f32[B, n_v] or None."""

    last_logits: Array
    segments: tuple
    next_position: Array
    kept: Array
    scores: Array | None = None


# ----------------------------------------------------------------------------- helpers

def build_context(model: Llava, params: Any, pixels: Array, ids: Array, mask: Array,
                  info: pruning.MethodInfo, rng: Array | None = None
                  ) -> tuple[PruneContext, Array]:
    """Run the tower + projector + text embedding; returns (context, text embeddings)."""
    cfg: LlavaConfig = model.cfg
    stats = info.needs_vit_attention or info.needs_vit_keys
    vis, tokens = model.apply(params, pixels, stats, method=Llava.encode_image)
    text = model.apply(params, ids, method=Llava.embed_text)
    cls_attention = None if vis.cls_attention is None else vis.cls_attention.sum(axis=1)
    keys = None if vis.keys is None else vis.keys.mean(axis=2)
    ctx = PruneContext(
        vision_tokens=tokens, text_embeds=text,
        text_mask=mask & (ids != cfg.image_token_id),
        vision_features=vis.features, cls_features=vis.cls, cls_attention=cls_attention,
        vision_keys=keys, mean_attention_received=vis.attention_received, rng=rng,
        grid=cfg.vision.grid)
    return ctx, text


def select_pre_llm(model: Llava, params: Any, ctx: PruneContext, spec: PruneSpec,
                   ppm: tuple[Any, Any] | None = None) -> pruning.PruneResult:
    """Apply a pre-LLM method: PruneResult with k tokens."""
    info = spec.info
    kwargs = dict(spec.options)
    if info.needs_project:
        kwargs["project"] = lambda f: model.apply(params, f, method=Llava.project)
    if info.name == "ppm":
        if ppm is None:
            raise ValueError("pruning.method='ppm' needs trained PPM params "
                             "(pruning.ppm_checkpoint)")
        kwargs.update(module=ppm[0], variables=ppm[1])
    return info.fn(ctx, spec.k, **kwargs)


def _pad_valid(seq_mask: Array, extra: int) -> Array:
    return jnp.concatenate([seq_mask, jnp.zeros(seq_mask.shape[:1] + (extra,), bool)], axis=1)


def _run_segment(model, params, x, positions, seq_mask, start, stop, extra):
    """Run layers [start, stop) over a prompt x [B, L, D] into a fresh cache of L + extra."""
    cfg: LlavaConfig = model.cfg
    key_valid = _pad_valid(seq_mask, extra)
    cache = init_cache(cfg, x.shape[0], x.shape[1] + extra, num_layers=stop - start)
    h, cache = model.apply(params, x, method=Llava.run, positions=positions,
                           key_valid=key_valid, cache=cache, cache_index=0, start=start,
                           stop=stop)
    return h, Segment(cache, key_valid, start, stop, x.shape[1])


# ----------------------------------------------------------------------------- prefill

def prefill(model: Llava, params: Any, pixels: Array, ids: Array, mask: Array,
            spec: PruneSpec, *, extra: int, ppm: tuple[Any, Any] | None = None,
            rng: Array | None = None) -> PrefillOutput:
    """Pruned prefill into KV caches with room for `extra` new tokens.

    pixels f32[B, H, W, 3]; ids i32[B, T] left-padded, one placeholder each; mask bool[B, T].
    """
    cfg: LlavaConfig = model.cfg
    n_layers = cfg.text.num_layers
    info = spec.info
    ctx, text = build_context(model, params, pixels, ids, mask, info, rng)
    image_pos = image_positions(ids, cfg.image_token_id)
    n_v = ctx.n_v

    if info.stage == "pre_llm":
        res = select_pre_llm(model, params, ctx, spec, ppm)
        seq, seq_mask, positions, _ = select.splice(text, mask, image_pos, res.tokens,
                                                    res.indices, spec.positions, n_v)
        h, seg = _run_segment(model, params, seq, positions, seq_mask, 0, n_layers, extra)
        segments, kept, scores = (seg,), res.indices, res.scores
    else:
        kk = spec.layer
        if not 1 <= kk < n_layers:
            raise ValueError(f"in-LLM pruning layer K={kk} must be in [1, {n_layers})")
        idx = jnp.broadcast_to(jnp.arange(n_v, dtype=jnp.int32), (ids.shape[0], n_v))
        seq, seq_mask, positions, _ = select.splice(text, mask, image_pos, ctx.vision_tokens,
                                                    idx, "contiguous", n_v)
        h, seg_a = _run_segment(model, params, seq, positions, seq_mask, 0, kk - 1, extra)
        kept = _select_in_llm(model, params, h, positions, seq_mask, image_pos, n_v, spec)
        h, seg_b = _run_segment(model, params, h, positions, seq_mask, kk - 1, kk, extra)
        keep_seq = select.in_llm_keep_indices(image_pos, kept, n_v, seq.shape[1])
        take = lambda a: jnp.take_along_axis(a, keep_seq.reshape(keep_seq.shape + (1,) * (
            a.ndim - 2)), axis=1)
        h, seq_mask, positions = take(h), take(seq_mask), take(positions)
        h, seg_c = _run_segment(model, params, h, positions, seq_mask, kk, n_layers, extra)
        segments, scores = (_merge(seg_a, seg_b), seg_c), None

    last = model.apply(params, h[:, -1:], method=Llava.logits)[:, 0]
    return PrefillOutput(last, segments, positions[:, -1] + 1, kept, scores)


def _merge(a: Segment, b: Segment) -> Segment:
    """Two adjacent segments over the same sequence -> one."""
    cache = jax.tree.map(lambda x, y: jnp.concatenate([x, y], axis=0), a.cache, b.cache)
    return Segment(cache, a.key_valid, a.start, b.stop, a.base)


def _select_in_llm(model, params, h, positions, seq_mask, image_pos, n_v, spec) -> Array:
    """The in-LLM method's kept image tokens i32[B, k], from the input h of layer K-1."""
    layer = spec.layer - 1
    b, length = seq_mask.shape
    if spec.method == "fastv":
        rows = jnp.full((b, 1), length - 1, jnp.int32)
        probs = model.apply(params, h, method=Llava.attention_rows, layer=layer,
                            positions=positions, key_valid=seq_mask, rows=rows)[:, :, 0]
        image_attention = select.slice_span(probs, image_pos, n_v, axis=2)  # [B, N, n_v]
        return spec.info.fn(image_attention, spec.k)
    if spec.method == "dart":
        keys = model.apply(params, h, method=Llava.layer_keys, layer=layer, positions=positions)
        # DART compares hidden states of the layer-K input through the final norm.
        h_next, _ = model.apply(params, h, method=Llava.run, positions=positions,
                                key_valid=seq_mask, start=layer, stop=layer + 1)
        normed = model.apply(params, h_next, method=Llava.final_norm)
        return spec.info.fn(normed, keys, image_pos, n_v, spec.k, seq_mask=seq_mask,
                            **dict(spec.options))
    raise ValueError(f"no in-LLM selection for method {spec.method!r}")


# ----------------------------------------------------------------------------- full forward

def forward(model: Llava, params: Any, pixels: Array, ids: Array, mask: Array,
            spec: PruneSpec, *, realize: str = "gather", ppm: tuple[Any, Any] | None = None,
            rng: Array | None = None, bias_fn=None) -> tuple[Array, Array, Array]:
    """Logits over the whole (pruned) prompt, no cache: for training and analysis.

    realize: "gather" (sequence of L_k tokens) or "mask" (all L slots, pruned ones masked;
    pre-LLM methods only). bias_fn(ctx, is_vision) -> f32[B, L] optional additive key bias.
    Returns (logits f32[B, L', V], seq_mask bool[B, L'], kept i32[B, k]).
    """
    info = spec.info
    if info.stage != "pre_llm":
        raise ValueError("forward() realizes pre-LLM methods; use prefill() for in-LLM ones")
    cfg: LlavaConfig = model.cfg
    ctx, text = build_context(model, params, pixels, ids, mask, info, rng)
    image_pos = image_positions(ids, cfg.image_token_id)
    n_v = ctx.n_v
    res = select_pre_llm(model, params, ctx, spec, ppm)
    if realize == "gather":
        seq, seq_mask, positions, is_vis = select.splice(text, mask, image_pos, res.tokens,
                                                         res.indices, spec.positions, n_v)
    elif realize == "mask":
        if info.needs_project:
            raise ValueError(f"{spec.method!r} merges tokens; it has no mask realization")
        idx = jnp.broadcast_to(jnp.arange(n_v, dtype=jnp.int32), res.indices.shape[:1] + (n_v,))
        seq, seq_mask, positions, is_vis = select.splice(text, mask, image_pos,
                                                         ctx.vision_tokens, idx, "contiguous",
                                                         n_v)
        keep = select.keep_mask(res.indices, n_v)  # [B, n_v]
        vis_keep = jnp.take_along_axis(
            keep, jnp.clip(jnp.arange(seq.shape[1])[None] - image_pos[:, None], 0, n_v - 1),
            axis=1)
        seq_mask = seq_mask & (~is_vis | vis_keep)
        if spec.positions == "contiguous":
            positions = jnp.maximum(jnp.cumsum(seq_mask.astype(jnp.int32), axis=1) - 1, 0)
    else:
        raise ValueError(f"realize must be gather|mask, got {realize!r}")
    bias = None if bias_fn is None else bias_fn(ctx, is_vis)
    h, _ = model.apply(params, seq, method=Llava.run, positions=positions,
                       key_valid=seq_mask, bias=bias)
    return model.apply(params, h, method=Llava.logits), seq_mask, res.indices
