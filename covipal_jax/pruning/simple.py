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
from covipal_jax.pruning.select import (KIND_NEWLINE, example_budget, gather_tokens,
                                       masked_select, masked_topk)

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


def _ceil_div(a: Array, b: Array) -> Array:
    return -((-a) // b)


def pool_member(r: Array, c: Array, h: Array, w: Array, m: Array) -> Array:
    """bool: cell (r, c) of an h x w grid is one of `pool_indices(h, w, m)` (m = 0: none).

    All arguments i32 arrays that broadcast (sizes may be traced: a packed buffer's unpadded
    crop map); exact integer arithmetic, so it agrees with `pool_indices` (Python's round
    half-to-even of sqrt(m h / w) included) cell for cell.
    """
    r, c, h, w, m = (jnp.asarray(x, jnp.int32) for x in (r, c, h, w, m))
    h1, w1 = jnp.maximum(h, 1), jnp.maximum(w, 1)
    mh = m * h1
    n = jnp.floor(jnp.sqrt(mh.astype(jnp.float32) / w1.astype(jnp.float32))).astype(jnp.int32)
    n = jnp.where((n + 1) * (n + 1) * w1 <= mh, n + 1, n)      # exact floor(sqrt(m h / w))
    n = jnp.where(n * n * w1 > mh, n - 1, n)
    lhs, rhs = 4 * mh, (2 * n + 1) ** 2 * w1                    # sqrt vs n + 0.5
    gh = jnp.where(lhs > rhs, n + 1, jnp.where(lhs == rhs, n + n % 2, n))
    gh = jnp.maximum(jnp.maximum(gh, _ceil_div(m, w1)), 1)
    gh = jnp.maximum(jnp.minimum(jnp.minimum(gh, h1), m), 1)
    ri = _ceil_div(2 * r * gh - h1, 2 * h1)                    # the only row that can land on r
    row_ok = (ri >= 0) & (ri < gh) & (((2 * ri + 1) * h1) // (2 * gh) == r)
    n_r = jnp.maximum((ri + 1) * m // gh - ri * m // gh, 1)
    ci = _ceil_div(2 * c * n_r - w1, 2 * w1)
    col_ok = (ci >= 0) & (ci < n_r) & (((2 * ci + 1) * w1) // (2 * n_r) == c)
    return row_ok & col_ok & (m > 0) & (r < h) & (c < w)


def pool_packed(ctx: PruneContext, k: int, keep: float | int) -> PruneResult:
    """`pool` (stride) on a packed AnyRes / video buffer: the uniform sub-grid of every view.

    Views (from `ctx.coords`): the AnyRes base view (g x g), the unpadded (and, for
    OneVision's anyres_max, downsampled) crop map as the LLM sees it (out_h x out_w; crops are
    cut by the unpadding, so the map is pooled as one grid), and each video frame (p x p).
    Several images per prompt: each image's views on their own, the images sharing the budget
    in proportion to their sizes.
    The example's budget is the packed one (`select.example_budget(keep, k, valid)`, as
    random / divprune): the newlines are kept, the rest (budget - newlines) is split over the
    views in proportion to their sizes (video: evenly over the frames, the remainder to the
    later frames like `pool_indices` rows), and each view keeps `pool_indices(h, w, m)`.
    Padding slots are never kept. Returns the static k = `method.k(N)` slots, `valid` False
    beyond the example's budget.
    """
    if ctx.coords is None or ctx.valid is None:
        raise ValueError("pool on a packed buffer needs PruneContext.coords and valid")
    kind, row, col = (ctx.coords[..., i] for i in range(3))
    valid = ctx.valid
    budget = example_budget(keep, k, valid)
    nl = valid & (kind == KIND_NEWLINE)
    m_total = jnp.maximum(budget - jnp.sum(nl, axis=1), 0)[:, None]          # [B, 1]

    base, grid, frame = (valid & (kind == x) for x in (0, 1, 3))   # anyres / video kinds
    # several images per prompt: image i's base view starts at (0, 0, 0); each image's share
    # of m_total is in proportion to its size (cumulative rounding: the shares sum to m_total)
    b, n = valid.shape
    img = jnp.maximum(jnp.cumsum(base & (row == 0) & (col == 0), axis=1) - 1, 0)
    rows_b = jnp.arange(b)[:, None]

    def per_image(x, op="add", init=0):  # [B, N] -> per slot: op over the slot's image
        acc = getattr(jnp.full((b, n), init, jnp.int32).at[rows_b, img], op)(x)
        return jnp.take_along_axis(acc, img, axis=1)

    def extent(sel):  # (h, w) [B, N] of the cells where sel, in the slot's image
        return (per_image(jnp.where(sel, row, -1), "max", -1) + 1,
                per_image(jnp.where(sel, col, -1), "max", -1) + 1)

    size = jnp.zeros((b, n), jnp.int32).at[rows_b, img].add((base | grid).astype(jnp.int32))
    cum = jnp.cumsum(size, axis=1)
    share = m_total * cum // jnp.maximum(cum[:, -1:], 1)
    m_img = jnp.take_along_axis(share - jnp.pad(share[:, :-1], ((0, 0), (1, 0))), img, axis=1)
    n_base, n_grid = per_image(base.astype(jnp.int32)), per_image(grid.astype(jnp.int32))
    m_base = jnp.round(m_img * n_base / jnp.maximum(n_base + n_grid, 1)).astype(jnp.int32)
    hb, wb = extent(base)
    hg, wg = extent(grid)
    member = base & pool_member(row, col, hb, wb, m_base)
    member |= grid & pool_member(row, col, hg, wg, m_img - m_base)
    p = jnp.max(jnp.where(frame, col, -1), axis=1, keepdims=True) + 1        # frame side
    p1 = jnp.maximum(p, 1)
    n_frames = jnp.maximum(jnp.sum(frame, axis=1, keepdims=True) // (p1 * p1), 1)
    f = row // p1
    m_f = (f + 1) * m_total // n_frames - f * m_total // n_frames
    member |= frame & pool_member(row % p1, col, p, p, m_f)
    idx, kept = masked_topk(member.astype(jnp.float32), k, valid, nl, budget)
    return PruneResult(tokens=gather_tokens(ctx.vision_tokens, idx), indices=idx,
                       scores=member.astype(jnp.float32), valid=kept)


def pool(ctx: PruneContext, k: int, *, mode: str = "stride", project=None,
         keep: float | int = 1.0) -> PruneResult:
    """Uniform spatial pooling to k tokens.

    mode "stride": keep the tokens at `pool_indices(h, w, k)`.
    mode "avg": each kept token is the mean of the projected tokens of its cell (the patches
    nearest to that point), positioned at the point.
    On a packed AnyRes / video buffer (`ctx.packed`): `pool_packed` (stride only), `keep` the
    method's budget (the per-example budget of the real tokens).
    """
    del project
    if ctx.packed:
        if mode != "stride":
            ctx.refuse_packed("pool", f"mode {mode!r} averages cells of one h x w grid; on "
                              "AnyRes / video input pool supports mode='stride' (per view)")
        return pool_packed(ctx, k, keep)
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
        return pool(ctx, k, mode=self.mode, keep=self.keep)
