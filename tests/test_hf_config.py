"""covipal_jax.weights.hf_config: the config check compares every field that changes the
computation, and the HF loader and `inference.loading.model_config` decide alike
(`resolve_config`), checked on a tiny transformers model saved by save_pretrained."""
from __future__ import annotations

import dataclasses

import pytest

import hf_models as H
from covipal_jax.weights import check_config, load_llava


@pytest.fixture(scope="module")
def llava_tiny():
    return H.shared_llava()


# ----------------------------------------------------------------------------- config check


def _vis(cfg, **kw):
    return cfg.replace(vision=dataclasses.replace(cfg.vision, **kw))


def _txt(cfg, **kw):
    return cfg.replace(text=dataclasses.replace(cfg.text, **kw))


COMPUTATION_EDITS = {
    # field named in the error: edit of the checkpoint's config
    "text.rms_norm_eps": lambda c: _txt(c, rms_norm_eps=1e-6),
    "vision.layer_norm_eps": lambda c: _vis(c, layer_norm_eps=1e-6),
    "text.rope_theta": lambda c: _txt(c, rope_theta=5e5),
    "vision.act": lambda c: _vis(c, act="gelu"),
    "vision.feature_layer": lambda c: _vis(c, feature_layer=-1),
    "vision.select_strategy": lambda c: _vis(c, select_strategy="full"),
    "text.qkv_bias": lambda c: _txt(c, qkv_bias=True),
    "text.tie_word_embeddings": lambda c: _txt(c, tie_word_embeddings=True),
    "text.head_dim": lambda c: _txt(c, head_dim=32),
    "text.num_kv_heads": lambda c: _txt(c, num_kv_heads=2),
    "text.max_position_embeddings": lambda c: _txt(c, max_position_embeddings=128),
    "image_token_id": lambda c: c.replace(image_token_id=256),
    "projector_act": lambda c: c.replace(projector_act="gelu_tanh"),
    "image_newline": lambda c: c.replace(image_newline=True),
}


@pytest.mark.parametrize("field", sorted(COMPUTATION_EDITS))
def test_check_config_compares_every_computation_field(field):
    ckpt = H.llava_cfg()
    given = COMPUTATION_EDITS[field](ckpt)
    with pytest.raises(ValueError, match="config does not match the checkpoint") as e:
        check_config(given, ckpt)
    assert f"  {field}: given " in str(e.value)
    assert "1 fields differ" in str(e.value)  # exactly the edited one


def test_check_config_ignores_only_runtime_and_input_packing_fields():
    from covipal_jax.weights import hf_config

    ckpt = H.onevision_cfg()
    given = ckpt.replace(dtype="bfloat16", param_dtype="bfloat16", scan_layers=False,
                         remat_policy="full", attention_impl=None, attention="chunked",
                         decoder_kernels="out_in", image_grid_pinpoints=(),
                         anyres_max_crops=0, video_token_id=-1)
    check_config(given, ckpt)
    assert set(hf_config.RUNTIME_FIELDS) == {"dtype", "param_dtype", "scan_layers",
                                             "remat_policy", "attention_impl", "attention",
                                             "decoder_kernels"}
    assert set(hf_config.INPUT_FIELDS) == {"image_grid_pinpoints", "anyres_max_crops",
                                           "video_token_id"}
    # Every other LlavaConfig field is compared (a new field is compared by default).
    keys = {k.split(".")[0] for k in hf_config.computation_dict(ckpt)}
    fields = {f.name for f in dataclasses.fields(ckpt)}
    assert keys == fields - set(hf_config.RUNTIME_FIELDS) - set(hf_config.INPUT_FIELDS)
    assert {"text.rms_norm_eps", "vision.layer_norm_eps", "text.rope_theta"} <= set(
        hf_config.computation_dict(ckpt))
    assert hf_config.resolve_config(given, ckpt) == given
    check_config(_txt(ckpt, rms_norm_eps=1.0000001e-6), ckpt)  # float noise is not a change


def test_input_packing_comes_from_config_json_and_round_trips():
    from covipal_jax.weights import hf_config

    d = H.onevision_hf_config()
    got = hf_config.config_from_hf(dict(d, vision_aspect_ratio="anyres_max_4"))
    assert got.image_grid_pinpoints == ((28, 28), (28, 56), (56, 28), (56, 56))
    assert got.anyres_max_crops == 4 and got.video_token_id == 291
    assert hf_config.config_from_hf(hf_config.hf_config_dict(got)) == got
    llava = hf_config.config_from_hf(H.llava_hf_config())
    assert (llava.image_grid_pinpoints, llava.video_token_id) == ((), -1)
    assert hf_config.config_from_hf(hf_config.hf_config_dict(llava)) == llava


def test_eps_override_refused_by_loader_and_model_config(llava_tiny):
    """The saved tiny transformers model has rms_norm_eps=1e-5 and layer_norm_eps=1e-5: a config
    asking for other values is refused by both entry points, with the same message."""
    import ml_collections

    from covipal_jax.inference import loading

    given = _vis(_txt(H.llava_cfg(), rms_norm_eps=1e-6), layer_norm_eps=1e-6)
    with pytest.raises(ValueError) as e_load:
        load_llava(llava_tiny.path, cfg=given)
    config = ml_collections.ConfigDict(dict(model=given.to_dict(), checkpoint=llava_tiny.path))
    with pytest.raises(ValueError) as e_cfg:
        loading.model_config(config)
    assert str(e_load.value) == str(e_cfg.value)
    msg = str(e_load.value)
    assert "text.rms_norm_eps: given 1e-06, checkpoint 1e-05" in msg
    assert "vision.layer_norm_eps: given 1e-06, checkpoint 1e-05" in msg
    # Agreeing configs: both entry points return the same config, runtime fields kept.
    ok = H.llava_cfg().replace(scan_layers=False, remat_policy="full")
    config = ml_collections.ConfigDict(dict(model=ok.to_dict(), checkpoint=llava_tiny.path))
    assert loading.model_config(config) == load_llava(llava_tiny.path, cfg=ok)[0] == ok
