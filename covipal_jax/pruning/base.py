"""The pruning interface: the budget rule, the inputs a method sees, the result it returns.

Shapes: `B` batch, `n_v` vision tokens of one image (CLS excluded), `k` kept vision tokens,
`D` LLM width, `Dv` vision-tower width, `Hv` vision head dim, `T` text length.

Two kinds of methods share these types:
- pre-LLM methods (`ppm`, `visionzip`, `random`, `pool`, `none`) are called as
  `fn(ctx: PruneContext, k: int, **params) -> PruneResult` and hand the LLM `k` projected
  vision tokens;
- in-LLM methods (`fastv`, `dart`) expose `select_in_llm(<signal>, k) -> i32[B, k]`, called by
  the decoder at layer K on its own hidden states / attention (see their modules).
"""
from __future__ import annotations

import numbers
from typing import Any

import flax.struct
import jax
import numpy as np

Array = jax.Array


def resolve_keep(keep: float | int, n_v: int) -> int:
    """The static number of vision tokens to keep.

    - `keep` a float in (0, 1]: a reserve ratio r; returns `max(1, round(r * n_v))`. The paper
      keeps `r * n_v` tokens (TopK(S, r * n_v)); rounding to nearest (Python's round, ties to
      even) gives exactly `r * n_v` whenever that is an integer (r = 0.5, 0.25 with n_v = 576
      -> 288, 144) and the closest count otherwise (FastV also uses
      `round(n_v * (1 - R))`, pkunlp-icler/FastV
      `src/transformers/src/transformers/models/llama/modeling_llama.py`).
    - `keep` an int in [1, n_v]: an absolute count, returned as is.

    `bool` is rejected (True would silently mean "keep 1"); anything outside (0, n_v] raises
    `ValueError`.
    """
    if not isinstance(n_v, numbers.Integral) or isinstance(n_v, bool) or n_v < 1:
        raise ValueError(f"n_v must be a positive int, got {n_v!r}")
    if isinstance(keep, (bool, np.bool_)):
        raise ValueError(f"keep must be a ratio in (0, 1] or a count in [1, {n_v}], "
                         f"got the bool {keep!r}")
    if isinstance(keep, numbers.Integral):
        if not 1 <= keep <= n_v:
            raise ValueError(f"keep count {keep} outside [1, n_v={n_v}]")
        return int(keep)
    if isinstance(keep, numbers.Real):
        r = float(keep)
        if not 0.0 < r <= 1.0:
            raise ValueError(f"keep ratio {keep} outside (0, 1] (use an int for a token count)")
        return max(1, min(n_v, int(round(r * n_v))))
    raise ValueError(f"keep must be a float ratio or an int count, got {type(keep).__name__}")


@flax.struct.dataclass
class PruneContext:
    """Everything a pre-LLM method may read; a pytree (`grid` is static).

    vision_tokens:  f32[B, n_v, D]  projected vision tokens H_v (projector output).
    vision_features: f32[B, n_v, Dv] tower features at the LLaVA feature layer (the
        `hidden_states[select_layer]`, CLS removed), i.e. what the projector consumes.
    text_embeds:    f32[B, T, D]   LLM input embeddings of the (left-padded) prompt.
    text_mask:      bool[B, T]     real text tokens. The PPM attends to text where True; a
        caller may clear the image placeholder here so the PPM ignores it.
    cls_features:   f32[B, Dv] | None  the CLS token's hidden state at the feature layer
        (CLIP; None for SigLIP). VisionZip keeps it as a token.
    cls_attention:  f32[B, n_v] | None  CLS -> patch attention probabilities at the feature
        layer, summed over heads, CLS column removed (VisionZip:
        `attn_weights[:, :, 0, 1:].sum(dim=1)` with `attentions[-2]`).
    vision_keys:    f32[B, n_v, Hv] | None  the feature layer's key projections (pre-softmax
        keys, with bias, no scaling) averaged over heads, CLS row removed (VisionZip's
        `metric = raw_key_states.mean(1)`, dvlab-research/VisionZip `visionzip/utils.py`).
    mean_attention_received: f32[B, n_v] | None  attention each patch receives, mean over heads
        and over all queries, at the feature layer (`attn.mean(1).mean(1)`); the dominant-token
        score for towers without CLS (SigLIP), as in cokeshao/HoliTom
        `LLaVA-NeXT/llava/model/multimodal_encoder/siglip_encoder.py` (WRAPPER=visionzip).
    grid:           (h, w) static patch grid, h * w == n_v.
    rng:            PRNG key (or keys [B]) for stochastic methods (`random`); may be None.
    """

    vision_tokens: Array
    text_embeds: Array
    text_mask: Array
    vision_features: Array | None = None
    cls_features: Array | None = None
    cls_attention: Array | None = None
    vision_keys: Array | None = None
    mean_attention_received: Array | None = None
    rng: Any = None
    grid: tuple[int, int] = flax.struct.field(pytree_node=False, default=(0, 0))

    @property
    def n_v(self) -> int:
        return self.vision_tokens.shape[1]

    @property
    def batch(self) -> int:
        return self.vision_tokens.shape[0]

    def require(self, *names: str, method: str) -> None:
        """Raise a clear error if a field `method` needs is missing."""
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ValueError(f"pruning method {method!r} needs PruneContext fields {missing}; "
                             "the vision tower must be run to produce them")

    def checked_grid(self) -> tuple[int, int]:
        h, w = self.grid
        if h * w != self.n_v:
            raise ValueError(f"PruneContext.grid {self.grid} does not cover n_v={self.n_v}")
        return h, w


@flax.struct.dataclass
class PruneResult:
    """What a pre-LLM method returns.

    tokens:  f32[B, k, D]  the kept vision tokens, already projected (merging methods return
        merged tokens), in the order they enter the LLM.
    indices: i32[B, k]  source position of each token in [0, n_v) (row-major patch index):
        selection methods return them sorted ascending (original spatial order); a merged token
        takes its target's position; VisionZip's CLS token takes position 0. VisionZip with its
        default `order="visionzip"` keeps the official order [CLS, dominant..., contextual...],
        which is not globally sorted (see `visionzip.py`).
    scores:  f32[B, n_v] | None  the per-token score the selection used (higher = kept).
    """

    tokens: Array
    indices: Array
    scores: Array | None = None
