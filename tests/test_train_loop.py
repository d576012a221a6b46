"""covipal_jax/train/loop.py (+ checkpoint.py, __main__.py): the tiny config learns stage 1
(top-k recall well above random), stage 2 follows, metrics / checkpoints / export are complete,
a non-finite loss stops the run without touching the last good checkpoint, and a checkpoint for
another PPM shape is refused with a clear error."""
from __future__ import annotations

import os

import numpy as np
import pytest

import train_util as tu

KEEP = 0.25  # configs/ppm_tiny.py: r; random scores give top-k recall r on average
NAN_STEP = 6  # the 7th update produces a NaN loss


@pytest.fixture(scope="module")
def runs():
    """The reference run and the NaN run, started together (two CPU cores)."""
    tu.start_reference()
    nan_dir = tu.workdir("nan")
    nan = tu.start(nan_dir, f"--config.train.inject_nan_step={NAN_STEP}",
                   "--config.train.save_every=4", "--config.train.eval_batches=0")
    return {"reference": tu.reference_run(), "nan": (nan, nan_dir)}


@pytest.mark.slow
def test_tiny_stage1_recall_rises_then_stage2(runs):
    ref = runs["reference"]
    records = tu.metrics(ref)
    evals = {r["step"]: r["eval_recall"] for r in records if "eval_recall" in r}
    before, after = evals[0], evals[tu.STEPS[0]]
    steps = [r for r in records if "loss" in r]
    s1 = [r for r in steps if r["stage"] == 1]
    s2 = [r for r in steps if r["stage"] == 2]
    rate = np.median([r["steps_per_s"] for r in s1[1:]])
    print(f"\ntiny stage 1: eval top-k recall {before:.3f} -> {after:.3f} (random {KEEP}); "
          f"train recall {s1[0]['recall']:.3f} -> {s1[-1]['recall']:.3f}; "
          f"{rate:.1f} steps/s ({1e3 / rate:.0f} ms/step incl. a checkpoint each, batch 16, CPU, "
          f"test XLA flags)")
    assert before < KEEP + 0.15
    assert after > 2.5 * KEEP and after > before + 0.3
    assert s1[-1]["loss"] < 0.9 * s1[0]["loss"]
    # One record per step, with the documented fields; stage 2 adds its loss terms.
    assert [r["step"] for r in steps] == list(range(1, sum(tu.STEPS) + 1))
    for r in steps:
        for k in ("stage", "loss", "recall", "lr", "steps_per_s", "tokens_per_s", "grad_norm"):
            assert k in r and np.isfinite(r[k]), (k, r)
    assert len(s2) == tu.STEPS[1]
    for r in s2:
        assert {"lm", "kl", "budget", "keep_prob"} <= set(r)
        assert r["kl"] >= -1e-6 and 0 < r["keep_prob"] < 1


@pytest.mark.slow
def test_checkpoints_and_export(runs):
    from covipal_jax.weights import ppm_io
    from covipal_jax.models.config import LlavaConfig
    from covipal_jax.train.checkpoint import Checkpointer

    ref = runs["reference"]
    ckpt = Checkpointer(os.path.join(ref, "checkpoints"))
    assert ckpt.all_steps() == list(range(1, sum(tu.STEPS) + 1))
    meta = ckpt.read_meta(tu.STEPS[0])
    assert meta["stage"] == 1 and meta["stage_step"] == tu.STEPS[0]
    meta = ckpt.read_meta(sum(tu.STEPS))
    assert meta["stage"] == 2 and meta["stage_step"] == tu.STEPS[1]
    assert meta["data_position"] == tu.STEPS[1] and meta["ppm"]["width"] == 32
    assert meta["config"]["train"]["stages"] == [1, 2] and "base_model" in meta
    # The exported PPM is the last checkpoint's params, loadable for inference.
    from covipal_jax.configs import ppm_tiny as ppm_tiny

    cfg = LlavaConfig.from_config(ppm_tiny.get_config().model)
    _, variables, info = ppm_io.load_ppm(os.path.join(ref, "ppm"), cfg)
    assert info["trained_steps"] == sum(tu.STEPS)
    last = tu.checkpoint_params(ref, sum(tu.STEPS))
    import jax

    flat, _ = jax.tree_util.tree_flatten_with_path(variables["params"])
    exported = {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}
    assert exported.keys() == last.keys()
    for k in last:
        np.testing.assert_array_equal(exported[k], last[k])


@pytest.mark.slow
def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(runs):
    proc, nan_dir = runs["nan"]
    rc = proc.wait(timeout=600)
    log = open(nan_dir + ".log").read()
    assert rc == 3, log[-3000:]
    assert "non-finite loss" in log and f"last good checkpoint is step 4" in log
    steps = sorted(int(s) for s in os.listdir(os.path.join(nan_dir, "checkpoints"))
                   if s.isdigit())
    assert steps == [4]
    # Nothing was logged for the failed step; the kept checkpoint is the reference's step 4
    # (the injection compiles another program: rounding differs at 1e-7, see train_util).
    assert max(tu.step_losses(nan_dir)) <= NAN_STEP
    good, ref = tu.checkpoint_params(nan_dir, 4), tu.checkpoint_params(runs["reference"], 4)
    for k in ref:
        if k not in tu.ZERO_GRADIENT_PARAMS:
            np.testing.assert_allclose(good[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
        assert np.all(np.isfinite(good[k]))
    assert not os.path.exists(os.path.join(nan_dir, "ppm"))


@pytest.mark.slow
def test_checkpoint_for_another_ppm_is_refused(runs):
    w = tu.workdir("mismatch")
    tu.copy_checkpoint(runs["reference"], 2, w)
    r = tu.run(w, "--config.ppm.width=48", "--config.ppm.num_heads=2")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "different model" in r.stderr and "ppm.width: 32 vs 48" in r.stderr


def test_stage_plan_and_schedule():
    from covipal_jax.configs import ppm_tiny as ppm_tiny
    from covipal_jax.train import loop

    c = ppm_tiny.get_config("stages=12,steps=7")
    plan = loop.stage_plan(c.train)
    assert [(p.stage, p.steps, p.start, p.stop) for p in plan] == [(1, 7, 0, 7), (2, 7, 7, 14)]
    c.train.stage, c.train.steps = 2, (5,)
    assert [(p.stage, p.steps) for p in loop.stage_plan(c.train)] == [(2, 5)]
    c.train.stage, c.train.stages, c.train.steps = 0, (1, 2), (3,)
    with pytest.raises(ValueError):
        loop.stage_plan(c.train)
    _, sched = loop.make_optimizer(c.train, 100, 1)
    lr, warm = c.train.lr, c.train.warmup_steps
    np.testing.assert_allclose(float(sched(0)), lr / warm, rtol=1e-6)   # never a no-op step
    np.testing.assert_allclose(float(sched(warm)), lr, rtol=1e-6)
    np.testing.assert_allclose(float(sched(100)), lr * c.train.end_lr_ratio, rtol=1e-5)


def test_llava15_7b_config_steps_trace():
    """configs/ppm_llava15_7b.py: both stages' steps trace at full size (shapes only)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from covipal_jax.configs import ppm_llava15_7b as cfg_7b
    from covipal_jax.weights import ppm_io
    from covipal_jax.models.config import LlavaConfig
    from covipal_jax.models.llava import Llava, init_params
    from covipal_jax.pruning.ppm import PPM
    from covipal_jax.train import loop, objectives

    c = cfg_7b.get_config()
    cfg = LlavaConfig.from_config(c.model)
    assert cfg.num_vision_tokens == 576 and c.train.guide_layer == 18
    frozen = jax.eval_shape(lambda r: nn.unbox(init_params(cfg, r)), jax.random.key(0))
    frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), frozen)
    pcfg = ppm_io.ppm_config(c, cfg)
    pp = jax.eval_shape(lambda r: nn.unbox(ppm_io.init_ppm(pcfg, r))["params"],
                        jax.random.key(0))
    b, t = 2, c.data.max_len
    sds = jax.ShapeDtypeStruct
    batch = dict(pixels=sds((b, 336, 336, 3), jnp.float32), ids=sds((b, t), jnp.int32),
                 mask=sds((b, t), bool), loss_mask=sds((b, t), bool),
                 weight=sds((b,), jnp.float32))
    for stage in (1, 2):
        spec = objectives.ObjectiveSpec.from_config(c.train, cfg, stage)
        assert spec.k == 144 and spec.loss == "mse"
        tx, _ = loop.make_optimizer(c.train, 100, stage)
        state = {"step": sds((), jnp.int32), "params": pp, "opt_state": jax.eval_shape(tx.init, pp)}
        new, metrics = jax.eval_shape(
            loop.make_step(Llava(cfg), PPM(pcfg), spec, tx, seed=0, deterministic=True),
            state, frozen, batch)
        assert jax.tree.map(lambda x: (x.shape, x.dtype), new) == \
            jax.tree.map(lambda x: (x.shape, x.dtype), state)
        assert metrics["loss"].shape == ()
        if stage == 2:
            assert {"lm", "kl", "budget", "keep_prob"} <= set(metrics)
