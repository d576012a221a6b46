"""PPM training on packed inputs (issue 12): stage-1 / stage-2 objectives on AnyRes images,
videos and several images per prompt (a two-image row next to a tiled one-image row) of a tiny
OneVision (targets on real slots only, loss finite and moving), then the
trained PPM exported and loaded back."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from covipal_jax.configs import tiny_ov
from covipal_jax.data import anyres as data_anyres
from covipal_jax.inference import visual_inputs as vi
from covipal_jax.models import anyres
from covipal_jax.models.config import LlavaConfig
from covipal_jax.models.llava import Llava, init_params
from covipal_jax.pruning.ppm import PPM, PPMConfig
from covipal_jax.train import objectives as ob
from covipal_jax.weights import ppm_io

# Compile-heavy (tiny models, many programs): run in the CI step for slow tests.
pytestmark = pytest.mark.slow


@functools.lru_cache(maxsize=None)
def _model():
    cfg = LlavaConfig.from_config(tiny_ov.get_config().model)
    params = nn.unbox(jax.jit(lambda r: init_params(cfg, r))(jax.random.key(0)))
    return cfg, Llava(cfg), params


def _batch(cfg, kind, t=12):
    r = np.random.default_rng(0)
    if kind == "video":
        vis = vi.Video(jnp.asarray(r.standard_normal((2, 4, 28, 28, 3)), jnp.float32))
    elif kind == "multi":
        imgs = [r.integers(0, 256, s + (3,), dtype=np.uint8) for s in [(37, 91), (60, 50)]]
        x = data_anyres.preprocess_multi([imgs, imgs[:1]], data_anyres.AnyResConfig.for_model(cfg))
        vis = vi.MultiImage.from_layout(cfg, jnp.asarray(x.pixels), x.layout, x.image_valid)
    else:
        imgs = [r.integers(0, 256, s + (3,), dtype=np.uint8) for s in [(37, 91), (60, 50)]]
        x = data_anyres.preprocess(imgs, data_anyres.AnyResConfig.for_model(cfg))
        plan = anyres.pack_plan(x.layout, cfg.vision.grid[0], cfg.anyres_max_crops)
        vis = vi.AnyResImage(jnp.asarray(x.pixels), jnp.asarray(plan),
                             anyres.bucket_capacity(cfg, x.pixels.shape[1]))
    ids = r.integers(10, 100, (2, t)).astype(np.int32)
    mask = np.ones((2, t), bool)
    mask[0, :2], ids[0, :2] = False, 0
    ids[:, 3] = vi.placeholder_id(cfg, vis)
    if kind == "multi":
        ids[0, 6] = vi.placeholder_id(cfg, vis)   # row 0: two images, row 1: one (tiled)
    loss_mask = np.zeros((2, t), bool)
    loss_mask[:, -3:] = True
    return dict(visual=vis, ids=jnp.asarray(ids), mask=jnp.asarray(mask),
                loss_mask=jnp.asarray(loss_mask), weight=jnp.ones(2, jnp.float32))


def _train(kind, stage, steps):
    cfg, model, params = _model()
    batch = _batch(cfg, kind)
    pcfg = PPMConfig(n_v=cfg.num_vision_tokens, d_model=cfg.text.hidden_size, width=16,
                     num_layers=1, num_heads=2, mlp_ratio=2)
    module = PPM(pcfg)
    spec = ob.ObjectiveSpec(stage=stage, n_v=pcfg.n_v, k=pcfg.n_v // 4, guide_layer=1,
                            hard=stage == 2)
    p = nn.unbox(module.init(jax.random.key(1), jnp.zeros((1, pcfg.n_v, pcfg.d_model)),
                             jnp.zeros((1, 4, pcfg.d_model)), jnp.ones((1, 4), bool)))["params"]
    tx = optax.adam(3e-2)

    @jax.jit
    def step(p, opt, batch):
        prep = ob.prepare(model, params, batch, spec)
        (loss, m), g = jax.value_and_grad(ob.loss_fn, has_aux=True)(
            p, ppm_module=module, model=model, params=params, prep=prep, batch=batch,
            spec=spec, step=jnp.asarray(0))
        upd, opt = tx.update(g, opt, p)
        gnorm = optax.tree.norm(g)
        return optax.apply_updates(p, upd), opt, loss, gnorm, prep

    opt, losses = tx.init(p), []
    for _ in range(steps):
        p, opt, loss, gnorm, prep = step(p, opt, batch)
        losses.append(float(loss))
        assert np.isfinite(float(gnorm)) and float(gnorm) > 0
    return pcfg, p, losses, prep, batch


@pytest.mark.parametrize("kind", ["anyres", "video", "multi"])
def test_stage1_on_packed_input_trains_and_exports(kind, tmp_path):
    pcfg, p, losses, prep, batch = _train(kind, 1, 4)
    cfg = _model()[0]
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
    # the targets live on the real slots only and sum to 1 per example
    valid = np.asarray(prep.enc.valid)
    labels = np.asarray(prep.labels)
    assert (labels[~valid] == 0).all()
    np.testing.assert_allclose(labels.sum(-1), 1.0, rtol=1e-5)
    assert valid.shape[1] == batch["visual"].num_slots(cfg) != pcfg.n_v
    # the LLM sees HF's compact sequence: as many visible slots as real ones
    n_ph = int((np.asarray(batch["ids"]) == vi.placeholder_id(cfg, batch["visual"])).sum())
    assert int(prep.enc.seq_mask.sum()) == int(valid.sum() + np.asarray(batch["mask"]).sum()
                                               - n_ph)
    out = ppm_io.save_ppm(tmp_path / "ppm", {"params": p}, pcfg, cfg, {"trained_steps": 4})
    module, variables, meta = ppm_io.load_ppm(out, cfg)
    assert module.cfg == pcfg and meta["format_version"] == 2
    s = module.apply(variables, prep.enc.vision, prep.enc.text, prep.enc.ppm_text_mask,
                     coords=prep.enc.coords, valid=prep.enc.valid)
    assert np.isneginf(np.asarray(s)[~valid]).all() and np.isfinite(np.asarray(s)[valid]).all()


@pytest.mark.parametrize("kind", ["anyres", "video", "multi"])
def test_stage2_on_packed_input_is_finite_and_moves(kind):
    _, _, losses, _, _ = _train(kind, 2, 3)
    assert np.isfinite(losses).all() and losses[-1] != losses[0], losses
