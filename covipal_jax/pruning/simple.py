"""Reference baselines: keep all (`none`), uniform random (`random`), spatial pooling (`pool`).

All are pre-LLM selections over the projected tokens H_v = ctx.vision_tokens f32[B, n_v, D]:
the functions below, and the registered method values `NoneMethod`, `RandomMethod`,
`PoolMethod` over them.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from covipal_jax.pruning.base import PreLLMMethod, PruneContext, PruneResult
from covipal_jax.pruning.registry import register
from covipal_jax.pruning.select import gather_tokens, masked_select

Array = jax.Array


def none(ctx: PruneContext, k: int, *, project=None) -> PruneResult:
    """No pruning: all n_v tokens (k must equal n_v); on a packed buffer every valid slot (the
    padding slots come back with `valid` False)."""
    del project
    b, n_v = ctx.vision_tokens.shape[:2]
    if k != n_v:
        raise ValueError(f"method 'none' keeps all tokens: k={k} must equal n_v={n_v}")
    idx = jnp.broadcast_to(jnp.arange(n_v, dtype=jnp.int32), (b, n_v))
    return PruneResult(tokens=ctx.vision_tokens, indices=idx, scores=None, valid=ctx.valid)


def _per_example_keys(rng, b: int):
    """One key per example: a batch of B keys is used as is; a single key gives row b the key
    `fold_in(key, b)` (never `split(key, B)`, whose keys change with B)."""
    if rng is None:
        raise ValueError("method 'random' needs PruneContext.rng")
    typed = jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
    single = rng.ndim == (0 if typed else 1)
    if single:
        return jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(b))
    if rng.shape[0] != b:
        raise ValueError(f"rng batch {rng.shape[0]} != batch {b}")
    return rng


def random(ctx: PruneContext, k: int, *, project=None, keep: float | int = 1.0) -> PruneResult:
    """k distinct tokens per example, uniformly at random, ascending.

    Example b uses key b of `ctx.rng` (a [B] batch of keys, one per example: the draw then
    never depends on the batch the example sits in), or `fold_in(ctx.rng, b)` when a single key
    is given: the draw is a deterministic function of the example's key (top-k of
    `uniform(key, [n_v])`, i.e. a uniformly random k-subset). On a packed buffer: a uniformly
    random subset of the valid slots of the example's budget (`select.masked_select`, `keep`),
    newlines kept.
    """
    del project
    b, n_v = ctx.vision_tokens.shape[:2]
    keys = _per_example_keys(ctx.rng, b)
    u = jax.vmap(lambda key: jax.random.uniform(key, (n_v,)))(keys)
    idx, kept = masked_select(ctx, u, k, keep)
    return PruneResult(tokens=gather_tokens(ctx.vision_tokens, idx), indices=idx, scores=u,
                       valid=kept)


def pool_indices(h: int, w: int, k: int) -> np.ndarray:
    """k patch indices spread evenly over an h x w grid (static, row-major, ascending).

    Rows: `gh = round(sqrt(k * h / w))`, clipped to [ceil(k / w), min(h, k)], at
    `floor((r + 0.5) * h / gh)`. Row r gets `n_r = floor((r+1) k / gh) - floor(r k / gh)`
    points (so counts differ by at most one and sum to k) at columns `floor((c + 0.5) * w / n_r)`.
    When k = g * g on a square grid this is the regular g x g sub-grid at the cell centres
    (e.g. 24 x 24, k = 64: rows/cols 1, 4, ..., 22, stride 3); otherwise rows hold
    floor(k/gh) or ceil(k/gh) points.
    """
    if not 1 <= k <= h * w:
        raise ValueError(f"k={k} outside [1, {h * w}]")
    gh = int(round(math.sqrt(k * h / w)))
    gh = max(gh, -(-k // w), 1)
    gh = min(gh, h, k)
    out = []
    for r in range(gh):
        row = int(math.floor((r + 0.5) * h / gh))
        n_r = (r + 1) * k // gh - r * k // gh
        for c in range(n_r):
            out.append(row * w + int(math.floor((c + 0.5) * w / n_r)))
    idx = np.asarray(out, np.int32)
    assert idx.size == k and np.all(np.diff(idx) > 0), (h, w, k)
    return idx


def pool_assignment(h: int, w: int, k: int) -> np.ndarray:
    """f32[n_v, k] averaging weights: each patch goes to its nearest pooled point (Euclidean on
    the grid, ties to the lower point index); columns sum to 1."""
    idx = pool_indices(h, w, k)
    rr, cc = np.divmod(np.arange(h * w), w)
    pr, pc = np.divmod(idx, w)
    d2 = (rr[:, None] - pr[None]) ** 2 + (cc[:, None] - pc[None]) ** 2
    a = np.zeros((h * w, k), np.float32)
    a[np.arange(h * w), np.argmin(d2, axis=1)] = 1.0
    return a / a.sum(axis=0, keepdims=True)


def pool(ctx: PruneContext, k: int, *, mode: str = "stride", project=None) -> PruneResult:
    """Uniform spatial pooling to k tokens.

    mode "stride": keep the tokens at `pool_indices(h, w, k)`.
    mode "avg": each kept token is the mean of the projected tokens of its cell (the patches
    nearest to that point), positioned at the point.
    """
    del project
    ctx.refuse_packed("pool", "its sub-grid is defined on one h x w grid; a packed buffer's "
                      "crops, newlines and padding have no common grid (use random, divprune "
                      "or ppm, or pool each view before packing)")
    h, w = ctx.checked_grid()
    b = ctx.batch
    idx_np = pool_indices(h, w, k)
    idx = jnp.broadcast_to(jnp.asarray(idx_np), (b, k))
    if mode == "stride":
        tokens = gather_tokens(ctx.vision_tokens, idx)
    elif mode == "avg":
        a = jnp.asarray(pool_assignment(h, w, k))
        tokens = jnp.einsum("bnd,nk->bkd", ctx.vision_tokens.astype(jnp.float32), a)
        tokens = tokens.astype(ctx.vision_tokens.dtype)
    else:
        raise ValueError(f"pool mode {mode!r} not in ('stride', 'avg')")
    return PruneResult(tokens=tokens, indices=idx, scores=None)


# ----------------------------------------------------------------------------- method values

@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class NoneMethod(PreLLMMethod):
    """No pruning: the LLM sees all n_v tokens (`keep` must be 1.0)."""

    name: ClassVar[str] = "none"
    budgeted: ClassVar[bool] = False
    description: ClassVar[str] = "keep all n_v tokens"

    def k(self, n_v: int) -> int:
        k = super().k(n_v)
        if k != n_v:
            raise ValueError(f"pruning.method='none' keeps all {n_v} tokens; "
                             f"pruning.keep={self.keep} asks for {k}")
        return k

    def select(self, ctx: PruneContext, k: int, variables: Any = None) -> PruneResult:
        return none(ctx, k)


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class RandomMethod(PreLLMMethod):
    """A uniformly random k-subset per example (`ctx.rng`: one key per example)."""

    name: ClassVar[str] = "random"
    needs: ClassVar[frozenset[str]] = frozenset({"rng"})
    description: ClassVar[str] = "uniform random k-subset, per example"

    def select(self, ctx: PruneContext, k: int, variables: Any = None) -> PruneResult:
        return random(ctx, k, keep=self.keep)


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class PoolMethod(PreLLMMethod):
    """A uniform spatial sub-grid (`mode` "stride") or its cell means ("avg")."""

    name: ClassVar[str] = "pool"
    config_keys: ClassVar[tuple[str, ...]] = ("pool_mode:mode",)
    description: ClassVar[str] = "uniform spatial sub-grid (mode stride | avg)"
    mode: str = "stride"

    def __post_init__(self):
        super().__post_init__()
        if self.mode not in ("stride", "avg"):
            raise ValueError(f"pool mode {self.mode!r} not in ('stride', 'avg')")

    @property
    def merges(self) -> bool:  # type: ignore[override]
        return self.mode == "avg"

    def select(self, ctx: PruneContext, k: int, variables: Any = None) -> PruneResult:
        return pool(ctx, k, mode=self.mode)
