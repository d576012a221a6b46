"""Procedurally generated visual QA task (NumPy, deterministic by seed) for the end-to-end demo.

Each image is a small canvas (default 64x64 RGB) with a lightly noisy dark background and 2-5
small objects (shape x colour). The canvas is divided into a grid of `cell_size` pixel cells
(set it to the ViT patch size) and every object lies inside ONE cell, so each object occupies a
single vision token and a question needs specific tokens: pruning the wrong ones loses the
answer. Objects never share a cell and, by default, never sit in 8-neighbouring cells, so they
never overlap or touch. Every (shape, colour) combination appears at most once per image.

Question types (answers are single words):

* ``color``    "what color is the triangle ?"                 -> "red" (exactly one triangle)
* ``shape``    "what shape is the blue object ?"              -> "circle" (exactly one blue object)
* ``exist``    "is there a green square ?"                    -> "yes"/"no" (50/50; near-miss
  distractors with the same shape or the same colour are added independently of the answer)
* ``count``    "how many red objects are there ?"             -> "two" (uniform in `counts`)
* ``position`` "is the red circle left of the blue square ?"  -> "yes"/"no" (50/50; relation in
  left/right/above/below; the two objects are in different grid columns or rows respectively)

Splits and held-out combinations: a fixed set of `n_heldout` (shape, colour) combinations is
drawn from a permutation seeded by `heldout_seed` so that no two held-out combinations share a
shape or a colour (every shape and every colour is still seen in training).

* ``train`` / ``validation``: the queried object(s) are never held-out combinations; by default
  held-out combinations do not appear in these images at all (`heldout_distractors_in_train`).
* ``test``: the queried object is always a held-out combination (for ``count``, one of the
  counted objects; for ``position``, one of the two named objects; for ``exist``, the combination
  asked about, present or not). Distractors are drawn from all combinations. Answering needs
  compositional generalisation, not memorised combinations. ``count`` answers are >= 1 in test.
* ``n_heldout=0`` makes ``test`` an i.i.d. split like ``validation`` (own seed stream).

Caveat (measured): in ``test`` the answer of a ``color`` question is a colour that training never
gave for that shape (likewise ``shape``), so a model leaning on the prior P(answer | question)
scores ~0 on those types. A 4-layer ViT+question encoder (width 96) trained from scratch on 20k
train examples reached 70% / 58% on validation color / shape after 1000 steps but exactly 0% on
test color / shape. Report validation (i.i.d.) accuracy next to the held-out one.

Determinism: example `i` of split `s` with seed `seed` is drawn from
``np.random.default_rng([seed, SPLIT_CODES[s], i])``, so it is independent of the other examples
(random access, sharding) and bit-identical across runs and machines.

Objects are reported as ``(shape, colour, x, y, size)``: `x, y` the top-left pixel (column, row)
of the object's `size x size` box. ``queried`` lists the indices of the objects that determine
the answer (empty for an ``exist`` question answered "no"); ``targets`` the (shape, colour)
combinations the question is about.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

SPLIT_CODES: dict[str, int] = {"train": 0, "validation": 1, "test": 2}

COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 210),
    "orange": (245, 140, 30),
    "cyan": (40, 210, 220),
    "white": (235, 235, 235),
    "pink": (250, 130, 190),
}

SHAPE_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "diamond")

NUMBER_WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
)

RELATION_PHRASES: dict[str, str] = {
    "left": "left of",
    "right": "right of",
    "above": "above",
    "below": "below",
}

QTYPES: tuple[str, ...] = ("color", "shape", "exist", "count", "position")

# One template per type by default (the demo trains a word-level model from scratch).
# Placeholders: {shape} {color} (the queried object), {shape2} {color2} (second object of a
# position question), {rel} (a RELATION_PHRASES value).
DEFAULT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "color": ("what color is the {shape} ?",),
    "shape": ("what shape is the {color} object ?",),
    "exist": ("is there a {color} {shape} ?",),
    "count": ("how many {color} objects are there ?",),
    "position": ("is the {color} {shape} {rel} the {color2} {shape2} ?",),
}

# Optional paraphrases (pass as `templates=PARAPHRASE_TEMPLATES`).
PARAPHRASE_TEMPLATES: dict[str, tuple[str, ...]] = {
    "color": ("what color is the {shape} ?", "which color does the {shape} have ?"),
    "shape": ("what shape is the {color} object ?", "which shape is {color} ?"),
    "exist": ("is there a {color} {shape} ?", "does the image contain a {color} {shape} ?"),
    "count": ("how many {color} objects are there ?", "count the {color} objects ."),
    "position": (
        "is the {color} {shape} {rel} the {color2} {shape2} ?",
        "is the {color} {shape} located {rel} the {color2} {shape2} ?",
    ),
}


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of the synthetic VQA task (all sizes in pixels)."""

    image_size: int = 64
    cell_size: int = 8  # grid cell = ViT patch size -> each object inside one patch
    object_size: tuple[int, int] = (5, 8)  # inclusive range of the object's side, <= cell_size
    n_objects: tuple[int, int] = (2, 5)  # inclusive range of objects per image
    shapes: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring")
    colors: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple")
    qtypes: tuple[str, ...] = QTYPES
    qtype_weights: tuple[float, ...] | None = None  # None: uniform over `qtypes`
    templates: Mapping[str, tuple[str, ...]] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_TEMPLATES)
    )
    counts: tuple[int, ...] = (1, 2, 3)  # possible answers of `count` questions
    relations: tuple[str, ...] = ("left", "right", "above", "below")
    n_heldout: int = 5  # held-out (shape, colour) combinations, <= min(#shapes, #colours)
    heldout_seed: int = 0
    heldout_distractors_in_train: bool = False  # let held-out combos be train/val distractors
    background: tuple[int, int] = (10, 60)  # range of the background grey level
    noise_std: float = 4.0  # Gaussian pixel noise (0-255 scale)
    color_jitter: int = 20  # per-object uniform jitter of each channel, +- jitter/2
    separate: bool = True  # objects never in 8-neighbouring cells
    near_miss_prob: float = 0.5  # `exist`: prob. of a same-shape and of a same-colour distractor

    def __post_init__(self):
        g = self.grid
        if self.image_size % self.cell_size:
            raise ValueError(f"image_size {self.image_size} not a multiple of {self.cell_size}")
        lo, hi = self.object_size
        if not 1 <= lo <= hi <= self.cell_size:
            raise ValueError(f"object_size {self.object_size} must fit in cell {self.cell_size}")
        if not 2 <= self.n_objects[0] <= self.n_objects[1] <= g * g:
            raise ValueError(f"bad n_objects {self.n_objects}")
        for s in self.shapes:
            if s not in SHAPE_NAMES:
                raise ValueError(f"unknown shape {s!r}; known: {SHAPE_NAMES}")
        for c in self.colors:
            if c not in COLOR_RGB:
                raise ValueError(f"unknown colour {c!r}; known: {tuple(COLOR_RGB)}")
        if len(set(self.shapes)) < 2 or len(set(self.colors)) < 2:
            raise ValueError("need at least two distinct shapes and colours")
        if not 0 <= self.n_heldout <= min(len(self.shapes), len(self.colors)):
            raise ValueError("n_heldout must be <= min(#shapes, #colours)")
        for q in self.qtypes:
            if q not in QTYPES:
                raise ValueError(f"unknown qtype {q!r}; known: {QTYPES}")
            if not self.templates.get(q):
                raise ValueError(f"no template for qtype {q!r}")
        if self.qtype_weights is not None and len(self.qtype_weights) != len(self.qtypes):
            raise ValueError("qtype_weights must match qtypes")
        if any(r not in RELATION_PHRASES for r in self.relations):
            raise ValueError(f"relations must be in {tuple(RELATION_PHRASES)}")
        if not self.counts or min(self.counts) < 0 or max(self.counts) >= len(NUMBER_WORDS):
            raise ValueError(f"counts must be in 0..{len(NUMBER_WORDS) - 1}")
        if max(self.counts) > min(len(self.shapes) - 1, self.n_objects[1] - 1):
            raise ValueError("max count must leave room for a distractor and a held-out shape")
        if self.n_objects[1] < 3 and "position" in self.qtypes:
            raise ValueError("position questions need n_objects max >= 3 (two named + one)")

    @property
    def grid(self) -> int:
        """Cells per side."""
        return self.image_size // self.cell_size


# ------------------------------------------------------------------------------ vocabulary


def count_word(n: int) -> str:
    return NUMBER_WORDS[n]


def answers_for(qtype: str, cfg: SyntheticConfig, split: str = "train") -> list[str]:
    """Possible answers of one question type (`split="test"` drops a count of zero)."""
    if qtype == "color":
        return list(cfg.colors)
    if qtype == "shape":
        return list(cfg.shapes)
    if qtype in ("exist", "position"):
        return ["yes", "no"]
    if qtype == "count":
        return [count_word(n) for n in _counts_for(split, cfg)]
    raise ValueError(qtype)


def answer_set(cfg: SyntheticConfig | None = None) -> list[str]:
    """All answer words of the configured question types, in a fixed order."""
    cfg = cfg or SyntheticConfig()
    out: list[str] = []
    for q in cfg.qtypes:
        for a in answers_for(q, cfg):
            if a not in out:
                out.append(a)
    return out


def _template_fills(cfg: SyntheticConfig) -> dict[str, list[str]]:
    return {
        "shape": list(cfg.shapes),
        "color": list(cfg.colors),
        "shape2": list(cfg.shapes),
        "color2": list(cfg.colors),
        "rel": [RELATION_PHRASES[r] for r in cfg.relations],
    }


def vocabulary(cfg: SyntheticConfig | None = None) -> list[str]:
    """Every whitespace-separated word of any question or answer, sorted (no special tokens)."""
    cfg = cfg or SyntheticConfig()
    fills = _template_fills(cfg)
    words: set[str] = set(answer_set(cfg))
    for q in cfg.qtypes:
        for t in cfg.templates[q]:
            for tok in t.split():
                if tok.startswith("{") and tok.endswith("}"):
                    for v in fills[tok[1:-1]]:
                        words.update(v.split())
                else:
                    words.add(tok)
    return sorted(words)


def heldout_combos(cfg: SyntheticConfig | None = None) -> list[tuple[str, str]]:
    """Held-out (shape, colour) combinations: no two share a shape or a colour."""
    cfg = cfg or SyntheticConfig()
    rng = np.random.default_rng(cfg.heldout_seed)
    si = rng.permutation(len(cfg.shapes))[: cfg.n_heldout]
    ci = rng.permutation(len(cfg.colors))[: cfg.n_heldout]
    return sorted((cfg.shapes[s], cfg.colors[c]) for s, c in zip(si, ci))


# ------------------------------------------------------------------------------ baselines


def chance_accuracy(cfg: SyntheticConfig | None = None, split: str = "test") -> dict[str, float]:
    """Expected accuracy of a uniform guess among each question type's answer words.

    Also ``"overall"``: the mean over types weighted by `qtype_weights`.
    """
    cfg = cfg or SyntheticConfig()
    out = {q: 1.0 / len(answers_for(q, cfg, split)) for q in cfg.qtypes}
    w = _qtype_probs(cfg)
    out["overall"] = float(sum(p * out[q] for q, p in zip(cfg.qtypes, w)))
    return out


def majority_baseline(
    train: Iterable[Mapping[str, Any]], evaluation: Iterable[Mapping[str, Any]]
) -> dict[str, float]:
    """Accuracy on `evaluation` of answering each qtype with its most frequent `train` answer.

    A blind (image-free, question-type-only) baseline; ``"overall"`` is the plain mean over
    `evaluation` examples. Types missing from `train` count as wrong.
    """
    freq: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for ex in train:
        freq[_s(ex["qtype"])][_s(ex["answer"])] += 1
    best = {q: c.most_common(1)[0][0] for q, c in freq.items()}
    hits: dict[str, list[bool]] = collections.defaultdict(list)
    for ex in evaluation:
        q = _s(ex["qtype"])
        hits[q].append(best.get(q) == _s(ex["answer"]))
    out = {q: float(np.mean(h)) for q, h in hits.items()}
    allh = [x for h in hits.values() for x in h]
    out["overall"] = float(np.mean(allh)) if allh else 0.0
    return out


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


# ------------------------------------------------------------------------------ rendering


@functools.lru_cache(maxsize=None)
def shape_mask(shape: str, size: int, supersample: int = 4) -> np.ndarray:
    """Anti-aliased coverage `f32[size, size, 1]` in [0, 1] of a shape filling a size box."""
    n = size * supersample
    c = (np.arange(n, dtype=np.float64) + 0.5) / n * 2.0 - 1.0  # sample centres in [-1, 1]
    v, u = np.meshgrid(c, c, indexing="ij")  # v: rows (down), u: columns (right)
    r2 = u * u + v * v
    if shape == "circle":
        m = r2 <= 1.0
    elif shape == "square":
        m = (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85)
    elif shape == "triangle":  # apex up
        m = np.abs(u) <= (v + 1.0) / 2.0
    elif shape == "cross":
        m = ((np.abs(u) <= 0.3) | (np.abs(v) <= 0.3)) & (np.abs(u) <= 1) & (np.abs(v) <= 1)
    elif shape == "ring":
        m = (r2 <= 1.0) & (r2 >= 0.3)
    elif shape == "diamond":
        m = np.abs(u) + np.abs(v) <= 1.0
    else:
        raise ValueError(shape)
    cov = m.reshape(size, supersample, size, supersample).mean(axis=(1, 3))
    cov.setflags(write=False)
    return cov.astype(np.float32)[..., None]


def render(
    objects: Sequence[tuple[str, str, int, int, int]],
    cfg: SyntheticConfig,
    rng: np.random.Generator,
) -> np.ndarray:
    """Draw `objects` on a noisy background: `uint8[H, W, 3]`."""
    s = cfg.image_size
    bg = rng.integers(cfg.background[0], cfg.background[1] + 1)
    img = np.full((s, s, 3), float(bg), np.float32)
    for shape, color, x, y, size in objects:
        rgb = np.asarray(COLOR_RGB[color], np.float32)
        if cfg.color_jitter:
            rgb = rgb + rng.uniform(-cfg.color_jitter / 2, cfg.color_jitter / 2, 3)
        a = shape_mask(shape, size)
        patch = img[y : y + size, x : x + size]
        img[y : y + size, x : x + size] = patch * (1.0 - a) + rgb.astype(np.float32) * a
    if cfg.noise_std > 0:
        img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(cfg.noise_std)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def object_patch_mask(
    objects: Sequence[tuple[str, str, int, int, int]],
    image_size: int,
    patch_size: int,
    indices: Iterable[int] | None = None,
) -> np.ndarray:
    """`bool[n_patches]` (row-major) marking patches overlapped by the selected objects' boxes.

    Use it to measure whether a pruning method kept the patches of the queried objects.
    """
    g = image_size // patch_size
    m = np.zeros((g, g), bool)
    idx = range(len(objects)) if indices is None else indices
    for i in idx:
        _, _, x, y, size = objects[i]
        m[y // patch_size : (y + size - 1) // patch_size + 1,
          x // patch_size : (x + size - 1) // patch_size + 1] = True
    return m.reshape(-1)


# ------------------------------------------------------------------------------ generation


def _qtype_probs(cfg: SyntheticConfig) -> np.ndarray:
    w = np.ones(len(cfg.qtypes)) if cfg.qtype_weights is None else np.asarray(cfg.qtype_weights)
    return w / w.sum()


def _counts_for(split: str, cfg: SyntheticConfig) -> tuple[int, ...]:
    if split == "test" and cfg.n_heldout > 0:
        return tuple(n for n in cfg.counts if n >= 1)
    return cfg.counts


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
        k = int(_pick(rng, _counts_for(split, cfg)))
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


def make_example(split: str, index: int, seed: int = 0,
                 cfg: SyntheticConfig | None = None) -> dict[str, Any]:
    """Example `index` of `split` (deterministic in (split, index, seed, cfg))."""
    cfg = cfg or SyntheticConfig()
    return _make(split, index, seed, cfg, _Pools(split, cfg), _qtype_probs(cfg))


def _make(split: str, index: int, seed: int, cfg: SyntheticConfig, pools: _Pools,
          probs: np.ndarray) -> dict[str, Any]:
    rng = np.random.default_rng([seed, SPLIT_CODES[split], index])
    qtype = cfg.qtypes[int(rng.choice(len(cfg.qtypes), p=probs))]
    for _ in range(50):
        try:
            combos, queried, answer, fills, axis = _build_question(qtype, rng, cfg, split, pools)
            break
        except _Retry:
            continue
    else:
        raise ValueError(f"config cannot produce a {qtype!r} question for split {split!r}")
    # shuffle drawing order so the queried object is not always first
    perm = rng.permutation(len(combos))
    cells = _place(rng, len(combos), cfg, axis)
    if qtype == "position":
        rel = answer
        want_yes = bool(rng.integers(2))
        (ra, ca), (rb, cb) = cells[0], cells[1]
        truth = {"left": ca < cb, "right": ca > cb, "above": ra < rb, "below": ra > rb}[rel]
        if truth != want_yes:
            cells[0], cells[1] = cells[1], cells[0]
        answer = "yes" if want_yes else "no"
    objects_by_slot = []
    lo, hi = cfg.object_size
    for (shape, color), (r, c) in zip(combos, cells):
        size = int(rng.integers(lo, hi + 1))
        ox, oy = rng.integers(0, cfg.cell_size - size + 1, size=2)
        objects_by_slot.append(
            (shape, color, int(c * cfg.cell_size + ox), int(r * cfg.cell_size + oy), size))
    inv = np.argsort(perm)  # slot j goes to position inv[j]
    objects = [objects_by_slot[j] for j in perm]
    queried_idx = sorted(int(inv[j]) for j in queried)
    if qtype == "exist":
        targets = [(fills["shape"], fills["color"])]
    else:
        targets = [combos[j] for j in queried]
    template = _pick(rng, cfg.templates[qtype])
    question = template.format(**{k: fills.get(k, "") for k in _template_fills(cfg)})
    image = render(objects, cfg, rng)
    return {
        "image": image,
        "question": question,
        "answer": answer,
        "qtype": qtype,
        "objects": objects,
        "queried": queried_idx,
        "targets": targets,
    }


def generate(
    split: str,
    n: int,
    seed: int = 0,
    cfg: SyntheticConfig | None = None,
    *,
    start: int = 0,
) -> Iterator[dict[str, Any]]:
    """Yields examples `start .. start + n - 1` of `split`.

    Each is ``dict(image uint8[H, W, 3], question str, answer str, qtype str,
    objects list[(shape, colour, x, y, size)], queried list[int],
    targets list[(shape, colour)])``: `queried` indexes the objects that determine the answer,
    `targets` are the combinations the question is about (for `exist`, the one asked about,
    present or not; for `count`, the counted objects; for `position`, both named objects).
    """
    if split not in SPLIT_CODES:
        raise ValueError(f"split must be one of {tuple(SPLIT_CODES)}, got {split!r}")
    cfg = cfg or SyntheticConfig()
    pools = _Pools(split, cfg)
    probs = _qtype_probs(cfg)
    for i in range(start, start + n):
        yield _make(split, i, seed, cfg, pools, probs)
