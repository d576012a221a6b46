"""covipal_jax.weights: config conversion, key map, checkpoint layouts, errors, export round trip.

Checkpoints are the tiny random HF models of `tests/hf_models.py` (never downloaded). Layout
variants are built from real transformers output: the `save_pretrained` file
(`transformers5_saved`), the model's in-memory `state_dict()` (`transformers5`), and the saved
file with `vision_tower.` renamed to `vision_tower.vision_model.` (the Hub's llava-hf layout).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import flax.linen as nn
from flax import traverse_util
from safetensors.numpy import load_file, save_file

import hf_models as H
from covipal_jax.models.config import LlavaConfig
from covipal_jax.weights import (
    LAYOUTS,
    TRANSFORMS,
    abstract_params,
    check_config,
    config_from_hf,
    detect_layout,
    export_llava,
    hf_config_dict,
    key_map,
    load_llava,
)
from covipal_jax.weights import hf as hf_lib
from covipal_jax.weights.keymap import expand, num_layers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def llava_tiny():
    return H.shared_llava()


@pytest.fixture(scope="module")
def ov_tiny():
    return H.shared_onevision()


@pytest.fixture(scope="module")
def llava_loaded(llava_tiny):
    return load_llava(llava_tiny.path)


@pytest.fixture(scope="module")
def ov_loaded(ov_tiny):
    return load_llava(ov_tiny.path)


def _flat(params) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def _assert_params_equal(a, b):
    fa, fb = _flat(a), _flat(b)
    assert set(fa) == set(fb)
    for k in fa:
        assert fa[k].dtype == fb[k].dtype, k
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def _copy_ckpt(src: str, dst, tensors: dict[str, np.ndarray] | None = None) -> str:
    """A copy of checkpoint dir `src` (config.json), optionally with other tensors."""
    dst = os.fspath(dst)
    os.makedirs(dst, exist_ok=True)
    shutil.copy(os.path.join(src, "config.json"), dst)
    if tensors is None:
        shutil.copy(os.path.join(src, "model.safetensors"), dst)
    else:
        save_file(tensors, os.path.join(dst, "model.safetensors"))
    return dst


# ----------------------------------------------------------------------------- config


def test_hf_defaults_match_transformers():
    """Our table of transformers' config defaults is what transformers really uses."""
    import transformers

    for model_type, defaults in hf_lib.HF_DEFAULTS.items():
        c = transformers.AutoConfig.for_model(model_type)
        for key, ours in defaults.items():
            if key == "rope_theta":
                theirs = c.rope_parameters["rope_theta"]
            elif key == "num_key_value_heads" and ours is None:
                continue  # None: "same as num_attention_heads" (checked below)
            else:
                theirs = getattr(c, key)
            assert theirs == ours, (model_type, key, theirs, ours)
    assert transformers.LlamaConfig().num_key_value_heads == transformers.LlamaConfig(
        ).num_attention_heads
    assert transformers.LlamaConfig(num_attention_heads=8).num_key_value_heads == 8


def test_config_from_hf_tiny_models(llava_tiny, ov_tiny):
    for t in (llava_tiny, ov_tiny):
        got = config_from_hf(t.path)
        assert got.architecture_dict() == t.cfg.architecture_dict()
        check_config(t.cfg, got)
        # hf_config_dict inverts config_from_hf (what export writes and reads back).
        assert config_from_hf(hf_config_dict(got)).architecture_dict() == got.architecture_dict()


def test_config_from_hf_legacy_fields():
    """Older config.json spellings: rope_theta/rope_scaling, no head_dim, tie in text_config."""
    d = H.onevision_hf_config(tie=False)
    d["text_config"] = dict(d["text_config"], rope_theta=1e6, rope_scaling=None)
    del d["text_config"]["rope_parameters"]
    d["text_config"]["tie_word_embeddings"] = True
    del d["tie_word_embeddings"]
    d["image_token_id"] = d.pop("image_token_index")
    got = config_from_hf(d)
    assert got.text.rope_theta == 1e6 and got.text.head_dim == 16
    assert got.text.tie_word_embeddings and got.image_token_id == H.OV_IMAGE_TOKEN
    assert got.architecture_dict() == H.onevision_cfg(tie=True).architecture_dict()


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.update(vision_feature_layer=[-2, -1]), "single feature layer"),
    (lambda d: d.update(multimodal_projector_bias=False), "multimodal_projector_bias"),
    (lambda d: d.update(model_type="llava_next_video"), "model_type"),
    (lambda d: d["vision_config"].update(model_type="dinov2"), "sub-model type"),
    (lambda d: d["text_config"].update(model_type="mistral"), "sub-model type"),
    (lambda d: d["text_config"].update(rope_parameters=dict(rope_type="linear", factor=2.0,
                                                             rope_theta=1e4)), "RoPE type"),
    (lambda d: d["text_config"].update(attention_bias=True), "attention_bias"),
    (lambda d: d["text_config"].update(hidden_act="gelu"), "silu"),
    (lambda d: d["vision_config"].update(hidden_act="relu"), "activation"),
    (lambda d: d.update(vision_feature_select_strategy="cls"), "select_strategy"),
])
def test_config_from_hf_rejects_unsupported(edit, match):
    d = json.loads(json.dumps(H.llava_hf_config()))
    edit(d)
    with pytest.raises(ValueError, match=match):
        config_from_hf(d)


def test_config_from_hf_rejects_legacy_rope_scaling():
    d = json.loads(json.dumps(H.llava_hf_config()))
    del d["text_config"]["rope_parameters"]
    d["text_config"].update(rope_theta=1e4, rope_scaling=dict(type="dynamic", factor=2.0))
    with pytest.raises(ValueError, match="rope_scaling 'dynamic'"):
        config_from_hf(d)
    d["text_config"]["rope_scaling"] = None
    assert config_from_hf(d).text.rope_theta == 1e4


def test_config_from_hf_rejects_siglip_head_and_sliding_window():
    d = H.onevision_hf_config()
    d["vision_config"] = dict(d["vision_config"], vision_use_head=True)
    with pytest.raises(ValueError, match="vision_use_head"):
        config_from_hf(d)
    d = H.onevision_hf_config()
    d["text_config"] = dict(d["text_config"], use_sliding_window=True)
    with pytest.raises(ValueError, match="sliding"):
        config_from_hf(d)


def test_check_config_lists_every_difference():
    a = H.llava_cfg()
    b = a.replace(text=dataclasses.replace(a.text, num_layers=5, vocab_size=301),
                  image_token_id=7)
    with pytest.raises(ValueError) as e:
        check_config(b, a)
    msg = str(e.value)
    for needle in ("text.num_layers: given 5, checkpoint 3", "text.vocab_size: given 301",
                   "checkpoint 300", "image_token_id: given 7, checkpoint 257"):
        assert needle in msg
    check_config(a.replace(dtype="bfloat16", scan_layers=False), a)  # not architecture


# ----------------------------------------------------------------------------- key map


@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
def test_transforms_invert(transform):
    shape = {"identity": (3, 5), "linear": (3, 5), "heads_in": (6, 2, 3),
             "heads_bias": (2, 3), "heads_out": (2, 3, 6), "conv": (4, 4, 3, 5)}[transform]
    tr = TRANSFORMS[transform]
    y = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    x = tr.to_hf(y)
    assert x.shape == tr.hf_shape(shape)
    np.testing.assert_array_equal(tr.to_ours(x, shape), y)


def test_heads_in_matches_torch_linear():
    """heads_in: x @ kernel[D, N, H] equals torch's Linear (x @ W.T) split into heads."""
    w = torch.randn(2 * 3, 5)
    x = torch.randn(4, 5)
    ours = TRANSFORMS["heads_in"].to_ours(w.numpy(), (5, 2, 3))
    np.testing.assert_allclose(np.einsum("bd,dnh->bnh", x.numpy(), ours),
                               (x @ w.T).reshape(4, 2, 3).numpy(), atol=1e-6)
    wo = torch.randn(5, 2 * 3)  # o_proj [D, N*H]
    a = torch.randn(4, 2, 3)
    ours_o = TRANSFORMS["heads_out"].to_ours(wo.numpy(), (2, 3, 5))
    np.testing.assert_allclose(np.einsum("bnh,nhd->bd", a.numpy(), ours_o),
                               (a.reshape(4, 6) @ wo.T).numpy(), atol=1e-6)


@pytest.mark.parametrize("make", [
    lambda: H.llava_cfg(), lambda: H.llava_cfg(tie=True), lambda: H.onevision_cfg(),
    lambda: H.onevision_cfg(tie=False),
])
def test_key_map_covers_every_param_once(make):
    cfg = make()
    entries = key_map(cfg)
    paths = [e.path for e in entries]
    assert len(paths) == len(set(paths))
    leaves = traverse_util.flatten_dict(
        abstract_params(cfg), sep="/",
        is_leaf=lambda p, x: isinstance(x, nn.LogicallyPartitioned))
    assert {"params/" + p for p in paths} == set(leaves)
    for layout in LAYOUTS.values():  # distinct HF keys
        keys = expand(cfg, entries, layout)
        n = sum(num_layers(cfg, e) if e.stacked else 1 for e in entries)
        assert len(keys) == n


# ----------------------------------------------------------------------------- layouts


def _layout_variants(t: H.TinyHF, tmp_path) -> dict[str, str]:
    saved = t.path
    tensors = load_file(os.path.join(saved, "model.safetensors"))
    hub = {k.replace("vision_tower.", "vision_tower.vision_model.", 1)
           if k.startswith("vision_tower.") else k: v for k, v in tensors.items()}
    in_memory = {k: v.detach().clone().numpy() for k, v in t.model.state_dict().items()}
    return {"transformers5_saved": saved,
            "hub": _copy_ckpt(saved, tmp_path / "hub", hub),
            "transformers5": _copy_ckpt(saved, tmp_path / "mem", in_memory)}


@pytest.mark.parametrize("which", ["llava", "ov"])
def test_three_layouts_load_identically(which, llava_tiny, ov_tiny, llava_loaded, ov_loaded,
                                        tmp_path):
    t, (cfg0, ref) = (llava_tiny, llava_loaded) if which == "llava" else (ov_tiny, ov_loaded)
    variants = _layout_variants(t, tmp_path)
    for name, path in variants.items():
        keys = hf_lib.Checkpoint(path).keys()
        assert detect_layout(cfg0, keys) == name
        cfg, params = load_llava(path)
        assert cfg == cfg0
        _assert_params_equal(params, ref)
    if which == "ov":  # the in-memory state_dict of a tied model repeats lm_head.weight
        keys = hf_lib.Checkpoint(variants["transformers5"]).keys()
        assert "lm_head.weight" in keys and cfg0.text.tie_word_embeddings


def test_loaded_values_follow_the_map(llava_tiny, llava_loaded):
    """Spot checks against HF tensors, independent of the transforms table."""
    sd = {k: v.detach().numpy() for k, v in llava_tiny.model.state_dict().items()}
    p = _flat(llava_loaded[1]["params"])
    np.testing.assert_array_equal(
        p["language_model/layers/stack/q/kernel"][2].reshape(64, 64),
        sd["model.language_model.layers.2.self_attn.q_proj.weight"].T)
    np.testing.assert_array_equal(
        p["vision_tower/layers/stack/o/kernel"][1].reshape(48, 48),
        sd["model.vision_tower.encoder.layers.1.self_attn.out_proj.weight"].T)
    np.testing.assert_array_equal(
        p["vision_tower/patch_embed/kernel"][:, :, 2, 7],
        sd["model.vision_tower.embeddings.patch_embedding.weight"][7, 2])
    np.testing.assert_array_equal(p["vision_tower/pre_layernorm/scale"],
                                  sd["model.vision_tower.pre_layrnorm.weight"])
    np.testing.assert_array_equal(p["language_model/lm_head/kernel"], sd["lm_head.weight"].T)


def test_extra_key_raises(llava_tiny, tmp_path):
    tensors = load_file(os.path.join(llava_tiny.path, "model.safetensors"))
    tensors["language_model.model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8,
                                                                                     np.float32)
    _copy_ckpt(llava_tiny.path, tmp_path / "ignored", tensors)
    load_llava(tmp_path / "ignored")  # a known non-parameter buffer is skipped
    tensors["vision_tower.head.probe.weight"] = np.ones(3, np.float32)
    tensors["language_model.model.layers.3.mlp.up_proj.weight"] = np.ones(3, np.float32)
    _copy_ckpt(llava_tiny.path, tmp_path / "extra", tensors)
    with pytest.raises(ValueError, match="unused keys") as e:
        load_llava(tmp_path / "extra")
    assert "vision_tower.head.probe.weight" in str(e.value)
    assert "language_model.model.layers.3.mlp.up_proj.weight" in str(e.value)


def test_missing_key_raises(llava_tiny, tmp_path):
    tensors = load_file(os.path.join(llava_tiny.path, "model.safetensors"))
    del tensors["language_model.model.layers.1.mlp.up_proj.weight"]
    del tensors["vision_tower.pre_layrnorm.bias"]
    _copy_ckpt(llava_tiny.path, tmp_path / "missing", tensors)
    with pytest.raises(ValueError, match="missing keys") as e:
        load_llava(tmp_path / "missing")
    assert "language_model.model.layers.1.mlp.up_proj.weight" in str(e.value)
    assert "vision_tower.pre_layrnorm.bias" in str(e.value)


def test_tied_duplicate_must_match(ov_tiny, tmp_path):
    tensors = load_file(os.path.join(ov_tiny.path, "model.safetensors"))
    emb = tensors["language_model.model.embed_tokens.weight"]
    tensors["language_model.lm_head.weight"] = emb.copy()
    _copy_ckpt(ov_tiny.path, tmp_path / "dup", tensors)
    load_llava(tmp_path / "dup")
    tensors["language_model.lm_head.weight"] = emb + 1
    _copy_ckpt(ov_tiny.path, tmp_path / "dup_bad", tensors)
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        load_llava(tmp_path / "dup_bad")


def test_config_mismatch_raises(llava_tiny):
    cfg = H.llava_cfg()
    bad = cfg.replace(vision=dataclasses.replace(cfg.vision, intermediate_size=128))
    with pytest.raises(ValueError, match="vision.intermediate_size: given 128, checkpoint 96"):
        load_llava(llava_tiny.path, cfg=bad)
    cfg2, _ = load_llava(llava_tiny.path, cfg=cfg.replace(scan_layers=False))
    assert cfg2.scan_layers is False


def test_shape_mismatch_raises(llava_tiny, tmp_path):
    dst = _copy_ckpt(llava_tiny.path, tmp_path / "shape")
    with open(os.path.join(dst, "config.json")) as f:
        d = json.load(f)
    d["text_config"]["intermediate_size"] = 96
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(d, f)
    with pytest.raises(ValueError, match="shapes") as e:
        load_llava(dst)
    assert "mlp.up_proj.weight: checkpoint (160, 64), expected (96, 64)" in str(e.value)


def test_incomplete_checkpoint_raises(llava_tiny, llava_loaded, tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        load_llava(tmp_path)  # empty dir
    dst = _copy_ckpt(llava_tiny.path, tmp_path / "noweights")
    os.remove(os.path.join(dst, "model.safetensors"))
    with pytest.raises(ValueError, match="model.safetensors"):
        load_llava(dst)
    cfg, params = llava_loaded
    sharded = export_llava(params, cfg, tmp_path / "sharded", max_shard_bytes=200_000)
    with open(os.path.join(sharded, "model.safetensors.index.json")) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    assert len(shards) > 1
    os.remove(os.path.join(sharded, shards[-1]))
    with pytest.raises(ValueError, match="missing") as e:
        load_llava(sharded)
    assert shards[-1] in str(e.value)


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("which", ["llava", "ov"])
def test_export_round_trip(which, llava_tiny, ov_tiny, llava_loaded, ov_loaded, tmp_path):
    """HF save -> load -> export (hub) -> transformers.from_pretrained: identical logits; and
    load(export) == params exactly (single file and sharded with an index)."""
    t, (cfg, params) = (llava_tiny, llava_loaded) if which == "llava" else (ov_tiny, ov_loaded)
    out = export_llava(params, cfg, tmp_path / "hub")
    keys = set(hf_lib.Checkpoint(out).keys())
    assert any(k.startswith("vision_tower.vision_model.") for k in keys)
    cfg2, params2 = load_llava(out)
    assert cfg2 == cfg
    _assert_params_equal(params2, params)

    reloaded = H.load_hf(out, "sdpa")
    original = H.load_hf(t.path, "sdpa")
    batch = H.make_batch(cfg, lengths=(5, 8), seed=3)
    if which == "llava":
        a, b = H.hf_llava_logits(reloaded, batch), H.hf_llava_logits(original, batch)
    else:
        a, b = H.hf_spliced_logits(reloaded, batch, cfg), H.hf_spliced_logits(original, batch,
                                                                               cfg)
    np.testing.assert_array_equal(a, b)
    sd_new, sd_old = reloaded.state_dict(), original.state_dict()
    assert set(sd_new) == set(sd_old)
    for k in sd_old:
        assert torch.equal(sd_new[k], sd_old[k]), k

    sharded = export_llava(params, cfg, tmp_path / "sharded", layout="transformers5",
                           max_shard_bytes=100_000)
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    assert not os.path.exists(os.path.join(sharded, "model.safetensors"))
    _, params3 = load_llava(sharded)
    _assert_params_equal(params3, params)


def test_bfloat16_export_and_load(llava_loaded, tmp_path):
    cfg, params = llava_loaded
    out = export_llava(params, cfg, tmp_path / "bf16", dtype=ml_dtypes.bfloat16)
    f = hf_lib.Checkpoint(out)
    assert f.dtype("language_model.model.embed_tokens.weight") == np.dtype(ml_dtypes.bfloat16)
    with open(os.path.join(out, "config.json")) as fh:
        assert json.load(fh)["dtype"] == "bfloat16"
    want = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16), params)
    cfg_bf, p_bf = load_llava(out, dtype="bfloat16")
    assert cfg_bf.weight_dtype == jnp.bfloat16
    _assert_params_equal(p_bf, want)
    cfg_f, p_f = load_llava(out)  # default: float32, exact upcast of the bf16 values
    _assert_params_equal(p_f, jax.tree.map(lambda x: x.astype(np.float32), want))
    assert LlavaConfig().architecture_dict() == LlavaConfig(param_dtype="bfloat16"
                                                            ).architecture_dict()


def test_sharded_load_on_a_mesh(llava_tiny, llava_loaded, tmp_path):
    """In a 4-device CPU process: leaves land in their logical shardings with the same values."""
    cfg, params = llava_loaded
    ref = tmp_path / "ref.npz"
    np.savez(ref, **_flat(params))
    script = textwrap.dedent(f"""
        import jax
        jax.config.update("jax_num_cpu_devices", 4)
        import numpy as np
        from jax.sharding import PartitionSpec as P
        from covipal_jax.configs.common import LOGICAL_AXIS_RULES
        from covipal_jax import sharding
        from covipal_jax.weights import load_llava
        from flax import traverse_util
        mesh = sharding.make_mesh(dict(data=1, fsdp=2, tensor=2))
        cfg, params = load_llava({llava_tiny.path!r}, mesh=mesh, rules=LOGICAL_AXIS_RULES)
        flat = traverse_util.flatten_dict(params, sep="/")
        ref = np.load({str(ref)!r})
        for k, v in flat.items():
            np.testing.assert_array_equal(np.asarray(v), ref[k], err_msg=k)
        q = flat["params/language_model/layers/stack/q/kernel"]
        assert q.sharding.spec == P(None, "fsdp", "tensor", None), q.sharding.spec
        assert len({{s.device for s in q.addressable_shards}}) == 4
        assert q.addressable_shards[0].data.shape == (3, 32, 2, 16)
        e = flat["params/language_model/embed/embedding"]
        assert e.sharding.spec == P("tensor", "fsdp"), e.sharding.spec
        print("OK", len(flat))
    """)
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "OK" in r.stdout
