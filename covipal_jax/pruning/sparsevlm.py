"""SparseVLM v1.5 (Zhang et al., ICML 2025): text-rater-guided staged pruning with token
recycling.

Version: Gumpest/SparseVLMs main @26a5f48 with `USE_VERSION` unset (the "v1.5" path run by
`scripts/v1_5/eval/*.sh`, `RETAIN_TOKN=192|128|96|64`). Files:
`llava/model/language_model/modelling_sparse_llama.py` (`LlamaDynamicvitModel.forward`),
`llava/model/language_model/score.py` (`attn_postprocess_topk`, `sparse_token_dict`),
`llava/model/language_model/utils.py` (`cluster_and_merge`).

Official rule (batch 1 there; here per example, static shapes):
1. Raters, once, on the LLM input embeddings: `v_t` the image tokens, `t_t` every token after
   the image; `m = softmax_text(v_t @ t_t^T).mean(over image)`; raters = `m > m.mean()`.
2. At decoder layer index l in `pruning_loc = [2, 6, 15]` the layer runs on all current tokens
   and returns its attention probabilities (causal softmax of q k^T / sqrt(d), after RoPE);
   score = mean over heads, rater rows, current image columns, mean over raters;
   `topk(min(count_s, n_cur - 1))` image tokens are kept (ascending).
   Per-stage kept counts (`score.py`, v1.5): 192: 300/200/110, 128: 303/110/36,
   96: 238/48/26, 64: 66/30/17 ("192" = layer average 2*576 4*300 10*200 16*110 / 32).
3. Recycling: of the pruned image tokens, the top `int(0.3 * n_pruned) + 1` by score are
   clustered into `int(n_top / 10) + 1` tokens (`cluster_and_merge`: density-peak centres on
   the layer's OUTPUT hidden states, each token to its nearest centre, mean per cluster); the
   merged tokens are inserted right after the kept image tokens and count as image tokens at
   the next stage (`v_token_num = kept + cluster_num`).
4. Positions: truncated to the new length (`position_ids[:, :len]`): contiguous.

Mapping to `InLLMMethod`: the pruned hidden states are layer l's OUTPUT, so K_s = l + 1 and the
probe at layer K_s - 1 = l gives `attention_rows(rows, layer="previous")` (that layer on its
input) and `next_hidden()` (its output). Stage budgets are totals `keep_s + m_s` (kept + merged).
Layers are given for a 32-layer LLM and scaled (`round(l * L / 32)`); counts for 576 tokens are
scaled by n_v / 576. The rater-to-image attention is recomputed for a fixed set of rows only
(the last `S - n` rows: every non-image row, which holds all text after the image under left
padding), raters being a mask over them; never the full S x S matrix.

Deviations (documented, static shapes / determinism): the official `cluster_and_merge` adds
`rand * 1e-6` to the densities to break ties (exact ties are common: mutual nearest neighbours
when cluster_num == 2); here exactly equal densities are ordered by index instead. An example without any rater (all `m` equal) uses all its after-image text rows.

SparseVLM+ (v2.0, `USE_VERSION=2_0`) differs: (a) attention logits divided by a RoPE-only
pattern (q = k = ones) before use ("attention gravity correction"); (b) only the 14 heads with
the largest rater-to-image attention are averaged; (c) no recycling; (d) original position ids
kept (`batch_index_select(position_ids, ...)`); (e) counts 192: 300/200/118,
128: 238/108/60, 96: 246/54/28, 64: 66/34/20. Not implemented here.

Packed AnyRes / video input (the whole packed buffer is the image span): the raters' mean runs
over the real image slots; each stage keeps the bucket's static (keep, m); the kept top-k never
holds padding and keeps the `image_newline` slots (counted in k); recycling clusters the best
pruned REAL tokens only, a merged slot with no real member is masked out (`merged_valid`).

LayerProbe needs (beyond base.py, see the methods report): `input_embeds` f32[B, S0, D] (the
LLM input of the unpruned sequence), `input_vision_index` i32[B, n_v], `next_hidden()`
f32[B, S, D] (layer K-1's output).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from covipal_jax.pruning import registry
from covipal_jax.pruning.base import InLLMMethod, InLLMResult, LayerProbe
from covipal_jax.pruning.probe_select import is_packed, probe_masks, probe_topk
from covipal_jax.pruning.select import complement_indices, gather_tokens, topk_indices

Array = jax.Array

REF_LAYERS, REF_TOKENS = 32, 576
PRUNING_LOC = (2, 6, 15)
COUNTS_V15 = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}
RECYCLE_RATIO, CLUSTER_DIV = 0.3, 10


def recycled_counts(n_pruned: int) -> tuple[int, int]:
    """(n_top, cluster_num) of the official recycling for `n_pruned` pruned tokens."""
    if n_pruned <= 0:
        return 0, 0
    n_top = int(n_pruned * RECYCLE_RATIO) + 1
    return n_top, int(n_top / CLUSTER_DIV) + 1


# ------------------------------------------------------------------------------ raters

def rater_mask(embeds: Array, vision_index: Array, rows: int,
               vision_valid: Array | None = None) -> Array:
    """Raters over the last `rows` rows of the LLM input (offsets from the end).

    embeds f32[B, S0, D]; vision_index i32[B, n_v] (ascending). Row r of the result is
    sequence row `S0 - rows + r`; it is a candidate when it comes after the image (left
    padding: the after-image text is the tail of every row). vision_valid bool[B, n_v] (packed
    input): the mean over image tokens runs over the real slots only. Returns bool[B, rows].
    """
    s0 = embeds.shape[1]
    x = embeds.astype(jnp.float32)
    v = gather_tokens(x, vision_index)                               # f32[B, n_v, D]
    t = x[:, s0 - rows:]                                             # f32[B, rows, D]
    seq_row = s0 - rows + jnp.arange(rows)[None, :]
    after = seq_row > jnp.max(vision_index, axis=-1, keepdims=True)  # bool[B, rows]
    logits = jnp.einsum("bvd,btd->bvt", v, t)
    logits = jnp.where(after[:, None, :], logits, -jnp.inf)
    if vision_valid is None:
        m = jnp.mean(jax.nn.softmax(logits, axis=-1), axis=1)        # f32[B, rows]
    else:
        w = vision_valid.astype(jnp.float32)[..., None]
        m = (jnp.sum(jax.nn.softmax(logits, axis=-1) * w, axis=1)
             / jnp.maximum(jnp.sum(w, axis=1), 1.0))
    m = jnp.where(after, m, 0.0)
    n_after = jnp.maximum(jnp.sum(after, axis=-1, keepdims=True), 1)
    mean = jnp.sum(m, axis=-1, keepdims=True) / n_after
    raters = after & (m > mean)
    return jnp.where(jnp.any(raters, axis=-1, keepdims=True), raters, after)


def rater_scores(probe: LayerProbe, raters: Array) -> Array:
    """f32[B, n]: head-mean attention (layer K-1 on its input) from the rater rows to the
    current image tokens, averaged over raters. raters: bool[B, R] over the last R rows."""
    b, s = probe.seq_mask.shape
    r = raters.shape[1]
    rows = jnp.broadcast_to(s - r + jnp.arange(r, dtype=jnp.int32), (b, r))
    att = probe.attention_rows(rows, layer="previous").astype(jnp.float32)   # f32[B, N, R, S]
    att = probe.vision_columns(jnp.mean(att, axis=1))                       # f32[B, R, n]
    att = jnp.where(raters[..., None], att, 0.0)        # padding rows may be NaN: `where`
    return jnp.sum(att, axis=1) / jnp.maximum(jnp.sum(raters, axis=-1, keepdims=True), 1)


# -------------------------------------------------------------------------- recycling

def cluster_and_merge(x: Array, cluster_num: int, valid: Array | None = None
                      ) -> tuple[Array, Array]:
    """Density-peak clustering + mean merge (official `utils.cluster_and_merge`).

    x f32[B, N, C] -> (merged f32[B, cluster_num, C] in centre order, centres i32[B, M]
    indices into N). Centre order = descending `dist * density` (the official `topk`).
    valid bool[B, N] (packed input): only the True rows are clustered (the others are far from
    everything, never centres, never merged); a centre that is not valid (fewer valid rows than
    cluster_num) merges nothing: check `valid` at `centres`.
    """
    b, n, c = x.shape
    if not 1 <= cluster_num <= n:
        raise ValueError(f"cluster_num={cluster_num} outside [1, {n}]")
    x = x.astype(jnp.float32)
    diff = x[:, :, None, :] - x[:, None, :, :]
    dist = jnp.sqrt(jnp.sum(diff * diff, axis=-1)) / (c ** 0.5)            # f32[B, N, N]
    if valid is not None:
        pair = valid[:, :, None] & valid[:, None, :]
        far = 2.0 * jnp.max(jnp.where(pair, dist, 0.0).reshape(b, -1), axis=-1) + 1.0
        dist = jnp.where(pair, dist, far[:, None, None])
    nearest = -jax.lax.top_k(-dist, cluster_num)[0]
    density = jnp.exp(-jnp.mean(nearest ** 2, axis=-1))                   # f32[B, N]
    if valid is not None:
        density = jnp.where(valid, density, 0.0)
    # higher[b, i, j]: token j is denser than i. The official adds `rand * 1e-6` to the
    # densities so that none are equal (mutual nearest neighbours tie exactly when
    # cluster_num == 2); here exact ties are ordered by index (lower index = denser).
    dj, di = density[:, None, :], density[:, :, None]
    idx = jnp.arange(n)
    higher = ((dj > di) | ((dj == di) & (idx[None, None, :] < idx[None, :, None])))
    if valid is not None:
        higher = higher & valid[:, None, :]
    higher = higher.astype(jnp.float32)
    dist_max = jnp.max(dist.reshape(b, -1), axis=-1)[:, None, None]
    parent = jnp.min(dist * higher + dist_max * (1.0 - higher), axis=-1)  # f32[B, N]
    peak = parent * density if valid is None else jnp.where(valid, parent * density, -1.0)
    _, centres = jax.lax.top_k(peak, cluster_num)                         # i32[B, M]
    to_centre = jnp.take_along_axis(dist, centres[:, :, None], axis=1)    # f32[B, M, N]
    assign = jnp.argmin(to_centre, axis=1)                                # i32[B, N]
    assign = assign.at[jnp.arange(b)[:, None], centres].set(jnp.arange(cluster_num)[None])
    onehot = jax.nn.one_hot(assign, cluster_num, dtype=jnp.float32)       # f32[B, N, M]
    if valid is not None:
        onehot = onehot * valid[..., None].astype(jnp.float32)
    total = jnp.einsum("bnm,bnc->bmc", onehot, x)
    count = jnp.sum(onehot, axis=1)[..., None] + 1e-6
    return total / count, centres.astype(jnp.int32)


# ----------------------------------------------------------------------------- method

@registry.register
@dataclasses.dataclass(frozen=True, kw_only=True)
class SparseVLM(InLLMMethod):
    """SparseVLM v1.5. Config keys `pruning.layers`, `.counts`, `.recycle`.

    keep:    the layer-averaged budget selecting the v1.5 table (192/128/96/64 of 576, as a
             count or a ratio; other n_v use the nearest table by ratio, counts scaled).
    layers:  `pruning_loc` for a 32-layer LLM (the layer whose attention scores; K = l + 1).
    counts:  explicit per-stage kept counts at this n_v (overrides the table).
    recycle: token recycling (official v1.5: on).
    """

    name = "sparsevlm"
    renumbers_stages = True  # official v1.5: position_ids renumbered after each stage
    merges = True                      # recycled tokens are not a subset of the inputs
    config_keys = ("layers", "counts", "recycle")
    description = "SparseVLM v1.5: text-rater attention, stages 2/6/15, token recycling"

    keep: float | int = 192 / 576
    layers: tuple[int, ...] = PRUNING_LOC
    counts: tuple[int, ...] | None = None
    recycle: bool = True

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "layers", tuple(self.layers))
        if self.counts is not None:
            object.__setattr__(self, "counts", tuple(int(c) for c in self.counts))
            if len(self.counts) != len(self.layers) or min(self.counts) < 1:
                raise ValueError(f"SparseVLM: counts {self.counts} must be positive, one per "
                                 f"layer {self.layers}")

    def kept_realized_by_mask(self) -> bool:
        """Without recycling the kept set is a plain subset (maskable)."""
        return not self.recycle

    def stage_counts(self, n_v: int) -> tuple[int, ...]:
        """Requested kept counts per stage at this n_v (before the `n_cur - 1` cap)."""
        if self.counts is not None:
            return self.counts
        k = self.k(n_v)
        budget = min(COUNTS_V15, key=lambda t: abs(t / REF_TOKENS - k / n_v))
        if abs(budget / REF_TOKENS - k / n_v) > 0.1 * budget / REF_TOKENS:
            raise ValueError(f"SparseVLM: keep={self.keep} ({k} of {n_v}) matches none of the "
                             f"v1.5 budgets {sorted(COUNTS_V15)} of {REF_TOKENS}; pass counts=")
        return tuple(max(1, round(c * n_v / REF_TOKENS)) for c in COUNTS_V15[budget])

    def plan(self, n_v: int) -> tuple[tuple[int, int], ...]:
        """((keep_s, merged_s), ...): kept and recycled tokens per stage."""
        out, n_cur = [], n_v
        for c in self.stage_counts(n_v):
            if n_cur < 2:
                raise ValueError(f"SparseVLM: {n_cur} image token(s) left, cannot prune")
            keep = min(c, n_cur - 1)
            m = recycled_counts(n_cur - keep)[1] if self.recycle else 0
            out.append((keep, m))
            n_cur = keep + m
        return tuple(out)

    def stages(self, n_v: int, num_layers: int) -> tuple[tuple[int, int], ...]:
        ks = tuple(int(round(l * num_layers / REF_LAYERS)) + 1 for l in self.layers)
        if any(not 1 <= k < num_layers for k in ks) or any(a >= b for a, b in zip(ks, ks[1:])):
            raise ValueError(f"SparseVLM: layers {self.layers} (for {REF_LAYERS}) give stage "
                             f"layers {ks} on {num_layers} layers; need strictly increasing "
                             f"in [1, {num_layers})")
        return tuple((k, keep + m) for k, (keep, m) in zip(ks, self.plan(n_v)))

    def select_in_llm(self, probe: LayerProbe, k: int, stage: int) -> InLLMResult | Array:
        missing = [a for a in ("input_embeds", "input_vision_index", "next_hidden")
                   if getattr(probe, a, None) is None]
        if missing:
            raise ValueError(f"SparseVLM needs LayerProbe.{missing} (the LLM input sequence "
                             "for the raters, layer K-1's output for recycling)")
        n = probe.n_vision
        s = probe.seq_mask.shape[1]
        keep, m = self._stage(probe.input_vision_index.shape[1], n, stage)
        if keep + m != k:
            raise ValueError(f"SparseVLM stage {stage}: budget {k} != kept {keep} + merged {m} "
                             f"for {n} current image tokens")
        r = s - n                                           # every non-image row
        if probe.input_embeds.shape[1] - probe.input_vision_index.shape[1] != r:
            raise ValueError("SparseVLM: the probe's sequence and its input sequence differ in "
                             "non-image rows")
        raters = rater_mask(probe.input_embeds, probe.input_vision_index, r,
                            getattr(probe, "input_vision_valid", None))
        score = rater_scores(probe, raters)                 # f32[B, n]
        if is_packed(probe):
            return self._select_packed(probe, score, keep, m)
        kept = topk_indices(score, keep)
        if not m:
            return kept
        pruned = complement_indices(kept, n)                # i32[B, n - keep]
        n_top, _ = recycled_counts(n - keep)
        _, top = jax.lax.top_k(jnp.take_along_axis(score, pruned, axis=1), n_top)
        src = jnp.take_along_axis(pruned, top, axis=1)      # i32[B, n_top], score order
        rows = jnp.take_along_axis(probe.vision_index, src, axis=1)
        merged, centres = cluster_and_merge(gather_tokens(probe.next_hidden(), rows), m)
        return InLLMResult(kept=kept, merged=merged.astype(probe.hidden.dtype),
                           merged_positions=jnp.take_along_axis(src, centres, axis=1))

    def _select_packed(self, probe: LayerProbe, score: Array, keep: int, m: int
                       ) -> InLLMResult:
        """A stage on a packed AnyRes / video buffer: the static (keep, m) of the bucket; the
        kept top-k never holds padding and keeps the newlines (`probe_topk`, budget = the
        example's stage budget minus the m merged slots); recycling clusters the best pruned
        REAL tokens only (merged slots without one are not seen: `merged_valid`)."""
        valid, _, budget = probe_masks(probe)
        res = probe_topk(probe, score, keep, budget=jnp.clip(budget - m, 1, keep))
        if not m:
            return res
        b, n = valid.shape
        seen = jnp.zeros((b, n), bool).at[jnp.arange(b)[:, None], res.kept].max(res.valid)
        n_top, _ = recycled_counts(n - keep)
        val, src = jax.lax.top_k(jnp.where(valid & ~seen, score, -jnp.inf), n_top)
        src_ok = jnp.isfinite(val)                                   # bool[B, n_top]
        rows = jnp.take_along_axis(probe.vision_index, src, axis=1)
        merged, centres = cluster_and_merge(gather_tokens(probe.next_hidden(), rows), m,
                                            valid=src_ok)
        return res.replace(merged=merged.astype(probe.hidden.dtype),
                           merged_positions=jnp.take_along_axis(src, centres, axis=1),
                           merged_valid=jnp.take_along_axis(src_ok, centres, axis=1))

    def _stage(self, n_v: int, n: int, stage: int) -> tuple[int, int]:
        """(keep, m) at stage `stage` with n current image tokens out of n_v originally."""
        keep = min(self.stage_counts(n_v)[stage], n - 1)
        return keep, (recycled_counts(n - keep)[1] if self.recycle else 0)
