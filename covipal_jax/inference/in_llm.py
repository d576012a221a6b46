"""In-LLM pruning inside prefill: the layer probe a method reads and the stage-by-stage run.

Letters: B batch, S current sequence length, D width, n_v vision tokens, n current vision
tokens, k kept at a stage. See `prefill` for the contract between prefill and the methods.

Packed AnyRes / video / multi-image input (`PruneContext.valid` / `coords` set,
`visual_inputs`): the whole packed buffer of N = n_v slots is the candidate set (several
images: all images' slots, in P spans separated by text that is never pruned; one top-k over
all of them, per-example budgets of the example's real tokens). Its padding slots are masked
out of attention and positions (`visual_inputs.splice_all`, the sequence HF sees) and the
probe tells the method which slots it may keep (`vision_valid`), which are `image_newline` slots
(`vision_forced`: kept and counted in k, the house rule of `select.masked_select`) and how
many of the stage's static k_s the example keeps (`vision_budget`, `stage_budgets`). Kept
slots a method marks unseen (`InLLMResult.valid`) stay in the static sequence, masked out, so
shapes depend on (bucket, k) only. Renumbering methods (PDrop, SparseVLM) renumber over the
tokens really seen; the per-example count of dropped tokens differs from the segment's static
offset n_v - k_s, so the stage's positions are shifted per example by the difference (RoPE is
relative: a uniform shift of a whole segment changes nothing but the decode position's
agreement with the static offset).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from covipal_jax.inference.segments import merge_segments, run_segment
from covipal_jax.models import anyres
from covipal_jax.models import multimodal as mm
from covipal_jax.models.llava import Llava
from covipal_jax.pruning.base import InLLMResult, PruneContext, PruningMethod
from covipal_jax.pruning.select import example_budget

Array = jax.Array


@dataclasses.dataclass
class Probe:
    """The concrete `LayerProbe` of prefill at layer `layer` = K - 1 (see `pruning.base`).

    hidden f32[B, S, D] is the input of layer K-1; every signal is computed on demand from it,
    so the main pass stays fused and a method pays only for what it asks.
    """

    model: Llava
    params: Any
    layer: int
    hidden: Array            # f32[B, S, D]
    seq_mask: Array          # bool[B, S]
    positions: Array         # i32[B, S]
    vision_index: Array      # i32[B, n]
    text_mask: Array         # bool[B, S]
    last_index: Array        # i32[B]
    input_embeds: Array | None = None        # f32[B, S0, D] LLM input, unpruned (SparseVLM)
    input_vision_index: Array | None = None  # i32[B, n_v] its vision rows
    vision_valid: Array | None = None        # bool[B, n] packed input: slots a method may keep
    vision_forced: Array | None = None       # bool[B, n] packed input: image_newline slots
    vision_budget: Array | None = None       # i32[B] packed input: tokens kept of this k
    input_vision_valid: Array | None = None  # bool[B, n_v] packed input: real input slots
    _out: Array | None = None

    @property
    def n_vision(self) -> int:
        return self.vision_index.shape[1]

    def _layer_output(self) -> Array:
        """The output of layer K-1 (the input of layer K), f32[B, S, D]."""
        if self._out is None:
            self._out, _ = self.model.apply(
                self.params, self.hidden, method=Llava.run, positions=self.positions,
                key_valid=self.seq_mask, start=self.layer, stop=self.layer + 1)
        return self._out

    def attention_rows(self, rows: Array, *, layer: str = "previous") -> Array:
        if layer == "previous":
            x, at = self.hidden, self.layer
        elif layer == "next":
            x, at = self._layer_output(), self.layer + 1
        else:
            raise ValueError(f'layer must be "previous" | "next", got {layer!r}')
        return self.model.apply(self.params, x, method=Llava.attention_rows, layer=at,
                                positions=self.positions, key_valid=self.seq_mask,
                                rows=rows.astype(jnp.int32))

    def vision_columns(self, x: Array) -> Array:
        idx = self.vision_index.reshape(
            (x.shape[0],) + (1,) * (x.ndim - 2) + (self.n_vision,))
        return jnp.take_along_axis(x, idx, axis=-1)

    def keys(self) -> Array:
        return self.model.apply(self.params, self.hidden, method=Llava.layer_keys,
                                layer=self.layer, positions=self.positions)

    def next_hidden(self) -> Array:
        return self._layer_output()

    def next_hidden_normed(self) -> Array:
        return self.model.apply(self.params, self._layer_output(), method=Llava.final_norm)


def renumbers_stages(method: PruningMethod) -> bool:
    """Whether an in-LLM method renumbers positions contiguously after each stage (its
    `positions == "contiguous"` and its class opts in with `renumbers_stages = True`, as PDrop
    and SparseVLM v1.5 do officially); otherwise kept tokens keep their position ids (FastV,
    DART: the official `position_ids = keep_indexs`)."""
    return method.positions == "contiguous" and method.renumbers_stages


def stage_budgets(method: PruningMethod, stages, n_v: int, valid: Array) -> list[Array]:
    """Per-example budgets i32[B] of each stage on a packed input (valid bool[B, n_v]).

    A single-stage method whose k is `method.k(n_v)` (FastV, DART) budgets exactly as the
    pre-LLM path does: `example_budget(method.keep, k, valid)` (a ratio of THIS example's real
    tokens, or a count capped by them). A schedule (PDrop, SparseVLM) scales each stage's static
    k_s by the example's real tokens: `example_budget(k_s / n_v, k_s, valid)`.
    """
    single = len(stages) == 1 and stages[0][1] == method.k(n_v)
    return [example_budget(method.keep if single else k / n_v, k, valid) for _, k in stages]


def run_in_llm(model, params, ctx: PruneContext, text, mask, image_pos, method, extra,
               spliced=None):
    """In-LLM pruning, stage by stage: returns (h of the last layer, segments, next decode
    position i32[B] in the unpruned numbering, kept source patch indices i32[B, k_last]).

    With `renumbers_stages(method)` every stage's sequence is renumbered `cumsum(mask) - 1`
    and its KV segment carries the decode offset n_v - k_s (tokens dropped before it).

    A packed context (`ctx.packed`: AnyRes image, video or several images) runs over the whole
    packed buffer (module docstring); `spliced` is then its unpruned sequence
    (`visual_inputs.splice_all`: seq, seq_mask, positions, is_vision, vision_index i32[B, N]
    the sequence index of each slot, ascending; with several images P spans separated by text,
    which is never a candidate) and `kept` is -1 where the LLM sees no token (padding, beyond
    the example's budget, or an empty merged slot).
    """
    n_layers = model.cfg.text.num_layers
    b, n_v = ctx.batch, ctx.n_v
    stages = method.stages(n_v, n_layers)
    src = jnp.broadcast_to(jnp.arange(n_v, dtype=jnp.int32), (b, n_v))
    packed = ctx.packed
    if packed:
        if spliced is None:
            raise ValueError("a packed context needs its spliced sequence "
                             "(`visual_inputs.splice_all`)")
        valid0 = (jnp.ones((b, n_v), bool) if ctx.valid is None else ctx.valid.astype(bool))
        h, seq_mask, positions, is_vis, vision_index = spliced
        vis_valid = valid0
        vis_forced = (jnp.zeros_like(valid0) if ctx.coords is None
                      else (ctx.coords[..., 0] == anyres.KIND_NEWLINE) & valid0)
        budgets = stage_budgets(method, stages, n_v, valid0)
    else:
        h, seq_mask, positions, is_vis = mm.splice(text, mask, image_pos, ctx.vision_tokens,
                                                   src, "contiguous", n_v)
        valid0 = vis_valid = vis_forced = budgets = None
        vision_index = image_pos[:, None] + jnp.arange(n_v, dtype=jnp.int32)[None, :]
    seen0 = jnp.sum(seq_mask, axis=1).astype(jnp.int32)          # tokens of the unpruned prompt
    text_mask = seq_mask & ~is_vis
    h0, vision_index0 = h, vision_index
    next_position = positions[:, -1] + 1
    renumber = renumbers_stages(method)
    segments, start, prev_k = [], 0, n_v
    rows_b = jnp.arange(b)[:, None]
    for s, (kk, k) in enumerate(stages):
        if not start < kk < n_layers or not 1 <= k <= prev_k:
            raise ValueError(f"{method.name}: stage {s} (K={kk}, k={k}) must have K in "
                             f"({start}, {n_layers}) and k in [1, {prev_k}]")
        seg = None
        if kk - 1 > start:
            h, seg = run_segment(model, params, h, positions, seq_mask, start, kk - 1, extra,
                                  n_v - prev_k if renumber else 0)
        length = h.shape[1]
        probe = Probe(model, params, kk - 1, h, seq_mask, positions, vision_index, text_mask,
                      jnp.full((b,), length - 1, jnp.int32), h0, vision_index0,
                      vision_valid=vis_valid, vision_forced=vis_forced,
                      vision_budget=None if budgets is None else budgets[s],
                      input_vision_valid=valid0)
        res = method.select_in_llm(probe, k, s)
        if not isinstance(res, InLLMResult):
            res = InLLMResult(kept=res)
        got = res.kept.shape[1] + (0 if res.merged is None else res.merged.shape[1])
        if got != k:
            raise ValueError(f"{method.name}: stage {s} returned {got} vision tokens "
                             f"(kept + merged), its budget is k={k}")
        h, seg_b = run_segment(model, params, h, positions, seq_mask, kk - 1, kk, extra,
                                n_v - prev_k if renumber else 0)
        segments.append(seg_b if seg is None else merge_segments(seg, seg_b))
        kept_idx = res.kept.astype(jnp.int32)
        keep_seq = mm.keep_sequence_indices(vision_index, kept_idx, length)
        new_pos = jnp.cumsum(jnp.zeros((b, length), jnp.int32).at[
            rows_b, keep_seq].set(1), axis=1) - 1          # old -> new index
        kept_seq = jnp.take_along_axis(vision_index, kept_idx, axis=1)
        new_vis = jnp.take_along_axis(new_pos, kept_seq, axis=1)
        new_src = jnp.take_along_axis(src, kept_idx, axis=1)
        h, seq_mask, positions, text_mask = (mm.gather_sequence(a, keep_seq)
                                             for a in (h, seq_mask, positions, text_mask))
        if packed:        # a kept slot the LLM does not see: padding, or beyond the budget
            ok = jnp.take_along_axis(vis_valid, kept_idx, axis=1)
            ok = ok if res.valid is None else ok & res.valid.astype(bool)
            seq_mask = seq_mask.at[rows_b, new_vis].set(ok)
            vis_forced = jnp.take_along_axis(vis_forced, kept_idx, axis=1) & ok
            vis_valid = ok
        if res.merged is not None:
            m = res.merged.shape[1]
            mpos = res.merged_positions.astype(jnp.int32)
            after = new_vis[:, -1]
            mposition = jnp.take_along_axis(                    # their position ids
                probe.positions, jnp.take_along_axis(vision_index, mpos, axis=1), axis=1)
            mvalid = (jnp.ones((b, m), bool) if res.merged_valid is None
                      else res.merged_valid.astype(bool))
            h = mm.insert_after(h, res.merged, after)
            seq_mask = mm.insert_after(seq_mask, mvalid, after)
            positions = mm.insert_after(positions, mposition, after)
            text_mask = mm.insert_after(text_mask, jnp.zeros((b, m), bool), after)
            new_vis = jnp.concatenate(
                [new_vis, after[:, None] + 1 + jnp.arange(m, dtype=jnp.int32)[None]], axis=1)
            new_src = jnp.concatenate([new_src, jnp.take_along_axis(src, mpos, axis=1)], axis=1)
            if packed:
                vis_valid = jnp.concatenate([vis_valid, mvalid], axis=1)
                vis_forced = jnp.concatenate([vis_forced, jnp.zeros((b, m), bool)], axis=1)
        if renumber:
            positions = mm.text_positions(seq_mask)
            if packed:    # per-example drops vs the segment's static offset n_v - k
                dropped = seen0 - jnp.sum(seq_mask, axis=1).astype(jnp.int32)
                positions = positions + (dropped - (n_v - k))[:, None]
        vision_index, src, start, prev_k = new_vis.astype(jnp.int32), new_src, kk, k
    h, seg = run_segment(model, params, h, positions, seq_mask, start, n_layers, extra,
                          n_v - prev_k if renumber else 0)
    segments.append(seg)
    if packed:
        src = jnp.where(vis_valid, src, -1).astype(jnp.int32)
    return h, tuple(segments), next_position, src
