"""AnyRes configs: parameter counts against transformers (meta device), HF field mapping, tiny
configs' static shapes."""
from __future__ import annotations

import copy
import math

import jax
import pytest

from covipal_jax.configs import llava_next_7b, llava_ov_7b, tiny_next, tiny_ov
from covipal_jax.data import anyres as data_anyres
from covipal_jax.models import anyres
from covipal_jax.models.config import LlavaConfig
from covipal_jax.weights import abstract_params, config_from_hf
from covipal_jax.weights.hf import hf_config_dict

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

CLIP_L_336 = dict(model_type="clip_vision_model", hidden_size=1024, image_size=336,
                  intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                  patch_size=14, projection_dim=768, vocab_size=32000)
# llava-hf/llava-v1.6-vicuna-7b-hf config.json, as the Hub spells it.
LLAVA_NEXT_7B = dict(
    architectures=["LlavaNextForConditionalGeneration"], ignore_index=-100,
    image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    image_token_index=32000, model_type="llava_next", projector_hidden_act="gelu",
    text_config=dict(architectures=["LlamaForCausalLM"], max_position_embeddings=4096,
                     model_type="llama", pad_token_id=0, rms_norm_eps=1e-5,
                     torch_dtype="float16", vocab_size=32064),
    tie_word_embeddings=False, torch_dtype="float16", use_image_newline_parameter=True,
    vision_config=dict(CLIP_L_336), vision_feature_layer=-2,
    vision_feature_select_strategy="default", vocab_size=32064)


def _cfg(module, arg=None) -> LlavaConfig:
    return LlavaConfig.from_config(module.get_config(arg).model)


def _ours(cfg) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(cfg)))


def _hf(cls_name: str, d: dict) -> int:
    conf = getattr(transformers, cls_name.replace("ForConditionalGeneration", "Config"))(**d)
    with torch.device("meta"):
        model = getattr(transformers, cls_name)(conf)
    return sum(p.numel() for p in model.parameters())


def test_llava_next_7b_param_count_and_mapping():
    cfg = _cfg(llava_next_7b)
    ours, theirs = _ours(cfg), _hf("LlavaNextForConditionalGeneration", LLAVA_NEXT_7B)
    print(f"llava_next_7b: covipal {ours:,} transformers {theirs:,}")
    assert ours == theirs == 7_063_427_072 + 4096  # LLaVA-1.5-7B + image_newline
    # The HF config maps onto our config (architecture as llava, plus the anyres fields).
    as_llava = config_from_hf({**LLAVA_NEXT_7B, "model_type": "llava"})
    mapped = as_llava.replace(**anyres.hf_fields(LLAVA_NEXT_7B))
    assert mapped.architecture_dict() == cfg.architecture_dict()
    assert mapped.image_grid_pinpoints == cfg.image_grid_pinpoints
    assert mapped.anyres_max_crops == cfg.anyres_max_crops == 0


def test_llava_ov_7b_anyres_fields_and_count():
    cfg = _cfg(llava_ov_7b)
    from test_configs import LLAVA_OV_7B  # the Hub-style dict of the existing count test
    f = anyres.hf_fields(LLAVA_OV_7B)
    assert f["image_grid_pinpoints"] == cfg.image_grid_pinpoints == \
        data_anyres.AnyResConfig.onevision().pinpoints
    assert f["anyres_max_crops"] == cfg.anyres_max_crops == 9
    assert f["video_token_id"] == cfg.video_token_id == 151647
    assert _ours(cfg) == 8_030_807_584  # AnyRes adds no parameters
    single = _cfg(llava_ov_7b, "anyres=0")
    assert single.image_grid_pinpoints == () and single.architecture_dict() == \
        cfg.architecture_dict()
    assert llava_ov_7b.get_config("frames=8").video_frames == 8
    # Static packed length of a OneVision-7B AnyRes image (every layout): base 729 + grid.
    assert anyres.capacity(cfg) + 729 == anyres.packed_length(anyres.crop_grids(cfg), 27, 9)


@pytest.mark.parametrize("module,cls_name", [
    (tiny_ov, "LlavaOnevisionForConditionalGeneration"),
    (tiny_next, "LlavaNextForConditionalGeneration")])
def test_tiny_configs_match_transformers(module, cls_name):
    cfg = _cfg(module)
    d = hf_config_dict(cfg)
    d["image_grid_pinpoints"] = [list(p) for p in cfg.image_grid_pinpoints]
    if cls_name.startswith("LlavaNext"):
        d.update(model_type="llava_next", architectures=[cls_name])
    else:
        d["vision_aspect_ratio"] = f"anyres_max_{cfg.anyres_max_crops}"
    assert _ours(cfg) == _hf(cls_name, copy.deepcopy(d))
    f = anyres.hf_fields(d)
    assert f["image_grid_pinpoints"] == cfg.image_grid_pinpoints
    assert f.get("anyres_max_crops", 0) == cfg.anyres_max_crops
    # The data side's crop layouts equal the model side's.
    s = cfg.vision.image_size
    proc = (data_anyres.AnyResConfig.onevision if module is tiny_ov
            else data_anyres.AnyResConfig.next)(s, cfg.image_grid_pinpoints)
    assert proc.grids == anyres.crop_grids(cfg)
    assert data_anyres.AnyResConfig.for_model(cfg) == proc


def test_config_validation():
    with pytest.raises(ValueError, match="multiples"):
        _cfg(tiny_ov).replace(image_grid_pinpoints=((28, 30),))
    assert hash(_cfg(tiny_ov))  # pinpoints normalized to tuples: usable as a jit static arg
    with pytest.raises(ValueError, match="no image_grid_pinpoints"):
        anyres.crop_grids(_cfg(llava_ov_7b, "anyres=0"))
    with pytest.raises(ValueError, match="no image_grid_pinpoints"):
        data_anyres.AnyResConfig.for_model(_cfg(llava_ov_7b, "anyres=0"))
    assert data_anyres.AnyResConfig.for_model(_cfg(llava_ov_7b)) == \
        data_anyres.AnyResConfig.onevision()
    assert data_anyres.AnyResConfig.for_model(_cfg(llava_next_7b)) == \
        data_anyres.AnyResConfig.next()
    assert anyres.hf_fields({"model_type": "llava"}) == dict(image_newline=False)
