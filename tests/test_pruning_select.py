"""Tests for covipal_jax/pruning/select.py and the budget rule in pruning/base.py."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from covipal_jax.models import multimodal as mm
from covipal_jax.pruning import base, select


# ----------------------------------------------------------------------------- resolve_keep

@pytest.mark.parametrize("keep,n_v,want", [
    (0.25, 576, 144), (0.5, 576, 288), (1.0, 576, 576), (0.111, 576, 64), (1e-6, 576, 1),
    (64, 576, 64), (1, 576, 1), (576, 576, 576), (np.int64(3), 10, 3), (0.15, 10, 2),
])
def test_resolve_keep(keep, n_v, want):
    assert base.resolve_keep(keep, n_v) == want


@pytest.mark.parametrize("keep", [0.0, -0.1, 1.5, 0, -3, 577, True, False, "0.5", None])
def test_resolve_keep_rejects(keep):
    with pytest.raises(ValueError):
        base.resolve_keep(keep, 576)


# ----------------------------------------------------------------------------- top-k & gather

def test_topk_indices_sorted_exact_and_matches_numpy():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(4, 50)).astype(np.float32)
    for k in (1, 7, 50):
        idx = np.asarray(select.topk_indices(jnp.asarray(s), k))
        assert idx.shape == (4, k) and idx.dtype == np.int32
        for b in range(4):
            want = np.sort(np.argsort(-s[b], kind="stable")[:k])
            np.testing.assert_array_equal(idx[b], want)
            assert np.all(np.diff(idx[b]) > 0)


def test_topk_ties_go_to_lower_index():
    s = jnp.array([[1.0, 3.0, 3.0, 3.0, 0.0, 3.0]])
    np.testing.assert_array_equal(select.topk_indices(s, 2), [[1, 2]])
    np.testing.assert_array_equal(select.topk_indices(jnp.zeros((2, 9)), 4),
                                  [[0, 1, 2, 3]] * 2)


def test_topk_bad_k():
    with pytest.raises(ValueError):
        select.topk_indices(jnp.zeros((1, 5)), 6)
    with pytest.raises(ValueError):
        select.topk_indices(jnp.zeros((1, 5)), 0)


def test_gather_keep_mask_complement():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 10, 4)).astype(np.float32)
    idx = np.stack([np.sort(rng.choice(10, 4, replace=False)) for _ in range(3)]).astype(np.int32)
    g = np.asarray(select.gather_tokens(jnp.asarray(x), jnp.asarray(idx)))
    for b in range(3):
        np.testing.assert_array_equal(g[b], x[b, idx[b]])
    m = np.asarray(select.keep_mask(jnp.asarray(idx), 10))
    comp = np.asarray(select.complement_indices(jnp.asarray(idx), 10))
    for b in range(3):
        assert set(np.flatnonzero(m[b])) == set(idx[b])
        np.testing.assert_array_equal(comp[b], sorted(set(range(10)) - set(idx[b])))


def test_slice_span():
    x = jnp.arange(2 * 3 * 10).reshape(2, 3, 10)
    out = select.slice_span(x, jnp.array([2, 5]), 4, axis=-1)
    np.testing.assert_array_equal(out[0], np.asarray(x)[0, :, 2:6])
    np.testing.assert_array_equal(out[1], np.asarray(x)[1, :, 5:9])


# ----------------------------------------------------------------------------- splice

def _ref_splice(te, tm, ipos, vis, vpos, mode, n_v):
    """Per-example Python-list construction of the spliced sequence."""
    seqs, masks, poss, isvs = [], [], [], []
    for b in range(te.shape[0]):
        p = int(ipos[b])
        k = vis.shape[1]
        t = te.shape[1]
        seq = [te[b, i] for i in range(p)] + [vis[b, j] for j in range(k)] + \
              [te[b, i] for i in range(p + 1, t)]
        mask = [bool(tm[b, i]) for i in range(p)] + [True] * k + \
               [bool(tm[b, i]) for i in range(p + 1, t)]
        isv = [False] * p + [True] * k + [False] * (t - p - 1)
        if mode == "contiguous":
            pos, c = [], -1
            for m in mask:
                c += int(m)
                pos.append(max(c, 0))
        else:
            tpos, c = [], -1
            for i in range(t):
                c += int(tm[b, i])
                tpos.append(max(c, 0))
            base_pos = tpos[p]
            pos = [tpos[i] for i in range(p)] + [base_pos + int(vpos[b, j]) for j in range(k)] + \
                  [tpos[i] + n_v - 1 for i in range(p + 1, t)]
            # text right after the image sits at pos(placeholder) + n_v
            if p + 1 < t:
                assert pos[p + k] == base_pos + n_v
        seqs.append(np.stack(seq))
        masks.append(mask)
        poss.append(pos)
        isvs.append(isv)
    return (np.stack(seqs), np.array(masks), np.array(poss, np.int32), np.array(isvs))


def _splice_inputs(k=5, n_v=12, seed=0):
    rng = np.random.default_rng(seed)
    b, t, d = 3, 11, 6
    pads = [0, 3, 5]
    ipos = np.array([2, 4, 9], np.int32)      # placeholder after the pads, different places
    tm = np.zeros((b, t), bool)
    for i, p in enumerate(pads):
        tm[i, p:] = True
        assert ipos[i] >= p
    te = rng.normal(size=(b, t, d)).astype(np.float32)
    vis = rng.normal(size=(b, k, d)).astype(np.float32)
    vpos = np.stack([np.sort(rng.choice(n_v, k, replace=False)) for _ in range(b)]).astype(
        np.int32)
    return te, tm, ipos, vis, vpos, n_v


@pytest.mark.parametrize("mode", ["contiguous", "original"])
def test_splice_matches_reference(mode):
    te, tm, ipos, vis, vpos, n_v = _splice_inputs()
    out = select.splice(jnp.asarray(te), jnp.asarray(tm), jnp.asarray(ipos), jnp.asarray(vis),
                        jnp.asarray(vpos), positions_mode=mode, n_v=n_v)
    ref = _ref_splice(te, tm, ipos, vis, vpos, mode, n_v)
    assert out[0].shape == (3, te.shape[1] - 1 + vis.shape[1], te.shape[2])
    np.testing.assert_array_equal(np.asarray(out[0]), ref[0])
    for got, want in zip(out[1:], ref[1:]):
        np.testing.assert_array_equal(np.asarray(got), want)


def test_splice_modes_agree_when_unpruned():
    te, tm, ipos, _, _, _ = _splice_inputs()
    n_v = 7
    vis = np.random.default_rng(3).normal(size=(3, n_v, te.shape[2])).astype(np.float32)
    vpos = np.broadcast_to(np.arange(n_v, dtype=np.int32), (3, n_v))
    a = select.splice(te, tm, ipos, vis, vpos, "contiguous", n_v)
    b = select.splice(te, tm, ipos, vis, vpos, "original", n_v)
    np.testing.assert_array_equal(a[2], b[2])


def test_splice_jit_compiles_once_with_traced_positions():
    traces = []

    @jax.jit
    def f(te, tm, ipos, vis, vpos):
        traces.append(1)
        return select.splice(te, tm, ipos, vis, vpos, "original", 12)

    te, tm, ipos, vis, vpos, n_v = _splice_inputs(seed=0)
    for seed, shift in ((0, 0), (1, 1), (2, -1)):
        te, tm, ipos0, vis, vpos, n_v = _splice_inputs(seed=seed)
        ipos = np.clip(ipos0 + shift, [0, 3, 5], te.shape[1] - 1).astype(np.int32)
        out = f(te, tm, ipos, vis, vpos)
        ref = _ref_splice(te, tm, ipos, vis, vpos, "original", n_v)
        np.testing.assert_array_equal(np.asarray(out[2]), ref[2])
        np.testing.assert_array_equal(np.asarray(out[0]), ref[0])
    assert len(traces) == 1


def test_splice_errors():
    te, tm, ipos, vis, vpos, n_v = _splice_inputs()
    with pytest.raises(ValueError):
        select.splice(te, tm, ipos, vis, vpos, "bogus", n_v)
    with pytest.raises(ValueError):
        select.splice(te, tm, ipos, vis, None, "original", n_v)


# ----------------------------------------------------------------------------- in-LLM keep

def test_in_llm_keep_indices():
    rng = np.random.default_rng(4)
    n_v, k, length = 10, 4, 20
    start = np.array([3, 6], np.int32)
    vis = np.stack([np.sort(rng.choice(n_v, k, replace=False)) for _ in range(2)]).astype(
        np.int32)
    got = np.asarray(select.in_llm_keep_indices(jnp.asarray(start), jnp.asarray(vis), n_v,
                                                length))
    for b in range(2):
        s = int(start[b])
        want = list(range(s)) + [s + int(v) for v in vis[b]] + list(range(s + n_v, length))
        np.testing.assert_array_equal(got[b], want)


# ----------------------------------------------------------------------------- multi-image splice

def _ref_multi(te, tm, ipos, vis, vimg, vpos, mode, n_v):
    """Hand-built: walk the prompt; each placeholder p expands to the tokens of image p."""
    seqs, masks, poss, isv = [], [], [], []
    for b in range(te.shape[0]):
        s, m, pos, iv = [], [], [], []
        tpos = np.maximum(np.cumsum(tm[b]) - 1, 0)
        for j in range(te.shape[1]):
            if j in list(ipos[b]):
                p = list(ipos[b]).index(j)
                for q in np.where(vimg[b] == p)[0]:
                    s.append(vis[b, q]); m.append(True); iv.append(True)
                    pos.append(tpos[j] + p * (n_v - 1) + vpos[b, q])
            else:
                before = sum(1 for x in ipos[b] if x < j)
                s.append(te[b, j]); m.append(bool(tm[b, j])); iv.append(False)
                pos.append(tpos[j] + before * (n_v - 1))
        m = np.array(m)
        if mode == "contiguous":
            pos = np.maximum(np.cumsum(m) - 1, 0)
        seqs.append(np.stack(s)); masks.append(m); poss.append(np.array(pos)); isv.append(iv)
    return np.stack(seqs), np.stack(masks), np.stack(poss), np.array(isv)


@pytest.mark.parametrize("mode", ["contiguous", "original"])
def test_splice_two_placeholders_matches_hand_built_reference(mode):
    """Two images per prompt; a global top-k splits k = 5 differently per example (4 + 1,
    0 + 5, 2 + 3): an image with no kept token makes its placeholder vanish."""
    rng = np.random.default_rng(11)
    b, t, d, n_v, k = 3, 9, 4, 6, 5
    tm = np.ones((b, t), bool)
    tm[0, :2] = False
    ipos = np.array([[3, 6], [1, 8], [2, 3]], np.int32)
    vimg = np.array([[0, 0, 0, 0, 1], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], np.int32)
    vpos = np.array([[0, 2, 3, 5, 4], [0, 1, 2, 3, 5], [1, 4, 0, 2, 3]], np.int32)
    te = rng.normal(size=(b, t, d)).astype(np.float32)
    vis = rng.normal(size=(b, k, d)).astype(np.float32)
    out = mm.splice(jnp.asarray(te), jnp.asarray(tm), jnp.asarray(ipos), jnp.asarray(vis),
                    jnp.asarray(vpos), mode, n_v, vis_image=jnp.asarray(vimg))
    ref = _ref_multi(te, tm, ipos, vis, vimg, vpos, mode, n_v)
    assert out[0].shape == (b, t - 2 + k, d)
    for got, want in zip(out, ref):
        np.testing.assert_array_equal(np.asarray(got), want)


def test_image_positions_several_placeholders():
    ids = jnp.asarray([[5, 9, 1, 9, 2], [9, 3, 4, 9, 0]])
    np.testing.assert_array_equal(mm.image_positions(ids, 9, num_images=2), [[1, 3], [0, 3]])
    np.testing.assert_array_equal(mm.image_positions(ids, 9), [1, 0])


def test_keep_sequence_indices_non_contiguous_vision():
    vision_index = jnp.asarray([[1, 2, 5, 6]])
    got = mm.keep_sequence_indices(vision_index, jnp.asarray([[1, 2]]), 8)
    np.testing.assert_array_equal(got, [[0, 2, 3, 4, 5, 7]])
