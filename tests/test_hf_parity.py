"""Numerical parity of covipal's LLaVA against Hugging Face transformers (f32, atol 1e-4).

Tiny random models from `tests/hf_models.py` are saved with `save_pretrained`, loaded with
`covipal_jax.weights.load_llava`, and compared piece by piece: vision-tower features at the
feature layer, projector output, and final logits of a batch of two left-padded prompts of
different lengths (valid positions only). HF is fed the placeholder expanded to n_v image
tokens, the attention mask, and `position_ids = (cumsum(mask) - 1).clamp(min=0)` explicitly.

LLaVA-1.5 (CLIP + LLaMA): HF's own full forward, with both "eager" and "sdpa" attention.

LLaVA-OneVision (SigLIP + Qwen2, GQA, tied embeddings): HF's forward does multi-crop "anyres"
packing with `image_newline`, while covipal runs one base-resolution crop. So tower features and
projector output are compared directly, and the full-model logits are compared against HF's
LANGUAGE MODEL fed `inputs_embeds` = HF's text embeddings with HF's own projected single-crop
image features spliced in at the placeholder, then HF's lm_head (`hf_models.hf_spliced_logits`).
Every piece of that reference is an HF module, so this checks our whole path against HF's.
"""
from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

import hf_models as H
from covipal_jax.models.llava import Llava
from covipal_jax.weights import load_llava

ATOL = 1e-4


def _max_diff(a, b, where=None) -> float:
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return float(d[where].max() if where is not None else d.max())


@functools.lru_cache(maxsize=None)
def _jitted(cfg):
    model = Llava(cfg)
    encode = jax.jit(lambda p, x: model.apply(p, x, method=Llava.encode_image))
    return encode, jax.jit(model.apply)


def _ours(cfg, params, batch):
    encode, forward = _jitted(cfg)
    vis, proj = encode(params, batch.pixels)
    logits, seq_mask = forward(params, batch.pixels, batch.ids, batch.mask)
    return np.asarray(vis.features), np.asarray(proj), np.asarray(logits), np.asarray(seq_mask)


@pytest.fixture(scope="module")
def llava_tiny():
    return H.shared_llava()


@pytest.fixture(scope="module")
def ov_tiny():
    return H.shared_onevision()


def test_llava_clip_llama_parity(llava_tiny):
    t = llava_tiny
    cfg, params = load_llava(t.path)
    batch = H.make_batch(cfg, lengths=(9, 5), seed=0)
    assert len(set(batch.mask.sum(1))) == 2  # rows of different lengths
    feats, proj, logits, seq_mask = _ours(cfg, params, batch)

    hf_feats = H.hf_vision_features(t.model, batch.pixels_nchw, -2, "default")
    assert feats.shape == hf_feats.shape == (2, cfg.num_vision_tokens, cfg.vision.hidden_size)
    d_vis = _max_diff(feats, hf_feats)
    hf_proj = H.hf_project(t.model, hf_feats)
    d_proj = _max_diff(proj, hf_proj)

    np.testing.assert_array_equal(seq_mask, batch.hf_mask.astype(bool))
    eager = H.hf_llava_logits(H.load_hf(t.path, "eager"), batch)
    sdpa = H.hf_llava_logits(H.load_hf(t.path, "sdpa"), batch)
    assert logits.shape == eager.shape
    d_impl = _max_diff(eager, sdpa, seq_mask)
    d_eager = _max_diff(logits, eager, seq_mask)
    d_sdpa = _max_diff(logits, sdpa, seq_mask)
    print(f"llava: vision {d_vis:.2e} projector {d_proj:.2e} logits eager {d_eager:.2e} "
          f"sdpa {d_sdpa:.2e} (eager vs sdpa {d_impl:.2e})")
    assert np.abs(hf_feats).max() > 1 and np.abs(eager[seq_mask]).max() > 1  # O(1) signals
    assert d_vis <= ATOL and d_proj <= ATOL
    assert d_impl <= ATOL and d_eager <= ATOL and d_sdpa <= ATOL

    # Negative control: the same comparison detects a small weight error.
    bad = jax.tree.map(lambda x: x, params)
    lm = bad["params"]["language_model"]["layers"]["stack"]
    lm["post_attn_norm"]["scale"] = lm["post_attn_norm"]["scale"].at[1, 3].multiply(1.01)
    _, _, bad_logits, _ = _ours(cfg, bad, batch)
    assert _max_diff(bad_logits, eager, seq_mask) > 10 * ATOL


def test_onevision_siglip_qwen2_parity(ov_tiny):
    t = ov_tiny
    cfg, params = load_llava(t.path)
    assert cfg.text.tie_word_embeddings and cfg.text.num_kv_heads < cfg.text.num_heads
    batch = H.make_batch(cfg, lengths=(6, 10), seed=1)
    feats, proj, logits, seq_mask = _ours(cfg, params, batch)

    hf_feats = H.hf_vision_features(t.model, batch.pixels_nchw, -1, "full")
    assert feats.shape == hf_feats.shape == (2, cfg.vision.num_patches, cfg.vision.hidden_size)
    d_vis = _max_diff(feats, hf_feats)
    d_proj = _max_diff(proj, H.hf_project(t.model, hf_feats))

    np.testing.assert_array_equal(seq_mask, batch.hf_mask.astype(bool))
    ref = {impl: H.hf_spliced_logits(H.load_hf(t.path, impl), batch, cfg)
           for impl in ("eager", "sdpa")}
    d_impl = _max_diff(ref["eager"], ref["sdpa"], seq_mask)
    d_logits = max(_max_diff(logits, r, seq_mask) for r in ref.values())
    print(f"onevision: vision {d_vis:.2e} projector {d_proj:.2e} logits {d_logits:.2e} "
          f"(eager vs sdpa {d_impl:.2e})")
    assert np.abs(hf_feats).max() > 1 and np.abs(ref["eager"][seq_mask]).max() > 1
    assert d_vis <= ATOL and d_proj <= ATOL and d_impl <= ATOL and d_logits <= ATOL


def test_llava_spliced_reference_matches_hf_forward(llava_tiny):
    """The pieces-based reference used for OneVision equals HF's own LLaVA forward."""
    t = llava_tiny
    batch = H.make_batch(t.cfg, lengths=(7, 4), seed=2)
    full = H.hf_llava_logits(t.model, batch)
    pieces = H.hf_spliced_logits(t.model, batch, t.cfg)
    assert _max_diff(full, pieces, batch.hf_mask.astype(bool)) <= 1e-5
