"""SparseVLM v1.5 (pruning/sparsevlm.py) against the official rule, with the fake probe.

The reference is a torch transcription, per example (the official code is batch 1), of
Gumpest/SparseVLMs main @26a5f48 (USE_VERSION unset = v1.5):
`modelling_sparse_llama.py` `LlamaDynamicvitModel.forward` (raters; the pruning-layer branch
with recycling), `score.py` `attn_postprocess_topk`, `utils.py` `cluster_and_merge` (its
`torch.rand * 1e-6` density noise, which orders exactly tied densities at random, replaced by
the index order the port uses; `tie="rand"` restores it), and the SDPA attention path of
`LlamaDynamicvitSdpaAttention` + `utils.scaled_dot_product_attention` (causal softmax after
input_layernorm, q/k projections and RoPE on `position_ids = arange`).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from covipal_jax.pruning import registry
from covipal_jax.pruning.base import InLLMResult
from covipal_jax.pruning.sparsevlm import (COUNTS_V15, SparseVLM, cluster_and_merge,
                                           rater_mask, recycled_counts)
from tests.fake_probe import FakeProbe, left_padded_layout, random_layer
from tests.test_pruning_pdrop import _rmsnorm, _rotary, _rotate_half

D, NH, HD = 32, 4, 8
PAD = 15          # non-image rows of every padded sequence (prefix + suffix <= 13)


# ----------------------------------------------------------------------- official (torch)

def _official_raters(inputs_embeds, v_token_start, image_shape):
    hidden_states = inputs_embeds[None]
    text_token_start = v_token_start + image_shape
    v_t = hidden_states[:, v_token_start: text_token_start, :]
    t_t = hidden_states[:, text_token_start:, :]
    m_v_t = v_t @ t_t.transpose(1, 2)
    m_v_t = m_v_t.softmax(2).mean(1)
    return torch.where(m_v_t > m_v_t.mean())


def _official_attention(hidden, layer):
    norm, wq, wk = (torch.from_numpy(np.asarray(a)) for a in (layer.norm, layer.wq, layer.wk))
    h = _rmsnorm(hidden[None], norm)
    q_len = h.shape[1]
    q = (h @ wq).view(1, q_len, NH, HD).transpose(1, 2)
    k = (h @ wk).view(1, q_len, NH, HD).transpose(1, 2)
    cos, sin = _rotary(HD, q_len)
    pos = torch.arange(q_len)[None]
    cos, sin = cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    attn_bias = torch.zeros(q_len, q_len)
    attn_bias.masked_fill_(torch.ones(q_len, q_len, dtype=torch.bool).tril(0).logical_not(),
                           float("-inf"))
    w = q @ k.transpose(-2, -1) * (1 / math.sqrt(HD)) + attn_bias
    return torch.softmax(w, dim=-1)


def _official_cluster_and_merge(x, cluster_num, tie="index"):
    B, N, C = x.shape
    dist_matrix = (x[:, :, None, :] - x[:, None, :, :]).norm(dim=-1, p=2) / (C ** 0.5)
    dist_nearest, _ = torch.topk(dist_matrix, k=cluster_num, dim=-1, largest=False)
    density = (-(dist_nearest ** 2).mean(dim=-1)).exp()
    if tie == "rand":                                   # the official line
        density = density + torch.rand(density.shape, dtype=density.dtype) * 1e-6
        mask = (density[:, None, :] > density[:, :, None]).type(x.dtype)
    else:   # exact ties ordered by index (ours); the official random noise otherwise
        ar = torch.arange(N)
        dj, di = density[:, None, :], density[:, :, None]
        mask = ((dj > di) | ((dj == di) & (ar[None, None, :] < ar[None, :, None]))).type(x.dtype)
    dist_max = dist_matrix.flatten(1).max(dim=-1)[0][:, None, None]
    dist, _ = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1)
    score = dist * density
    _, index_down = torch.topk(score, k=cluster_num, dim=-1)
    dm = dist_matrix[torch.arange(B)[:, None], index_down]
    idx_cluster = dm.argmin(dim=1)
    idx_batch = torch.arange(B)[:, None].expand(B, cluster_num)
    idx_tmp = torch.arange(cluster_num)[None, :].expand(B, cluster_num)
    idx_cluster[idx_batch.reshape(-1), index_down.reshape(-1)] = idx_tmp.reshape(-1)
    token_weight = x.new_ones(B, N, 1)
    idx = idx_cluster + torch.arange(B)[:, None] * cluster_num
    all_weight = token_weight.new_zeros(B * cluster_num, 1)
    all_weight.index_add_(dim=0, index=idx.reshape(B * N), source=token_weight.reshape(B * N, 1))
    all_weight = all_weight + 1e-6
    norm_weight = token_weight / all_weight[idx]
    x_merged = x.new_zeros(B * cluster_num, C)
    x_merged.index_add_(dim=0, index=idx.reshape(B * N),
                        source=(x * norm_weight).reshape(B * N, C))
    return x_merged.reshape(B, cluster_num, C)


def _official_stage(inputs_embeds, hidden, out, layer, v_token_start, n_v, v_token_num, count):
    """One example, one pruning layer: (kept image indices, merged tokens f32[m, D])."""
    t_token_idx = _official_raters(inputs_embeds, v_token_start, n_v)
    attn = _official_attention(hidden, layer)                       # [1, H, L, L]
    text_token_start = v_token_start + v_token_num
    w = attn.mean(1)
    rows = t_token_idx[1] + text_token_start
    relation_vis_text = w[:, rows, v_token_start: v_token_start + v_token_num].mean(1)
    mask = torch.zeros_like(relation_vis_text, dtype=bool)
    _, indices = torch.topk(relation_vis_text, min(count, v_token_num - 1), dim=1)
    mask[0][indices] = 1
    pred_score_vis = mask
    policy = torch.ones(1, hidden.shape[0])
    policy[:, v_token_start:text_token_start] = pred_score_vis.float()
    total_sparse_token_idx = torch.where(policy == 0)[1].unsqueeze(0)
    total_sparse_token = out[None][:, total_sparse_token_idx[0]]
    merge_token_idx_stage1 = torch.where(pred_score_vis == 0)[1]
    merge_token_stage1 = relation_vis_text[0][merge_token_idx_stage1]
    merge_token_num_stage1 = int(merge_token_idx_stage1.shape[0] * 0.3) + 1
    merge_token_stage2_idx = merge_token_stage1.topk(merge_token_num_stage1)[1]
    merge_token_stage2 = total_sparse_token[:, merge_token_stage2_idx, :]
    cluster_num = int(merge_token_stage2.shape[1] / 10) + 1
    merged = _official_cluster_and_merge(merge_token_stage2, cluster_num)
    return torch.where(pred_score_vis[0])[0].numpy(), merged[0].numpy()


# ------------------------------------------------------------------------------ helpers

def _make(rng, prefix, suffix, n_v, n, embed_scale=1.0):
    """A batch at one stage: left-padded probe with n current image tokens (sequence n + PAD)
    and the unpruned LLM input (n_v image tokens, sequence n_v + PAD)."""
    b = len(prefix)
    s, s0 = n + PAD, n_v + PAD
    seq_mask, text_mask, vis, pos, last = left_padded_layout(prefix, suffix, n, s)
    m0, _, vis0, _, _ = left_padded_layout(prefix, suffix, n_v, s0)
    embeds = (embed_scale * rng.normal(size=(b, s0, D))).astype(np.float32) * m0[..., None]
    hidden = (rng.normal(size=(b, s, D))).astype(np.float32)
    out = (hidden + rng.normal(size=(b, s, D))).astype(np.float32)
    return FakeProbe(hidden=hidden, out=out, prev=random_layer(rng, D, NH, NH, HD, scale=3.0),
                     next=random_layer(rng, D, NH, NH, HD), seq_mask=seq_mask, positions=pos,
                     vision_index=vis, text_mask=text_mask, last_index=last, num_heads=NH,
                     num_kv_heads=NH, head_dim=HD, input_embeds=embeds, input_vision_index=vis0)


def _official_for_example(probe, i, prefix, n_v, n, count):
    valid = np.asarray(probe.seq_mask[i])
    s0 = probe.input_embeds.shape[1]
    length0 = int(valid.sum()) - n + n_v
    emb = torch.from_numpy(np.asarray(probe.input_embeds[i])[s0 - length0:])
    return _official_stage(emb, torch.from_numpy(np.asarray(probe.hidden[i])[valid]),
                           torch.from_numpy(np.asarray(probe.out[i])[valid]), probe.prev,
                           prefix, n_v, n, count)


# -------------------------------------------------------------------------------- tests

@pytest.mark.slow
@pytest.mark.parametrize("seed", range(6))
def test_same_kept_and_merged_as_official(seed):
    """Every stage of the 192 and 64 tables on 576 tokens and of the scaled table on 64
    tokens, a batch of 3 left-padded prompts: same kept set, same merged tokens (in order)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    for n_v, method in ((576, SparseVLM(keep=192)), (576, SparseVLM(keep=64)),
                        (64, SparseVLM(keep=1 / 3))):
        n = n_v
        for stage, (_, k) in enumerate(method.stages(n_v, 32)):
            prefix = [int(x) for x in rng.integers(1, 6, size=3)]
            suffix = [int(x) for x in rng.integers(3, 9, size=3)]
            probe = _make(rng, prefix, suffix, n_v, n)
            res = method.select_in_llm(probe, k, stage)
            assert isinstance(res, InLLMResult)
            keep, m = method.plan(n_v)[stage]
            assert res.kept.shape == (3, keep) and res.merged.shape == (3, m, D)
            assert keep + m == k
            count = method.stage_counts(n_v)[stage]
            for i in range(3):
                ref_kept, ref_merged = _official_for_example(probe, i, prefix[i], n_v, n, count)
                np.testing.assert_array_equal(np.asarray(res.kept[i]), ref_kept)
                np.testing.assert_allclose(np.asarray(res.merged[i]), ref_merged, rtol=1e-5,
                                           atol=1e-5)
            n = k


def test_batched_equals_per_example_and_jits_once():
    rng = np.random.default_rng(4)
    prefix, suffix, n_v = [1, 4, 2, 3], [3, 6, 4, 8], 64
    method = SparseVLM(keep=1 / 3)
    probe = _make(rng, prefix, suffix, n_v, n_v)
    k = method.stages(n_v, 4)[0][1]
    traces = []

    @jax.jit
    def run(hidden, out, embeds):
        traces.append(1)
        p = FakeProbe(**{**probe.__dict__, "hidden": hidden, "out": out, "input_embeds": embeds})
        return method.select_in_llm(p, k, 0)

    res = run(probe.hidden, probe.out, probe.input_embeds)
    run(probe.hidden * 2, probe.out + 1, probe.input_embeds * 0.5)
    assert len(traces) == 1
    fields = ("hidden", "out", "seq_mask", "positions", "vision_index", "text_mask",
              "last_index", "input_embeds", "input_vision_index")
    for i in range(4):
        one = FakeProbe(**{**probe.__dict__, **{f: getattr(probe, f)[i:i + 1] for f in fields}})
        r1 = method.select_in_llm(one, k, 0)
        np.testing.assert_array_equal(np.asarray(res.kept[i]), np.asarray(r1.kept[0]))
        np.testing.assert_allclose(np.asarray(res.merged[i]), np.asarray(r1.merged[0]),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(res.merged_positions[i]),
                                      np.asarray(r1.merged_positions[0]))
    assert len({tuple(r) for r in np.asarray(res.kept).tolist()}) == 4


def test_raters_match_official_and_ignore_padding():
    rng = np.random.default_rng(2)
    prefix, suffix, n_v = [2, 5], [6, 3], 20
    probe = _make(rng, prefix, suffix, n_v, n_v)
    r = probe.input_embeds.shape[1] - n_v
    mask = np.asarray(rater_mask(jnp.asarray(probe.input_embeds),
                                 jnp.asarray(probe.input_vision_index), r))
    s0 = probe.input_embeds.shape[1]
    for i in range(2):
        length0 = prefix[i] + n_v + suffix[i]
        emb = torch.from_numpy(np.asarray(probe.input_embeds[i])[s0 - length0:])
        ref = _official_raters(emb, prefix[i], n_v)[1].numpy()
        got = np.nonzero(mask[i])[0] - (r - suffix[i])
        np.testing.assert_array_equal(got, ref)
        assert not mask[i, : r - suffix[i]].any()


def test_cluster_and_merge_official():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    for n, m in ((30, 4), (83, 9), (5, 1), (1, 1)):
        x = rng.normal(size=(2, n, 16)).astype(np.float32)
        got, centres = cluster_and_merge(jnp.asarray(x), m)
        ref = _official_cluster_and_merge(torch.from_numpy(x), m).numpy()
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-6)
        assert centres.shape == (2, m)


def test_plans_and_config():
    import ml_collections
    assert SparseVLM(keep=192).stage_counts(576) == COUNTS_V15[192]
    assert SparseVLM(keep=192).stages(576, 32) == ((3, 309), (7, 204), (16, 113))
    assert SparseVLM(keep=64, recycle=False).stages(576, 32) == ((3, 66), (7, 30), (16, 17))
    assert SparseVLM().stages(64, 4)[0][0] == 1
    assert recycled_counts(276) == (83, 9)
    with pytest.raises(ValueError, match="v1.5 budgets"):
        SparseVLM(keep=300).stage_counts(576)
    with pytest.raises(ValueError):
        SparseVLM(counts=(10, 5))
    probe = _make(np.random.default_rng(0), [1], [4], 16, 16)
    with pytest.raises(ValueError, match="input_embeds"):
        SparseVLM(keep=6).select_in_llm(
            FakeProbe(**{**probe.__dict__, "input_embeds": None}), 7, 0)
    assert registry.get("sparsevlm") is SparseVLM
    m = registry.from_config(ml_collections.ConfigDict(
        {"method": "sparsevlm", "keep": 128, "layers": [2, 6, 15], "counts": None,
         "recycle": True}))
    assert m.stage_counts(576) == COUNTS_V15[128] and m.layers == (2, 6, 15)
    hash(m)
