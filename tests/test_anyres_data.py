"""covipal_jax.data.anyres against transformers' LlavaOnevision / LlavaNext PIL processors."""
from __future__ import annotations

import numpy as np
import PIL.Image
import pytest

from covipal_jax.data import anyres

transformers = pytest.importorskip("transformers")

# (height, width): odd sizes, both orientations, extreme aspect ratios, tiny and square.
SHAPES = [(37, 91), (101, 29), (64, 64), (13, 200), (250, 9), (77, 53), (5, 7)]
OV_PINS = [[32, 32], [32, 64], [64, 32], [64, 64], [32, 96], [96, 32], [96, 96]]
NEXT_PINS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]


def _images(shapes=SHAPES, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for h, w in shapes:
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1),
                         ((xx + yy) % 31) * 8.0], axis=-1)
        out.append(PIL.Image.fromarray(
            np.clip(base + rng.integers(-30, 30, (h, w, 3)), 0, 255).astype(np.uint8)))
    return out


def _compare(ours: anyres.AnyResInputs, hf_out, cfg, images):
    diffs = []
    for b, img in enumerate(images):
        rows, cols, h, w = ours.layout[b]
        assert (h, w) == (img.height, img.width)
        assert tuple(hf_out["image_sizes"][b]) == (h, w)
        n = 1 + rows * cols
        hf = np.transpose(np.asarray(hf_out["pixel_values"][b][:n]), (0, 2, 3, 1))
        assert ours.crop_valid[b].sum() == n == ours.num_views[b]
        assert not ours.crop_valid[b, n:].any() and not ours.pixels[b, n:].any()
        # HF pads its batch to the most views with zeros, we to a bucket: the rest must be 0.
        assert not np.asarray(hf_out["pixel_values"][b][n:]).any()
        diffs.append(float(np.abs(ours.pixels[b, :n] - hf).max()))
    return max(diffs)


def test_onevision_pixels_match_hf():
    hf = transformers.LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32},
                                                      image_grid_pinpoints=OV_PINS)
    cfg = anyres.AnyResConfig.onevision(32, OV_PINS)
    imgs = _images()
    ours = anyres.preprocess(imgs, cfg)
    out = hf(images=imgs, return_tensors="np")
    assert ours.pixels.shape[0] == len(imgs) and ours.pixels.shape[1] in cfg.buckets
    assert ours.pixels.shape[2:] == (32, 32, 3) and ours.pixels.dtype == np.float32
    assert _compare(ours, out, cfg, imgs) == 0.0
    grids = {tuple(x) for x in ours.layout[:, :2]}
    assert len(grids) >= 4, grids  # several different layouts exercised


def test_next_pixels_match_hf():
    hf = transformers.LlavaNextImageProcessorPil(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
        image_grid_pinpoints=NEXT_PINS)
    cfg = anyres.AnyResConfig.next(28, NEXT_PINS)
    imgs = _images(seed=1)
    ours = anyres.preprocess(imgs, cfg)
    out = hf(images=imgs, return_tensors="np")
    assert _compare(ours, out, cfg, imgs) == 0.0


@pytest.mark.parametrize("kind", ["onevision", "next"])
def test_default_presets_match_hf(kind):
    """The real OneVision-384 / NeXT-336 pinpoints on two odd-sized images."""
    imgs = _images([(301, 517), (700, 219)], seed=2)
    if kind == "onevision":
        hf, cfg = transformers.LlavaOnevisionImageProcessorPil(), anyres.AnyResConfig.onevision()
    else:
        hf = transformers.LlavaNextImageProcessorPil(
            size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
        cfg = anyres.AnyResConfig.next()
    assert cfg.pinpoints == tuple(tuple(p) for p in hf.image_grid_pinpoints)
    ours = anyres.preprocess(imgs, cfg)
    assert _compare(ours, hf(images=imgs, return_tensors="np"), cfg, imgs) == 0.0


def test_onevision_multi_image_is_untiled_like_hf():
    hf = transformers.LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32},
                                                      image_grid_pinpoints=OV_PINS)
    imgs = _images([(37, 91), (101, 29)], seed=3)
    out = hf(images=[imgs], return_tensors="np")  # one sample, two images: no tiling
    ours = anyres.preprocess(imgs, anyres.AnyResConfig.onevision(32, OV_PINS), patch=False)
    assert ours.pixels.shape == (2, 1, 32, 32, 3) and ours.layout[:, :2].tolist() == [[0, 0]] * 2
    hf_px = np.transpose(np.asarray(out["pixel_values"])[:, 0], (0, 2, 3, 1))
    assert float(np.abs(ours.pixels[:, 0] - hf_px).max()) == 0.0


def test_best_resolution_and_buckets():
    cfg = anyres.AnyResConfig.onevision()
    assert cfg.max_views == 37 and cfg.buckets[0] == 2 and cfg.buckets[-1] == 37
    assert cfg.grid_for(384, 384) == (1, 1)
    assert cfg.grid_for(500, 1500) == (2, 4)  # 768 x 1536 keeps all pixels, least waste
    nxt = anyres.AnyResConfig.next()
    assert nxt.buckets == (3, 4, 5)
    assert nxt.grid_for(400, 900) == (1, 3)  # wide: 336 x 1008
    fixed = anyres.AnyResConfig.next(crop_buckets=(5,))
    x = anyres.preprocess(_images([(40, 90)]), fixed)
    assert x.pixels.shape[1] == 5 and x.num_views.tolist() == [3]
    with pytest.raises(ValueError, match="cannot hold"):
        anyres.AnyResConfig.next(crop_buckets=(3,))
    with pytest.raises(ValueError, match="not a crop bucket"):
        anyres.preprocess(_images([(40, 90)]), nxt, num_views=2)
    with pytest.raises(ValueError, match="multiple of"):
        anyres.AnyResConfig.next(pinpoints=[(336, 600)])


def test_from_hf_dict_roundtrip():
    d = transformers.LlavaOnevisionImageProcessorPil(
        size={"height": 32, "width": 32}, image_grid_pinpoints=OV_PINS).to_dict()
    assert anyres.AnyResConfig.from_hf_dict(d) == anyres.AnyResConfig.onevision(32, OV_PINS)
    d = transformers.LlavaNextImageProcessorPil(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
        image_grid_pinpoints=NEXT_PINS).to_dict()
    assert anyres.AnyResConfig.from_hf_dict(d) == anyres.AnyResConfig.next(28, NEXT_PINS)
    with pytest.raises(ValueError, match="not an AnyRes"):
        anyres.AnyResConfig.from_hf_dict({"image_processor_type": "CLIPImageProcessor"})
