"""The pruning interface: the budget rule, the inputs a method sees, the result it returns.

Shapes: `B` batch, `n_v` vision tokens of one image (CLS excluded), `k` kept vision tokens,
`D` LLM width, `Dv` vision-tower width, `Hv` vision head dim, `T` text length.

A method is a value (`PruningMethod`, a frozen dataclass registered in `registry.py`):
- `PreLLMMethod.select(ctx: PruneContext, k, variables) -> PruneResult` hands the LLM `k`
  projected vision tokens (ppm, visionzip, random, pool, none);
- `InLLMMethod.select_in_llm(probe: LayerProbe, k, stage) -> i32[B, k] | InLLMResult` picks
  the vision tokens that stay, at each layer of `stages(n_v, num_layers)` (fastv, dart, ...).
`inference/prefill.py` branches only on `method.where`.
"""
from __future__ import annotations

import dataclasses
import fractions
import numbers
from typing import Any, ClassVar, Protocol

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
    rng:            PRNG keys [B] (one per example, so a draw never depends on the batch it
        sits in) or a single key (row b then uses `fold_in(key, b)`), for stochastic methods
        (`random`); may be None.
    project:        f32[B, M, Dv] -> f32[B, M, D], the model's projector (static; for methods
        that merge tower features before projecting, VisionZip).
    valid:          bool[B, n_v] | None  the slots that hold a real token. None: every slot (a
        single base-resolution image). A packed AnyRes buffer (`models/anyres.py`) pads each
        image to the bucket's static length N = n_v; its padding slots are False and no method
        ever hands them to the LLM (`select.masked_select`).
    coords:         i32[B, n_v, 3] | None  (kind, row, col) per slot, kind 0 base view / 1 crop
        grid / 2 `image_newline` / 3 video frame (row = frame * p + r) / -1 padding
        (`models/anyres.py`). None: a plain (h, w) = `grid` image. Newline slots carry the
        layout, not content: `masked_select` always keeps them and they count toward k.
    groups:         i32[B, n_v] | None  budget group of each slot (image or frame) when the
        budget is split per image / per frame (`visual_inputs.budget_groups`); None: one
        global top-k. num_groups: G (static).
    views:          `pruning.views.ViewStats` | None  per-view tower statistics of a packed
        input (AnyRes views, video frames), filled only for methods that prune per view
        (`per_view = True`, VisionZip); None otherwise.
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
    valid: Array | None = None
    coords: Array | None = None
    groups: Array | None = None
    views: Any = None
    grid: tuple[int, int] = flax.struct.field(pytree_node=False, default=(0, 0))
    project: Any = flax.struct.field(pytree_node=False, default=None)
    num_groups: int = flax.struct.field(pytree_node=False, default=0)

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

    @property
    def packed(self) -> bool:
        """Whether the tokens are a packed multi-crop / video buffer (not one h x w grid)."""
        return self.valid is not None or self.coords is not None

    def refuse_packed(self, method: str, why: str) -> None:
        """Raise a clear error: `method` does not (yet) run on packed multi-crop / video input."""
        if self.packed:
            raise ValueError(f"pruning method {method!r} does not run on multi-crop (AnyRes) or "
                             f"video input: {why}")

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
    valid:   bool[B, k] | None  which of the k returned tokens the LLM sees (None: all). On a
        packed buffer (`PruneContext.valid`) a row with fewer real tokens than its budget, or a
        per-example budget below the static k, returns False slots; prefill masks them out of
        attention and positions (they are never attended to).
    """

    tokens: Array
    indices: Array
    scores: Array | None = None
    valid: Array | None = None


# ============================================================================= methods as values

def parse_keep(value: Any) -> float | int:
    """The one keep parser: a config / CLI value -> a ratio (float in (0, 1]) or a count (int).

    `0.25`, `"0.25"` -> 0.25; `"1/9"` -> 0.111... (a ratio); `64`, `"64"`, `64.0` (ConfigDict
    stores floats) -> 64; `1`, `1.0`, `"1.0"` -> 1.0 (keep everything). Anything else raises `ValueError`; `resolve_keep` checks
    the range against n_v.
    """
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"keep must be a ratio or a count, got the bool {value!r}")
    if isinstance(value, str):
        s = value.strip()
        if "/" in s:
            try:
                return float(fractions.Fraction(s))
            except (ValueError, ZeroDivisionError):
                raise ValueError(f"keep {value!r} is not a fraction") from None
        try:
            value = int(s) if s.lstrip("+-").isdigit() else float(s)
        except ValueError:
            raise ValueError(f"keep {value!r} is neither a ratio nor a count") from None
    if isinstance(value, numbers.Integral):
        return 1.0 if int(value) == 1 else int(value)
    if isinstance(value, numbers.Real):
        v = float(value)
        if v > 1 and v.is_integer():
            return int(v)
        return v
    raise ValueError(f"keep must be a ratio or a count, got {type(value).__name__}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PruningMethod:
    """A pruning method is a value: a frozen, hashable dataclass holding its budget and options.

    Jitted code receives the instance as a static argument (one compilation per distinct value
    and input shape), exactly like gemma's sampling methods (`gemma/gm/text/_sampling.py`).
    Subclasses are registered with `@register` and declare, as class-level facts:

    name:      registry key (`pruning.method` in configs, `--method` on command lines).
    where:     "pre_llm" (selects/merges the projected vision tokens before LLM layer 0) or
               "in_llm" (selects at one or more decoder layers, see `InLLMMethod`).
    needs:     the vision-tower signals it reads from `PruneContext` (any of "cls",
               "cls_attention", "vision_keys", "mean_attention_received", "vision_features",
               "rng"); prefill materializes exactly these.
    trainable: it has variables (the PPM); prefill takes them as a separate pytree argument.
    merges:    it returns tokens that are not a subset of its inputs (no "mask" realization).
    budgeted:  it takes a budget (False: `none`, which keeps everything; sweeps skip its keep).
    config_keys: its own `config.pruning.<key>` options, read by `from_config`: a key names
               the field it fills, or `"config_key:field"` when the config's name differs
               (e.g. `"pool_mode:mode"`).

    Fields shared by every method:
    keep:      a reserve ratio r in (0, 1] or an absolute count (see `resolve_keep`).
    positions: "contiguous" (kept tokens renumbered) | "original" (kept tokens keep the
               positions they had in the unpruned sequence).
    """

    name: ClassVar[str] = ""
    where: ClassVar[str] = "pre_llm"
    needs: ClassVar[frozenset[str]] = frozenset()
    trainable: ClassVar[bool] = False
    merges: ClassVar[bool] = False
    budgeted: ClassVar[bool] = True
    config_keys: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""

    keep: float | int = 1.0
    positions: str = "contiguous"

    def __post_init__(self):
        keep = parse_keep(self.keep)
        if isinstance(keep, int) and keep < 1 or isinstance(keep, float) and not 0 < keep <= 1:
            raise ValueError(f"keep must be a ratio in (0, 1] or a count >= 1, got {self.keep!r}")
        object.__setattr__(self, "keep", keep)
        if self.positions not in ("contiguous", "original"):
            raise ValueError(f"positions must be contiguous|original, got {self.positions!r}")

    def k(self, n_v: int) -> int:
        """The static number of vision tokens the LLM keeps out of n_v (`resolve_keep`)."""
        return resolve_keep(self.keep, n_v)

    @classmethod
    def from_config(cls, p: Any) -> "PruningMethod":
        """From a `config.pruning` section: `keep`, `positions` and `cls.config_keys`
        (None / absent keys keep the dataclass default)."""
        kw: dict[str, Any] = {"keep": p.get("keep", 1.0),
                              "positions": p.get("positions", "contiguous")}
        for entry in cls.config_keys:
            key, _, field = entry.partition(":")
            v = p.get(key)
            if v is not None:
                kw[field or key] = tuple(v) if isinstance(v, list) else v
        return cls(**kw)

    def to_dict(self, n_v: int | None = None) -> dict[str, Any]:
        """A JSON-able record: {"method": name, <fields>..., "k": k(n_v) when n_v given}."""
        d = {"method": self.name, **dataclasses.asdict(self)}
        if n_v is not None:
            d["k"] = self.k(n_v)
        return d

    def with_keep(self, keep: float | int) -> "PruningMethod":
        """The same method at another budget."""
        return dataclasses.replace(self, keep=keep)

    def dense(self) -> "PruningMethod":
        """The method as a FLOP counter traces it: attention of its own (the PPM's) on the
        dense "xla" backend (XLA's cost analysis counts a blockwise loop's body once). The
        same selection; methods without attention of their own return self."""
        return self

    def load_variables(self, model_cfg: Any) -> "tuple[PruningMethod, Any]":
        """(method, variables) ready for prefill: a trainable method reads its checkpoint (and
        may fill config fields from it); others return (self, None)."""
        del model_cfg
        return self, None

    def kept_layout(self, k: int, has_cls: bool) -> tuple[bool, int]:
        """How the `kept` row of k tokens reads (for drawing): (the first token is the tower's
        CLS, how many tokens after it are plain patches; the rest are merged tokens placed at
        their target patch)."""
        del has_cls
        return False, k

    def kept_realized_by_mask(self) -> bool:
        """Whether the kept set can be realized by masking the full sequence (not merging)."""
        return not self.merges


@dataclasses.dataclass(frozen=True, kw_only=True)
class PreLLMMethod(PruningMethod):
    """Acts before LLM layer 0 on the projected vision tokens (and the text embeddings)."""

    where: ClassVar[str] = "pre_llm"

    def select(self, ctx: PruneContext, k: int, variables: Any = None) -> PruneResult:
        """Pick (or merge) `k` tokens: f32[B, k, D] + source indices i32[B, k].

        `variables`: the method's trainable variables (trainable methods only). A merging
        method that must run the projector itself finds it as `ctx.project`.
        """
        raise NotImplementedError


@dataclasses.dataclass(frozen=True, kw_only=True)
class InLLMMethod(PruningMethod):
    """Acts inside the LLM: layers [0, K_1) see every vision token, then at each stage
    (K_s, k_s) the method picks k_s of the vision tokens still present from signals of layer
    K_s - 1 (a `LayerProbe`), the others are dropped for layers [K_s, ...). One KV-cache
    segment per layer range.

    layer: K of a single-stage method (FastV's and DART's K = 2).
    """

    where: ClassVar[str] = "in_llm"
    config_keys: ClassVar[tuple[str, ...]] = ("layer",)
    # With positions="contiguous": renumber positions after each stage and shift each KV
    # segment's decode positions by the tokens dropped before it (PDrop, SparseVLM v1.5).
    # FastV and DART keep the kept tokens' original ids, as their official code does.
    renumbers_stages: ClassVar[bool] = False
    layer: int = 2

    def stages(self, n_v: int, num_layers: int) -> tuple[tuple[int, int], ...]:
        """((K_1, k_1), (K_2, k_2), ...): strictly increasing layers in [1, num_layers),
        non-increasing kept counts. Default: one stage (self.layer, self.k(n_v))."""
        if not 1 <= self.layer < num_layers:
            raise ValueError(f"{self.name}: pruning layer K={self.layer} must be in "
                             f"[1, {num_layers})")
        return ((self.layer, self.k(n_v)),)

    def select_in_llm(self, probe: "LayerProbe", k: int, stage: int) -> "Array | InLLMResult":
        """Which of the `probe.n_vision` current vision tokens to keep at stage `stage`
        (0-based): i32[B, k] indices into the current vision tokens, ascending; or an
        `InLLMResult` when the method also adds merged tokens (SparseVLM's recycling)."""
        raise NotImplementedError


@flax.struct.dataclass
class InLLMResult:
    """An in-LLM selection with merged tokens (the stage's budget k = k_keep + m).

    kept:    i32[B, k_keep]  indices into the current vision tokens, ascending.
    merged:  f32[B, m, D] | None  new hidden states placed right after the kept vision tokens;
             they enter layer K (like `probe.next_hidden()`, the output of layer K-1) with the
             position id of `merged_positions`.
    merged_positions: i32[B, m] | None  index (into the current vision tokens) whose position
             id each merged token takes.
    """

    kept: Array
    merged: Array | None = None
    merged_positions: Array | None = None
    # packed input (`LayerProbe.vision_valid` set): bool[B, k_keep] which kept tokens the LLM
    # really sees (False: padding or beyond the example's budget; prefill masks them out), and
    # bool[B, m] which merged tokens are real. None: all.
    valid: Array | None = None
    merged_valid: Array | None = None


class LayerProbe(Protocol):
    """What prefill offers an in-LLM method at layer K-1 (computed on demand, so the main pass
    stays fused: only the requested rows / keys are recomputed).

    Shapes: B batch, S current sequence length, n current vision tokens, N query heads,
    R requested rows, K kv heads, H head dim, D width.
    """

    hidden: Array            # f32[B, S, D]  input of layer K-1
    seq_mask: Array          # bool[B, S]    real tokens
    positions: Array         # i32[B, S]
    vision_index: Array      # i32[B, n]     sequence index of each current vision token
    text_mask: Array         # bool[B, S]    real text tokens (not vision, not padding)
    last_index: Array        # i32[B]        sequence index of the last prompt token
    # Packed AnyRes / video input only (None on a single image, and on probes that predate it):
    # vision_valid bool[B, n] the current vision slots a method may keep (real and still seen;
    # never keep the others), vision_forced bool[B, n] the `image_newline` slots (always kept,
    # counted in k, as `select.masked_select` does before the LLM), vision_budget i32[B] how
    # many of the stage's static k each example really keeps. `pruning.probe_select` applies them.
    vision_valid: Array | None = None
    vision_forced: Array | None = None
    vision_budget: Array | None = None

    @property
    def n_vision(self) -> int: ...

    def attention_rows(self, rows: Array, *, layer: str = "previous") -> Array:
        """f32[B, N, R, S]: attention probabilities of query rows i32[B, R] (causal, padding
        masked). layer="previous": layer K-1 on its input (FastV, SparseVLM); "next": layer K on
        its input, i.e. on layer K-1's output (PyramidDrop: the next layer's input norm, q/k
        projections and RoPE)."""

    def vision_columns(self, x: Array) -> Array:
        """Gather the vision columns of the last axis: f32[..., S] -> f32[..., n]."""

    def keys(self) -> Array:
        """f32[B, S, K, H]: layer K-1's keys (after RoPE) for the whole sequence."""

    def next_hidden(self) -> Array:
        """f32[B, S, D]: the output of layer K-1 (the input of layer K)."""

    def next_hidden_normed(self) -> Array:
        """f32[B, S, D]: the output of layer K-1 through the final norm (DART)."""
