"""DART (pruning/dart.py) against an independent NumPy transcription of the official rule
(ZichenWen1/DART), written per example with Python loops/sets: exact k, batched ==
per-example, one jit trace for different data."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from covipal_jax.pruning import dart
from tests.test_pruning_methods import _jit_once


# ============================================================================= DART

def _dart_inputs(seed, b=3, length=40, n_v=20, d=8, kv=2, hd=3):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(b, length, d)).astype(np.float32)
    keys = rng.normal(size=(b, length, kv, hd)).astype(np.float32)
    start = np.array([3, 6, 10], np.int32)[:b]
    return hidden, keys, start, n_v


def _ref_dart(hidden, keys, start, n_v, quotas, p_img=4, p_txt=4):
    """Official get_retained_image_token, one example at a time, with Python sets; pivots
    visited in ascending position (the official code visits them in set order)."""
    out = []
    for b in range(hidden.shape[0]):
        s = int(start[b])
        ks = keys[b].reshape(keys.shape[1], -1)
        img_l1 = np.abs(ks[s:s + n_v]).sum(-1)
        qry_l1 = np.abs(ks[s + n_v:]).sum(-1)
        image_indices = (np.argsort(-img_l1, kind="stable")[:p_img] + s).tolist()
        query_indices = (np.argsort(-qry_l1, kind="stable")[:p_txt] + s + n_v).tolist()
        indices_set = set(image_indices + query_indices)
        valid = set(range(s, s + n_v)) - set(image_indices)
        pivots = sorted(image_indices) + sorted(query_indices)
        for item, q in zip(pivots, quotas):
            vl = sorted(valid)
            hv = hidden[b, vl]
            cos = hv @ hidden[b, item] / (np.linalg.norm(hv, axis=-1)
                                           * np.linalg.norm(hidden[b, item]))
            top = np.argsort(cos, kind="stable")[:q]            # topk of -cos
            real = [vl[i] for i in top]
            indices_set.update(real)
            valid.difference_update(real)
        indices_set.difference_update(query_indices)
        out.append(sorted(i - s for i in indices_set))
    return np.array(out)


def test_dart_official_budget_matches_reference():
    hidden, keys, start, n_v = _dart_inputs(0)
    k = dart.official_keep(8)                     # 4 image pivots + 8 pivots x 1 = 12
    assert k == 12
    p_img, quotas = dart.pivot_quotas(k)
    assert p_img == 4 and quotas == [1] * 8
    got = dart.select_in_llm(jnp.asarray(hidden), jnp.asarray(keys), jnp.asarray(start), n_v, k)
    np.testing.assert_array_equal(np.asarray(got), _ref_dart(hidden, keys, start, n_v, quotas))
    assert dart.official_keep(128) == 132 and dart.official_keep(64) == 68


@pytest.mark.parametrize("k", [4, 7, 15, 20])
def test_dart_exact_k_with_remainder(k):
    hidden, keys, start, n_v = _dart_inputs(1)
    p_img, quotas = dart.pivot_quotas(k)
    assert p_img + sum(quotas) == k
    got = np.asarray(dart.select_in_llm(jnp.asarray(hidden), jnp.asarray(keys.reshape(
        3, 40, -1)), jnp.asarray(start), n_v, k))
    assert got.shape == (3, k)
    for row in got:
        assert len(set(row.tolist())) == k and np.all(np.diff(row) > 0)
        assert row.min() >= 0 and row.max() < n_v
    np.testing.assert_array_equal(got, _ref_dart(hidden, keys, start, n_v, quotas))


def test_dart_small_k_keeps_top_norm_pivots():
    hidden, keys, start, n_v = _dart_inputs(2)
    got = np.asarray(dart.select_in_llm(hidden, keys, start, n_v, 2))
    for b in range(3):
        s = start[b]
        l1 = np.abs(keys[b, s:s + n_v].reshape(n_v, -1)).sum(-1)
        np.testing.assert_array_equal(got[b], np.sort(np.argsort(-l1)[:2]))


def test_dart_seq_mask_excludes_padding_from_text_pivots():
    hidden, keys, start, n_v = _dart_inputs(3)
    mask = np.ones(hidden.shape[:2], bool)
    mask[:, -3:] = False
    keys_big = keys.copy()
    keys_big[:, -3:] *= 100.0                       # padding with huge key norms
    k = 12
    a = dart.select_in_llm(hidden, keys_big, start, n_v, k, seq_mask=mask)
    # reference: the sequence truncated before the padding
    ref = _ref_dart(hidden[:, :-3], keys[:, :-3], start, n_v, dart.pivot_quotas(k)[1])
    np.testing.assert_array_equal(np.asarray(a), ref)


def test_dart_batched_equals_per_example_and_jit():
    hidden, keys, start, n_v = _dart_inputs(4)
    k = 9
    full = np.asarray(dart.select_in_llm(hidden, keys, start, n_v, k))
    for b in range(3):
        one = dart.select_in_llm(hidden[b:b + 1], keys[b:b + 1], start[b:b + 1], n_v, k)
        np.testing.assert_array_equal(np.asarray(one)[0], full[b])
    ins = [(jnp.asarray(h), jnp.asarray(kk), jnp.asarray(s))
           for h, kk, s, _ in (_dart_inputs(4), _dart_inputs(5))]
    outs = _jit_once(lambda x: dart.select_in_llm(x[0], x[1], x[2], n_v, k), ins)
    np.testing.assert_array_equal(outs[0], full)
    np.testing.assert_array_equal(outs[1], dart.select_in_llm(*ins[1], n_v, k))
