"""PyramidDrop (pruning/pdrop.py) against the official rank-and-drop rule, with the fake probe.

The reference is a torch transcription of the inference branch of
Cooperx521/PyramidDrop @6444f30 `llava/model/modeling_llama_pdrop.py`
`LlamaModel.pdrop_rank_drop` (LlamaRMSNorm, q_proj / k_proj, the old-HF rotary cache and
`apply_rotary_pos_emb`, the eager causal mask, the last-instruction-token row, mean over heads,
image columns, `topk(keep_length)`, `.sort()`), run per example on its unpadded sequence with
`position_ids = arange` as the official code re-indexes them.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from covipal_jax.pruning import registry
from covipal_jax.pruning.pdrop import PyramidDrop, average_tokens, budget_schedule, pdrop_scores
from tests.fake_probe import FakeProbe, left_padded_layout, random_layer

D, NH, HD = 32, 4, 8


# ----------------------------------------------------------------------- official (torch)

def _rmsnorm(x, w, eps=1e-6):
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    return w * (x * torch.rsqrt(variance + eps))


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _rotary(dim, seq_len, base=10000.0):
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
    t = torch.arange(seq_len, dtype=inv_freq.dtype)
    freqs = torch.einsum("i,j->ij", t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _official_rank(features, layer, image_index, image_tokens, keep_length, prompt_len):
    """features f32[L, D] (one example, valid tokens only) -> sorted kept image indices
    (0-based within the image span)."""
    features = torch.from_numpy(np.asarray(features))[None]
    norm, wq, wk = (torch.from_numpy(np.asarray(a)) for a in (layer.norm, layer.wq, layer.wk))
    hidden_states = _rmsnorm(features, norm)
    bsz, q_len, _ = hidden_states.size()
    query_states = (hidden_states @ wq).view(bsz, q_len, NH, HD).transpose(1, 2)
    key_states = (hidden_states @ wk).view(bsz, q_len, NH, HD).transpose(1, 2)
    cos, sin = _rotary(HD, q_len)
    position_ids = torch.arange(0, q_len).unsqueeze(0)
    cos, sin = cos[position_ids].unsqueeze(1), sin[position_ids].unsqueeze(1)
    query_states = query_states * cos + _rotate_half(query_states) * sin
    key_states = key_states * cos + _rotate_half(key_states) * sin
    causal = torch.full((q_len, q_len), torch.finfo(torch.float32).min).triu(1)
    cur_key_states, cur_query_states = key_states[0], query_states[0]
    prompt_total_len = prompt_len + image_tokens
    text_query_states = cur_query_states[:, prompt_total_len - 1, :].unsqueeze(1)
    text_eager_attention_mask = causal[prompt_total_len - 1, :][None, None, :]
    attn_weights = torch.matmul(text_query_states, cur_key_states.transpose(1, 2)) / math.sqrt(HD)
    attn_weights = attn_weights + text_eager_attention_mask
    attn_weights = torch.nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32)
    attention_avg_head = torch.mean(attn_weights, dim=0)
    attention_avg_head = attention_avg_head[:, image_index:image_index + image_tokens]
    attention_avg_text = torch.mean(attention_avg_head, dim=0)
    top_rank_index = attention_avg_text.topk(keep_length).indices
    return top_rank_index.sort().values.numpy()


# ------------------------------------------------------------------------------ helpers

def _probe(rng, prefix, suffix, n, s, scale=3.0):
    seq_mask, text_mask, vis, pos, last = left_padded_layout(prefix, suffix, n, s)
    b = len(prefix)
    hidden = rng.normal(size=(b, s, D)).astype(np.float32)
    out = (hidden + rng.normal(size=(b, s, D))).astype(np.float32)
    probe = FakeProbe(hidden=hidden, out=out, prev=random_layer(rng, D, NH, NH, HD),
                      next=random_layer(rng, D, NH, NH, HD, scale=scale),
                      seq_mask=seq_mask, positions=pos, vision_index=vis, text_mask=text_mask,
                      last_index=last, num_heads=NH, num_kv_heads=NH, head_dim=HD)
    return probe


def _official_for_example(probe, i, prefix, suffix, n, k):
    valid = np.asarray(probe.seq_mask[i])
    feats = np.asarray(probe.out[i])[valid]
    return _official_rank(feats, probe.next, prefix, n, k, prefix + suffix)


# -------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("seed", range(10))
def test_same_kept_sets_as_official_every_stage(seed):
    """Each stage of the default schedule (n_v=64 on 32 layers: 32/16/8 kept) and of the 64-
    token budget on 576 tokens: a batch of 3 left-padded prompts, per-example official ranks."""
    rng = np.random.default_rng(seed)
    for n_v in (64, 576):
        method = PyramidDrop() if n_v == 64 else PyramidDrop(keep=64)
        n = n_v
        for stage, (_, k) in enumerate(method.stages(n_v, 32)):
            prefix = [int(x) for x in rng.integers(1, 6, size=3)]
            suffix = [int(x) for x in rng.integers(2, 9, size=3)]
            s = n + 15                      # fixed per stage: one compile for all seeds
            probe = _probe(rng, prefix, suffix, n, s)
            idx = np.asarray(method.select_in_llm(probe, k, stage))
            assert idx.shape == (3, k)
            for i in range(3):
                ref = _official_for_example(probe, i, prefix[i], suffix[i], n, k)
                np.testing.assert_array_equal(idx[i], ref)
            n = k


def test_batched_equals_per_example_and_jits_once():
    rng = np.random.default_rng(11)
    prefix, suffix, n, k = [1, 4, 2, 3], [3, 6, 2, 5], 48, 12
    s = 60
    probe = _probe(rng, prefix, suffix, n, s)
    method = PyramidDrop()
    traces = []

    @jax.jit
    def run(out, vis, mask, pos, text, last):
        traces.append(1)
        p = FakeProbe(hidden=probe.hidden, out=out, prev=probe.prev, next=probe.next,
                      seq_mask=mask, positions=pos, vision_index=vis, text_mask=text,
                      last_index=last, num_heads=NH, num_kv_heads=NH, head_dim=HD)
        return method.select_in_llm(p, k, 0)

    args = (probe.out, probe.vision_index, probe.seq_mask, probe.positions, probe.text_mask,
            probe.last_index)
    idx = np.asarray(run(*args))
    run(probe.out * 2.0, *args[1:])
    assert len(traces) == 1
    for i in range(4):
        one = FakeProbe(**{**probe.__dict__, **{f: getattr(probe, f)[i:i + 1] for f in (
            "hidden", "out", "seq_mask", "positions", "vision_index", "text_mask",
            "last_index")}})
        np.testing.assert_array_equal(idx[i], np.asarray(method.select_in_llm(one, k, 0))[0])
        assert len(set(idx[i].tolist())) == k and np.all(np.diff(idx[i]) > 0)
    assert len({tuple(r) for r in idx.tolist()}) == 4   # different selections per example


def test_scores_are_head_mean_probabilities_of_the_next_layer():
    rng = np.random.default_rng(5)
    probe = _probe(rng, [2, 3], [4, 2], 16, 26)
    sc = np.asarray(pdrop_scores(probe))
    full = np.asarray(probe.attention_rows(probe.last_index[:, None], layer="next"))
    ref = full.mean(axis=1)[:, 0]
    np.testing.assert_allclose(sc, np.take_along_axis(ref, probe.vision_index, axis=1),
                               rtol=1e-6)
    # the previous layer's attention is a different signal
    prev = np.asarray(probe.attention_rows(probe.last_index[:, None])).mean(1)[:, 0]
    assert not np.allclose(sc, np.take_along_axis(prev, probe.vision_index, axis=1))


def test_schedules():
    assert PyramidDrop().stages(576, 32) == ((8, 288), (16, 144), (24, 72))
    assert average_tokens(576, 32, (8, 16, 24), (288, 144, 72)) == 270.0
    assert PyramidDrop().stages(64, 4) == ((1, 32), (2, 16), (3, 8))          # scaled depth
    assert PyramidDrop(lam=0.25).stages(576, 32) == ((8, 144), (16, 36), (24, 9))
    assert PyramidDrop(layers=(4, 12), ratios=(0.5, 0.1)).stages(576, 32) == ((4, 288),
                                                                              (12, 57))
    for target in (192, 128, 64):
        st = PyramidDrop(keep=target).stages(576, 32)
        ls, ks = zip(*st)
        avg = average_tokens(576, 32, ls, ks)
        assert target - 1.0 <= avg <= target, (target, st, avg)
        assert list(ks) == sorted(ks, reverse=True)
    assert PyramidDrop(keep=192).stages(576, 32)[0][0] == 8        # official layers when feasible
    assert PyramidDrop(keep=64).stages(576, 32)[0][0] == 2
    with pytest.raises(ValueError, match="not reachable"):
        budget_schedule(576, 32, 64, layers=(8, 16, 24))
    with pytest.raises(ValueError, match="strictly"):
        PyramidDrop().stages(576, 3)
    assert PyramidDrop(keep=0.5).stages(64, 4)[0][0] == 1          # 2/10/20 -> 1/2/3
    with pytest.raises(ValueError, match="not reachable"):          # layer 0 sees all 64
        PyramidDrop(keep=0.25).stages(64, 4)
    with pytest.raises(ValueError):
        PyramidDrop(ratios=(0.25, 0.5))


def test_registered_and_from_config():
    import ml_collections
    assert registry.get("pdrop") is PyramidDrop and PyramidDrop.where == "in_llm"
    m = registry.from_config(ml_collections.ConfigDict(
        {"method": "pdrop", "keep": 1.0, "layers": [8, 16, 24], "ratios": [0.5, 0.25, 0.125],
         "lam": None}))
    assert m.layers == (8, 16, 24) and m.ratios == (0.5, 0.25, 0.125)
    assert m.stages(576, 32) == ((8, 288), (16, 144), (24, 72))
    hash(m)
