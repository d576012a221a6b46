"""covipal_jax.weights.ppm_io: the PPM artifact (config.json + model.safetensors), local and
(fake) gs://, base-model checks, never a partial artifact, the older Orbax export."""
from __future__ import annotations

import dataclasses
import functools
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file

import fake_gcs
import hf_models as H
from covipal_jax import paths
from covipal_jax.pruning.ppm import PPM, PPMConfig
from covipal_jax.weights import ppm_io


@functools.lru_cache(maxsize=None)
def _setup(seed=0):
    cfg = H.llava_cfg()
    pcfg = PPMConfig(n_v=cfg.num_vision_tokens, d_model=cfg.text.hidden_size, width=16,
                     num_layers=1, num_heads=2, mlp_ratio=2)
    variables = ppm_io.init_ppm(pcfg, jax.random.key(seed))
    return cfg, pcfg, variables


def _flat(v):
    return {k: np.asarray(x) for k, x in traverse_util.flatten_dict(nn.unbox(v), sep="/").items()}


def _assert_same(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


EXTRA = {"trained_steps": 7, "keep": 0.25, "stages": [1, 2]}


def test_round_trip_and_artifact_contents(tmp_path):
    cfg, pcfg, variables = _setup()
    out = ppm_io.save_ppm(str(tmp_path / "ppm"), variables, pcfg, cfg, dict(EXTRA),
                          base_model_name="llava-hf/tiny", train_config={"lr": 1e-3,
                                                                         "steps": (3, 4)})
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert not [p for p in os.listdir(tmp_path) if p != "ppm"]  # no temp dirs left
    module, loaded, meta = ppm_io.load_ppm(out, cfg)
    assert isinstance(module, PPM) and module.cfg == pcfg
    _assert_same(loaded, variables)
    assert meta["trained_steps"] == 7 and meta["stages"] == [1, 2]  # what the trainer reads
    base = meta["base_model"]
    assert base["name"] == "llava-hf/tiny"
    assert base["architecture"] == "LlavaForConditionalGeneration"
    assert base["fingerprint"] == ppm_io.fingerprint(cfg) and len(base["fingerprint"]) == 64
    assert base["config"]["text.rms_norm_eps"] == 1e-5
    assert meta["training"] == {"lr": 1e-3, "steps": [3, 4]}
    assert meta["ppm"]["width"] == 16 and meta["format"] == "covipal_ppm"
    # model.safetensors is an ordinary safetensors file
    tensors = load_file(os.path.join(out, "model.safetensors"))
    assert set(tensors) == {k.replace("/", ".") for k in _flat(variables)}
    # the PPM runs with the loaded variables
    x = np.ones((1, pcfg.n_v, pcfg.d_model), np.float32)
    t = np.ones((1, 3, pcfg.d_model), np.float32)
    s = module.apply(loaded, x, t, np.ones((1, 3), bool))
    assert s.shape == (1, pcfg.n_v)
    # overwrite in place: the new params replace the old ones
    _, _, v2 = _setup(seed=1)
    ppm_io.save_ppm(out, v2, pcfg, cfg)
    _assert_same(ppm_io.load_ppm(out, cfg)[1], v2)


def test_base_model_mismatch_names_the_fields(tmp_path):
    cfg, pcfg, variables = _setup()
    out = ppm_io.save_ppm(str(tmp_path / "ppm"), variables, pcfg, cfg, base_model_name="tiny")
    other = cfg.replace(text=dataclasses.replace(cfg.text, rms_norm_eps=1e-6, num_layers=5))
    with pytest.raises(ValueError) as e:
        ppm_io.load_ppm(out, other)
    msg = str(e.value)
    assert "trained for a different base model (tiny)" in msg and out in msg
    assert "text.rms_norm_eps: PPM's base model 1e-05, given model 1e-06" in msg
    assert "text.num_layers: PPM's base model 3, given model 5" in msg
    assert "hidden_size" not in msg  # only the differing fields
    ppm_io.load_ppm(out, cfg.replace(dtype="bfloat16", scan_layers=False))  # runtime: fine


def test_on_gcs_writes_weights_first_and_config_last(tmp_path, monkeypatch):
    fake = fake_gcs.fake_gcs(monkeypatch, tmp_path / "gcs")
    cfg, pcfg, variables = _setup()
    order = []
    real_save, real_json = ppm_io.save_safetensors, paths.write_json
    monkeypatch.setattr(ppm_io, "save_safetensors",
                        lambda p, *a, **k: order.append(p.name) or real_save(p, *a, **k))
    monkeypatch.setattr(paths, "write_json",
                        lambda p, *a, **k: order.append(paths.as_path(p).name)
                        or real_json(p, *a, **k))
    uri = "gs://bkt/run/ppm"
    assert ppm_io.save_ppm(uri, variables, pcfg, cfg, dict(EXTRA)) == uri
    assert order == ["model.safetensors", "config.json"]
    assert not os.path.exists(uri)  # nothing local named gs:
    assert sorted(os.listdir(fake.local(uri))) == ["config.json", "model.safetensors"]
    _, loaded, meta = ppm_io.load_ppm(uri, cfg)
    _assert_same(loaded, variables)
    assert meta["trained_steps"] == 7
    # a directory without config.json is an incomplete export
    os.remove(fake.local(f"{uri}/config.json"))
    with pytest.raises(ValueError, match="incomplete PPM export"):
        ppm_io.load_ppm(uri, cfg)
    with pytest.raises(FileNotFoundError, match="'gs://bkt/none' does not exist"):
        ppm_io.load_ppm("gs://bkt/none", cfg)


def test_failed_local_save_keeps_the_previous_export(tmp_path, monkeypatch):
    cfg, pcfg, variables = _setup()
    out = ppm_io.save_ppm(str(tmp_path / "ppm"), variables, pcfg, cfg, dict(EXTRA))

    def fail(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(ppm_io, "save_safetensors", fail)
    _, _, v2 = _setup(seed=1)
    with pytest.raises(OSError, match="disk full"):
        ppm_io.save_ppm(out, v2, pcfg, cfg)
    assert sorted(os.listdir(tmp_path)) == ["ppm"]  # no temp dir left behind
    _assert_same(ppm_io.load_ppm(out, cfg)[1], variables)  # the old one, whole
    with pytest.raises(OSError, match="disk full"):
        ppm_io.save_ppm(str(tmp_path / "fresh"), v2, pcfg, cfg)
    assert not os.path.exists(tmp_path / "fresh")  # never a partial artifact


def test_bad_artifacts_are_clear_errors(tmp_path):
    cfg, pcfg, variables = _setup()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ppm_io.load_ppm(str(tmp_path / "nope"), cfg)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not an exported PPM"):
        ppm_io.load_ppm(str(tmp_path / "empty"), cfg)
    out = ppm_io.save_ppm(str(tmp_path / "ppm"), variables, pcfg, cfg)
    meta = json.load(open(os.path.join(out, "config.json")))
    json.dump(dict(meta, ppm=dict(meta["ppm"], width=32)), open(os.path.join(out,
                                                                           "config.json"), "w"))
    with pytest.raises(ValueError, match="tensors do not match the PPM config") as e:
        ppm_io.load_ppm(out, cfg)
    assert "model.safetensors" in str(e.value)
    json.dump(dict(meta, format="other"), open(os.path.join(out, "config.json"), "w"))
    with pytest.raises(ValueError, match="not a covipal PPM config"):
        ppm_io.load_ppm(out, cfg)
    data = open(os.path.join(out, "model.safetensors"), "rb").read()
    json.dump(meta, open(os.path.join(out, "config.json"), "w"))
    open(os.path.join(out, "model.safetensors"), "wb").write(data[:-10])
    with pytest.raises(ValueError, match="model.safetensors: .*truncated"):
        ppm_io.load_ppm(out, cfg)


def test_older_orbax_export_loads_and_converts(tmp_path):
    import orbax.checkpoint as ocp

    cfg, pcfg, variables = _setup()
    old = tmp_path / "old"
    old.mkdir()
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(old / "params", nn.unbox(variables), force=True)
    ckpt.wait_until_finished()
    (old / "ppm.json").write_text(json.dumps(dict(ppm=dataclasses.asdict(pcfg),
                                                  base_model=cfg.architecture_dict(),
                                                  trained_steps=3)))
    _, loaded, meta = ppm_io.load_ppm(str(old), cfg)
    _assert_same(loaded, variables)
    new = ppm_io.convert_ppm(str(old), str(tmp_path / "new"), cfg, base_model_name="tiny")
    _, loaded2, meta2 = ppm_io.load_ppm(new, cfg)
    _assert_same(loaded2, variables)
    assert meta2["trained_steps"] == 3 and meta2["base_model"]["name"] == "tiny"


def test_format_1_artifact_loads_as_a_table_ppm(tmp_path):
    """Artifacts written before format 2 have no `ppm.position`: a learned [n_v, d] table."""
    cfg, pcfg, _ = _setup()
    tcfg = dataclasses.replace(pcfg, position="table")
    variables = ppm_io.init_ppm(tcfg, jax.random.key(2))
    out = ppm_io.save_ppm(str(tmp_path / "ppm"), variables, tcfg, cfg)
    meta = json.load(open(os.path.join(out, "config.json")))
    old = {k: v for k, v in meta["ppm"].items()
           if k not in ("position", "pos_freqs", "index_freqs")}
    json.dump(dict(meta, format_version=1, ppm=old), open(os.path.join(out, "config.json"), "w"))
    module, loaded, _ = ppm_io.load_ppm(out, cfg)
    assert module.cfg == tcfg
    _assert_same(loaded, variables)
    # a format-1 config whose tensors are a layout PPM's is a clear mismatch
    lay = ppm_io.save_ppm(str(tmp_path / "lay"), ppm_io.init_ppm(pcfg, jax.random.key(0)),
                          pcfg, cfg)
    json.dump(dict(meta, format_version=1, ppm=old), open(os.path.join(lay, "config.json"), "w"))
    with pytest.raises(ValueError, match="pos_embedding"):
        ppm_io.load_ppm(lay, cfg)
