"""Generation: HF `generate` parity, batching, EOS, sampling, compilation counts."""
from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

import hf_models
import tiny
from covipal_jax.inference import decoding
from covipal_jax.models.llava import Llava
from covipal_jax import pruning
from covipal_jax.weights import load_llava



def _none_spec(model):
    return pruning.NoneMethod()


@pytest.fixture(scope="module")
def llava_hf():
    tiny_hf = hf_models.shared_llava()
    cfg, params = load_llava(tiny_hf.path)
    return tiny_hf, Llava(cfg), params


def test_greedy_matches_hf_generate(llava_hf):
    """Batch of 2 prompts of different lengths: 8 greedy tokens identical to HF generate."""
    tiny_hf, model, params = llava_hf
    batch = hf_models.make_batch(model.cfg, lengths=(9, 5))
    gen = decoding.Generator(model, _none_spec(model), max_new_tokens=8, eos_id=-1)
    ours = gen(params, batch.pixels, batch.ids, batch.mask).tokens
    hf = tiny_hf.model
    with torch.no_grad():
        out = hf.generate(input_ids=torch.from_numpy(batch.hf_ids),
                          pixel_values=torch.from_numpy(batch.pixels_nchw),
                          attention_mask=torch.from_numpy(batch.hf_mask),
                          max_new_tokens=8, min_new_tokens=8, do_sample=False,
                          eos_token_id=None, pad_token_id=hf_models.PAD_ID)
    theirs = out[:, batch.hf_ids.shape[1]:].numpy()
    np.testing.assert_array_equal(ours, theirs)


def test_greedy_matches_hf_pieces_onevision():
    """LLaVA-OneVision (SigLIP + Qwen2, GQA, tied): our greedy tokens equal a greedy loop over
    HF's own modules on the single-crop input (HF's full OV forward packs multi-crop)."""
    tiny_hf = hf_models.shared_onevision()
    cfg, params = load_llava(tiny_hf.path)
    model = Llava(cfg)
    batch = hf_models.make_batch(cfg, lengths=(8, 6))
    ours = decoding.Generator(model, _none_spec(model), max_new_tokens=8, eos_id=-1)(
        params, batch.pixels, batch.ids, batch.mask).tokens
    toks = []
    b = batch
    for _ in range(8):
        logits = hf_models.hf_spliced_logits(tiny_hf.model, b, cfg)
        nxt = logits[:, -1].argmax(-1)
        toks.append(nxt)
        b = hf_models.Batch(
            b.pixels, b.ids, b.mask, np.concatenate([b.hf_ids, nxt[:, None]], 1),
            np.concatenate([b.hf_mask, np.ones((len(nxt), 1), np.int64)], 1),
            np.concatenate([b.hf_positions, b.hf_positions[:, -1:] + 1], 1))
    np.testing.assert_array_equal(ours, np.stack(toks, 1))


def test_batched_equals_per_example():
    model, params = tiny.model_and_params()
    pixels, ids, mask = tiny.batch(lengths=(10, 6), image_at=(3, 1))
    gen = decoding.Generator(model, _none_spec(model), max_new_tokens=6, eos_id=-1)
    both = gen(params, pixels, ids, mask).tokens
    for i in range(2):
        one = gen(params, pixels[i:i + 1], ids[i:i + 1], mask[i:i + 1]).tokens
        np.testing.assert_array_equal(one[0], both[i])


def test_unstacked_layers_decode_like_the_stacked_scan():
    """The CPU decode path (per-layer weight slices hoisted out of the loop) emits the same
    tokens as the stacked scan, also with a pruned (in-LLM, two-segment) cache."""
    model, params = tiny.model_and_params()
    pixels, ids, mask = tiny.batch(lengths=(10, 6), image_at=(3, 1))
    for spec in (_none_spec(model), pruning.FastV(keep=16, layer=2)):
        a, b = (decoding.Generator(model, spec, max_new_tokens=6, eos_id=-1,
                                   unstack_layers=u)(params, pixels, ids, mask).tokens
                for u in (True, False))
        np.testing.assert_array_equal(a, b)


def test_eos_stops_rows_independently():
    model, params = tiny.model_and_params()
    pixels, ids, mask = tiny.batch()
    free = decoding.Generator(model, _none_spec(model), max_new_tokens=6, eos_id=-1)
    toks = free(params, pixels, ids, mask).tokens
    eos = int(toks[0, 1])  # row 0 emits it as its 2nd token
    gen = decoding.Generator(model, _none_spec(model), max_new_tokens=6, eos_id=eos, pad_id=0)
    out = gen(params, pixels, ids, mask)
    first0 = int(np.argmax(toks[0] == eos))
    assert out.lengths[0] == first0 + 1
    np.testing.assert_array_equal(out.tokens[0, :first0 + 1], toks[0, :first0 + 1])
    assert np.all(out.tokens[0, first0 + 1:] == 0)
    row1 = toks[1]
    n1 = int(np.argmax(row1 == eos)) + 1 if (row1 == eos).any() else 6
    assert out.lengths[1] == n1
    assert decoding.trim(out.tokens, out.lengths, (eos,))[0] == [int(t) for t in toks[0, :first0]]


def test_sampling():
    logits = jax.random.normal(jax.random.key(0), (4, 50)) * 3
    greedy = decoding.sample(logits, jax.random.key(1), decoding.Sampling())
    np.testing.assert_array_equal(greedy, np.argmax(logits, -1))
    # A tiny top_p keeps only the most likely token, whatever the temperature.
    tiny_p = decoding.sample(logits, jax.random.key(1), decoding.Sampling(2.0, 1e-6))
    np.testing.assert_array_equal(tiny_p, np.argmax(logits, -1))
    # top_p = 0.5: every draw lies in the smallest set of tokens covering half the mass.
    s = decoding.Sampling(1.0, 0.5)
    draws = np.stack([np.asarray(decoding.sample(logits, jax.random.key(i), s))
                      for i in range(200)])
    probs = np.asarray(jax.nn.softmax(logits, -1))
    for row in range(4):
        order = np.argsort(-probs[row])
        cum = np.cumsum(probs[row][order]) - probs[row][order]
        allowed = set(order[cum < 0.5].tolist())
        assert set(draws[:, row].tolist()) <= allowed
    with pytest.raises(ValueError):
        decoding.Sampling(1.0, 0.0)


def test_ten_prompt_lengths_compile_prefill_and_decode_once():
    model, params = tiny.model_and_params()
    gen = decoding.Generator(model, _none_spec(model), max_new_tokens=4, eos_id=-1,
                             sampling=decoding.Sampling(0.7, 0.9))
    for n in range(3, 13):  # ten different prompt lengths, one bucket of 16
        pixels, ids, mask = tiny.batch(lengths=(n, max(2, 14 - n)), image_at=(1, 0),
                                       bucket=16, seed=n)
        out = gen(params, pixels, ids, mask, rng=jax.random.key(n))
        assert out.tokens.shape == (2, 4)
    assert gen.compilations() == {"prefill": 1, "decode": 1, "decode_step": 0}


def test_max_new_tokens_past_the_position_limit_is_an_error():
    model, params = tiny.model_and_params()
    limit = model.cfg.text.max_position_embeddings
    with pytest.raises(ValueError, match="max_position_embeddings"):
        decoding.Generator(model, _none_spec(model), max_new_tokens=10**9, eos_id=-1)
    gen = decoding.Generator(model, _none_spec(model), max_new_tokens=limit, eos_id=-1)
    pixels, ids, mask = tiny.batch()
    with pytest.raises(ValueError, match="max_position_embeddings"):
        gen(params, pixels, ids, mask)
