"""Tests for covipal_jax.tools.visualize: pixel-exact greying, VisionZip markers, the CLI's PNG."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from covipal_jax.configs import tiny as tiny_config
from covipal_jax.tools import visualize as vis
from covipal_jax.data import image as image_lib
from covipal_jax.data.synthetic import task as synthetic
from covipal_jax.models.config import LlavaConfig
from covipal_jax import pruning
from covipal_jax.pruning.simple import pool_indices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _colourful(h=48, w=64, seed=0):
    """Saturated random colours: no pixel has R == G == B."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 200, size=(h, w, 3)).astype(np.uint8)
    x[..., 0] = np.maximum(x[..., 1], x[..., 2]) + 30  # R strictly largest
    return x


def _check_patches(out: np.ndarray, view: np.ndarray, kept, grid, scale: int):
    """Every kept patch equals the view (upscaled); every pruned one is grey and differs."""
    h, w = grid
    H, W = view.shape[:2]
    big = view.repeat(scale, 0).repeat(scale, 1)
    ys, xs = vis.patch_bounds(H, h) * scale, vis.patch_bounds(W, w) * scale
    kept = set(int(k) for k in kept)
    n_grey = 0
    for p in range(h * w):
        i, j = divmod(p, w)
        o = out[ys[i]:ys[i + 1], xs[j]:xs[j + 1]]
        v = big[ys[i]:ys[i + 1], xs[j]:xs[j + 1]]
        assert o.size > 0
        if p in kept:
            np.testing.assert_array_equal(o, v, err_msg=f"kept patch {p} changed")
        else:
            assert (o[..., 0] == o[..., 1]).all() and (o[..., 1] == o[..., 2]).all(), p
            assert not np.array_equal(o, v), f"pruned patch {p} not greyed"
            n_grey += 1
    assert n_grey == h * w - len(kept)


@pytest.mark.parametrize("scale", [1, 3])
def test_render_kept_greys_exactly_the_pruned_patches(scale):
    img = _colourful()
    kept = [0, 5, 17, 23, 31]
    out = vis.render_kept(img, kept, (4, 8), scale=scale)
    assert out.size == (64 * scale, 48 * scale)
    _check_patches(np.asarray(out), img, kept, (4, 8), scale)


def test_render_kept_uses_the_processor_view():
    """With a CLIP processor the panel is the resized + center-cropped image."""
    img = Image.fromarray(_colourful(60, 90, seed=1))
    proc = image_lib.ImageProcessorConfig.clip(32)
    view = vis.tower_view(img, proc)
    assert view.shape == (32, 32, 3)
    # The same geometry as preprocess(): normalizing the view gives the model's pixels.
    want = image_lib.preprocess([img], proc)[0]
    got = (view.astype(np.float64) / 255).astype(np.float32)
    got = (got - np.asarray(proc.mean, np.float32)) / np.asarray(proc.std, np.float32)
    np.testing.assert_allclose(got, want, atol=1e-6)
    kept = [1, 2, 9]
    out = vis.render_kept(img, kept, (4, 4), processor=proc, scale=2, title="a title")
    arr = np.asarray(out)
    assert arr.shape[1] == 64 and arr.shape[0] > 64  # caption band on top
    _check_patches(arr[-64:], view, kept, (4, 4), 2)


def test_contextual_outline_and_errors():
    img = _colourful(32, 32)
    out = np.asarray(vis.render_kept(img, [0, 3], (2, 2), contextual=[3], scale=4))
    # Patch 3 (bottom right) has the outline colour on its border, patch 0 not.
    assert tuple(out[-1, -1]) == vis.CONTEXTUAL_COLOR
    assert tuple(out[0, 0]) != vis.CONTEXTUAL_COLOR
    with pytest.raises(ValueError, match="kept indices"):
        vis.render_kept(img, [4], (2, 2))


def test_render_grid_layout():
    a = Image.new("RGB", (10, 20), (255, 0, 0))
    b = Image.new("RGB", (10, 12), (0, 0, 255))
    g = vis.render_grid([a, b, a], cols=2, gap=2)
    assert g.size == (22, 20 + 2 + 20)
    assert g.getpixel((0, 0)) == (255, 0, 0) and g.getpixel((12, 0)) == (0, 0, 255)
    assert g.getpixel((12, 15)) == (255, 255, 255)  # below the shorter panel


def test_markers_visionzip_cls_and_contextual():
    cfg = LlavaConfig.from_config(tiny_config.get_config().model)  # CLIP 8x8, n_v = 64
    assert cfg.vision.has_cls and cfg.num_vision_tokens == 64
    # k = 8: CLS + 5 dominant patches + 2 contextual targets, official order.
    spec = pruning.VisionZipMethod(keep=8, dominant=6)
    row = [0, 0, 9, 20, 40, 63, 1, 30]  # CLS (0), dominant incl. patch 0, contextual 1, 30
    m = vis.markers(spec, row, cfg)
    assert m.cls
    assert m.patches == [0, 1, 9, 20, 30, 40, 63]
    assert m.contextual == [1, 30]
    # A selection method: no CLS, no merges, indices are patches.
    m = vis.markers(pruning.FastV(keep=3), [0, 7, 8], cfg)
    assert (m.cls, m.patches, m.contextual) == (False, [0, 7, 8], [])
    # SigLIP-style tower (no CLS): VisionZip's first index is a patch.
    sig = LlavaConfig.from_config(tiny_config.get_config("vision=siglip").model)
    m = vis.markers(pruning.VisionZipMethod(keep=4, dominant=3), [2, 5, 6, 11], sig)
    assert (m.cls, m.patches, m.contextual) == (False, [2, 5, 6, 11], [11])


def test_cli_writes_png_with_pruned_patches_greyed(tmp_path):
    """`python -m covipal_jax.tools.visualize` on the tiny model: the pool method keeps a known
    sub-grid; the PNG shows exactly those patches in colour."""
    out = tmp_path / "kept.png"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_backend_optimization_level=0")
    proc = subprocess.run(
        [sys.executable, "-m", "covipal_jax.tools.visualize", "--config", "configs/tiny.py",
         "--config.pruning.method=pool", "--config.pruning.keep=0.25",
         "--config.max_new_tokens=2", f"--out={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pool: kept 16/64 tokens" in proc.stdout
    png = Image.open(out)
    assert png.format == "PNG"
    arr = np.asarray(png.convert("RGB"))
    cfg = LlavaConfig.from_config(tiny_config.get_config().model)
    view = vis.tower_view(image_lib.to_rgb(synthetic.make_example("test", 0, seed=0)["image"]),
                          image_lib.ImageProcessorConfig.clip(64))
    scale = 6  # ceil(336 / 64)
    body = arr[-64 * scale:]
    assert body.shape[:2] == (64 * scale, 64 * scale)
    _check_patches(body, view, pool_indices(8, 8, 16), cfg.vision.grid, scale)
