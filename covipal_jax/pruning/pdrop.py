"""PyramidDrop (Xing et al., CVPR 2025): drop vision tokens in stages, ranked by the attention
of the last instruction token at the next layer.

Official rule (Cooperx521/PyramidDrop @6444f30, `llava/model/modeling_llama_pdrop.py`,
`LlamaModel.pdrop_forward` and `.pdrop_rank_drop`; schedule from `llava/eval/model_vqa_loader.py`
and `scripts/v1_5/pdrop_eval/*.sh`):

- `--layer_list [8,16,24]`, `--image_token_ratio_list [0.5,0.25,0.125]` (the loader prepends
  1.0): after decoder layer index `rank_layer - 1` (i.e. before layer `rank_layer` = 8, 16, 24)
  stage s keeps `int(n_v * ratio[s])` image tokens (floor, from the ORIGINAL n_v each time).
- Score: layer `rank_layer`'s `input_layernorm`, `q_proj`, `k_proj` and RoPE applied to the
  hidden states entering it (the output of layer `rank_layer - 1`), the query row of the last
  instruction token (`prompt_len + image_tokens - 1`: the last prompt token at inference),
  `softmax(q k^T / sqrt(d) + causal mask)`, mean over heads, image columns, mean over the
  query rows (one row at inference); `topk(keep_length)`, re-sorted ascending.
- Positions: each stage's sequence is renumbered `arange(0, len)` (re-indexed, our
  `positions="contiguous"`); at decode every stage layer shifts the position by the tokens the
  stage dropped, i.e. each stage's KV segment keeps its own contiguous numbering.
  `positions="original"` keeps the unpruned positions instead (an option, not the official).

Mapping to `InLLMMethod.stages`: K_s = rank_layer (the first layer that sees k_s tokens), the
probe sits at layer K_s - 1 and `probe.attention_rows(rows, layer="next")` is exactly the
official recomputation (layer K_s on layer K_s - 1's output). Layers are given for a 32-layer
LLM and scaled to other depths by `round(l * num_layers / 32)`.

Budgets (`keep` other than 1.0): the comparison tables quote PDrop at "192 / 128 / 64 tokens",
the visual-token count averaged over the LLM's layers. The official repo gives no schedule for
these (PyramidDrop issues #10, #22, #28 ask; unanswered in the snapshot) and with layers
8/16/24 the average cannot go below n_v / 4 (144 of 576). So here a budget k means: geometric
ratios `lam ** s` with `lam` the largest value (bisection) whose layer-averaged count
`(K_1 n_v + sum_s (K_{s+1} - K_s) k_s) / num_layers` is <= k, on the official layers when that
is feasible, else on layers 2/10/20 (first stage moved to layer 2, as third-party
reproductions do). For LLaVA-1.5 (576 tokens, 32 layers), see `budget_schedule`:
    192 -> layers 8/16/24, lam 0.2552, kept 146/37/9   (average 192.0)
    128 -> layers 2/10/20, lam 0.3796, kept 218/82/31  (average 127.75)
    64  -> layers 2/10/20, lam 0.1597, kept 91/14/2    (average 63.875)
The default schedule (lam 0.5, 288/144/72) averages 270 tokens.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from covipal_jax.pruning import registry
from covipal_jax.pruning.base import InLLMMethod, InLLMResult, LayerProbe
from covipal_jax.pruning.probe_select import probe_topk

Array = jax.Array

REF_LAYERS = 32                       # the layer numbers below are for a 32-layer LLM
OFFICIAL_LAYERS = (8, 16, 24)         # --layer_list
OFFICIAL_LAMBDA = 0.5                 # --image_token_ratio_list [0.5, 0.25, 0.125]
BUDGET_FALLBACK_LAYERS = (2, 10, 20)  # when a budget is below what 8/16/24 can reach


def scale_layers(layers: tuple[int, ...], num_layers: int) -> tuple[int, ...]:
    """Stage layers given for a 32-layer LLM -> this depth: `round(l * L / 32)`, raised where
    needed to stay >= 1 and strictly increasing; an error if they do not fit in [1, L)."""
    out, prev = [], 0
    for l in layers:
        prev = max(int(round(l * num_layers / REF_LAYERS)), prev + 1)
        out.append(prev)
    out = tuple(out)
    if any(not 1 <= l < num_layers for l in out) or any(a >= b for a, b in zip(out, out[1:])):
        raise ValueError(f"PyramidDrop: layers {layers} (for {REF_LAYERS} layers) scale to "
                         f"{out} for a {num_layers}-layer LLM; they must be strictly "
                         f"increasing in [1, {num_layers}) (set `layers` explicitly)")
    return out


def counts(n_v: int, ratios: tuple[float, ...]) -> tuple[int, ...]:
    """Official kept counts `int(n_v * ratio)` (floor), at least 1."""
    return tuple(max(1, int(n_v * r)) for r in ratios)


def average_tokens(n_v: int, num_layers: int, layers: tuple[int, ...],
                   kept: tuple[int, ...]) -> float:
    """Vision tokens averaged over the LLM's layers (the tables' "average tokens")."""
    bounds = (*layers, num_layers)
    total = layers[0] * n_v + sum((bounds[i + 1] - bounds[i]) * k for i, k in enumerate(kept))
    return total / num_layers


def budget_schedule(n_v: int, num_layers: int, target: float,
                    layers: tuple[int, ...] | None = None) -> tuple[tuple[int, ...], float]:
    """(scaled layers, lam): geometric ratios lam**s whose layer average is <= target, lam the
    largest such (bisection to 1e-6). `layers=None`: official layers if feasible, else 2/10/20.
    """
    candidates = [layers] if layers is not None else [OFFICIAL_LAYERS, BUDGET_FALLBACK_LAYERS]
    for cand in candidates:
        try:
            ls = scale_layers(tuple(cand), num_layers)
        except ValueError:
            if layers is not None:
                raise
            continue

        def avg(lam, ls=ls):
            return average_tokens(n_v, num_layers, ls,
                                  counts(n_v, tuple(lam ** (s + 1) for s in range(len(ls)))))

        if avg(0.0) > target:
            continue
        lo, hi = 0.0, 1.0
        if avg(hi) <= target:
            return ls, hi
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if avg(mid) <= target else (lo, mid)
        return ls, lo
    raise ValueError(f"PyramidDrop: an average of {target} vision tokens is not reachable with "
                     f"layers {candidates[-1]} (scaled to {num_layers} layers); pick earlier "
                     "stage layers")


@registry.register
@dataclasses.dataclass(frozen=True, kw_only=True)
class PyramidDrop(InLLMMethod):
    """PyramidDrop. Fields (config keys `pruning.layers`, `.ratios`, `.lam`):

    layers: stage layers K_s for a 32-layer LLM (scaled); None = official 8/16/24 (or 2/10/20
        for budgets below reach).
    ratios: kept ratio of the original n_v after each stage (the official
        `image_token_ratio_list` without the leading 1.0); overrides `lam` and `keep`.
    lam:    per-stage ratio when `ratios` is None and `keep` is 1.0 (official: 0.5).
    keep:   1.0 (default) = the lam schedule; a ratio or count = the layer-averaged budget.
    """

    name = "pdrop"
    renumbers_stages = True  # official: position_ids renumbered after each stage
    config_keys = ("layers", "ratios", "lam")
    description = "PyramidDrop: staged drops ranked by the last instruction token's attention"

    layers: tuple[int, ...] | None = None
    ratios: tuple[float, ...] | None = None
    lam: float = OFFICIAL_LAMBDA

    def __post_init__(self):
        super().__post_init__()
        for f in ("layers", "ratios"):
            v = getattr(self, f)
            if v is not None:
                object.__setattr__(self, f, tuple(v))
        if not 0.0 < self.lam <= 1.0:
            raise ValueError(f"PyramidDrop: lam={self.lam} outside (0, 1]")
        if self.ratios is not None:
            if not all(0.0 < r <= 1.0 for r in self.ratios):
                raise ValueError(f"PyramidDrop: ratios {self.ratios} must lie in (0, 1]")
            if list(self.ratios) != sorted(self.ratios, reverse=True):
                raise ValueError(f"PyramidDrop: ratios {self.ratios} must be non-increasing")
            if self.layers is not None and len(self.layers) != len(self.ratios):
                raise ValueError("PyramidDrop: layers and ratios differ in length")

    def stages(self, n_v: int, num_layers: int) -> tuple[tuple[int, int], ...]:
        if self.ratios is not None:
            layers = self.layers or OFFICIAL_LAYERS[: len(self.ratios)]
            ls, ratios = scale_layers(tuple(layers), num_layers), self.ratios
            if len(ls) != len(ratios):
                raise ValueError("PyramidDrop: layers and ratios differ in length")
        elif self.keep == 1.0:
            ls = scale_layers(tuple(self.layers or OFFICIAL_LAYERS), num_layers)
            ratios = tuple(self.lam ** (s + 1) for s in range(len(ls)))
        else:
            ls, lam = budget_schedule(n_v, num_layers, self.k(n_v), self.layers)
            ratios = tuple(lam ** (s + 1) for s in range(len(ls)))
        return tuple(zip(ls, counts(n_v, tuple(ratios))))

    def select_in_llm(self, probe: LayerProbe, k: int, stage: int) -> Array | InLLMResult:
        """i32[B, k] ascending: top-k of the next layer's head-mean attention from the last
        prompt token (`probe.last_index`) to the current vision tokens. On a packed AnyRes /
        video input: over the whole packed buffer, padding never kept, newlines kept
        (`probe_select.probe_topk`); prefill renumbers over the tokens really seen."""
        del stage
        return probe_topk(probe, pdrop_scores(probe), k)


def pdrop_scores(probe: LayerProbe) -> Array:
    """f32[B, n]: `mean_heads softmax(q_last k^T)` at layer K on layer K-1's output,
    restricted to the current vision tokens."""
    rows = probe.last_index.astype(jnp.int32)[:, None]                # i32[B, 1]
    att = probe.attention_rows(rows, layer="next").astype(jnp.float32)  # f32[B, N, 1, S]
    att = jnp.mean(att, axis=1)                                         # f32[B, 1, S]
    return jnp.mean(probe.vision_columns(att), axis=1)                  # f32[B, n]
