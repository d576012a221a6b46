"""Tests for covipal_jax/train/pretrain.py: init, answer-only loss, batches, a short run learns."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from covipal_jax.inference import loading
from covipal_jax.data.synthetic import task as S
from covipal_jax.models.llava import init_params
from covipal_jax.train import pretrain as P

from tests import tiny


def test_sincos_2d_reads_rows_and_columns():
    t = P.sincos_2d(8, 64, cls=True)
    assert t.shape == (65, 64) and not t[0].any()
    grid = t[1:].reshape(8, 8, 64)
    # The first half depends on the row only, the second on the column only.
    np.testing.assert_allclose(grid[:, 0, :32], grid[:, 5, :32])
    np.testing.assert_allclose(grid[0, :, 32:], grid[3, :, 32:])
    assert len({tuple(np.round(r, 5)) for r in t[1:]}) == 64


def test_fan_in_init_scales():
    model, params = tiny.model_and_params()
    new = P.fan_in_init(params, jax.random.key(0))
    p = new["params"]
    q = p["language_model"]["layers"]["stack"]["q"]["kernel"]        # [L, D, N, H]
    assert float(jnp.std(q)) == pytest.approx(1 / np.sqrt(q.shape[1]), rel=0.1)
    o = p["language_model"]["layers"]["stack"]["o"]["kernel"]        # [L, N, H, D]
    assert float(jnp.std(o)) == pytest.approx(1 / np.sqrt(o.shape[1] * o.shape[2]), rel=0.1)
    pe = p["vision_tower"]["patch_embed"]["kernel"]                  # [P, P, 3, Dv]
    assert float(jnp.std(pe)) == pytest.approx(1 / np.sqrt(np.prod(pe.shape[:3])), rel=0.1)
    # Norms and biases untouched; shapes and dtypes kept.
    np.testing.assert_array_equal(p["language_model"]["final_norm"]["scale"],
                                  params["params"]["language_model"]["final_norm"]["scale"])
    assert jax.tree.map(lambda x: (x.shape, x.dtype), new) == jax.tree.map(
        lambda x: (x.shape, x.dtype), params)


def _data(n=64, max_len=20):
    tok = loading.builtin_tokenizer()
    exs = list(S.generate("train", n, seed=0))
    return P.encode_set(np.stack([e["image"] for e in exs]), [e["question"] for e in exs],
                        [e["answer"] for e in exs], tokenizer=tok, template="plain",
                        max_len=max_len), tok


def test_answer_loss_counts_only_answer_tokens():
    model, params = tiny.model_and_params()
    data, tok = _data(8)
    proc = loading.default_processor(model.cfg)
    batch = P.batch_at(data, 0, 4, 0, proc)
    loss, metrics = P.answer_loss(model, params, batch)
    # Changing the prompt's pad tokens or masking out the loss rows changes nothing / zeroes it.
    zero = dict(batch, weight=np.zeros(4, np.float32))
    assert float(P.answer_loss(model, params, zero)[0]) == 0.0
    # Reference: logits of the unpruned model at the rows before each answer token.
    logits, _ = model.apply(params, batch["pixels"], batch["ids"], batch["mask"])
    n_v = model.cfg.num_vision_tokens
    logp = jax.nn.log_softmax(logits, -1)
    nll = []
    for b in range(4):
        for t in np.flatnonzero(batch["loss_mask"][b]):
            nll.append(-float(logp[b, t + n_v - 2, batch["ids"][b, t]]))
    assert float(loss) == pytest.approx(np.mean(nll), rel=1e-5)
    assert 0.0 <= float(metrics["token_acc"]) <= 1.0


def test_batches_are_deterministic_and_cover_an_epoch():
    data, _ = _data(16)
    model, _ = tiny.model_and_params()
    proc = loading.default_processor(model.cfg)
    a = [P.batch_at(data, s, 4, 3, proc)["ids"] for s in range(4)]
    b = [P.batch_at(data, s, 4, 3, proc)["ids"] for s in range(4)]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    rows = {tuple(r) for x in a for r in x}
    assert len(rows) == len({tuple(r) for r in data.ids})


@pytest.mark.slow
def test_short_run_lowers_the_loss_and_stops_at_the_target():
    model, _ = tiny.model_and_params()
    params = nn.unbox(init_params(model.cfg, jax.random.key(1)))
    data, _ = _data(64)
    proc = loading.default_processor(model.cfg)
    pc = P.PretrainConfig(steps=40, batch_size=16, lr=3e-3, warmup_steps=3, eval_every=10,
                          target=0.5, min_steps=15)
    first = float(P.answer_loss(model, P.fan_in_init(params, jax.random.key(0)),
                                P.batch_at(data, 0, 16, 0, proc))[0])
    scores = iter([0.6, 0.1, 0.7, 0.9])   # above the target before min_steps: not a stop
    seen = []
    res = P.pretrain(model, params, data, pc, processor=proc,
                     evaluate=lambda p: seen.append(1) or next(scores), progress=False,
                     log=lambda s: None)
    assert res.reached_target and res.steps == 30 and len(seen) == 3
    assert [h["step"] for h in res.history] == [10, 20, 30]
    last = float(P.answer_loss(model, res.params, P.batch_at(data, 0, 16, 0, proc))[0])
    assert last < first
    # The caller's params are not donated away.
    jax.tree.map(np.asarray, params)


def test_trim_padding_keeps_the_loss():
    model, params = tiny.model_and_params()
    data, _ = _data(8, max_len=40)       # every row left-padded well below 40 tokens
    trimmed = data.trim_padding()
    n = int(data.mask.sum(axis=1).max())
    assert trimmed.ids.shape == (8, n) and trimmed.mask[:, 0].any()
    np.testing.assert_array_equal(trimmed.ids, data.ids[:, -n:])
    assert trimmed.trim_padding() is trimmed
    proc = loading.default_processor(model.cfg)
    full, short = P.batch_at(data, 0, 4, 0, proc), P.batch_at(trimmed, 0, 4, 0, proc)
    assert float(P.answer_loss(model, params, short)[0]) == pytest.approx(
        float(P.answer_loss(model, params, full)[0]), rel=1e-5)
