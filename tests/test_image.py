"""Parity of covipal_jax.data.image against the transformers PIL image processors."""
from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest

from covipal_jax.data import image as im

transformers = pytest.importorskip("transformers")

# (height, width): landscape, portrait, square, tiny, extreme aspect ratios, odd sizes.
SHAPES = [(480, 640), (701, 333), (336, 336), (17, 23), (90, 400), (1000, 64), (31, 30)]


def _images(seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for h, w in SHAPES:
        # Smooth + noise so resampling filters see both gradients and high frequencies.
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * 255 / max(w - 1, 1)), (yy * 255 / max(h - 1, 1)),
                         ((xx + yy) % 97) * 2.6], axis=-1)
        noise = rng.integers(-40, 40, size=(h, w, 3))
        out.append(np.clip(base + noise, 0, 255).astype(np.uint8))
    return out


def _hf(processor, images) -> np.ndarray:
    px = processor(images=images, return_tensors="np")["pixel_values"]
    return np.transpose(np.asarray(px), (0, 2, 3, 1))  # NCHW -> NHWC


def _max_diff(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


@pytest.mark.parametrize("size", [336, 30])
@pytest.mark.parametrize("as_pil", [True, False])
def test_clip_matches_hf(size, as_pil):
    hf = transformers.CLIPImageProcessorPil(size={"shortest_edge": size},
                                            crop_size={"height": size, "width": size})
    cfg = im.clip(size)
    imgs = _images(size)
    if as_pil:
        imgs = [PIL.Image.fromarray(x) for x in imgs]
    ours = im.preprocess(imgs, cfg)
    assert ours.shape == (len(SHAPES), size, size, 3) and ours.dtype == np.float32
    assert _max_diff(ours, _hf(hf, imgs)) < 1e-5


def test_clip_crop_larger_than_resize_pads_like_hf():
    hf = transformers.CLIPImageProcessorPil(size={"shortest_edge": 20},
                                            crop_size={"height": 24, "width": 24})
    cfg = im.clip(20, crop_size=24)
    imgs = _images(1)
    assert _max_diff(im.preprocess(imgs, cfg), _hf(hf, imgs)) < 1e-5


@pytest.mark.parametrize("size", [384, 30])
def test_siglip_matches_hf(size):
    hf = transformers.SiglipImageProcessorPil(size={"height": size, "width": size},
                                              image_mean=[0.5] * 3, image_std=[0.5] * 3)
    cfg = im.siglip(size)
    imgs = [PIL.Image.fromarray(x) for x in _images(2)]
    ours = im.preprocess(imgs, cfg)
    assert ours.shape == (len(SHAPES), size, size, 3)
    assert _max_diff(ours, _hf(hf, imgs)) < 1e-5


def test_siglip_bilinear_matches_hf_and_differs_from_bicubic():
    hf = transformers.SiglipImageProcessorPil(size={"height": 32, "width": 32}, resample=2)
    imgs = _images(3)
    ours = im.preprocess(imgs, im.siglip(32, resample="bilinear"))
    assert _max_diff(ours, _hf(hf, imgs)) < 1e-5
    assert _max_diff(ours, im.preprocess(imgs, im.siglip(32))) > 1e-2


def _expand2square_reference(pil_img, background_color):
    """Verbatim logic of LLaVA's llava/mm_utils.py `expand2square`."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = PIL.Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = PIL.Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


@pytest.mark.parametrize("size", [336, 30])
def test_llava15_pad_to_square_matches_hf(size):
    cfg = im.clip(size, pad_to_square=True)
    imgs = [PIL.Image.fromarray(x) for x in _images(4)]
    ours = im.preprocess(imgs, cfg)
    # 1) LLaVA's own recipe: expand2square with the mean colour, then the CLIP processor.
    clip_hf = transformers.CLIPImageProcessorPil(size={"shortest_edge": size},
                                                 crop_size={"height": size, "width": size})
    bg = tuple(int(x * 255) for x in clip_hf.image_mean)
    assert bg == cfg.background_color
    padded = [_expand2square_reference(x, bg) for x in imgs]
    assert _max_diff(ours, _hf(clip_hf, padded)) < 1e-5
    # 2) transformers' LlavaImageProcessor with do_pad=True.
    llava_hf = transformers.LlavaImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_pad=True)
    assert _max_diff(ours, _hf(llava_hf, imgs)) < 1e-5
    # Padding matters for non-square inputs.
    assert _max_diff(ours, im.preprocess(imgs, im.clip(size))) > 1e-2


def test_llava_onevision_base_crop_matches_hf(tmp_path):
    size = 40
    d = {"image_processor_type": "LlavaOnevisionImageProcessor", "do_pad": True,
         "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 3,
         "rescale_factor": 1 / 255, "size": {"height": size, "width": size},
         "image_grid_pinpoints": [[size, size], [size, 2 * size], [2 * size, size]]}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(d))
    cfg = im.ImageProcessorConfig.from_hf_dir(tmp_path)
    assert (cfg.kind, cfg.image_size, cfg.output_size) == ("siglip", size, size)
    assert cfg.mean == (0.5, 0.5, 0.5) and cfg.resample == "bicubic"
    hf = transformers.LlavaOnevisionImageProcessorPil(**{k: v for k, v in d.items()
                                                          if k != "image_processor_type"})
    imgs = [PIL.Image.fromarray(x) for x in _images(5)]
    for x in imgs:  # one image per call: HF pads the tile axis across a batch
        px = np.asarray(hf(images=[x], return_tensors="np")["pixel_values"])  # [1, tiles, C, H, W]
        base = np.transpose(px[:, 0], (0, 2, 3, 1))
        assert _max_diff(im.preprocess(x, cfg), base) < 1e-5


def test_from_hf_dir_clip_and_siglip(tmp_path):
    hf = transformers.CLIPImageProcessorPil(size={"shortest_edge": 336},
                                            crop_size={"height": 336, "width": 336})
    hf.save_pretrained(tmp_path / "clip")
    cfg = im.ImageProcessorConfig.from_hf_dir(tmp_path / "clip")
    assert cfg == im.clip_336()
    cfg_pad = im.ImageProcessorConfig.from_hf_dir(tmp_path / "clip", pad_to_square=True)
    assert cfg_pad == im.clip_336(pad_to_square=True)

    sg = transformers.SiglipImageProcessorPil(size={"height": 384, "width": 384},
                                              image_mean=[0.5] * 3, image_std=[0.5] * 3)
    sg.save_pretrained(tmp_path / "siglip")
    assert im.ImageProcessorConfig.from_hf_dir(tmp_path / "siglip") == im.siglip(384)

    lv = transformers.LlavaImageProcessorPil(size={"shortest_edge": 336},
                                             crop_size={"height": 336, "width": 336}, do_pad=True)
    lv.save_pretrained(tmp_path / "llava")
    assert im.ImageProcessorConfig.from_hf_dir(tmp_path / "llava") == im.clip_336(
        pad_to_square=True)

    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        im.ImageProcessorConfig.from_hf_dir(tmp_path / "nothing")


def test_input_kinds_agree():
    x = _images(6)[0]
    cfg = im.clip(30)
    a = im.preprocess(x, cfg)
    assert a.shape == (1, 30, 30, 3)
    np.testing.assert_array_equal(a, im.preprocess([PIL.Image.fromarray(x)], cfg))
    # Grayscale arrays/images become 3 equal channels; RGBA is composited onto white (as HF).
    g = x[..., 0]
    np.testing.assert_array_equal(im.preprocess(g, cfg),
                                  im.preprocess(PIL.Image.fromarray(g, "L"), cfg))
    rgba = np.concatenate([x, np.full(x.shape[:2] + (1,), 128, np.uint8)], -1)
    hf = transformers.CLIPImageProcessorPil(size={"shortest_edge": 30},
                                            crop_size={"height": 30, "width": 30})
    assert _max_diff(im.preprocess(PIL.Image.fromarray(rgba, "RGBA"), cfg),
                     _hf(hf, [PIL.Image.fromarray(rgba, "RGBA")])) < 1e-5
    with pytest.raises(TypeError):
        im.preprocess(x.astype(np.float32), cfg)


def test_load_image(tmp_path):
    x = _images(7)[1]
    p = tmp_path / "a.png"
    PIL.Image.fromarray(x).save(p)
    np.testing.assert_array_equal(np.asarray(im.load_image(p)), x)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.jpg"):
        im.load_image(bad)
    with pytest.raises(ValueError, match="missing.png"):
        im.load_image(tmp_path / "missing.png")
