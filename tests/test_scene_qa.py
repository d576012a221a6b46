"""Tests for covipal_jax/data/synthetic/scene_qa.py: questions are true of the scene, the held-out rule,
multi-turn encoding."""
from __future__ import annotations

import collections

import numpy as np
import pytest

from covipal_jax.data.synthetic import scene_qa as Q
from covipal_jax.data.synthetic import task as S
from covipal_jax.data import text as T

CFG = S.SyntheticConfig(heldout_distractors_in_train=True)
HELD = S.heldout_combos(CFG)


def _answer(objects, qtype, words):
    """Recompute the answer of a default-template question from the objects."""
    combos = [(s, c) for s, c, *_ in objects]
    if qtype == "color":
        return next(c for s, c in combos if s == words[4])
    if qtype == "shape":
        return next(s for s, c in combos if c == words[4])
    if qtype == "exist":
        return "yes" if (words[4], words[3]) in combos else "no"
    if qtype == "count":
        return S.count_word(sum(c == words[2] for _, c in combos))
    if qtype == "position":
        a = next(o for o in objects if (o[1], o[0]) == (words[2], words[3]))
        rest = " ".join(words[4:-1])
        rel = next(r for r, p in S.RELATION_PHRASES.items() if rest.startswith(p + " the"))
        b = next(o for o in objects if rest == f"{S.RELATION_PHRASES[rel]} the {o[1]} {o[0]}")
        cs = CFG.cell_size
        (ra, ca), (rb, cb) = (a[3] // cs, a[2] // cs), (b[3] // cs, b[2] // cs)
        return "yes" if {"left": ca < cb, "right": ca > cb, "above": ra < rb,
                         "below": ra > rb}[rel] else "no"
    raise ValueError(qtype)


@pytest.fixture(scope="module")
def examples():
    return list(S.generate("train", 200, seed=0, cfg=CFG))


def test_questions_are_true_and_respect_the_heldout_rule(examples):
    rng = np.random.default_rng(0)
    seen = collections.Counter()
    for ex in examples:
        cands = Q.scene_questions(ex["objects"], CFG, rng, protected=HELD)
        for qtype, turns in cands.items():
            for qt, q, a in turns:
                assert qt == qtype
                words = q.split()
                assert _answer(ex["objects"], qtype, words) == a, (q, a, ex["objects"])
                seen[(qtype, a)] += 1
                if qtype == "exist":
                    assert (words[4], words[3]) not in HELD
                if qtype == "count":
                    assert not any(c == words[2] and (s, c) in HELD
                                   for s, c, *_ in ex["objects"])
                if qtype == "position":
                    named = [(o[0], o[1]) for o in ex["objects"] if f"{o[1]} {o[0]}" in q]
                    assert not set(named) & set(HELD)
    for qtype in CFG.qtypes:
        assert sum(v for (q, _), v in seen.items() if q == qtype) > 0, qtype
    assert seen[("exist", "no")] > 0 and seen[("position", "no")] > 0


def test_unprotected_questions_may_name_heldout_combos(examples):
    rng = np.random.default_rng(0)
    hits = 0
    for ex in examples:
        cands = Q.scene_questions(ex["objects"], CFG, rng, protected=HELD)
        for _, q, a in cands["color"]:
            hits += (q.split()[4], a) in HELD
    assert hits > 0


def test_sample_turns_balanced_and_distinct(examples):
    rng = np.random.default_rng(1)
    types = collections.Counter()
    for ex in examples:
        turns = Q.turns_for_example(ex, CFG, 5, rng, protected=HELD)
        assert turns[0] == (ex["question"], ex["answer"])
        qs = [q for q, _ in turns]
        assert len(qs) == len(set(qs))
        types.update(len(q) for q in qs[1:])
    assert sum(types.values()) >= 4 * len(examples)


def test_encode_turns_first_turn_matches_encode_example(examples):
    tok = T.BuiltinTokenizer(S.vocabulary(CFG))
    rng = np.random.default_rng(2)
    ex = examples[0]
    turns = Q.turns_for_example(ex, CFG, 3, rng, protected=HELD)
    one = T.encode_example(tok, ex["question"], ex["answer"], max_len=24)
    first = Q.encode_turns(tok, turns[:1], max_len=24)
    for k in one:
        np.testing.assert_array_equal(one[k], first[k])
    full = Q.encode_turns(tok, turns, max_len=80)
    text = tok.decode(full["ids"][full["mask"]], skip_special_tokens=False)
    assert text.count("ANSWER:") == len(turns) and text.startswith("<s><image>")
    answers = tok.decode(full["ids"][full["loss_mask"]], skip_special_tokens=False)
    assert answers.split("</s>")[:-1] == [" " * (i > 0) + a for i, (_, a) in enumerate(turns)]
    # Turns that do not fit are dropped from the end; a first turn that does not fit -> None.
    short = Q.encode_turns(tok, turns, max_len=30)
    assert 1 <= tok.decode(short["ids"][short["mask"]],
                           skip_special_tokens=False).count("ANSWER:") < len(turns)
    assert Q.encode_turns(tok, turns, max_len=5) is None


def test_where_questions_and_grounded_caption(examples):
    rng = np.random.default_rng(3)
    words = {w: i for i, w in enumerate(S.NUMBER_WORDS)}
    for ex in examples[:50]:
        cands = Q.scene_questions(ex["objects"], CFG, rng, protected=HELD,
                                  extra_types=("where",))
        for _, q, a in cands["where"]:
            w = q.split()
            assert (w[4], w[3]) not in HELD  # "where" is protected like position
            o = next(o for o in ex["objects"] if (o[1], o[0]) == (w[3], w[4]))
            col, row = (words[x] for x in a.split())
            assert (col, row) == (o[2] // CFG.cell_size, o[3] // CFG.cell_size)
        q, a = Q.caption(ex["objects"], CFG, grounded=True)
        assert q == Q.CAPTION_QUESTION
        parts = [p.split() for p in a.split(" , ")]
        assert len(parts) == len(ex["objects"])
        cells = [(words[p[4]], words[p[3]]) for p in parts]  # (row, column)
        assert cells == sorted(cells)  # raster order
        assert sorted((p[0], p[1]) for p in parts) == sorted((c, s) for s, c, *_ in
                                                             ex["objects"])
        assert Q.caption(ex["objects"], CFG)[1] == " , ".join(" ".join(p[:2]) for p in parts)
    tok = T.BuiltinTokenizer(Q.vocabulary(CFG))
    assert tok.token_to_id("<unk>") not in tok.encode(a) + tok.encode(Q.CAPTION_QUESTION)
