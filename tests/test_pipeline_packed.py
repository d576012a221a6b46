"""Packed training rows (issue 12): OneVision AnyRes-image and video records into static-shape
batches (`data.packed_rows`), and a tiny PPM training run on them (loss finite and moving,
artifact written and loadable)."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from covipal_jax.configs import tiny_ov
from covipal_jax.data import packed_rows
from covipal_jax.data import pipeline as pl
from covipal_jax.inference import loading
from covipal_jax.models import anyres
from covipal_jax.models.config import LlavaConfig
from covipal_jax.models.llava import Llava, init_params
from covipal_jax.pruning.ppm import PPM, PPMConfig
from covipal_jax.train import objectives as ob
from covipal_jax.weights import ppm_io

# Compile-heavy (tiny models, many programs): run in the CI step for slow tests.
pytestmark = pytest.mark.slow

MAX_LEN = 20


@functools.lru_cache(maxsize=None)
def _model():
    cfg = LlavaConfig.from_config(tiny_ov.get_config().model)
    params = nn.unbox(jax.jit(lambda r: init_params(cfg, r))(jax.random.key(0)))
    return cfg, Llava(cfg), params


def _records():
    r = np.random.default_rng(0)
    img = lambda h, w: r.integers(0, 256, (h, w, 3), dtype=np.uint8)  # noqa: E731
    q, a = "what color is the square", "red"
    one = lambda i, h, w: dict(id=f"i{i}", images=[img(h, w)], frames=[], question=q,  # noqa
                               answer=a)
    video = lambda i, n: dict(id=f"v{i}", images=[], frames=[img(30, 40) for _ in range(n)],  # noqa
                              question=q, answer=a)
    return [one(0, 37, 91), video(0, 6), one(1, 60, 50), video(1, 8),
            dict(id="m", images=[img(20, 20), img(30, 30)], frames=[], question=q, answer=a),
            one(2, 28, 28), video(2, 5), video(3, 6)]


def _pipe(kind, source, *, max_images=0, num_views=0, **kw):
    cfg = _model()[0]
    spec = packed_rows.PackedSpec.for_model(cfg, kind, num_frames=4, max_images=max_images,
                                            num_views=num_views)
    return pl.Pipeline(source, tokenizer=loading.builtin_tokenizer(),
                       processor=loading.default_processor(cfg), template="plain",
                       max_len=MAX_LEN, global_batch=4, shuffle=False, packed=spec, **kw), spec


def test_anyres_and_video_rows_have_static_shapes():
    cfg = _model()[0]
    src = _records()
    p, spec = _pipe("anyres", src)
    b = p.batch(0)                       # rows: image, video, image, video
    s = spec.processor.crop_size
    assert b["anyres_pixels"].shape == (4, spec.views, s, s, 3)
    assert b["anyres_plan"].shape == (4, 8) and "pixels" not in b
    np.testing.assert_array_equal(b["weight"], [1, 0, 1, 0])
    assert p.stats.wrong_kind == 2
    assert (b["ids"][b["weight"] > 0] == cfg.image_token_id).sum(1).tolist() == [1, 1]
    assert b["anyres_plan"][0, 0] * b["anyres_plan"][0, 1] >= 1    # tiled
    b1 = p.batch(1)                      # multi-image, image, video, video
    np.testing.assert_array_equal(b1["weight"], [0, 1, 0, 0])
    assert p.stats.wrong_kind == 5
    v, vspec = _pipe("video", src)
    b = v.batch(0)
    assert b["frames"].shape == (4, 4, s, s, 3) and b["frames"].dtype == np.float32
    np.testing.assert_array_equal(b["weight"], [0, 1, 0, 1])
    assert ((b["ids"] == cfg.video_token_id).sum(1) == 1).all()      # filler rows too
    assert not (b["ids"] == cfg.image_token_id).any()
    with pytest.raises(ValueError, match="video"):
        packed_rows.PackedSpec.for_model(cfg, "video")               # no frame count
    # the objectives rebuild the visual input with the bucket's capacity
    vis = ob.visual_from_batch(cfg, {k: jnp.asarray(x) for k, x in p.batch(0).items()})
    assert vis.capacity == anyres.bucket_capacity(cfg, spec.views)


@pytest.mark.parametrize("kind", ["anyres", "video"])
def test_tiny_packed_training_run(kind, tmp_path):
    cfg, model, params = _model()
    src = _records()
    p, _ = _pipe(kind, src)
    pcfg = PPMConfig(n_v=cfg.num_vision_tokens, d_model=cfg.text.hidden_size, width=16,
                     num_layers=1, num_heads=2, mlp_ratio=2)
    module = PPM(pcfg)
    spec = ob.ObjectiveSpec(stage=1, n_v=pcfg.n_v, k=pcfg.n_v // 4, guide_layer=1)
    w = nn.unbox(module.init(jax.random.key(1), jnp.zeros((1, pcfg.n_v, pcfg.d_model)),
                             jnp.zeros((1, 4, pcfg.d_model)), jnp.ones((1, 4), bool)))["params"]
    tx = optax.adam(3e-2)

    @jax.jit
    def step(w, opt, batch):
        prep = ob.prepare(model, params, batch, spec)
        (loss, m), g = jax.value_and_grad(ob.loss_fn, has_aux=True)(
            w, ppm_module=module, model=model, params=params, prep=prep, batch=batch,
            spec=spec, step=jnp.asarray(0))
        upd, opt = tx.update(g, opt, w)
        return optax.apply_updates(w, upd), opt, loss

    batch = {k: jnp.asarray(v) for k, v in p.batch(0).items() if k != "index"}
    opt, losses = tx.init(w), []
    for _ in range(4):
        w, opt, loss = step(w, opt, batch)
        losses.append(float(loss))
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
    out = ppm_io.save_ppm(tmp_path / "ppm", {"params": w}, pcfg, cfg, {"trained_steps": 4})
    loaded, variables, _ = ppm_io.load_ppm(out, cfg)
    np.testing.assert_array_equal(variables["params"]["head"]["kernel"], w["head"]["kernel"])
    assert loaded.cfg.position == "layout"
