"""Tests for covipal_jax/train/finetune.py: PDrop* (full-model fine-tuning with PyramidDrop on)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from covipal_jax.inference.prefill import prefill
from covipal_jax.pruning.pdrop import PyramidDrop
from covipal_jax.train import finetune as F
from covipal_jax.train import pretrain as P

from tests import tiny

# Compile-heavy (tiny models, many programs): run in the CI step for slow tests.
pytestmark = pytest.mark.slow

ARG = "image=32"          # 16 vision tokens, 4 decoder layers (PDrop stages at 1 / 2 / 3)


def _batch(answer_len=2, seed=0):
    """A prompt of 9 real tokens (image at 2) + `answer_len` answer tokens, left-padded to 14."""
    pixels, ids, mask = tiny.batch(lengths=(9 + answer_len, 6 + answer_len), bucket=14,
                                   image_at=(2, 1), seed=seed, image_size=32)
    loss_mask = np.zeros_like(mask)
    loss_mask[:, -answer_len:] = True
    return {"pixels": pixels, "ids": ids, "mask": mask, "loss_mask": loss_mask,
            "weight": np.ones((ids.shape[0],), np.float32)}


def test_answer_queries_official_rows():
    ids = np.zeros((2, 8), np.int32)
    mask = np.ones((2, 8), bool)
    lm = np.zeros((2, 8), bool)
    lm[0, [3, 4, 6]] = True          # two spans: tokens before them are 2 and 5
    rows, valid = F.answer_queries(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(lm), 3)
    assert rows[0].tolist()[:2] == [2, 5] and valid[0].tolist() == [True, True, False]
    assert rows[1, 0] == 7 and valid[1].tolist() == [True, False, False]   # no answer: last


def test_keep_all_is_the_unpruned_forward():
    model, params = tiny.model_and_params(ARG)
    b = _batch()
    method = PyramidDrop(ratios=(1.0, 1.0))
    logits, k = F.pdrop_forward(model, params, method, b)
    full, _ = model.apply(params, b["pixels"], b["ids"], b["mask"])
    n_v = model.cfg.num_vision_tokens
    assert k == n_v and logits.shape == (2, 13, model.cfg.text.vocab_size)
    np.testing.assert_allclose(logits, full[:, n_v - 1:-1], atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("method", [PyramidDrop(), PyramidDrop(layers=(11, 21), ratios=(0.5, 0.25)),
                                    PyramidDrop(positions="original")])
def test_training_forward_matches_inference_prefill(method):
    """Single-turn: the training query row is the last prompt token, so the logits that
    predict the first answer token equal pruned prefill's next-token logits on the prompt."""
    model, params = tiny.model_and_params(ARG)
    b = _batch(answer_len=2)
    logits, k = F.pdrop_forward(model, params, method, b)
    assert k == method.stages(16, 4)[-1][1] < 16
    prompt_ids = np.concatenate([np.zeros((2, 2), np.int32), b["ids"][:, :-2]], axis=1)
    prompt_mask = np.concatenate([np.zeros((2, 2), bool), b["mask"][:, :-2]], axis=1)
    out = prefill(model, params, b["pixels"], prompt_ids, prompt_mask, method, extra=2)
    # Row j predicts ids[:, j + 1]: the first answer token (text index 12) is row 11.
    np.testing.assert_allclose(logits[:, 11], out.last_logits, atol=2e-4, rtol=2e-4)


def test_loss_decreases_llm_trains_tower_frozen():
    model, params = tiny.model_and_params(ARG)
    b = {k: jnp.asarray(v) for k, v in _batch().items()}
    method = PyramidDrop()
    trainable, frozen = F.split_params(params)
    assert set(frozen["params"]) == {"vision_tower"}
    assert {"language_model", "projector"} <= set(trainable["params"])
    grads = jax.grad(lambda p: F.finetune_loss(model, p, frozen, method, b)[0])(trainable)
    norm = lambda t: float(jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(t))))
    assert norm(grads["params"]["language_model"]["layers"]) > 0
    assert norm(grads["params"]["projector"]) > 0
    cfg = P.PretrainConfig(steps=20, lr=3e-3, warmup_steps=2, weight_decay=0.0)
    tx, _ = P.make_optimizer(cfg)
    state = P.init_state(jax.tree.map(jnp.array, trainable), tx)
    step = jax.jit(F.make_step(model, method, tx), donate_argnums=0)
    losses = []
    for _ in range(20):
        state, m = step(state, frozen, b)
        losses.append(float(m["loss"]))
        assert m["ok"] == 1.0
    assert losses[-1] < 0.5 * losses[0], losses
    moved = jax.tree.map(lambda a, c: float(jnp.max(jnp.abs(a - c))), state["params"],
                         trainable)
    assert max(jax.tree.leaves(moved["params"]["language_model"])) > 0
    merged = F.merge_params(state["params"], frozen)
    for a, c in zip(jax.tree.leaves(merged["params"]["vision_tower"]),
                    jax.tree.leaves(params["params"]["vision_tower"])):
        np.testing.assert_array_equal(a, c)


def test_rejects_other_methods():
    from covipal_jax.pruning.fastv import FastV

    model, params = tiny.model_and_params(ARG)
    with pytest.raises(ValueError, match="pdrop"):
        F.pdrop_forward(model, params, FastV(keep=0.5), _batch())


def _records(n=32):
    from covipal_jax.data.synthetic import task as S

    return [S.make_example("train", i, seed=0) for i in range(n)]


def test_trainer_mode_resumes_exports_and_generates(tmp_path):
    """`python -m covipal_jax.train --config configs/pdrop_star_tiny.py`: the PPM trainer's
    loop with the PDrop* state; stops / resumes from its Orbax checkpoint; the exported HF
    checkpoint loads and generates with method pdrop."""
    from covipal_jax import generate
    from covipal_jax.configs import pdrop_star_tiny
    from covipal_jax.train import finetune_trainer as FT
    from covipal_jax.train import loop

    c = pdrop_star_tiny.get_config("image=32,steps=6")
    with c.unlocked():
        c.train.batch_size = 4
        c.train.save_every = 3
        c.train.log_every = 1
        c.train.progress = False
        c.train.async_checkpoint = False
    src = _records()
    wd = str(tmp_path / "run")
    s1 = FT.train(c, wd, source=src, stop_after=3, log=lambda s: None)
    assert s1["step"] == 3 and not (tmp_path / "run" / "llava").exists()
    s2 = FT.train(c, wd, source=src, log=lambda s: None)
    assert s2["resumed_from"] == 3 and s2["step"] == 6
    steps = [r["step"] for r in loop.read_metrics(wd) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    export = tmp_path / "run" / "llava"
    assert (export / "config.json").exists() and (export / "pdrop_star.json").exists()
    # The exported tower is the base one (frozen); the LLM moved.
    from covipal_jax.inference import loading

    g = pdrop_star_tiny.get_config("image=32")
    with g.unlocked():
        g.checkpoint, g.tokenizer = str(export), ""
    tuned = loading.load(g).params["params"]
    base = loading.load(c, rng=jax.random.key(0)).params["params"]
    for a, b in zip(jax.tree.leaves(tuned["vision_tower"]), jax.tree.leaves(base["vision_tower"])):
        np.testing.assert_allclose(a, b, atol=1e-6)
    moved = [float(jnp.max(jnp.abs(a - b))) for a, b in
             zip(jax.tree.leaves(tuned["language_model"]), jax.tree.leaves(base["language_model"]))]
    assert max(moved) > 1e-4
    with g.unlocked():
        g.pruning.method = PyramidDrop.name
    from PIL import Image

    Image.fromarray(np.asarray(src[0]["image"], np.uint8)).save(tmp_path / "x.png")
    r = generate.run(g, str(tmp_path / "x.png"), src[0]["question"])
    assert r["method"] == PyramidDrop.name and r["vision_tokens_kept"] < r["vision_tokens_total"]
