"""Checkpoint I/O on `gs://` against a GCS emulator (`gcp-storage-emulator`, in memory, started
here on 127.0.0.1): export a tiny HF LLaVA to a bucket (sharded), load it back from the bucket,
a missing bucket path, and the PPM artifact saved to and loaded from the bucket.

epath reaches the emulator through fsspec's gcsfs (`STORAGE_EMULATOR_HOST`, and epath told not to
use tf.io.gfile), exactly the code path a pod without TensorFlow takes.
"""
from __future__ import annotations

import os
import socket

import jax
import numpy as np
import pytest
from etils import epath
from etils.epath import gpath
from flax import traverse_util

import hf_models as H
from covipal_jax.pruning.ppm import PPMConfig
from covipal_jax.weights import export_llava, load_llava, ppm_io


@pytest.fixture
def bucket(monkeypatch):
    from gcp_storage_emulator.server import create_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket="bucket")
    server.start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("EPATH_USE_TF", "false")
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # cached per process
    from etils.epath import backend
    backend.fsspec_backend._get_filesystem.cache_clear()  # a gcsfs for this emulator
    try:
        yield "gs://bucket"
    finally:
        backend.fsspec_backend._get_filesystem.cache_clear()
        server.stop()


def _flat(p):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(p, sep="/").items()}


def test_hf_checkpoint_and_ppm_on_emulated_gcs(bucket):
    t = H.shared_llava()
    cfg, params = load_llava(t.path)
    uri = f"{bucket}/models/llava"
    assert export_llava(params, cfg, uri, max_shard_bytes=100_000) == uri
    names = sorted(p.name for p in epath.Path(uri).iterdir())
    assert "config.json" in names and "model.safetensors.index.json" in names
    cfg2, params2 = load_llava(uri)
    assert cfg2 == cfg
    a, b = _flat(params), _flat(params2)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    with pytest.raises(FileNotFoundError, match=f"'{bucket}/nope' does not exist"):
        load_llava(f"{bucket}/nope")
    assert not os.path.exists("gs:")

    pcfg = PPMConfig(n_v=cfg.num_vision_tokens, d_model=cfg.text.hidden_size, width=16,
                     num_layers=1, num_heads=2, mlp_ratio=2)
    variables = ppm_io.init_ppm(pcfg, jax.random.key(0))
    ppm_uri = f"{bucket}/run/ppm"
    ppm_io.save_ppm(ppm_uri, variables, pcfg, cfg, {"trained_steps": 5},
                    base_model_name=uri)
    _, loaded, meta = ppm_io.load_ppm(ppm_uri, cfg)
    assert meta["trained_steps"] == 5 and meta["base_model"]["name"] == uri
    x = traverse_util.flatten_dict(loaded, sep="/")
    y = traverse_util.flatten_dict(variables, sep="/")
    for k in y:
        np.testing.assert_array_equal(np.asarray(x[k]), np.asarray(y[k].unbox()
                                      if hasattr(y[k], "unbox") else y[k]), err_msg=k)
