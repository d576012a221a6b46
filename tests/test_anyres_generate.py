"""Greedy generation on AnyRes images and video equals transformers' `generate` (issue 12).

Tiny random `LlavaOnevisionForConditionalGeneration` / `LlavaNextForConditionalGeneration`
saved with `save_pretrained` and loaded by `weights.load_llava` (`test_anyres_models._build`);
batch 2 with left padding: two AnyRes images of different aspect ratios (so different packed
lengths), and a OneVision video batch. Method `none`: the tokens must be identical.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import hf_models as H
import test_anyres_models as A
from covipal_jax import pruning
from covipal_jax.data import anyres as data_anyres
from covipal_jax.inference import decoding
from covipal_jax.inference import visual_inputs as vi
from covipal_jax.models import anyres
from covipal_jax.models.llava import Llava

# Compile-heavy (tiny models, many programs): run in the CI step for slow tests.
pytestmark = pytest.mark.slow

pytest.importorskip("transformers")
NEW = 6


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    d = tmp_path_factory.mktemp("anyres_generate")
    yield str(d)
    shutil.rmtree(d, ignore_errors=True)


def _hf_generate(model, hf_ids, hf_mask, **inputs):
    with torch.no_grad():
        out = model.generate(input_ids=torch.from_numpy(hf_ids),
                             attention_mask=torch.from_numpy(hf_mask), max_new_tokens=NEW,
                             min_new_tokens=NEW, do_sample=False, eos_token_id=None,
                             pad_token_id=H.PAD_ID, **inputs)
    return out[:, hf_ids.shape[1]:].numpy()


@pytest.mark.parametrize("kind", ["onevision", "next"])
def test_anyres_greedy_matches_hf_generate(kind, tmp):
    aspect = "anyres_max_2" if kind == "onevision" else "anyres"
    model, cfg, params, proc, g, max_crops = A._build(kind, tmp, aspect)
    cfg = cfg.replace(image_grid_pinpoints=proc.pinpoints, anyres_max_crops=max_crops)
    x = data_anyres.preprocess(A._images([(37, 91), (120, 100)], seed=5), proc)
    plan = anyres.pack_plan(x.layout, g, max_crops)
    lens = anyres.packed_lengths(plan, g)
    assert lens[0] != lens[1]
    ids, mask, hf_ids, hf_mask, _ = A._prompts((9, 5), cfg.image_token_id, lens,
                                               cfg.text.vocab_size)
    visual = vi.AnyResImage(x.pixels, plan, anyres.bucket_capacity(cfg, x.pixels.shape[1]))
    gen = decoding.Generator(Llava(cfg), pruning.NoneMethod(), max_new_tokens=NEW, eos_id=-1)
    ours = np.asarray(gen(params, visual, ids, mask).tokens)
    theirs = _hf_generate(model, hf_ids, hf_mask, pixel_values=A._nchw(x.pixels),
                          image_sizes=torch.from_numpy(x.layout[:, 2:]))
    print(f"{kind}: ours {ours.tolist()} hf {theirs.tolist()}")
    np.testing.assert_array_equal(ours, theirs)


def test_video_greedy_matches_hf_generate(tmp):
    model, cfg, params, proc, g, _ = A._build("onevision", tmp)
    cfg = cfg.replace(video_token_id=model.config.video_token_id)
    rng = np.random.default_rng(6)
    frames = rng.standard_normal((2, 4, cfg.vision.image_size, cfg.vision.image_size, 3))
    frames = frames.astype(np.float32)
    n = 4 * (-(-g // 2)) ** 2 + 1
    ids, mask, hf_ids, hf_mask, _ = A._prompts((8, 6), cfg.video_token_id, [n, n],
                                               cfg.text.vocab_size, seed=7)
    gen = decoding.Generator(Llava(cfg), pruning.NoneMethod(), max_new_tokens=NEW, eos_id=-1)
    ours = np.asarray(gen(params, vi.Video(frames), ids, mask).tokens)
    theirs = _hf_generate(model, hf_ids, hf_mask, pixel_values_videos=A._nchw(frames))
    np.testing.assert_array_equal(ours, theirs)
