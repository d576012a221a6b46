"""configs/*.py: exact parameter counts (jax.eval_shape, zero memory) against transformers.

The HF side builds the real model classes on the meta device from config dicts written here
as the llava-hf Hub checkpoints spell them (legacy fields included: no head_dim, `rope_theta`
at the top of text_config, `torch_dtype`), and sums `numel`. `config_from_hf` on the same dicts
must give our configs' architecture.
"""
from __future__ import annotations

import math

import jax
import pytest

from covipal_jax.configs import llava15_7b, llava15_13b, llava_ov_7b
from covipal_jax.models.config import LlavaConfig
from covipal_jax.weights import abstract_params, config_from_hf

CLIP_L_336 = dict(model_type="clip_vision_model", hidden_size=1024, image_size=336,
                  intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                  patch_size=14, projection_dim=768, vocab_size=32000)


def _llava15(size: str) -> dict:
    text = dict(model_type="llama", architectures=["LlamaForCausalLM"],
                max_position_embeddings=4096, rms_norm_eps=1e-5, torch_dtype="float16",
                vocab_size=32064)
    if size == "13b":
        text.update(hidden_size=5120, intermediate_size=13824, num_attention_heads=40,
                    num_hidden_layers=40, num_key_value_heads=40)
    return dict(architectures=["LlavaForConditionalGeneration"], ignore_index=-100,
                image_token_index=32000, model_type="llava", pad_token_id=32001,
                projector_hidden_act="gelu", text_config=text, tie_word_embeddings=False,
                torch_dtype="float16", vision_config=dict(CLIP_L_336),
                vision_feature_layer=-2, vision_feature_select_strategy="default",
                vocab_size=32064)


LLAVA_OV_7B = dict(
    architectures=["LlavaOnevisionForConditionalGeneration"], image_token_index=151646,
    model_type="llava_onevision", projector_hidden_act="gelu", tie_word_embeddings=False,
    torch_dtype="float16", use_image_newline_parameter=True, video_token_index=151647,
    vision_aspect_ratio="anyres_max_9", vision_feature_layer=-1,
    vision_feature_select_strategy="full",
    text_config=dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"],
                     bos_token_id=151643, eos_token_id=151645, hidden_size=3584,
                     intermediate_size=18944, max_position_embeddings=32768,
                     max_window_layers=28, num_attention_heads=28, num_hidden_layers=28,
                     num_key_value_heads=4, rope_theta=1000000.0, sliding_window=131072,
                     tie_word_embeddings=False, torch_dtype="bfloat16",
                     use_sliding_window=False, vocab_size=152128),
    vision_config=dict(model_type="siglip_vision_model", hidden_size=1152, image_size=384,
                       intermediate_size=4304, num_attention_heads=16, num_hidden_layers=26,
                       patch_size=14, vision_use_head=False),
)

CASES = {
    "llava15_7b": (llava15_7b, _llava15("7b"), "LlavaForConditionalGeneration", 7_063_427_072),
    "llava15_13b": (llava15_13b, _llava15("13b"), "LlavaForConditionalGeneration",
                    13_351_494_656),
    "llava_ov_7b": (llava_ov_7b, LLAVA_OV_7B, "LlavaOnevisionForConditionalGeneration",
                    8_030_807_584),
}


def _our_count(module) -> tuple[LlavaConfig, int]:
    cfg = LlavaConfig.from_config(module.get_config().model)
    tree = abstract_params(cfg)  # jax.eval_shape: nothing allocated
    return cfg, sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _hf_count(hf_config: dict, cls_name: str) -> int:
    import torch
    import transformers

    config_cls = {"LlavaForConditionalGeneration": transformers.LlavaConfig,
                  "LlavaOnevisionForConditionalGeneration": transformers.LlavaOnevisionConfig}
    config = config_cls[cls_name](**hf_config)
    with torch.device("meta"):
        model = getattr(transformers, cls_name)(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(CASES))
def test_param_count_matches_transformers(name):
    module, hf_config, cls_name, expected = CASES[name]
    cfg, ours = _our_count(module)
    theirs = _hf_count(hf_config, cls_name)
    print(f"{name}: covipal {ours:,} transformers {theirs:,}")
    assert ours == theirs
    if expected is not None:
        assert ours == expected
    # config_from_hf on the Hub-style dict gives our config's architecture.
    assert config_from_hf(hf_config).architecture_dict() == cfg.architecture_dict()


def test_layers_arg_truncates_decoder():
    cfg, n = _our_count(llava15_7b)
    c2 = LlavaConfig.from_config(llava15_7b.get_config("layers=2").model)
    n2 = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(c2)))
    t = cfg.text
    per_layer = (2 * t.hidden_size + 4 * t.hidden_size * t.num_heads * t.head_dim
                 + 3 * t.hidden_size * t.intermediate_size)
    assert n - n2 == 30 * per_layer
