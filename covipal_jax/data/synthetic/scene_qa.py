"""More questions about one synthetic scene, and multi-turn training sequences (LLaVA style).

`synthetic.make_example` draws one image per question. LLaVA's instruction data asks several
questions about each image in one conversation; a from-scratch model learns far faster that way
(one image encoding, several supervised answers). `scene_questions` derives every valid question
of the five types from an example's `objects` list, with the same templates and answer words as
`synthetic.py`:

* ``color``    for every shape that occurs exactly once;
* ``shape``    for every colour that occurs exactly once;
* ``exist``    "yes" for a present combination, "no" for an absent one (a near miss: same shape
  or same colour as a present object);
* ``count``    for every colour whose count is one of `cfg.counts`;
* ``position`` for ordered pairs of objects in different columns (left / right) or rows (above /
  below), the relation true or false.

`protected` combinations (the held-out ones) are never the subject of a question of a type in
`protected_types` (by default exist / count / position): an ``exist`` question never names one,
a ``count`` question is not asked about a colour one of whose objects is protected, and a
``position`` question never names one. Questions of other types may be about them.

`caption` describes the whole scene ("describe the image ." -> "red circle , blue square"), the
LLaVA stage-1 kind of supervision. `sample_turns` picks extra questions (balanced over types, then yes/no) and `encode_turns` builds
the multi-turn sequence `<s> <image> q1 ANSWER: a1 </s> q2 ANSWER: a2 </s> ...` (any
`ChatTemplate`: the first turn is `template.prompt(q1)`, later turns `template.prompt(q, image=
False)`), left-padded, with the loss on every answer (its word and end token).
"""
from __future__ import annotations

import collections
from collections.abc import Collection, Sequence
from typing import Any

import numpy as np

from covipal_jax.data.synthetic import task as synthetic
from covipal_jax.data import text as text_lib

Turn = tuple[str, str, str]  # (qtype, question, answer)
PROTECTED_TYPES = ("exist", "count", "position", "where")
CAPTION_QUESTION = "describe the image ."
WHERE_TEMPLATE = "where is the {color} {shape} ?"
# Words of the caption and `where` questions beyond synthetic's vocabulary: grid coordinates
# are number words (column, then row).
EXTRA_WORDS = ("describe", "image", "at", "where") + synthetic.NUMBER_WORDS


def vocabulary(cfg: synthetic.SyntheticConfig) -> list[str]:
    """`synthetic.vocabulary(cfg)` plus the caption / `where` words."""
    return sorted(set(synthetic.vocabulary(cfg)) | set(EXTRA_WORDS))


def _cell(o, cfg) -> tuple[int, int]:
    """(column, row) of an object's grid cell."""
    return o[2] // cfg.cell_size, o[3] // cfg.cell_size


def _coords(o, cfg) -> str:
    col, row = _cell(o, cfg)
    return f"{synthetic.NUMBER_WORDS[col]} {synthetic.NUMBER_WORDS[row]}"


def caption(objects: Sequence[tuple[str, str, int, int, int]],
            cfg: synthetic.SyntheticConfig, *, grounded: bool = False) -> tuple[str, str]:
    """(CAPTION_QUESTION, "red circle , blue square , ..."): every object in raster order of
    its grid cell (LLaVA's first training stage is captioning: dense supervision of every
    object's attributes and of the reading order). `grounded`: each object followed by
    "at <column> <row>" (grid coordinates as number words; LLaVA-1.5's region data gives boxes)."""
    order = sorted(objects, key=lambda o: _cell(o, cfg)[::-1])
    where = (lambda o: f" at {_coords(o, cfg)}") if grounded else (lambda o: "")
    return CAPTION_QUESTION, " , ".join(f"{o[1]} {o[0]}{where(o)}" for o in order)


def _template(qtype: str, cfg: synthetic.SyntheticConfig, rng: np.random.Generator) -> str:
    options = cfg.templates[qtype]
    return options[int(rng.integers(len(options)))]


def scene_questions(objects: Sequence[tuple[str, str, int, int, int]],
                    cfg: synthetic.SyntheticConfig, rng: np.random.Generator, *,
                    protected: Collection[tuple[str, str]] = (),
                    protected_types: Collection[str] = PROTECTED_TYPES,
                    extra_types: Sequence[str] = ()) -> dict[str, list[Turn]]:
    """Every valid question about a scene, grouped by type (types not in `cfg.qtypes` or
    `extra_types` are skipped). `extra_types` may hold "where" ("where is the red circle ?"
    -> "<column> <row>", grid coordinates as number words). Deterministic given `rng`."""
    protected = set(protected)
    guard = lambda qtype, combos: qtype in protected_types and any(c in protected
                                                                   for c in combos)
    combos = [(s, c) for s, c, *_ in objects]
    cell = cfg.cell_size
    shape_n = collections.Counter(s for s, _ in combos)
    color_n = collections.Counter(c for _, c in combos)
    out: dict[str, list[Turn]] = {q: [] for q in (*cfg.qtypes, *extra_types)}

    def add(qtype, fills, answer, about):
        if qtype in out and not guard(qtype, about):
            template = WHERE_TEMPLATE if qtype == "where" else _template(qtype, cfg, rng)
            q = template.format(**{k: fills.get(k, "") for k in
                                                     ("shape", "color", "shape2", "color2",
                                                      "rel")})
            out[qtype].append((qtype, q, answer))

    for s, c in combos:
        if shape_n[s] == 1:
            add("color", {"shape": s}, c, [(s, c)])
        if color_n[c] == 1:
            add("shape", {"color": c}, s, [(s, c)])
        add("exist", {"shape": s, "color": c}, "yes", [(s, c)])
    for o in objects:
        add("where", {"shape": o[0], "color": o[1]}, _coords(o, cfg), [(o[0], o[1])])
    present = set(combos)
    near = sorted({(s2, c2) for s2 in cfg.shapes for c2 in cfg.colors
                   if (s2, c2) not in present and (s2 in shape_n or c2 in color_n)})
    for s, c in near:
        add("exist", {"shape": s, "color": c}, "no", [(s, c)])
    for c in cfg.colors:
        if color_n[c] in cfg.counts:
            add("count", {"color": c}, synthetic.count_word(color_n[c]),
                [x for x in combos if x[1] == c])
    rels = [r for r in cfg.relations]
    for i, (sa, ca, xa, ya, _) in enumerate(objects):
        for j, (sb, cb, xb, yb, _) in enumerate(objects):
            if i == j:
                continue
            (ra, cola), (rb, colb) = (ya // cell, xa // cell), (yb // cell, xb // cell)
            for rel in rels:
                if rel in ("left", "right") and cola == colb:
                    continue
                if rel in ("above", "below") and ra == rb:
                    continue
                truth = {"left": cola < colb, "right": cola > colb,
                         "above": ra < rb, "below": ra > rb}[rel]
                add("position", {"shape": sa, "color": ca, "shape2": sb, "color2": cb,
                                 "rel": synthetic.RELATION_PHRASES[rel]},
                    "yes" if truth else "no", [(sa, ca), (sb, cb)])
    return out


def sample_turns(candidates: dict[str, list[Turn]], n: int, rng: np.random.Generator, *,
                 avoid: Collection[str] = ()) -> list[Turn]:
    """Up to `n` distinct questions: a type uniformly among those with candidates left, then
    (yes/no types) an answer uniformly, then a question. `avoid`: question strings to skip."""
    pools = {q: [t for t in ts if t[1] not in set(avoid)] for q, ts in candidates.items()}
    out: list[Turn] = []
    while len(out) < n:
        types = [q for q, ts in pools.items() if ts]
        if not types:
            break
        q = types[int(rng.integers(len(types)))]
        ts = pools[q]
        answers = sorted({t[2] for t in ts})
        if q in ("exist", "position"):
            a = answers[int(rng.integers(len(answers)))]
            ts = [t for t in ts if t[2] == a]
        t = ts[int(rng.integers(len(ts)))]
        out.append(t)
        pools[q] = [x for x in pools[q] if x[1] != t[1]]
    return out


def encode_turns(tokenizer: text_lib.Tokenizer, turns: Sequence[tuple[str, str]], *,
                 template: str | text_lib.ChatTemplate = "plain", max_len: int,
                 add_bos: bool | None = None) -> dict[str, np.ndarray] | None:
    """A multi-turn example `[(question, answer), ...]` -> ids, mask, loss_mask (each [max_len],
    left-padded), or None when even the first turn does not fit. Turns that do not fit are
    dropped from the end. The first turn equals `text.encode_example(question, answer)`."""
    tmpl = text_lib.get_template(template, tokenizer)
    bos = tokenizer.add_bos_default if add_bos is None else add_bos
    ids: list[int] = [tokenizer.bos_id] if bos else []
    loss: list[bool] = [False] * len(ids)
    for i, (q, a) in enumerate(turns):
        p = tokenizer.encode(tmpl.prompt(q, image=i == 0))
        r = tokenizer.encode(tmpl.answer(a))
        if len(ids) + len(p) + len(r) > max_len:
            if i == 0:
                return None
            break
        ids += p + r
        loss += [False] * len(p) + [True] * len(r)
    pad = max_len - len(ids)
    out_ids = np.full(max_len, tokenizer.pad_id, np.int32)
    out_ids[pad:] = ids
    mask = np.zeros(max_len, bool)
    mask[pad:] = True
    loss_mask = np.zeros(max_len, bool)
    loss_mask[pad:] = loss
    return {"ids": out_ids, "mask": mask, "loss_mask": loss_mask}


def turns_for_example(example: dict[str, Any], cfg: synthetic.SyntheticConfig, n_extra: int,
                      rng: np.random.Generator, *,
                      protected: Collection[tuple[str, str]] = (),
                      with_caption: bool = False, grounded: bool = False,
                      extra_types: Sequence[str] = ()) -> list[tuple[str, str]]:
    """The example's own question first, then up to `n_extra` more about its image, then (with
    `with_caption`) the caption turn last (so no question can read the answer off it)."""
    cands = scene_questions(example["objects"], cfg, rng, protected=protected,
                            extra_types=extra_types)
    extra = sample_turns(cands, n_extra, rng, avoid=[example["question"]])
    turns = [(example["question"], example["answer"])] + [(q, a) for _, q, a in extra]
    if with_caption:
        turns.append(caption(example["objects"], cfg, grounded=grounded))
    return turns
