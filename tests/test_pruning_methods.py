"""Tests for the training-free methods (pruning/fastv.py, visionzip.py, simple.py) and the
registry (pruning/__init__.py); DART: tests/test_pruning_dart.py.

Each method is checked against an independent NumPy transcription of its published rule,
written per example with Python loops/sets (the official code's style), plus: exact k,
batched == per-example, and one jit trace for different data.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from covipal_jax import pruning
from covipal_jax.pruning import fastv, select, simple, visionzip
from covipal_jax.pruning.base import PruneContext


def _softmax(x, axis=-1):
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def _jit_once(fn, inputs):
    """Run jit(fn) on each input; assert one trace; return outputs."""
    traces = []

    @jax.jit
    def f(x):
        traces.append(1)
        return fn(x)

    outs = [jax.tree.map(np.asarray, f(x)) for x in inputs]
    assert len(traces) == 1
    return outs


# ============================================================================= FastV

def _fastv_attention(seed, b=3, n_heads=4, length=30):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(b, n_heads, length, length)) * 3
    causal = np.tril(np.ones((length, length), bool))
    return _softmax(np.where(causal, logits, -np.inf)).astype(np.float32)


def _ref_fastv(attn, image_start, n_v, drop_ratio):
    """pkunlp-icler/FastV modeling_llama.py, in-place path, one example at a time."""
    out = []
    for b in range(attn.shape[0]):
        avg = attn[b].mean(axis=0)           # torch.mean(last_layer_attention, dim=1)[0]
        last = avg[-1]                       # [-1]
        s = int(image_start[b])
        img = last[s:s + n_v]
        k = round(n_v * (1 - drop_ratio))
        top = np.argsort(-img, kind="stable")[:k] + s
        keep = np.sort(np.concatenate([np.arange(s), top, np.arange(s + n_v, len(last))]))
        out.append(keep[(keep >= s) & (keep < s + n_v)] - s)
    return np.stack(out)


@pytest.mark.parametrize("drop_ratio", [0.5, 0.75])
def test_fastv_matches_reference(drop_ratio):
    n_v = 16
    attn = _fastv_attention(0)
    start = np.array([2, 5, 9], np.int32)
    k = fastv.fastv_keep(n_v, drop_ratio)
    assert k == round(n_v * (1 - drop_ratio))
    row = attn[:, :, -1, :]                                   # [B, N, L]
    img = select.slice_span(jnp.asarray(row), jnp.asarray(start), n_v, axis=-1)
    got = np.asarray(fastv.select_in_llm(img, k))
    np.testing.assert_array_equal(got, _ref_fastv(attn, start, n_v, drop_ratio))
    # head-averaged input gives the same answer
    np.testing.assert_array_equal(fastv.select_in_llm(jnp.mean(img, axis=1), k), got)
    # batched == per example
    for b in range(3):
        np.testing.assert_array_equal(fastv.select_in_llm(img[b:b + 1], k)[0], got[b])


def test_fastv_jit_once():
    n_v, k = 16, 6
    start = jnp.array([2, 5, 9])
    imgs = [select.slice_span(jnp.asarray(_fastv_attention(s)[:, :, -1]), start, n_v, axis=-1)
            for s in (1, 2)]
    outs = _jit_once(functools.partial(fastv.select_in_llm, k=k), imgs)
    for img, o in zip(imgs, outs):
        np.testing.assert_array_equal(o, fastv.select_in_llm(img, k))
        assert o.shape == (3, k)


def test_last_row_attention_matches_full_attention_gqa():
    rng = np.random.default_rng(5)
    b, s, kv, g, h = 2, 9, 2, 3, 4
    q = rng.normal(size=(b, s, kv * g, h)).astype(np.float32)
    keys = rng.normal(size=(b, s, kv, h)).astype(np.float32)
    mask = np.ones((b, s), bool)
    mask[1, :3] = False                                       # left padding in row 1
    # reference: HF-style repeat_kv, full causal attention, take the last query row
    k_rep = np.repeat(keys, g, axis=2)                        # [B, S, N, H]
    logits = np.einsum("bqnh,bknh->bnqk", q, k_rep) / np.sqrt(h)
    allowed = np.tril(np.ones((s, s), bool))[None, None] & mask[:, None, None, :]
    want = _softmax(np.where(allowed, logits, -1e30))[:, :, -1, :]
    got = fastv.last_row_attention(jnp.asarray(q[:, -1]), jnp.asarray(keys), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_fastv_keep_bounds():
    assert fastv.fastv_keep(576, 0.5) == 288
    assert fastv.fastv_keep(576, 0.75) == 144
    with pytest.raises(ValueError):
        fastv.fastv_keep(576, 1.0)


# ============================================================================= VisionZip

def _vit_layer(seed, b=3, n=36, heads=4, dv=8, hd=5):
    """Random stand-ins for one CLIP feature layer: hidden [B,1+n,Dv] (CLS first), attention
    probabilities [B,heads,1+n,1+n], per-head keys [B,heads,1+n,hd]."""
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(b, 1 + n, dv)).astype(np.float32)
    attn = _softmax(rng.normal(size=(b, heads, 1 + n, 1 + n)) * 2).astype(np.float32)
    keys = rng.normal(size=(b, heads, 1 + n, hd)).astype(np.float32)
    return hidden, attn, keys


def _ctx_from_vit(hidden, attn, keys, cls=True, d=7, grid=(6, 6)):
    b = hidden.shape[0]
    kw = dict(vision_features=jnp.asarray(hidden[:, 1:]),
              vision_keys=jnp.asarray(keys.mean(axis=1)[:, 1:]),
              vision_tokens=jnp.zeros((b, hidden.shape[1] - 1, d)),
              text_embeds=jnp.zeros((b, 3, d)), text_mask=jnp.ones((b, 3), bool), grid=grid)
    if cls:
        kw.update(cls_features=jnp.asarray(hidden[:, 0]),
                  cls_attention=jnp.asarray(attn[:, :, 0, 1:].sum(axis=1)))
    else:
        kw.update(mean_attention_received=jnp.asarray(attn[:, :, :, 1:].mean(axis=1).mean(axis=1)))
    return PruneContext(**kw)


def _ref_merge(hidden_filtered, metric_filtered, contextual_num):
    """VisionZip contextual merge on the filtered (non-dominant) tokens of one example."""
    mn = metric_filtered / np.linalg.norm(metric_filtered, axis=-1, keepdims=True)
    r = mn.shape[0]
    step = max(1, r // contextual_num)
    target_indices = np.arange(0, r, step)[:contextual_num]
    is_t = np.isin(np.arange(r), target_indices)
    similarity = mn[~is_t] @ mn[target_indices].T
    assign = np.zeros((int((~is_t).sum()), contextual_num), np.float32)
    assign[np.arange(assign.shape[0]), similarity.argmax(axis=1)] = 1
    counts = np.maximum(assign.sum(axis=0), 1)[:, None]
    aggregated = assign.T @ hidden_filtered[~is_t] / counts
    return hidden_filtered[target_indices] + aggregated, target_indices


def _ref_visionzip_clip(hidden, attn, keys, dominant, contextual):
    """dvlab-research/VisionZip clip_encoder.py, one example at a time (dominant incl. CLS)."""
    toks, pos = [], []
    dominant_num = dominant - 1                         # visionzip/main.py: dominant - 1
    for b in range(hidden.shape[0]):
        cls_attention_sum = attn[b, :, 0, 1:].sum(axis=0)
        topk = np.argsort(-cls_attention_sum, kind="stable")[:dominant_num] + 1
        all_indices = np.concatenate([[0], topk])
        mask = np.ones(hidden.shape[1], bool)
        mask[all_indices] = False
        dominant_tokens = hidden[b][~mask]
        metric = keys[b].mean(axis=0)                   # raw_key_states.mean(1)
        ctx_tok, tgt = _ref_merge(hidden[b][mask], metric[mask], contextual)
        toks.append(np.concatenate([dominant_tokens, ctx_tok]))
        filtered_idx = np.flatnonzero(mask)
        pos.append(np.concatenate([[0], np.flatnonzero(~mask)[1:] - 1, filtered_idx[tgt] - 1]))
    return np.stack(toks), np.stack(pos)


def _ref_visionzip_siglip(hidden, attn, keys, dominant, contextual):
    """No CLS: score = attention received, mean over heads and queries (HoliTom's port)."""
    toks, pos = [], []
    for b in range(hidden.shape[0]):
        h, k = hidden[b, 1:], keys[b].mean(axis=0)[1:]
        score = attn[b, :, :, 1:].mean(axis=0).mean(axis=0)
        top = np.argsort(-score, kind="stable")[:dominant]
        mask = np.ones(h.shape[0], bool)
        mask[top] = False
        ctx_tok, tgt = _ref_merge(h[mask], k[mask], contextual)
        toks.append(np.concatenate([h[~mask], ctx_tok]))
        pos.append(np.concatenate([np.flatnonzero(~mask), np.flatnonzero(mask)[tgt]]))
    return np.stack(toks), np.stack(pos)


@pytest.mark.parametrize("k,dom,ctxn", [(32, None, None), (20, None, None), (10, 4, 6),
                                        (36, 30, 6), (3, 3, 0), (1, None, None)])
def test_visionzip_clip_matches_reference(k, dom, ctxn):
    hidden, attn, keys = _vit_layer(0)
    ctx = _ctx_from_vit(hidden, attn, keys)
    w = np.random.default_rng(9).normal(size=(hidden.shape[-1], 7)).astype(np.float32)
    project = lambda x: x @ jnp.asarray(w)
    res = visionzip.visionzip(ctx, k, project=project, dominant=dom, contextual=ctxn)
    d_tot, c_num = visionzip.split_budget(k, dom, ctxn)
    if dom is None:
        assert d_tot == max(1, round(k * 54 / 64)) and c_num == k - d_tot
    else:
        assert (d_tot, c_num) == (dom, ctxn)
    if c_num == 0:
        ref_tok = []
        for b in range(3):
            top = np.sort(np.argsort(-attn[b, :, 0, 1:].sum(0), kind="stable")[:d_tot - 1])
            ref_tok.append(np.concatenate([hidden[b, :1], hidden[b, 1 + top]]))
        ref_tok = np.stack(ref_tok)
        ref_pos = None
    else:
        ref_tok, ref_pos = _ref_visionzip_clip(hidden, attn, keys, d_tot, c_num)
    assert res.tokens.shape == (3, k, 7) and res.indices.shape == (3, k)
    np.testing.assert_allclose(np.asarray(res.tokens), ref_tok @ w, rtol=1e-5, atol=1e-5)
    if ref_pos is not None:
        np.testing.assert_array_equal(np.asarray(res.indices), ref_pos)


def test_visionzip_official_budgets():
    assert visionzip.split_budget(64) == (54, 10)
    assert visionzip.split_budget(128) == (108, 20)
    assert visionzip.split_budget(192) == (162, 30)


def test_visionzip_siglip_fallback_matches_reference():
    hidden, attn, keys = _vit_layer(1)
    ctx = _ctx_from_vit(hidden, attn, keys, cls=False)
    res = visionzip.visionzip(ctx, 20, project=lambda x: x)
    ref_tok, ref_pos = _ref_visionzip_siglip(hidden, attn, keys, *visionzip.split_budget(20))
    np.testing.assert_allclose(np.asarray(res.tokens), ref_tok, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(res.indices), ref_pos)


def test_visionzip_spatial_order_and_batching_and_jit():
    hidden, attn, keys = _vit_layer(2)
    ctx = _ctx_from_vit(hidden, attn, keys)
    k = 16
    a = visionzip.visionzip(ctx, k, project=lambda x: x)
    s = visionzip.visionzip(ctx, k, project=lambda x: x, order="spatial")
    for b in range(3):
        assert np.all(np.diff(np.asarray(s.indices[b])) >= 0)
        # same multiset of (position, token) pairs, reordered
        pa = sorted(zip(np.asarray(a.indices[b]).tolist(), np.asarray(a.tokens[b]).tolist()))
        ps = sorted(zip(np.asarray(s.indices[b]).tolist(), np.asarray(s.tokens[b]).tolist()))
        assert pa == ps
        one = jax.tree.map(lambda x: x[b:b + 1] if hasattr(x, "shape") else x, ctx)
        r1 = visionzip.visionzip(one, k, project=lambda x: x)
        np.testing.assert_allclose(np.asarray(r1.tokens[0]), np.asarray(a.tokens[b]),
                                   rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(r1.indices[0]), np.asarray(a.indices[b]))
    ctxs = [ctx, _ctx_from_vit(*_vit_layer(3))]
    outs = _jit_once(lambda c: visionzip.visionzip(c, k, project=lambda x: 2 * x), ctxs)
    for c, o in zip(ctxs, outs):
        want = visionzip.visionzip(c, k, project=lambda x: 2 * x)
        np.testing.assert_allclose(o.tokens, np.asarray(want.tokens), rtol=1e-5, atol=1e-5)


def test_visionzip_needs_inputs():
    hidden, attn, keys = _vit_layer(0)
    ctx = _ctx_from_vit(hidden, attn, keys).replace(cls_attention=None)
    with pytest.raises(ValueError, match="mean_attention_received"):
        visionzip.visionzip(ctx, 8, project=lambda x: x)
    with pytest.raises(ValueError, match="vision_keys"):
        visionzip.visionzip(ctx.replace(vision_keys=None), 8, project=lambda x: x)


# ============================================================================= simple

def _simple_ctx(seed, b=3, grid=(6, 8), d=5, rng_key=None):
    n_v = grid[0] * grid[1]
    r = np.random.default_rng(seed)
    return PruneContext(vision_tokens=jnp.asarray(r.normal(size=(b, n_v, d)), jnp.float32),
                        text_embeds=jnp.zeros((b, 2, d)), text_mask=jnp.ones((b, 2), bool),
                        grid=grid, rng=rng_key)


def test_random_deterministic_distinct_and_batched():
    keys = jax.random.split(jax.random.key(0), 3)
    ctx = _simple_ctx(0, rng_key=keys)
    res = simple.random(ctx, 10)
    again = simple.random(ctx, 10)
    np.testing.assert_array_equal(res.indices, again.indices)
    idx = np.asarray(res.indices)
    for b in range(3):
        assert len(set(idx[b])) == 10 and np.all(np.diff(idx[b]) > 0)
        np.testing.assert_array_equal(np.asarray(res.tokens[b]),
                                      np.asarray(ctx.vision_tokens[b, idx[b]]))
        one = simple.random(jax.tree.map(lambda x: x[b:b + 1], ctx), 10)
        np.testing.assert_array_equal(np.asarray(one.indices[0]), idx[b])
    assert not np.array_equal(idx[0], idx[1])
    # a single (raw) key is split per example
    single = simple.random(ctx.replace(rng=jax.random.PRNGKey(3)), 10)
    assert single.indices.shape == (3, 10)


def test_random_is_uniform():
    n_v, k, draws = 48, 12, 2000
    ctx = _simple_ctx(0, b=draws, d=1, rng_key=jax.random.split(jax.random.key(1), draws))
    idx = np.asarray(jax.jit(lambda c: simple.random(c, k).indices)(ctx))
    counts = np.bincount(idx.ravel(), minlength=n_v)
    expected = draws * k / n_v                         # 500 each
    # binomial std ~ sqrt(500 * 0.75) ~ 19.4; 5 sigma band
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected * (1 - k / n_v)))


def test_pool_indices_subgrid_and_properties():
    idx = simple.pool_indices(24, 24, 64)
    rows, cols = np.divmod(idx, 24)
    want = np.arange(1, 24, 3)
    np.testing.assert_array_equal(np.unique(rows), want)
    np.testing.assert_array_equal(np.unique(cols), want)
    assert len(idx) == 64
    for h, w in ((24, 24), (27, 27), (6, 8), (1, 5)):
        for k in range(1, h * w + 1):
            idx = simple.pool_indices(h, w, k)
            assert len(idx) == k and np.all(np.diff(idx) > 0) and idx.max() < h * w
            rows, cols = np.divmod(idx, w)
            per_row = np.bincount(rows)
            per_row = per_row[per_row > 0]
            assert per_row.max() - per_row.min() <= 1        # balanced rows
    np.testing.assert_array_equal(simple.pool_indices(4, 4, 16), np.arange(16))


def test_pool_methods():
    ctx = _simple_ctx(1, grid=(6, 8))
    res = simple.pool(ctx, 12)
    idx = simple.pool_indices(6, 8, 12)
    np.testing.assert_array_equal(np.asarray(res.indices), np.broadcast_to(idx, (3, 12)))
    np.testing.assert_array_equal(np.asarray(res.tokens), np.asarray(ctx.vision_tokens)[:, idx])
    avg = simple.pool(ctx, 12, mode="avg")
    x = np.asarray(ctx.vision_tokens)
    rr, cc = np.divmod(np.arange(48), 8)
    pr, pc = np.divmod(idx, 8)
    for j in range(12):
        members = [n for n in range(48)
                   if np.argmin((rr[n] - pr) ** 2 + (cc[n] - pc) ** 2) == j]
        assert idx[j] in members
        np.testing.assert_allclose(np.asarray(avg.tokens[:, j]), x[:, members].mean(1),
                                   rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        simple.pool(ctx.replace(grid=(5, 8)), 4)


def test_none_and_jit_of_simple_methods():
    ctx = _simple_ctx(2, rng_key=jax.random.split(jax.random.key(2), 3))
    res = simple.none(ctx, 48)
    np.testing.assert_array_equal(np.asarray(res.tokens), np.asarray(ctx.vision_tokens))
    with pytest.raises(ValueError):
        simple.none(ctx, 10)
    ctx2 = _simple_ctx(3, rng_key=jax.random.split(jax.random.key(3), 3))
    for fn in (simple.random, simple.pool, functools.partial(simple.pool, mode="avg")):
        outs = _jit_once(lambda c: fn(c, 7), [ctx, ctx2])
        for c, o in zip((ctx, ctx2), outs):
            np.testing.assert_allclose(o.tokens, np.asarray(fn(c, 7).tokens), rtol=1e-5,
                                       atol=1e-6)
            assert o.indices.shape == (3, 7)


# ============================================================================= registry

def test_registry():
    assert set(pruning.names()) >= {"ppm", "fastv", "visionzip", "dart", "random", "pool",
                                    "none"}
    assert pruning.get("fastv").where == "in_llm"
    assert pruning.get("dart")().layer == 2
    assert pruning.get("ppm").trainable
    vz = pruning.get("visionzip")
    assert "cls" in vz.needs and vz.merges and vz.where == "pre_llm"
    assert not any(pruning.get(n).trainable for n in pruning.names() if n != "ppm")
    with pytest.raises(ValueError, match="valid:.*dart.*fastv"):
        pruning.get("nosuchmethod")


def test_methods_are_hashable_values_with_their_config_keys():
    import ml_collections

    c = ml_collections.ConfigDict(dict(method="visionzip", keep=64.0, positions="original",
                                       layer=3, dart_pivots=6, visionzip_dominant_frac=0.5,
                                       pool_mode="avg", ppm_checkpoint="/x"))
    vz = pruning.from_config(c)
    assert vz == pruning.VisionZipMethod(keep=64, positions="original", dominant_frac=0.5)
    assert vz.k(576) == 64 and vz.dominant_count(64) == 32 and hash(vz) == hash(
        pruning.VisionZipMethod(keep=64, positions="original", dominant_frac=0.5))
    c.method = "dart"
    assert pruning.from_config(c) == pruning.DART(keep=64, positions="original", layer=3,
                                                  pivots=6)
    c.method = "pool"
    assert pruning.from_config(c).mode == "avg" and pruning.from_config(c).merges
    c.method = "ppm"
    assert pruning.from_config(c).ppm_checkpoint == "/x"
    c.method, c.keep = "fastv", 0.5
    assert pruning.from_config(c) == pruning.FastV(keep=0.5, positions="original", layer=3)
    with pytest.raises(ValueError, match="keep"):
        pruning.NoneMethod(keep=0.5).k(16)
    with pytest.raises(ValueError, match="keep"):
        pruning.FastV(keep=1.5)
    with pytest.raises(ValueError, match=r"K=9 must be in \[1, 4\)"):
        pruning.FastV(keep=0.5, layer=9).stages(16, 4)


def test_random_is_per_example_batch_1_equals_batch_7():
    """Issue 15: example i's draw depends only on its own key, never on the batch."""
    b, n_v, d = 7, 24, 4
    tokens = jax.random.normal(jax.random.key(0), (b, n_v, d))
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(3), i))(jnp.arange(b))
    ctx = lambda sl: PruneContext(vision_tokens=tokens[sl], text_embeds=jnp.zeros((1, 2, d)),
                                  text_mask=jnp.ones((1, 2), bool), rng=keys[sl])
    m = pruning.RandomMethod(keep=6)
    batch = m.select(ctx(slice(0, b)), 6).indices
    for i in range(b):
        one = m.select(ctx(slice(i, i + 1)), 6).indices
        np.testing.assert_array_equal(one[0], batch[i])
    # A single key: row b uses fold_in(key, b), whatever the batch size.
    single = lambda n: PruneContext(vision_tokens=tokens[:n], text_embeds=jnp.zeros((1, 2, d)),
                                    text_mask=jnp.ones((1, 2), bool), rng=jax.random.key(3))
    np.testing.assert_array_equal(m.select(single(1), 6).indices[0],
                                  m.select(single(b), 6).indices[0])
    assert len({tuple(np.asarray(r)) for r in batch}) > 1  # examples differ
