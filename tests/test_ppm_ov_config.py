"""configs/ppm_llava_ov_7b.py: the paper's settings, and both stages' trainer steps trace at full
size (jax.eval_shape: shapes only, nothing allocated)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from covipal_jax.configs import ppm_llava_ov_7b as cfg_ov
from covipal_jax.models.config import LlavaConfig
from covipal_jax.models.llava import Llava, init_params
from covipal_jax.pruning.ppm import PPM
from covipal_jax.train import loop, objectives
from covipal_jax.weights import ppm_io


def test_paper_settings_and_options():
    c = cfg_ov.get_config()
    t = c.train
    assert c.model.text["num_layers"] == 28 and t.guide_layer == 16
    assert t.stages == (1, 2) and t.loss == "mse" and t.label_queries == "all"
    assert (t.lambda_kl, t.lambda_budget, t.stage2_hard) == (0.0, 0.0, True)  # LM loss only
    assert t.keep == 0.25 == c.pruning.keep and c.pruning.method == "ppm"
    assert c.data.kind == "llava" and c.template == "qwen2"
    o = cfg_ov.get_config("layers=14,stages=1,queries=text_after_image,kl=1,budget=10,hard=0,"
                          "keep=0.5")
    assert o.model.text["num_layers"] == 14 and o.train.guide_layer == 8  # the same depth
    assert o.train.stages == (1,) and o.train.steps == (5000,)
    assert (o.train.label_queries, o.train.lambda_kl, o.train.lambda_budget,
            o.train.stage2_hard, o.train.keep) == ("text_after_image", 1.0, 10.0, False, 0.5)
    with pytest.raises(ValueError, match="unknown config arg"):
        cfg_ov.get_config("guide=3")


def test_trainer_state_and_steps_trace_at_full_size():
    c = cfg_ov.get_config()
    cfg = LlavaConfig.from_config(c.model)
    assert cfg.num_vision_tokens == 729 and cfg.text.num_layers == 28
    frozen = jax.eval_shape(lambda r: nn.unbox(init_params(cfg, r)), jax.random.key(0))
    frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), frozen)
    assert "image_newline" in frozen["params"]  # AnyRes model (single base view in training)
    pcfg = ppm_io.ppm_config(c, cfg)
    pp = jax.eval_shape(lambda r: nn.unbox(ppm_io.init_ppm(pcfg, r))["params"],
                        jax.random.key(0))
    n_ppm = sum(x.size for x in jax.tree.leaves(pp))
    assert 1e6 < n_ppm < 5e7  # lightweight next to the 8B frozen model
    b, t = 2, c.data.max_len
    s = cfg.vision.image_size
    sds = jax.ShapeDtypeStruct
    batch = dict(pixels=sds((b, s, s, 3), jnp.float32), ids=sds((b, t), jnp.int32),
                 mask=sds((b, t), bool), loss_mask=sds((b, t), bool),
                 weight=sds((b,), jnp.float32))
    for stage in (1, 2):
        spec = objectives.ObjectiveSpec.from_config(c.train, cfg, stage)
        assert spec.k == 182 and spec.loss == "mse" and spec.guide_layer == 16
        tx, _ = loop.make_optimizer(c.train, 100, stage)
        state = {"step": sds((), jnp.int32), "params": pp,
                 "opt_state": jax.eval_shape(tx.init, pp)}
        new, metrics = jax.eval_shape(
            loop.make_step(Llava(cfg), PPM(pcfg), spec, tx, seed=0, deterministic=True),
            state, frozen, batch)
        assert jax.tree.map(lambda x: (x.shape, x.dtype), new) == \
            jax.tree.map(lambda x: (x.shape, x.dtype), state)
        assert metrics["loss"].shape == ()
        if stage == 2:
            assert {"lm", "kl", "budget", "keep_prob"} <= set(metrics)
