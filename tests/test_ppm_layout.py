"""The layout-aware PPM (issue 12): positions from (kind, view / frame index, row, col), any N;
a PPM trained on single images prunes AnyRes images and videos (prefill, generation)."""
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
from covipal_jax.inference import decoding
from covipal_jax.inference import prefill as P
from covipal_jax.inference import visual_inputs as vi
from covipal_jax.models import anyres
from covipal_jax.models.config import LlavaConfig
from covipal_jax.models.llava import Llava, init_params
from covipal_jax.pruning import ppm_layout as L
from covipal_jax.pruning.base import PruneContext
from covipal_jax.pruning.ppm import PPM, PPMConfig, PPMMethod, context_layout
from covipal_jax.pruning.select import example_budget
from covipal_jax.train import objectives as ob

# Compile-heavy (tiny models, many programs): run in the CI step for slow tests.
pytestmark = pytest.mark.slow


def test_kinds_agree_with_the_models():
    assert (L.KIND_INVALID, L.KIND_BASE, L.KIND_GRID, L.KIND_NEWLINE) == (
        anyres.KIND_INVALID, anyres.KIND_BASE, anyres.KIND_GRID, anyres.KIND_NEWLINE)
    assert L.KIND_FRAME == vi.KIND_FRAME


def test_geometry_of_single_image_anyres_and_video():
    kind, index, y, x = L.layout_geometry(L.single_image_coords(2, (3, 4)))
    assert kind.shape == (2, 12) and (np.asarray(kind) == 0).all()
    np.testing.assert_allclose(y[0, :4], 0.5 / 3)
    np.testing.assert_allclose(x[0, :4], (np.arange(4) + 0.5) / 4)
    assert (np.asarray(index) == 0).all()
    assert L.default_grid(12) == (3, 4) and L.default_grid(16) == (4, 4)
    # video: 3 frames of 2 x 2, then the newline
    kind, index, y, x = L.layout_geometry(vi.video_coords(1, 3, 2))
    np.testing.assert_array_equal(index[0], [0] * 4 + [1] * 4 + [2] * 4 + [3])
    np.testing.assert_allclose(y[0, :4], [0.25, 0.25, 0.75, 0.75])
    np.testing.assert_allclose(y[0, 4:8], [0.25, 0.25, 0.75, 0.75])   # per frame
    np.testing.assert_array_equal(kind[0], [L.KIND_FRAME] * 12 + [L.KIND_NEWLINE])
    assert float(x[0, -1]) == 1.0
    # AnyRes: a 2 x 2 base, a 2 x 3 crop map with its newline column, padding
    coords = jnp.asarray([[[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1],
                           [1, 0, 0], [1, 0, 1], [1, 0, 2], [2, 0, 3],
                           [1, 1, 0], [1, 1, 1], [1, 1, 2], [2, 1, 3], [-1, -1, -1]]])
    kind, index, y, x = L.layout_geometry(coords)
    np.testing.assert_allclose(x[0, 4:8], [1 / 6, 0.5, 5 / 6, 1.0])
    np.testing.assert_allclose(y[0, 8:12], 0.75)
    assert (np.asarray(index) == 0).all() and bool(jnp.all(jnp.isfinite(y)))


CFG = PPMConfig(n_v=16, d_model=24, width=16, num_layers=2, num_heads=4, mlp_ratio=2)


@functools.lru_cache(maxsize=None)
def _ppm():
    m = PPM(CFG)
    v = m.init(jax.random.key(0), jnp.zeros((1, 16, 24)), jnp.zeros((1, 3, 24)),
               jnp.ones((1, 3), bool))
    return m, nn.unbox(v)


def test_default_coords_are_the_single_image_grid_and_any_n_runs():
    m, v = _ppm()
    r = np.random.default_rng(0)
    hv, ht = jnp.asarray(r.normal(size=(2, 16, 24))), jnp.asarray(r.normal(size=(2, 5, 24)))
    tm = jnp.ones((2, 5), bool)
    s = m.apply(v, hv, ht, tm)
    s2 = m.apply(v, hv, ht, tm, coords=L.single_image_coords(2, (4, 4)))
    np.testing.assert_allclose(s, s2, rtol=1e-6)
    # a plain PruneContext gets its grid's coords
    ctx = PruneContext(vision_tokens=hv, text_embeds=ht, text_mask=tm, grid=(4, 4))
    np.testing.assert_array_equal(context_layout(ctx)[0], L.single_image_coords(2, (4, 4)))
    # the positions matter: another layout of the same 16 tokens scores differently
    s3 = m.apply(v, hv, ht, tm, coords=L.single_image_coords(2, (2, 8)))
    assert float(jnp.max(jnp.abs(s3 - s))) > 1e-4
    # video layout, 4 frames of 2 x 2 + newline = 17 slots
    hv17 = jnp.asarray(r.normal(size=(2, 17, 24)))
    sv = m.apply(v, hv17, ht, tm, coords=vi.video_coords(2, 4, 2))
    assert sv.shape == (2, 17) and bool(jnp.all(jnp.isfinite(sv)))


def test_padding_slots_get_no_score_and_no_influence():
    m, v = _ppm()
    r = np.random.default_rng(1)
    coords = np.array(L.single_image_coords(2, (4, 5)))
    coords[0, 14:] = -1                     # row 0: 14 real slots, 6 padding
    coords, valid = jnp.asarray(coords), jnp.asarray(coords[..., 0] >= 0)
    hv = jnp.asarray(r.normal(size=(2, 20, 24)))
    ht, tm = jnp.asarray(r.normal(size=(2, 4, 24))), jnp.ones((2, 4), bool)
    s = m.apply(v, hv, ht, tm, coords=coords, valid=valid)
    assert bool(jnp.all(jnp.isneginf(s[0, 14:]))) and bool(jnp.all(jnp.isfinite(s[0, :14])))
    assert bool(jnp.all(jnp.isfinite(s[1])))
    garbage = jnp.where(valid[..., None], hv, 1e6 * jnp.ones_like(hv))
    s2 = m.apply(v, garbage, ht, tm, coords=coords)        # valid from the coords' kinds
    np.testing.assert_allclose(s2[0, :14], s[0, :14], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- tiny OneVision

@functools.lru_cache(maxsize=None)
def _model():
    cfg = LlavaConfig.from_config(tiny_ov.get_config().model)
    params = nn.unbox(jax.jit(lambda r: init_params(cfg, r))(jax.random.key(0)))
    return cfg, Llava(cfg), params


def _single_batch(cfg, seed=0, b=2, t=10):
    r = np.random.default_rng(seed)
    s = cfg.vision.image_size
    ids = r.integers(10, 100, (b, t)).astype(np.int32)
    ids[:, 2] = cfg.image_token_id
    loss_mask = np.zeros((b, t), bool)
    loss_mask[:, -3:] = True
    return dict(pixels=jnp.asarray(r.standard_normal((b, s, s, 3)), jnp.float32),
                ids=jnp.asarray(ids), mask=jnp.ones((b, t), bool),
                loss_mask=jnp.asarray(loss_mask), weight=jnp.ones(b, jnp.float32))


@functools.lru_cache(maxsize=None)
def _single_image_trained_ppm():
    """A layout PPM trained a few stage-1 steps on single images of the tiny OneVision."""
    cfg, model, params = _model()
    pcfg = PPMConfig(n_v=cfg.num_vision_tokens, d_model=cfg.text.hidden_size, width=16,
                     num_layers=1, num_heads=2, mlp_ratio=2)
    module = PPM(pcfg)
    spec = ob.ObjectiveSpec(stage=1, n_v=pcfg.n_v, k=pcfg.n_v // 2, guide_layer=1)
    batch = _single_batch(cfg)
    p = nn.unbox(module.init(jax.random.key(3), jnp.zeros((1, pcfg.n_v, pcfg.d_model)),
                             jnp.zeros((1, 4, pcfg.d_model)), jnp.ones((1, 4), bool)))["params"]
    tx = optax.adam(1e-2)

    @jax.jit
    def step(p, opt):
        prep = ob.prepare(model, params, batch, spec)
        (loss, _), g = jax.value_and_grad(ob.loss_fn, has_aux=True)(
            p, ppm_module=module, model=model, params=params, prep=prep, batch=batch,
            spec=spec, step=jnp.asarray(0))
        upd, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, upd), opt, loss

    opt, losses = tx.init(p), []
    for _ in range(4):
        p, opt, loss = step(p, opt)
        losses.append(float(loss))
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
    return pcfg, {"params": p}


def _prompt(b, t, token):
    ids = np.random.default_rng(0).integers(10, 100, (b, t)).astype(np.int32)
    ids[:, 3] = token
    mask = np.ones((b, t), bool)
    mask[0, :2], ids[0, :2] = False, 0
    return jnp.asarray(ids), jnp.asarray(mask)


def _visual(cfg, kind):
    if kind == "video":
        r = np.random.default_rng(0)
        return vi.Video(jnp.asarray(r.standard_normal((2, 4, 28, 28, 3)), jnp.float32)), \
            cfg.video_token_id
    imgs = [np.random.default_rng(i).integers(0, 256, s + (3,), dtype=np.uint8)
            for i, s in enumerate([(37, 91), (60, 50)])]
    x = data_anyres.preprocess(imgs, data_anyres.AnyResConfig.for_model(cfg))
    plan = anyres.pack_plan(x.layout, cfg.vision.grid[0], cfg.anyres_max_crops)
    cap = anyres.bucket_capacity(cfg, x.pixels.shape[1])
    return vi.AnyResImage(jnp.asarray(x.pixels), jnp.asarray(plan), cap), cfg.image_token_id


@pytest.mark.parametrize("kind", ["anyres", "video"])
def test_single_image_ppm_prunes_anyres_and_video(kind):
    cfg, model, params = _model()
    pcfg, variables = _single_image_trained_ppm()
    vis, token = _visual(cfg, kind)
    n = vis.num_slots(cfg)
    assert n != pcfg.n_v
    ids, mask = _prompt(2, 16, token)
    method = PPMMethod(keep=0.25, ppm=pcfg)
    k = method.k(n)
    ctx, _, _ = vi.packed_context(model, params, vis, ids, mask, method)
    res = method.select(ctx, k, variables)
    valid = np.asarray(ctx.valid)
    budget = np.asarray(example_budget(method.keep, k, ctx.valid))
    scores = np.asarray(res.scores)
    assert np.isfinite(scores[valid]).all() and np.isneginf(scores[~valid]).all()
    out = P.prefill(model, params, vis, ids, mask, method, extra=2, variables=variables)
    kept = np.asarray(out.kept)
    assert kept.shape == (2, k)
    for b in range(2):
        real = kept[b][kept[b] >= 0]
        assert len(real) == budget[b] and len(set(real.tolist())) == len(real)
        assert valid[b, real].all(), "a padding slot was kept"
    assert bool(jnp.all(jnp.isfinite(out.last_logits)))
    if kind == "anyres":  # generation once (compiling is the cost on CPU)
        return
    gen = decoding.Generator(model, method, max_new_tokens=3, eos_id=2)
    res = gen(params, vis, ids, mask, variables=variables)
    assert res.tokens.shape == (2, 3)
    assert gen.compilations()["prefill"] == 1
