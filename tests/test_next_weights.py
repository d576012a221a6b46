"""LLaVA-NeXT (`llava_next`) in weights/: config.json mapping with transformers' defaults,
export as `llava_next`, and `image_newline` in both key layouts (the hub's bare `image_newline`,
transformers 5 `save_pretrained`'s `model.image_newline`)."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

import hf_models as H
from covipal_jax.configs import llava_next_7b, tiny, tiny_next, tiny_ov
from covipal_jax.models.config import LlavaConfig
from covipal_jax.weights import export_llava, hf_config, keymap, load_llava


def _next_hf(pins=None) -> dict:
    d = H.llava_hf_config()
    d.pop("image_seq_length")
    s = d["vision_config"]["image_size"]
    d.update(model_type="llava_next",
             image_grid_pinpoints=pins or [[s, 2 * s], [2 * s, s], [2 * s, 2 * s]])
    return d


def test_llava_next_defaults_are_transformers():
    """A bare `{"model_type": "llava_next"}` maps to transformers' LlavaNextConfig defaults:
    CLIP-L/14-336 (layer -2, "default"), LLaMA, image token 32000, the 5 NeXT pinpoints."""
    ours = hf_config.config_from_hf({"model_type": "llava_next"})
    theirs = hf_config.config_from_hf(transformers.LlavaNextConfig().to_dict())
    assert ours == theirs
    assert (ours.vision.kind, ours.vision.image_size, ours.vision.patch_size) == ("clip", 336, 14)
    assert (ours.vision.feature_layer, ours.vision.select_strategy) == (-2, "default")
    assert ours.text.kind == "llama" and ours.image_token_id == 32000
    assert ours.image_newline and ours.anyres_max_crops == 0 and ours.video_token_id == -1
    assert ours.image_grid_pinpoints == tuple(
        map(tuple, transformers.LlavaNextConfig().image_grid_pinpoints))


def test_llava_next_7b_config_matches_the_mapping():
    """configs/llava_next_7b.py equals config.json of llava-v1.6-vicuna-7b-hf (as transformers
    writes it) in every checked field."""
    ours = LlavaConfig.from_config(llava_next_7b.get_config().model)
    hub = transformers.LlavaNextConfig(
        text_config=dict(model_type="llama", vocab_size=32064, max_position_embeddings=4096,
                         rms_norm_eps=1e-5, pad_token_id=0),
        image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        image_token_index=32000, vision_config=dict(
            model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
            num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14,
            projection_dim=768, vocab_size=32000)).to_dict()
    ckpt = hf_config.config_from_hf(hub)
    hf_config.check_config(ours, ckpt)
    assert ckpt.image_grid_pinpoints == ours.image_grid_pinpoints


@pytest.mark.parametrize("make, model_type", [
    (lambda: tiny_next.get_config(), "llava_next"),
    (lambda: llava_next_7b.get_config(), "llava_next"),
    (lambda: tiny_ov.get_config(), "llava_onevision"),
    (lambda: tiny.get_config(), "llava"),
])
def test_export_model_type_and_round_trip(make, model_type):
    cfg = LlavaConfig.from_config(make().model)
    d = hf_config.hf_config_dict(cfg)
    assert d["model_type"] == model_type == hf_config.export_model_type(cfg)
    assert d["architectures"] == [hf_config.MODEL_TYPES[model_type][0]]
    back = hf_config.config_from_hf(json.loads(json.dumps(d)))
    assert back.replace(dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                        scan_layers=cfg.scan_layers, remat_policy=cfg.remat_policy) == cfg
    if model_type == "llava_next":  # transformers reads it as the same NeXT
        hf = transformers.LlavaNextConfig(**{k: v for k, v in d.items() if k != "model_type"})
        assert hf.image_grid_pinpoints == [list(p) for p in cfg.image_grid_pinpoints]
        assert "vision_aspect_ratio" not in d and "video_token_index" not in d


@pytest.fixture(scope="module")
def next_saved(tmp_path_factory):
    """A tiny random LlavaNext saved by transformers 5."""
    torch.manual_seed(0)
    model = transformers.LlavaNextForConditionalGeneration(
        transformers.LlavaNextConfig(**{k: v for k, v in _next_hf().items()
                                        if k != "model_type"})).float().eval()
    H.randomize_(model, seed=1)
    path = str(tmp_path_factory.mktemp("next") / "saved")
    model.save_pretrained(path)
    newline = model.model.image_newline.detach().numpy()
    return path, newline


def test_both_newline_layouts_load(next_saved, tmp_path):
    path, newline = next_saved
    keys = safetensors.numpy.load_file(os.path.join(path, "model.safetensors"))
    assert "image_newline" in keys and "model.image_newline" not in keys
    cfg, params = load_llava(path)
    assert hf_config.export_model_type(cfg) == "llava_next"
    assert keymap.detect_layout(cfg, keys) == "transformers5_saved"
    np.testing.assert_array_equal(np.asarray(params["params"]["image_newline"]), newline)
    # `model.image_newline` beside the saved layout (what transformers 5 writes for a NeXT
    # whose LlavaNextConfig was given model_type="llava", as tests/test_anyres_models.py does)
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in os.listdir(path):
        if f != "model.safetensors":
            (moved / f).write_bytes(open(os.path.join(path, f), "rb").read())
    keys["model.image_newline"] = keys.pop("image_newline")
    safetensors.numpy.save_file(keys, str(moved / "model.safetensors"), metadata={"format": "pt"})
    assert keymap.detect_layout(cfg, keys) == "transformers5_saved_next"
    cfg_m, params_m = load_llava(str(moved))
    assert cfg_m == cfg
    np.testing.assert_array_equal(np.asarray(params_m["params"]["image_newline"]), newline)
    # the hub's files (llava-v1.6-*-hf): a bare `image_newline` and `vision_model.`
    hub = str(tmp_path / "hub")
    export_llava(params, cfg, hub, layout="hub")
    hub_keys = safetensors.numpy.load_file(os.path.join(hub, "model.safetensors"))
    assert "image_newline" in hub_keys and "model.image_newline" not in hub_keys
    assert keymap.detect_layout(cfg, hub_keys) == "hub"
    with open(os.path.join(hub, "config.json")) as f:
        assert json.load(f)["model_type"] == "llava_next"
    cfg2, params2 = load_llava(hub)
    assert cfg2 == cfg
    flat = lambda p: {jax.tree_util.keystr(k): np.asarray(v)  # noqa: E731
                      for k, v in jax.tree_util.tree_leaves_with_path(p)}
    a, b = flat(params), flat(params2)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # and transformers loads our export as the same model
    theirs = transformers.LlavaNextForConditionalGeneration.from_pretrained(hub).float()
    np.testing.assert_array_equal(theirs.model.image_newline.detach().numpy(), newline)
