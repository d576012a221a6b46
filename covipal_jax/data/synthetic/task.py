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

Layout: `config.py` (words, colours, templates, `SyntheticConfig`), `vocab.py` (answer lists,
vocabulary, held-out combinations), `baselines.py` (chance / majority), `render.py` (drawing),
`questions.py` (pools, placement, per-type question construction) and this module (the example
generator, re-exporting the names above).
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

# Re-exported: the task's public names live in one namespace (`task as synthetic`).
from covipal_jax.data.synthetic.baselines import chance_accuracy, majority_baseline  # noqa: F401
from covipal_jax.data.synthetic.config import (  # noqa: F401
    COLOR_RGB,
    DEFAULT_TEMPLATES,
    NUMBER_WORDS,
    PARAPHRASE_TEMPLATES,
    QTYPES,
    RELATION_PHRASES,
    SHAPE_NAMES,
    SPLIT_CODES,
    SyntheticConfig,
    qtype_probs,
)
from covipal_jax.data.synthetic.questions import (  # noqa: F401
    _build_question,
    _pick,
    _place,
    _Pools,
    _Retry,
)
from covipal_jax.data.synthetic.render import object_patch_mask, render, shape_mask  # noqa: F401
from covipal_jax.data.synthetic.vocab import (  # noqa: F401
    _template_fills,
    answer_set,
    answers_for,
    count_word,
    heldout_combos,
    vocabulary,
)


def make_example(split: str, index: int, seed: int = 0,
                 cfg: SyntheticConfig | None = None) -> dict[str, Any]:
    """Example `index` of `split` (deterministic in (split, index, seed, cfg))."""
    cfg = cfg or SyntheticConfig()
    return _make(split, index, seed, cfg, _Pools(split, cfg), qtype_probs(cfg))


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
    probs = qtype_probs(cfg)
    for i in range(start, start + n):
        yield _make(split, i, seed, cfg, pools, probs)
