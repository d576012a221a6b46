"""Tests for covipal_jax.eval.metrics against hand-computed values."""
from __future__ import annotations

import pytest

from covipal_jax.eval import metrics as mt


# ---------------------------------------------------------------------------- VQA / TextVQA
@pytest.mark.parametrize("raw, norm", [
    ("Two dogs.", "2 dogs"),
    ("the cat", "cat"),
    ("A Cat", "cat"),
    ("Yes.", "yes"),
    ("1,000", "1000"),
    ("dont", "don't"),
    ("hello-world", "hello world"),
    ("coca - cola", "coca cola"),
    ("What?", "what"),
    ("3.5", "3.5"),
    ("  none ", "0"),
])
def test_normalize_vqa_answer(raw, norm):
    assert mt.normalize_vqa_answer(raw) == norm


def test_vqa_accuracy_number_words():
    # normalised gts: "2" x3, "2 dogs", "3" x6. Leave-one-out: the 3 "2"s see 2 matches (2/3),
    # the 7 others see 3 (1.0): (3 * 2/3 + 7) / 10 = 0.9.
    gts = ["two", "2", "2", "two dogs", "3", "3", "3", "3", "3", "3"]
    assert mt.vqa_accuracy("Two.", gts) == pytest.approx(0.9)
    assert mt.vqa_accuracy("2", gts) == pytest.approx(0.9)
    assert mt.vqa_accuracy("three", gts) == pytest.approx(1.0)
    assert mt.vqa_accuracy("four", gts) == 0.0


def test_vqa_accuracy_articles():
    # "cat" matches 2 normalised gts: LOO gives 1/3 twice and 2/3 eight times -> 0.6.
    gts = ["cat", "the cat"] + ["a dog"] * 8
    assert mt.vqa_accuracy("cat", gts) == pytest.approx(0.6)
    assert mt.vqa_accuracy("The cat", gts) == pytest.approx(0.6)
    assert mt.vqa_accuracy("dog", gts) == pytest.approx(1.0)


def test_textvqa_metrics_mean():
    recs = [
        {"qid": "1", "pred": "two", "answer": "2", "answers": ["2"] * 10},
        {"qid": "2", "pred": "cat", "answer": "dog", "answers": ["cat", "the cat"] + ["dog"] * 8},
    ]
    m = mt.compute_metrics("textvqa", recs)
    assert m["score"] == pytest.approx(100 * (1.0 + 0.6) / 2)
    assert m["n"] == 2


# ---------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("text, want", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("B) dog", "B"), ("[C]", "C"), ("C:", "C"),
    ("The answer is B", "B"), ("The answer is (C).", "C"), ("Answer: D", "D"),
    ("The correct answer is option D.", "D"), ("Option A is wrong, the answer is C", "C"),
    ("I think it is C", "C"), ("**B**", "B"), ("A", "A"), ("A. cat", "A"),
    ("dog", "B"), ("It is a fish.", "D"),
    ("E", None), ("", None), ("I am not sure", None), ("b", None),
])
def test_extract_choice(text, want):
    assert mt.extract_choice(text, ["cat", "dog", "bird", "fish"]) == want


def test_extract_choice_respects_option_count():
    assert mt.extract_choice("D", ["x", "y", "z"]) is None
    assert mt.extract_choice("D", num_options=4) == "D"


@pytest.mark.parametrize("pred, want", [
    ("yes", "yes"), ("No", "no"), ("Yes, there is.", "yes"), ("nope", "no"),
    ("The answer is yes", "other"), ("Not really", "no"), ("", "other"),
])
def test_parse_mme_answer(pred, want):
    assert mt.parse_mme_answer(pred) == want


@pytest.mark.parametrize("pred, want", [
    ("Yes", "yes"), ("No, there is no dog.", "no"), ("There is not a dog", "no"),
    ("yes, there is. No doubt", "yes"), ("no", "no"), ("Nope", "yes"),
])
def test_parse_pope_answer(pred, want):
    assert mt.parse_pope_answer(pred) == want


# ---------------------------------------------------------------------------- MME
def _mme(task, image, answer, pred):
    return {"qid": f"{task}/{image}/{answer}", "pred": pred, "answer": answer,
            "meta": {"category": task, "image_key": f"{task}/{image}"}}


def test_mme_acc_plus_and_totals():
    recs = [
        _mme("existence", "1.jpg", "yes", "Yes"),
        _mme("existence", "1.jpg", "no", "No, there is not."),
        _mme("existence", "2.jpg", "yes", "no"),
        _mme("existence", "2.jpg", "no", "no"),
        _mme("code_reasoning", "3.png", "yes", "The answer is yes"),  # "other": wrong
        _mme("code_reasoning", "3.png", "no", "nope"),
    ]
    m = mt.compute_metrics("mme", recs)
    ex = m["tasks"]["existence"]
    assert (ex["acc"], ex["acc_plus"], ex["score"]) == (75.0, 50.0, 125.0)
    cr = m["tasks"]["code_reasoning"]
    assert (cr["acc"], cr["acc_plus"], cr["score"]) == (50.0, 0.0, 50.0)
    assert m["perception"] == 125.0 and m["cognition"] == 50.0 and m["total"] == 175.0
    assert mt.headline_score("mme", m) == 175.0
    assert mt.headline_score("mme", m, mme="perception") == 125.0
    assert "OCR" in m["missing_tasks"] and "existence" not in m["missing_tasks"]


def test_mme_task_names_case_insensitive():
    m = mt.compute_metrics("mme", [_mme("ocr", "1.jpg", "yes", "yes"),
                                   _mme("ocr", "1.jpg", "no", "no")])
    assert m["perception"] == 200.0 and m["unknown_tasks"] == []


# ---------------------------------------------------------------------------- POPE
def test_pope_f1_per_split():
    labels = ["yes", "yes", "no", "no", "yes"]
    preds = ["Yes", "No, there is no dog.", "There is not a dog", "yes, there is.", "no"]
    recs = [{"qid": f"random/{i}", "pred": p, "answer": y, "meta": {"category": "random"}}
            for i, (p, y) in enumerate(zip(preds, labels))]
    recs += [{"qid": "popular/0", "pred": "yes", "answer": "yes", "meta": {"category": "popular"}},
             {"qid": "popular/1", "pred": "no", "answer": "no", "meta": {"category": "popular"}}]
    m = mt.compute_metrics("pope", recs)
    r = m["splits"]["random"]
    # parsed: yes no no yes no -> TP=1 FP=1 TN=1 FN=2
    assert (r["tp"], r["fp"], r["tn"], r["fn"]) == (1, 1, 1, 2)
    assert r["precision"] == pytest.approx(50.0)
    assert r["recall"] == pytest.approx(100 / 3)
    assert r["f1"] == pytest.approx(40.0)
    assert r["accuracy"] == pytest.approx(40.0)
    assert r["yes_ratio"] == pytest.approx(40.0)
    assert m["splits"]["popular"]["f1"] == pytest.approx(100.0)
    assert m["score"] == pytest.approx(70.0) and m["f1"] == pytest.approx(70.0)


def test_binary_metrics_no_positives_predicted():
    m = mt.binary_metrics(["no", "no"], ["yes", "no"])
    assert m["precision"] == 0.0 and m["f1"] == 0.0 and m["accuracy"] == 50.0


# ---------------------------------------------------------------------------- GQA
def test_gqa_exact_match_normalisation():
    recs = [
        {"qid": "1", "pred": "Yes.", "answer": "yes", "meta": {"structural": "verify"}},
        {"qid": "2", "pred": " Left ", "answer": "left", "meta": {"structural": "query"}},
        {"qid": "3", "pred": "the cat", "answer": "cat", "meta": {"structural": "query"}},
        {"qid": "4", "pred": "t-shirt", "answer": "t-shirt", "meta": {"structural": "query"}},
        {"qid": "5", "pred": "x", "answer": None},
    ]
    m = mt.compute_metrics("gqa", recs)
    assert m["score"] == pytest.approx(75.0)
    assert m["unscored"] == 1 and m["n"] == 4
    assert m["by_structural"] == {"query": pytest.approx(200 / 3), "verify": 100.0}


# ---------------------------------------------------------------------------- multiple choice
def test_mc_accuracy_categories_choice_and_errors():
    opts = ["cat", "dog", "bird"]
    recs = [
        {"qid": "1", "pred": "The answer is B.", "answer": "B", "options": opts,
         "meta": {"category": "x"}},
        {"qid": "2", "pred": "(A)", "answer": "C", "options": opts, "meta": {"category": "x"}},
        {"qid": "3", "pred": "garbage", "choice": "C", "answer": "C", "options": opts,
         "meta": {"category": "y"}},
        {"qid": "4", "pred": "no idea", "answer": "A", "options": opts,
         "meta": {"category": "y"}},
        {"qid": "5", "pred": "", "answer": "A", "options": opts, "error": "image: OSError"},
    ]
    for bench in ("scienceqa", "seed", "ai2d", "mmstar"):
        m = mt.compute_metrics(bench, recs)
        assert m["score"] == 50.0
        assert m["by_category"] == {"x": 50.0, "y": 50.0}
        assert m["unparsed"] == 1 and m["errors"] == 1 and m["n"] == 4


def _mmb(base, rot, answer, pred, cat="c1"):
    return {"qid": f"{base}@{rot}", "pred": pred, "answer": answer,
            "options": ["w", "x", "y", "z"],
            "meta": {"base_index": base, "rotation": rot, "category": cat}}


def test_mmbench_circular():
    recs = []
    # q1: every rotation right.
    recs += [_mmb(1, k, "ABCD"[(2 - k) % 4], "ABCD"[(2 - k) % 4]) for k in range(4)]
    # q2: rotation 0 right, rotation 2 wrong.
    recs += [_mmb(2, k, "A", "A" if k != 2 else "B", "c2") for k in range(4)]
    # q3: rotation 0 wrong, the others right.
    recs += [_mmb(3, k, "D", "D" if k else "C", "c2") for k in range(4)]
    m = mt.compute_metrics("mmbench", recs)
    assert m["circular"] == pytest.approx(100 / 3)
    assert m["plain"] == pytest.approx(200 / 3)
    assert m["score"] == m["circular"]
    assert m["n_questions"] == 3
    assert m["by_category"] == {"c1": 100.0, "c2": 0.0}


def test_unknown_benchmark():
    with pytest.raises(KeyError):
        mt.compute_metrics("vqav3", [])
