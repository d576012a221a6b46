"""Tests for covipal_jax/demo/evaluation.py: first-answer-token accuracy equals generation's first
token, static batches, answer ids, timing."""
from __future__ import annotations

import numpy as np
import pytest

from covipal_jax.inference import decoding, loading
from covipal_jax.demo import evaluation
from covipal_jax.data.synthetic import task as S
from covipal_jax.data import text as T
from covipal_jax import pruning

from tests import tiny


def test_answer_token_ids_builtin_and_cased():
    tok = loading.builtin_tokenizer()
    assert evaluation.answer_token_ids(tok, "plain", "what color is the ring ?", "red") == (
        tok.token_to_id("red"),)
    # The builtin vocabulary has no "Red": the cased variants collapse to <unk> or "red".
    ids = evaluation.answer_token_ids(tok, "plain", "is there a red ring ?", "yes", cased=True)
    assert ids[0] == tok.token_to_id("yes")


@pytest.mark.parametrize("method, keep", [("none", 1.0), ("random", 0.25), ("fastv", 0.5)])
def test_predictions_are_the_generators_first_token(method, keep):
    model, params = tiny.model_and_params()
    cfg = model.cfg
    tok = loading.builtin_tokenizer()
    proc = loading.default_processor(cfg)
    exs = list(S.generate("test", 5, seed=0))
    qs = [e["question"] for e in exs]
    ids, mask = T.encode_prompts(tok, qs, template="plain", buckets=(20,))
    answers = [evaluation.answer_token_ids(tok, "plain", q, e["answer"]) for q, e in
               zip(qs, exs)]
    images = np.stack([e["image"] for e in exs])
    ev = evaluation.Evaluator(model, params, processor=proc, images=images, ids=ids,
                              mask=mask, answer_ids=answers, batch_size=2)
    n_v = cfg.num_vision_tokens
    cls = pruning.get(method)
    spec = cls(keep=max(1, round(keep * n_v)) if cls.budgeted else 1.0)
    k = spec.k(n_v)
    res = ev.accuracy(spec)
    assert res.predicted.shape == (5,) and res.kept.shape == (5, k) and res.k == k
    assert res.seconds > 0
    want = np.array([a[0] for a in answers])
    np.testing.assert_array_equal(res.correct, res.predicted == want)
    assert res.accuracy == pytest.approx(np.mean(res.predicted == want))
    if method == "random":
        return  # the generator draws its own pruning rng
    gen = decoding.Generator(model, spec, max_new_tokens=1, eos_id=tok.eos_id)
    pixels = ev.pixels
    out = gen(params, pixels, ids, mask)
    np.testing.assert_array_equal(out.tokens[:, 0], res.predicted)
    # Same answers again (deterministic), and the compiled program is reused.
    again = ev.accuracy(spec)
    np.testing.assert_array_equal(again.predicted, res.predicted)


def test_evaluator_rejects_mismatched_inputs():
    model, params = tiny.model_and_params()
    proc = loading.default_processor(model.cfg)
    with pytest.raises(ValueError):
        evaluation.Evaluator(model, params, processor=proc,
                             images=np.zeros((2, 64, 64, 3), np.uint8),
                             ids=np.zeros((3, 8), np.int32), mask=np.ones((3, 8), bool),
                             answer_ids=[(5,)] * 3)
    ev = evaluation.Evaluator(model, params, processor=proc,
                              images=np.zeros((1, 64, 64, 3), np.uint8),
                              ids=np.full((1, 8), 4, np.int32), mask=np.ones((1, 8), bool),
                              answer_ids=[(5,)])
    with pytest.raises(ValueError, match="ppm"):
        ev.accuracy(pruning.PPMMethod(keep=4))
