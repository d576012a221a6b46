"""`python -m covipal_jax.train`'s Trainer on packed data (issue 12): a tiny OneVision, the PPM
trained through stage 1 and stage 2 on AnyRes images and on videos (`config.data.packed`),
the batch sharded by `train.state.batch_keys`, the artifact exported and loaded back."""
from __future__ import annotations

import json

import pytest

from covipal_jax.configs import ppm_tiny, tiny_ov
from covipal_jax.models.config import LlavaConfig
from covipal_jax.train import loop, state as state_lib
from covipal_jax.weights import ppm_io
from tests.test_pipeline_packed import _records

# Compile-heavy (tiny models, many programs): run in the CI step for slow tests.
pytestmark = pytest.mark.slow


def _config(kind: str):
    c = ppm_tiny.get_config("stages=12,steps=3")
    c.model = tiny_ov.get_config().model
    c.train.batch_size = 4
    c.train.guide_layer = 1
    c.train.eval_every = 0
    c.train.eval_batches = 0
    c.train.save_every = 100
    c.data.max_len = 20
    c.data.packed = kind
    c.data.num_frames = 4 if kind == "video" else 0
    return c


def test_batch_keys():
    assert state_lib.batch_keys()[0] == "pixels"
    assert state_lib.batch_keys("anyres")[:2] == ("anyres_pixels", "anyres_plan")
    assert state_lib.batch_keys("video")[0] == "frames"
    with pytest.raises(ValueError, match="data.packed"):
        state_lib.batch_keys("gif")


@pytest.mark.parametrize("kind", ["anyres", "video"])
def test_trainer_runs_both_stages_on_packed_rows(kind, tmp_path):
    summary = loop.train(_config(kind), str(tmp_path), source=_records())
    assert summary["step"] == 6 and [s["stage"] for s in summary["stages"]] == [1, 2]
    losses = [m["loss"] for m in loop.read_metrics(str(tmp_path)) if "loss" in m]
    assert losses and all(x == x for x in losses)            # logged, finite
    cfg = LlavaConfig.from_config(tiny_ov.get_config().model)
    module, _, meta = ppm_io.load_ppm(str(tmp_path / "ppm"), cfg)
    assert "layout" in json.dumps(meta)                     # a layout-aware PPM
    assert module.cfg.position == "layout"
