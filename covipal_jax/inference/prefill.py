"""Where vision tokens are pruned: encode -> project -> method -> splice -> decoder prefill.

Letters: B batch, T text bucket, n_v vision tokens per image, k kept, L = T - 1 + n_v (full
sequence), L_k = T - 1 + k (pruned sequence), D width, V vocab, S a current sequence length,
n the current vision tokens.

Every shape here is static: `k` comes from the method value (`method.k(n_v)`), never from
data, so a jitted prefill compiles once per (bucket, method value).

The method (`covipal_jax.pruning`) is a static value; prefill branches only on `method.where`:
- "pre_llm": `method.select(ctx, k, variables)` picks / merges `k` tokens from the projected
  vision tokens; the LLM sees a sequence of L_k tokens from layer 0 on.
- "in_llm": `method.stages(n_v, num_layers)` = ((K_1, k_1), (K_2, k_2), ...). Layers
  [K_{s-1}, K_s) run over the current sequence; at each stage the method sees a `Probe` of
  layer K_s - 1 (attention rows recomputed for the rows it asks, keys, normed next hidden
  states) and returns which current vision tokens stay (optionally plus merged tokens, an
  `InLLMResult`); hidden states, masks and position ids are gathered (kept tokens keep their
  position ids, or, for methods that `renumbers_stages` with positions="contiguous", every
  stage is renumbered and its segment decodes at position - (n_v - k_s)). The KV cache has one
  segment per layer range.

Two realizations of a pre-LLM keep set:
- "gather" (inference): the LLM really sees only k tokens; prefill FLOPs and KV cache shrink.
- "mask" (training, analysis): all n_v slots stay, the pruned ones are masked out of attention
  (and out of the positions' cumsum), so shapes never change between keep ratios. Both give the
  same logits; `tests/test_prefill.py` checks it.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from covipal_jax.inference import visual_inputs as vi
from covipal_jax.inference.in_llm import run_in_llm
from covipal_jax.inference.segments import PrefillOutput, Segment, run_segment  # noqa: F401 (re-exported)
from covipal_jax.models import multimodal as mm
from covipal_jax.models.config import LlavaConfig
from covipal_jax.models.llava import Llava
from covipal_jax.pruning.base import PruneContext, PruneResult, PruningMethod

Array = jax.Array

# the tower statistics (attention, keys) are computed only for methods that read them
_TOWER_STATS = frozenset({"cls_attention", "vision_keys", "mean_attention_received"})


# ----------------------------------------------------------------------------- helpers

def build_context(model: Llava, params: Any, pixels: Array, ids: Array, mask: Array,
                  method: PruningMethod, rng: Array | None = None
                  ) -> tuple[PruneContext, Array]:
    """Run the tower + projector + text embedding; returns (context, text embeddings)."""
    cfg: LlavaConfig = model.cfg
    stats = bool(method.needs & _TOWER_STATS)
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


def select_pre_llm(model: Llava, params: Any, ctx: PruneContext, method: PruningMethod,
                   variables: Any = None) -> PruneResult:
    """Apply a pre-LLM method: PruneResult with `method.k(n_v)` tokens (the context gets the
    model's projector as `ctx.project`)."""
    ctx = ctx.replace(project=lambda f: model.apply(params, f, method=Llava.project))
    return method.select(ctx, method.k(ctx.n_v), variables)


# ----------------------------------------------------------------------------- prefill

def prefill(model: Llava, params: Any, pixels: Array, ids: Array, mask: Array,
            method: PruningMethod, *, extra: int, variables: Any = None,
            rng: Array | None = None) -> PrefillOutput:
    """Pruned prefill into KV caches with room for `extra` new tokens.

    pixels f32[B, H, W, 3]; ids i32[B, T] left-padded, one placeholder each; mask bool[B, T];
    method: a `PruningMethod` value (static); variables: its trainable variables (PPM) or None;
    rng: PRNG keys [B] (one per example) or one key, for stochastic methods.
    `pixels` may also be a packed visual input (`visual_inputs.AnyResImage` / `Video`): see
    `prefill_packed`.
    """
    if vi.is_packed(pixels):
        return prefill_packed(model, params, pixels, ids, mask, method, extra=extra,
                              variables=variables, rng=rng)
    cfg: LlavaConfig = model.cfg
    n_layers = cfg.text.num_layers
    ctx, text = build_context(model, params, pixels, ids, mask, method, rng)
    image_pos = mm.image_positions(ids, cfg.image_token_id)
    n_v = ctx.n_v

    if method.where == "pre_llm":
        res = select_pre_llm(model, params, ctx, method, variables)
        seq, seq_mask, positions, _ = mm.splice(text, mask, image_pos, res.tokens,
                                                res.indices, method.positions, n_v)
        h, seg = run_segment(model, params, seq, positions, seq_mask, 0, n_layers, extra)
        segments, kept, scores = (seg,), res.indices, res.scores
        next_position = positions[:, -1] + 1
    elif method.where == "in_llm":
        h, segments, next_position, kept = run_in_llm(model, params, ctx, text, mask, image_pos,
                                                   method, extra)
        scores = None
    else:
        raise ValueError(f"{type(method).__name__}.where={method.where!r}")

    last = model.apply(params, h[:, -1:], method=Llava.logits)[:, 0]
    return PrefillOutput(last, segments, next_position, kept, scores)


def packed_sequence(model: Llava, params: Any, visual: Any, ids: Array, mask: Array,
                    method: PruningMethod, *, variables: Any = None, rng: Array | None = None
                    ) -> tuple[Array, Array, Array, Array, PruneResult]:
    """A pre-LLM method on a packed visual input (AnyRes image / video), spliced.

    The method sees every slot of the buffer (a global top-k over base view, crops, frames);
    it never keeps a padding slot and always keeps the newlines (`select.masked_select`); the
    static k is `method.k(N)` (N the bucket's packed length), each example keeps its own
    budget of real tokens (`select.example_budget`). Returns (seq f32[B, L_k, D], seq_mask
    bool[B, L_k], positions i32[B, L_k], kept i32[B, k] source slot or -1 for a slot the LLM
    does not see, the PruneResult), L_k = T - 1 + k; positions are contiguous over what the
    LLM sees (the returned invalid slots are masked out and take no position), or with
    positions="original" those of the unpruned sequence (gaps where tokens were pruned).
    A `MultiImage` splices image p's picks at the row's p-th placeholder.
    """
    if method.where != "pre_llm":
        raise ValueError(f"in-LLM method {method.name!r}: a packed (AnyRes / video) input "
                         "prunes inside the LLM, through prefill() / prefill_packed() only")
    ctx, text, pos = vi.packed_context(model, params, visual, ids, mask, method, rng)
    res = select_pre_llm(model, params, ctx, method, variables)
    kept_valid = (jnp.ones(res.indices.shape, bool) if res.valid is None else res.valid)
    kept_valid = kept_valid & jnp.take_along_axis(ctx.valid, res.indices, axis=1)
    seq, seq_mask, positions = vi.splice_selected(model.cfg, visual, ctx, text, mask, pos,
                                                  res.indices, res.tokens, kept_valid,
                                                  method.positions)
    kept = jnp.where(kept_valid, res.indices, -1).astype(jnp.int32)
    return seq, seq_mask, positions, kept, res


def prefill_packed(model: Llava, params: Any, visual: Any, ids: Array, mask: Array,
                   method: PruningMethod, *, extra: int, variables: Any = None,
                   rng: Array | None = None) -> PrefillOutput:
    """`prefill` for a packed visual input (`packed_sequence`); `kept` i32[B, k] is -1 where
    the LLM sees no token (padding or beyond the example's budget). In-LLM methods run over
    the whole packed buffer, all images of a `MultiImage` together (`in_llm.run_in_llm` with
    the packed context and `visual_inputs.splice_all`); they take the global budget only."""
    if method.where == "in_llm":
        ctx, text, pos = vi.packed_context(model, params, visual, ids, mask, method, rng)
        if ctx.num_groups > 1:
            raise ValueError(f"in-LLM method {method.name!r}: budget={visual.budget!r} is not "
                             'supported inside the LLM; use budget="global" (one top-k over '
                             "all images / frames)")
        h, segments, next_position, kept = run_in_llm(
            model, params, ctx, text, mask, pos, method, extra,
            spliced=vi.splice_all(model.cfg, visual, ctx, text, mask, pos))
        last = model.apply(params, h[:, -1:], method=Llava.logits)[:, 0]
        return PrefillOutput(last, segments, next_position, kept, None)
    seq, seq_mask, positions, kept, res = packed_sequence(
        model, params, visual, ids, mask, method, variables=variables, rng=rng)
    h, seg = run_segment(model, params, seq, positions, seq_mask, 0,
                          model.cfg.text.num_layers, extra)
    last = model.apply(params, h[:, -1:], method=Llava.logits)[:, 0]
    return PrefillOutput(last, (seg,), positions[:, -1] + 1, kept, res.scores)


def forward_packed(model: Llava, params: Any, visual: Any, ids: Array, mask: Array,
                   method: PruningMethod, *, variables: Any = None, rng: Array | None = None
                   ) -> tuple[Array, Array, Array]:
    """Logits over the whole pruned prompt of a packed visual input, no cache:
    (logits f32[B, L_k, V], seq_mask bool[B, L_k], kept i32[B, k])."""
    seq, seq_mask, positions, kept, _ = packed_sequence(
        model, params, visual, ids, mask, method, variables=variables, rng=rng)
    h, _ = model.apply(params, seq, method=Llava.run, positions=positions, key_valid=seq_mask)
    return model.apply(params, h, method=Llava.logits), seq_mask, kept


# ----------------------------------------------------------------------------- full forward

def forward(model: Llava, params: Any, pixels: Array, ids: Array, mask: Array,
            method: PruningMethod, *, realize: str = "gather", variables: Any = None,
            rng: Array | None = None, bias_fn=None) -> tuple[Array, Array, Array]:
    """Logits over the whole (pruned) prompt, no cache: for training and analysis.

    realize: "gather" (sequence of L_k tokens) or "mask" (all L slots, pruned ones masked;
    pre-LLM methods that do not merge). bias_fn(ctx, is_vision) -> f32[B, L] optional additive
    key bias. Returns (logits f32[B, L', V], seq_mask bool[B, L'], kept i32[B, k]).
    """
    if method.where != "pre_llm":
        raise ValueError("forward() realizes pre-LLM methods; use prefill() for in-LLM ones")
    cfg: LlavaConfig = model.cfg
    ctx, text = build_context(model, params, pixels, ids, mask, method, rng)
    image_pos = mm.image_positions(ids, cfg.image_token_id)
    n_v = ctx.n_v
    res = select_pre_llm(model, params, ctx, method, variables)
    if realize == "gather":
        seq, seq_mask, positions, is_vis = mm.splice(text, mask, image_pos, res.tokens,
                                                     res.indices, method.positions, n_v)
    elif realize == "mask":
        if not method.kept_realized_by_mask():
            raise ValueError(f"{method.name!r} merges tokens; it has no mask realization")
        b = res.indices.shape[0]
        idx = jnp.broadcast_to(jnp.arange(n_v, dtype=jnp.int32), (b, n_v))
        seq, seq_mask, positions, is_vis = mm.splice(text, mask, image_pos, ctx.vision_tokens,
                                                     idx, "contiguous", n_v)
        keep = jnp.zeros((b, n_v), bool).at[jnp.arange(b)[:, None], res.indices].set(True)
        vis_keep = jnp.take_along_axis(
            keep, jnp.clip(jnp.arange(seq.shape[1])[None] - image_pos[:, None], 0, n_v - 1),
            axis=1)
        seq_mask = seq_mask & (~is_vis | vis_keep)
        if method.positions == "contiguous":
            positions = mm.text_positions(seq_mask)
    else:
        raise ValueError(f"realize must be gather|mask, got {realize!r}")
    bias = None if bias_fn is None else bias_fn(ctx, is_vis)
    h, _ = model.apply(params, seq, method=Llava.run, positions=positions,
                       key_valid=seq_mask, bias=bias)
    return model.apply(params, h, method=Llava.logits), seq_mask, res.indices
