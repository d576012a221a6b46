"""`pool` (stride) per view on packed AnyRes images and videos (issue 12): the traced
membership rule equals `pool_indices`, padding is never kept, newlines always, exact budget."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from covipal_jax import pruning
from covipal_jax.configs import tiny_ov
from covipal_jax.data import anyres as data_anyres
from covipal_jax.inference import prefill as P
from covipal_jax.inference import visual_inputs as vi
from covipal_jax.models import anyres
from covipal_jax.models.config import LlavaConfig
from covipal_jax.models.llava import Llava, init_params
from covipal_jax.pruning.select import example_budget
from covipal_jax.pruning.simple import pool_indices, pool_member

# Compile-heavy (tiny models, many programs): run in the CI step for slow tests.
pytestmark = pytest.mark.slow

SHAPES = [(37, 91), (60, 50), (200, 30)]


@functools.lru_cache(maxsize=None)
def _model():
    cfg = LlavaConfig.from_config(tiny_ov.get_config().model)
    return cfg, Llava(cfg), nn.unbox(init_params(cfg, jax.random.key(0)))


def _ctx(visual, token):
    cfg, model, params = _model()
    b = visual.batch
    ids = np.full((b, 12), 7, np.int32)
    ids[:, 3] = token
    ctx, _, _ = vi.packed_context(model, params, visual, jnp.asarray(ids),
                                  jnp.ones((b, 12), bool), pruning.get("pool")())
    return ctx


def _anyres_input(shapes, max_crops=None):
    cfg, _, _ = _model()
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    x = data_anyres.preprocess(imgs, data_anyres.AnyResConfig.for_model(cfg))
    plan = anyres.pack_plan(x.layout, cfg.vision.grid[0],
                            cfg.anyres_max_crops if max_crops is None else max_crops)
    return vi.AnyResImage(jnp.asarray(x.pixels), jnp.asarray(plan),
                          anyres.bucket_capacity(cfg, x.pixels.shape[1])), plan


def test_pool_member_equals_pool_indices():
    for h in range(1, 10):
        for w in range(1, 10):
            r, c = np.divmod(np.arange(h * w), w)
            ms = np.arange(0, h * w + 1)
            got = np.asarray(pool_member(r[None], c[None], h, w, ms[:, None]))
            for m in ms:
                want = np.zeros(h * w, bool)
                if m:
                    want[pool_indices(h, w, int(m))] = True
                np.testing.assert_array_equal(got[m], want, err_msg=f"{h}x{w} m={m}")


def _check(ctx, method, res):
    kind = np.asarray(ctx.coords[..., 0])
    valid = np.asarray(ctx.valid)
    budget = np.asarray(example_budget(method.keep, method.k(ctx.n_v), ctx.valid))
    out = []
    for b in range(ctx.batch):
        kept = np.asarray(res.indices[b])[np.asarray(res.valid[b])]
        assert len(set(kept.tolist())) == len(kept) == budget[b]
        assert valid[b, kept].all(), "a padding slot was kept"
        nl = np.flatnonzero(valid[b] & (kind[b] == anyres.KIND_NEWLINE))
        assert set(nl.tolist()) <= set(kept.tolist())
        out.append((kept, budget[b] - len(nl)))
    return out


@pytest.mark.parametrize("keep,max_crops", [(0.5, None), (0.25, None), (30, None), (0.5, 2)])
def test_anyres_pool_is_the_uniform_subgrid_of_each_view(keep, max_crops):
    cfg, _, _ = _model()
    visual, plan = _anyres_input(SHAPES, max_crops)
    ctx = _ctx(visual, cfg.image_token_id)
    method = pruning.get("pool")(keep=keep)
    res = method.select(ctx, method.k(ctx.n_v))
    g = cfg.vision.grid[0]
    coords = np.asarray(ctx.coords)
    for b, (kept, m_total) in enumerate(_check(ctx, method, res)):
        oh, ow = int(plan[b, 6]), int(plan[b, 7])
        n_base, n_grid = g * g, oh * ow
        m_base = int(np.round(np.float32(m_total * n_base / (n_base + n_grid))))
        base = kept[coords[b, kept, 0] == anyres.KIND_BASE]
        np.testing.assert_array_equal(base, pool_indices(g, g, m_base) if m_base else [])
        cells = coords[b, kept][coords[b, kept, 0] == anyres.KIND_GRID]
        want = pool_indices(oh, ow, m_total - m_base) if m_total - m_base else []
        np.testing.assert_array_equal(cells[:, 1] * ow + cells[:, 2], want)


def test_video_pool_is_the_uniform_subgrid_of_each_frame():
    cfg, _, _ = _model()
    rng = np.random.default_rng(1)
    frames = 4
    visual = vi.Video(jnp.asarray(rng.standard_normal((2, frames, 28, 28, 3)), jnp.float32))
    ctx = _ctx(visual, cfg.video_token_id)
    method = pruning.get("pool")(keep=0.4)
    res = method.select(ctx, method.k(ctx.n_v))
    p = -(-cfg.vision.grid[0] // 2)
    for kept, m_total in _check(ctx, method, res):
        for f in range(frames):
            m_f = (f + 1) * m_total // frames - f * m_total // frames
            got = kept[(kept >= f * p * p) & (kept < (f + 1) * p * p)] - f * p * p
            np.testing.assert_array_equal(got, pool_indices(p, p, m_f) if m_f else [])


def test_avg_refused_and_pruned_prefill_runs():
    cfg, model, params = _model()
    visual, _ = _anyres_input(SHAPES[:2])
    ctx = _ctx(visual, cfg.image_token_id)
    m = pruning.get("pool")(keep=0.5, mode="avg")
    with pytest.raises(ValueError, match="multi-crop"):
        m.select(ctx, m.k(ctx.n_v))
    ids = np.full((2, 12), 7, np.int32)
    ids[:, 3] = cfg.image_token_id
    ids, mask = jnp.asarray(ids), jnp.ones((2, 12), bool)
    method = pruning.get("pool")(keep=0.5)
    logits, _, kept = P.forward_packed(model, params, visual, ids, mask, method)
    out = P.prefill(model, params, visual, ids, mask, method, extra=2)
    np.testing.assert_array_equal(out.kept, kept)
    assert float(jnp.max(jnp.abs(out.last_logits - logits[:, -1]))) <= 1e-5
