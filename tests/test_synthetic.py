"""Tests for covipal_jax/data/synthetic/task.py: determinism, uniqueness, held-out split, balance."""
from __future__ import annotations

import collections
import time

import numpy as np
import pytest

from covipal_jax.data.synthetic import task as S

CFG = S.SyntheticConfig()


@pytest.fixture(scope="module")
def train():
    return list(S.generate("train", 1500, seed=0, cfg=CFG))


@pytest.fixture(scope="module")
def test_split():
    return list(S.generate("test", 1000, seed=0, cfg=CFG))


def _objects_with(ex, shape=None, color=None):
    return [o for o in ex["objects"]
            if (shape is None or o[0] == shape) and (color is None or o[1] == color)]


def _fills(ex):
    """Recover the template fills of a default-template question."""
    w = ex["question"].split()
    q = ex["qtype"]
    if q == "color":
        return {"shape": w[4]}
    if q == "shape":
        return {"color": w[4]}
    if q == "exist":
        return {"color": w[3], "shape": w[4]}
    if q == "count":
        return {"color": w[2]}
    assert q == "position"
    rel = "above" if "above" in w else "below" if "below" in w else w[4]
    j = w.index("the", 3) + 1
    return {"color": w[2], "shape": w[3], "rel": rel, "color2": w[j], "shape2": w[j + 1]}


def _centre(o):
    return o[2] + o[4] / 2.0, o[3] + o[4] / 2.0


def _true_answer(ex):
    """Answer recomputed from the object list only."""
    f = _fills(ex)
    q = ex["qtype"]
    if q == "color":
        (o,) = _objects_with(ex, shape=f["shape"])
        return o[1]
    if q == "shape":
        (o,) = _objects_with(ex, color=f["color"])
        return o[0]
    if q == "exist":
        return "yes" if _objects_with(ex, f["shape"], f["color"]) else "no"
    if q == "count":
        return S.NUMBER_WORDS[len(_objects_with(ex, color=f["color"]))]
    (a,) = _objects_with(ex, f["shape"], f["color"])
    (b,) = _objects_with(ex, f["shape2"], f["color2"])
    (ax, ay), (bx, by) = _centre(a), _centre(b)
    truth = {"left": ax < bx, "right": ax > bx, "above": ay < by, "below": ay > by}[f["rel"]]
    return "yes" if truth else "no"


def test_deterministic_and_random_access():
    a = list(S.generate("train", 20, seed=3))
    b = list(S.generate("train", 20, seed=3))
    c = list(S.generate("train", 20, seed=4))
    for x, y in zip(a, b):
        assert x["image"].tobytes() == y["image"].tobytes()
        assert {k: v for k, v in x.items() if k != "image"} == \
               {k: v for k, v in y.items() if k != "image"}
    assert any(x["image"].tobytes() != z["image"].tobytes() for x, z in zip(a, c))
    # example i does not depend on the others
    d = list(S.generate("train", 5, seed=3, start=10))
    assert d[2]["image"].tobytes() == a[12]["image"].tobytes()
    assert S.make_example("train", 7, seed=3)["question"] == a[7]["question"]
    # splits differ
    v = list(S.generate("validation", 20, seed=3))
    assert all(x["image"].tobytes() != y["image"].tobytes() for x, y in zip(a, v))


def test_image_and_objects_well_formed(train):
    for ex in train:
        img = ex["image"]
        assert img.dtype == np.uint8 and img.shape == (64, 64, 3)
        objs = ex["objects"]
        assert CFG.n_objects[0] <= len(objs) <= CFG.n_objects[1]
        combos = [(o[0], o[1]) for o in objs]
        assert len(set(combos)) == len(combos)
        cells = set()
        for shape, color, x, y, size in objs:
            assert shape in CFG.shapes and color in CFG.colors
            assert CFG.object_size[0] <= size <= CFG.object_size[1]
            c = CFG.cell_size
            assert x // c == (x + size - 1) // c and y // c == (y + size - 1) // c  # one cell
            cells.add((y // c, x // c))
        assert len(cells) == len(objs)  # never overlapping
        for (r1, c1) in cells:  # separated: no 8-neighbours
            assert all(max(abs(r1 - r2), abs(c1 - c2)) > 1 for r2, c2 in cells if
                       (r2, c2) != (r1, c1))
        # the object's colour is really drawn at its centre
        shape, color, x, y, size = objs[0]
        if shape != "ring" and size >= 6:
            px = img[y + size // 2, x + size // 2].astype(int)
            assert np.abs(px - np.asarray(S.COLOR_RGB[color])).max() < 40


@pytest.mark.parametrize("split", ["train", "test"])
def test_answers_are_unique_and_correct(split, train, test_split):
    exs = train if split == "train" else test_split
    for ex in exs:
        assert ex["answer"] == _true_answer(ex), ex
        assert len(ex["answer"].split()) == 1
        queried = {(ex["objects"][i][0], ex["objects"][i][1]) for i in ex["queried"]}
        if ex["qtype"] == "exist":
            assert ex["targets"] == [(_fills(ex)["shape"], _fills(ex)["color"])]
            assert queried == (set(ex["targets"]) if ex["answer"] == "yes" else set())
        else:
            assert queried == set(ex["targets"]) and len(queried) == len(ex["targets"])


def test_questions_use_vocabulary(train, test_split):
    vocab = set(S.vocabulary(CFG))
    answers = set(S.answer_set(CFG))
    assert answers <= vocab
    for ex in train + test_split:
        assert set(ex["question"].split()) <= vocab
        assert ex["answer"] in answers
        assert ex["answer"] in S.answers_for(ex["qtype"], CFG)


def test_heldout_combos_split(train, test_split):
    held = set(S.heldout_combos(CFG))
    assert len(held) == CFG.n_heldout
    assert len({s for s, _ in held}) == len(held) == len({c for _, c in held})
    for ex in train:  # never queried, and by default never drawn at all in train
        assert not held & set(ex["targets"])
        assert not held & {(o[0], o[1]) for o in ex["objects"]}
    for ex in test_split:  # test always asks about a held-out combination
        assert held & set(ex["targets"]), ex
        if ex["qtype"] in ("color", "shape"):
            assert set(ex["targets"]) <= held
    # held-out combinations may be train distractors when asked, never queried
    cfg = S.SyntheticConfig(heldout_distractors_in_train=True)
    seen_as_distractor = False
    for ex in S.generate("train", 400, seed=1, cfg=cfg):
        assert not held & set(ex["targets"])
        seen_as_distractor |= bool(held & {(o[0], o[1]) for o in ex["objects"]})
    assert seen_as_distractor


def test_answer_balance(train):
    by_type = collections.defaultdict(collections.Counter)
    for ex in train:
        by_type[ex["qtype"]][ex["answer"]] += 1
    assert set(by_type) == set(CFG.qtypes)
    for q, counter in by_type.items():
        n = sum(counter.values())
        k = len(S.answers_for(q, CFG))
        assert set(counter) == set(S.answers_for(q, CFG)), (q, counter)
        # every answer within a factor ~1.6 of uniform: a blind guess stays near chance
        assert max(counter.values()) / n < 1.6 / k, (q, counter)


def test_baselines(train, test_split):
    chance = S.chance_accuracy(CFG)
    assert chance["color"] == pytest.approx(1 / 5) and chance["exist"] == 0.5
    assert chance["count"] == pytest.approx(1 / 3)
    assert 0 < chance["overall"] < 1
    blind = S.majority_baseline(train, test_split)
    for q in CFG.qtypes:  # a question-type prior is no better than a little above chance
        assert blind[q] < chance[q] + 0.12, (q, blind[q], chance[q])
    # sanity of the function itself: a perfect prior gets 1.0
    same = [{"qtype": "exist", "answer": "yes"}] * 3
    assert S.majority_baseline(same, same)["exist"] == 1.0


def test_config_variants():
    cfg = S.SyntheticConfig(image_size=96, qtypes=("count", "position"),
                            templates=S.PARAPHRASE_TEMPLATES, counts=(0, 1, 2),
                            shapes=("circle", "square", "diamond"), colors=("red", "cyan"),
                            n_heldout=1, n_objects=(3, 4))
    vocab = set(S.vocabulary(cfg))
    assert "zero" in vocab and "located" in vocab and "diamond" in vocab
    exs = list(S.generate("train", 200, seed=0, cfg=cfg))
    assert {e["qtype"] for e in exs} == {"count", "position"}
    assert all(e["image"].shape == (96, 96, 3) for e in exs)
    assert all(set(e["question"].split()) <= vocab for e in exs)
    assert "zero" in {e["answer"] for e in exs}
    assert "zero" not in {e["answer"] for e in S.generate("test", 100, seed=0, cfg=cfg)}
    with pytest.raises(ValueError):
        S.SyntheticConfig(shapes=("blob",))
    with pytest.raises(ValueError):
        S.SyntheticConfig(object_size=(5, 9))


def test_no_heldout_gives_iid_test():
    cfg = S.SyntheticConfig(n_heldout=0, counts=(0, 1, 2))
    assert S.heldout_combos(cfg) == []
    exs = list(S.generate("test", 300, seed=0, cfg=cfg))
    combos = {t for e in exs for t in e["targets"]}
    assert len(combos) == len(cfg.shapes) * len(cfg.colors)  # every combination may be asked
    assert "zero" in {e["answer"] for e in exs}
    assert all(e["answer"] == _true_answer(e) for e in exs)


def test_object_patch_mask():
    objs = [("circle", "red", 8, 0, 8), ("square", "blue", 20, 20, 8)]
    m = S.object_patch_mask(objs, 64, 8)
    assert m.shape == (64,) and m.dtype == bool
    assert set(np.flatnonzero(m)) == {1, 2 * 8 + 2, 2 * 8 + 3, 3 * 8 + 2, 3 * 8 + 3}
    assert set(np.flatnonzero(S.object_patch_mask(objs, 64, 8, [0]))) == {1}


def test_fast():
    t = time.perf_counter()
    n = sum(1 for _ in S.generate("train", 2000, seed=0))
    dt = time.perf_counter() - t
    assert n == 2000 and dt < 5.0, dt  # ~0.35 ms per example on a 2-core CPU
