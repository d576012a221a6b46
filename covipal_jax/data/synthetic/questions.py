"""Question construction of the synthetic VQA task: combination pools, object placement and the
per-type choice of objects, answer and template fills (`task.make_example` draws the scene)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from covipal_jax.data.synthetic.config import RELATION_PHRASES, SyntheticConfig, counts_for
from covipal_jax.data.synthetic.vocab import count_word, heldout_combos


class _Pools:
    """Combination pools for one (split, cfg)."""

    def __init__(self, split: str, cfg: SyntheticConfig):
        allc = [(s, c) for s in cfg.shapes for c in cfg.colors]
        held = set(heldout_combos(cfg))
        seen = [x for x in allc if x not in held]
        if split == "test" and held:
            self.query = sorted(held)
            self.distract = allc
        else:
            self.query = seen
            self.distract = allc if cfg.heldout_distractors_in_train else seen
        self.held = held
        self.test = split == "test" and bool(held)


def _pick(rng: np.random.Generator, items: Sequence[Any]) -> Any:
    return items[int(rng.integers(len(items)))]


def _pick_many(rng: np.random.Generator, items: Sequence[Any], k: int) -> list[Any]:
    if k > len(items):
        raise _Retry
    return [items[i] for i in rng.choice(len(items), size=k, replace=False)]


class _Retry(Exception):
    pass


def _place(
    rng: np.random.Generator, n: int, cfg: SyntheticConfig, axis: int | None = None
) -> list[tuple[int, int]]:
    """`n` distinct grid cells (row, col); cells 0 and 1 differ along `axis` (0 rows, 1 cols)."""
    g = cfg.grid
    for separate in ((True, False) if cfg.separate else (False,)):
        for _ in range(20):
            free = np.ones((g, g), bool)
            cells: list[tuple[int, int]] = []
            for i in range(n):
                ok = free.copy()
                if i == 1 and axis is not None:
                    if axis == 0:
                        ok[cells[0][0], :] = False
                    else:
                        ok[:, cells[0][1]] = False
                cand = np.flatnonzero(ok)
                if cand.size == 0:
                    break
                r, c = divmod(int(_pick(rng, cand)), g)
                cells.append((r, c))
                if separate:
                    free[max(r - 1, 0) : r + 2, max(c - 1, 0) : c + 2] = False
                else:
                    free[r, c] = False
            else:
                return cells
    raise ValueError(f"cannot place {n} objects on a {g}x{g} grid")


def _n_total(rng: np.random.Generator, cfg: SyntheticConfig, required: int) -> int:
    """Number of objects: at least `required` + 1 (a distractor is always present)."""
    lo = max(cfg.n_objects[0], required + 1)
    return int(rng.integers(lo, cfg.n_objects[1] + 1))


def _fill(
    rng: np.random.Generator,
    combos: list[tuple[str, str]],
    n_total: int,
    pool: Sequence[tuple[str, str]],
    allowed,
) -> list[tuple[str, str]]:
    cand = [x for x in pool if x not in combos and allowed(x)]
    return combos + _pick_many(rng, cand, n_total - len(combos))


def _build_question(
    qtype: str, rng: np.random.Generator, cfg: SyntheticConfig, split: str, pools: _Pools
) -> tuple[list[tuple[str, str]], list[int], str, dict[str, str], int | None]:
    """Returns (combos, queried indices, answer, template fills, position axis).

    The queried objects come first in `combos`.
    """
    axis = None
    if qtype == "color":
        s, c = _pick(rng, pools.query)
        combos = _fill(rng, [(s, c)], _n_total(rng, cfg, 1), pools.distract,
                       lambda x: x[0] != s)
        return combos, [0], c, {"shape": s}, axis
    if qtype == "shape":
        s, c = _pick(rng, pools.query)
        combos = _fill(rng, [(s, c)], _n_total(rng, cfg, 1), pools.distract,
                       lambda x: x[1] != c)
        return combos, [0], s, {"color": c}, axis
    if qtype == "exist":
        s, c = _pick(rng, pools.query)
        yes = bool(rng.integers(2))
        combos = [(s, c)] if yes else []
        for same in (0, 1):  # near misses: same shape / same colour, other attribute differs
            take = rng.random() < cfg.near_miss_prob
            cand = [x for x in pools.distract if x[same] == (s, c)[same] and x != (s, c)]
            if take and cand:
                combos.append(_pick(rng, cand))
        n = min(max(_n_total(rng, cfg, 1), len(combos)), cfg.n_objects[1])
        combos = _fill(rng, combos, n, pools.distract, lambda x: x != (s, c))
        return combos, ([0] if yes else []), ("yes" if yes else "no"), \
            {"shape": s, "color": c}, axis
    if qtype == "count":
        k = int(_pick(rng, counts_for(split, cfg)))
        if pools.test:
            s_h, c = _pick(rng, pools.query)
            first = [(s_h, c)]
            cand = [x for x in pools.distract if x[1] == c and x != (s_h, c)]
        else:
            c = _pick(rng, cfg.colors)
            first = []
            cand = [x for x in pools.query if x[1] == c]
        counted = first + _pick_many(rng, cand, k - len(first))
        combos = _fill(rng, counted, _n_total(rng, cfg, k), pools.distract,
                       lambda x: x[1] != c)
        return combos, list(range(k)), count_word(k), {"color": c}, axis
    if qtype == "position":
        rel = _pick(rng, cfg.relations)
        if pools.test:
            a = _pick(rng, pools.query)
            b = _pick(rng, [x for x in pools.distract if x != a])
            if rng.integers(2):
                a, b = b, a
        else:
            a, b = _pick_many(rng, pools.query, 2)
        combos = _fill(rng, [a, b], _n_total(rng, cfg, 2), pools.distract, lambda x: True)
        axis = 1 if rel in ("left", "right") else 0
        fills = {"shape": a[0], "color": a[1], "shape2": b[0], "color2": b[1],
                 "rel": RELATION_PHRASES[rel]}
        return combos, [0, 1], rel, fills, axis  # answer decided after placement
    raise ValueError(f"unknown qtype {qtype!r}")
