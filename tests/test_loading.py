"""User paths of checkpoint loading, local and (fake) gs://: load / export an HF checkpoint on a
bucket, missing and unreadable paths, processor defaults, interrupted exports.

gs:// goes through epath's own gs:// code path onto a local directory (`tests/fake_gcs.py`):
code calling `os.path` / `open` on a `gs://` string does not see those files.
"""
from __future__ import annotations

import json
import os
import shutil

import ml_collections
import numpy as np
import pytest
from etils.epath import backend as backend_lib
from flax import traverse_util

import fake_gcs
import hf_models as H
from covipal_jax import paths
from covipal_jax.data import image as image_lib
from covipal_jax.inference import loading
from covipal_jax.weights import export_llava, load_llava
from covipal_jax.weights import hf as hf_lib


@pytest.fixture(scope="module")
def llava_tiny():
    return H.shared_llava()


@pytest.fixture(scope="module")
def llava_loaded(llava_tiny):
    return load_llava(llava_tiny.path)


def _equal(a, b):
    fa = traverse_util.flatten_dict(a, sep="/")
    fb = traverse_util.flatten_dict(b, sep="/")
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def _config(**kw):
    return ml_collections.ConfigDict(dict(dict(model={}, checkpoint=""), **kw))


def test_load_and_export_on_gcs(llava_tiny, llava_loaded, tmp_path, monkeypatch):
    fake = fake_gcs.fake_gcs(monkeypatch, tmp_path / "gcs")
    shutil.copytree(llava_tiny.path, fake.local("gs://bkt/llava"))
    uri = "gs://bkt/llava"
    assert not os.path.exists(uri)  # only epath sees it
    cfg0, ref = llava_loaded
    cfg, params = load_llava(uri)
    assert cfg == cfg0
    _equal(params, ref)
    assert loading.model_config(_config(checkpoint=uri)) == cfg0
    # every tensor byte of the checkpoint was read once
    size = os.path.getsize(fake.local(f"{uri}/model.safetensors"))
    assert fake.bytes_read["bkt/llava/model.safetensors"] == size

    # export to the bucket, sharded, then load it back from there
    out = export_llava(params, cfg, "gs://bkt/exported", max_shard_bytes=100_000)
    assert out == "gs://bkt/exported"
    names = sorted(os.listdir(fake.local(out)))
    assert "config.json" in names and "model.safetensors.index.json" in names
    assert not [n for n in names if "tmp" in n]
    cfg2, params2 = load_llava(out)
    assert cfg2 == cfg
    _equal(params2, params)


def test_missing_gcs_checkpoint_error_comes_from_epath(tmp_path, monkeypatch):
    fake = fake_gcs.fake_gcs(monkeypatch, tmp_path / "gcs")
    asked = []
    real = fake.exists
    monkeypatch.setattr(fake, "exists", lambda p: asked.append(p) or real(p), raising=False)
    with pytest.raises(FileNotFoundError,
                       match="checkpoint directory 'gs://bkt/nope' does not exist"):
        loading.model_config(_config(checkpoint="gs://bkt/nope"))
    assert "gs://bkt/nope" in asked  # asked the bucket (epath), not the local disk
    with pytest.raises(FileNotFoundError, match="'gs://bkt/nope' does not exist"):
        load_llava("gs://bkt/nope")


def test_local_missing_and_not_a_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        loading.model_config(_config(checkpoint=str(tmp_path / "nope")))
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        loading.model_config(_config(checkpoint=str(tmp_path / "file")))
    with pytest.raises(ValueError, match="no config.json in"):
        loading.model_config(_config(checkpoint=str(tmp_path)))


def test_permission_denied_on_config_is_one_line(llava_tiny, tmp_path, monkeypatch):
    d = shutil.copytree(llava_tiny.path, tmp_path / "ckpt")
    real_open = backend_lib.os_backend.open
    denied = os.fspath(d / "config.json")

    def deny(path, mode, *a, **kw):
        if os.fspath(path) == denied:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, mode, *a, **kw)
    monkeypatch.setattr(backend_lib.os_backend, "open", deny)
    for call in (lambda: loading.model_config(_config(checkpoint=str(d))),
                 lambda: load_llava(d)):
        with pytest.raises(paths.PathPermissionError) as e:
            call()
        assert "\n" not in str(e.value) and denied in str(e.value)
        assert isinstance(e.value, ValueError) and isinstance(e.value, PermissionError)


def test_interrupted_export_leaves_no_loadable_checkpoint(llava_loaded, tmp_path, monkeypatch):
    cfg, params = llava_loaded
    out = export_llava(params, cfg, tmp_path / "out", max_shard_bytes=100_000)
    calls = []
    real = hf_lib.save_safetensors

    def dies_on_second_shard(*a, **kw):
        calls.append(a[0])
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*a, **kw)
    monkeypatch.setattr(hf_lib, "save_safetensors", dies_on_second_shard)
    with pytest.raises(OSError, match="disk full"):
        export_llava(params, cfg, out, max_shard_bytes=100_000)
    assert not os.path.exists(os.path.join(out, "config.json"))  # removed first, written last
    with pytest.raises(ValueError, match="no config.json"):
        load_llava(out)


def test_processor_falls_back_to_the_family_defaults(tmp_path):
    clip_mean, clip_std = image_lib.OPENAI_CLIP_MEAN, image_lib.OPENAI_CLIP_STD
    # no image_mean / image_std: the processor family's
    p = image_lib.ImageProcessorConfig.from_hf_dict(
        {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 336},
         "crop_size": {"height": 336, "width": 336}})
    assert (p.mean, p.std, p.image_size) == (tuple(clip_mean), tuple(clip_std), 336)
    p = image_lib.ImageProcessorConfig.from_hf_dict(
        {"image_processor_type": "SiglipImageProcessor", "size": {"height": 384, "width": 384},
         "image_mean": None})
    assert (p.mean, p.std) == ((0.5,) * 3, (0.5,) * 3)
    # neither type nor size: the model's tower decides, at its input size
    p = image_lib.ImageProcessorConfig.from_hf_dict({}, family="siglip", image_size=28)
    assert (p.kind, p.mean, p.image_size) == ("siglip", (0.5,) * 3, 28)
    p = image_lib.ImageProcessorConfig.from_hf_dict({"do_pad": False}, family="clip",
                                                    image_size=32)
    assert (p.kind, p.mean, p.crop_size) == ("clip", tuple(clip_mean), 32)
    with pytest.raises(ValueError, match="unsupported image processor config"):
        image_lib.ImageProcessorConfig.from_hf_dict({})
    with pytest.raises(ValueError, match="image_std=.*3 numbers"):
        image_lib.ImageProcessorConfig.from_hf_dict(
            {"image_processor_type": "CLIPImageProcessor", "image_std": [1, 2]})
    # through the loader: a checkpoint whose preprocessor_config.json lacks mean / std
    cfg = H.llava_cfg()
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "CLIPImageProcessor"}))
    p = loading.load_processor(str(tmp_path), cfg)
    assert (p.kind, p.mean, p.std, p.image_size) == ("clip", tuple(clip_mean), tuple(clip_std),
                                                     cfg.vision.image_size)
    assert loading.load_processor(str(tmp_path / "none"), cfg) == loading.default_processor(cfg)


def test_remote_tokenizer_is_staged_locally(tmp_path, monkeypatch):
    fake = fake_gcs.fake_gcs(monkeypatch, tmp_path / "gcs")
    tok = loading.builtin_tokenizer()
    src = fake.local("gs://bkt/tok")
    os.makedirs(src)
    tok.save(src)
    local = loading.local_tokenizer_dir("gs://bkt/tok")
    assert not local.startswith("gs://") and os.path.isdir(local)
    from covipal_jax.data import text as text_lib
    assert text_lib.load_tokenizer(local) == tok
    assert loading.local_tokenizer_dir(str(tmp_path)) == str(tmp_path)  # local: as is
