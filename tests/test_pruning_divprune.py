"""DivPrune (pruning/divprune.py) against the official selection rule.

The reference is a line-by-line torch transcription of vbdi/divprune @799e2d9
`LLaVA/llava/model/llava_arch.py` (`pairwise_cosine_similarity`, `DivPrune`, and the
`keep_indexs.sort()` of `prepare_inputs_labels_for_multimodal`), run per example.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from covipal_jax.pruning import registry
from covipal_jax.pruning.base import PruneContext
from covipal_jax.pruning.divprune import DivPrune, divprune_order, cosine_distance


# ----------------------------------------------------------------------- official (torch)

def _official_pairwise_cosine_similarity(matrix):
    norm_matrix = matrix / matrix.norm(dim=1, keepdim=True)
    return torch.mm(norm_matrix, norm_matrix.t())


def _official_divprune(visual_feature_vectors, image_feature_length, threshold_ratio):
    threshold_terms = int(round(threshold_ratio * image_feature_length))
    cosine_matrix = 1.0 - _official_pairwise_cosine_similarity(visual_feature_vectors)
    s = torch.empty(threshold_terms, dtype=torch.long)
    for i in range(threshold_terms):
        if i == 0:
            m2 = cosine_matrix
        else:
            m2 = torch.index_select(cosine_matrix, 0, torch.index_select(s, 0, torch.arange(0, i)))
        if i == 0:
            scores = torch.topk(m2, 2, dim=0, largest=False).values[1, :]
        else:
            scores = torch.min(m2, dim=0).values
        s[i] = torch.argmax(scores)
    return s


def _official_kept(tokens: np.ndarray, ratio: float) -> np.ndarray:
    """tokens f32[n_v, D] -> the official kept indices, sorted."""
    s = _official_divprune(torch.from_numpy(tokens), tokens.shape[0], ratio)
    return np.sort(s.numpy())


def _ctx(tokens):
    b = tokens.shape[0]
    return PruneContext(vision_tokens=jnp.asarray(tokens),
                        text_embeds=jnp.zeros((b, 3, tokens.shape[-1]), jnp.float32),
                        text_mask=jnp.ones((b, 3), bool))


# ------------------------------------------------------------------------------- tests

CASES = [(n_v, d, ratio, seed) for seed, (n_v, d, ratio) in enumerate(
    [(64, 32, 0.25), (64, 32, 0.1), (144, 48, 0.098), (100, 16, 0.5), (49, 8, 0.3),
     (576, 64, 0.111), (576, 64, 0.2222), (36, 24, 0.9), (81, 40, 0.05), (256, 32, 0.333),
     (64, 4, 0.25), (121, 12, 0.6), (16, 8, 1.0), (200, 64, 0.15), (64, 64, 0.5),
     (90, 30, 0.2), (300, 20, 0.07), (50, 50, 0.5), (128, 16, 0.125), (25, 6, 0.4)])]


@pytest.mark.parametrize("n_v,d,ratio,seed", CASES)
def test_same_kept_set_as_official(n_v, d, ratio, seed):
    rng = np.random.default_rng(seed)
    # a mix of clustered and spread tokens (as projected patches are), positive-mean like CLIP
    centers = rng.normal(size=(max(2, n_v // 8), d))
    tokens = (centers[rng.integers(0, len(centers), n_v)] + 0.5 * rng.normal(size=(n_v, d))
              + 0.3).astype(np.float32)
    method = DivPrune(keep=ratio)
    k = method.k(n_v)
    assert k == int(round(ratio * n_v))
    res = method.select(_ctx(tokens[None]), k)
    np.testing.assert_array_equal(np.asarray(res.indices[0]), _official_kept(tokens, ratio))
    assert res.tokens.shape == (1, k, d)
    np.testing.assert_allclose(np.asarray(res.tokens[0]), tokens[np.asarray(res.indices[0])])


def test_batched_equals_per_example_and_jits_once():
    rng = np.random.default_rng(7)
    b, n_v, d, k = 4, 64, 16, 12
    x = rng.normal(size=(b, n_v, d)).astype(np.float32)
    method = DivPrune(keep=k)
    traces = []

    @jax.jit
    def run(v):
        traces.append(1)
        return method.select(_ctx(v), k)

    out = run(x)
    run(x[::-1].copy() + 1.0)
    assert len(traces) == 1
    idx = np.asarray(out.indices)
    assert idx.shape == (b, k)
    for i in range(b):
        one = np.asarray(method.select(_ctx(x[i:i + 1]), k).indices[0])
        np.testing.assert_array_equal(idx[i], one)
        np.testing.assert_array_equal(idx[i], _official_kept(x[i], k / n_v))
        assert len(set(idx[i].tolist())) == k and np.all(np.diff(idx[i]) > 0)
    # different examples select differently
    assert len({tuple(r) for r in idx.tolist()}) == b


def test_greedy_is_max_min():
    """Each pick maximises the minimum distance to the earlier picks (the rule itself)."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1, 40, 8)).astype(np.float32)
    dist = np.asarray(cosine_distance(jnp.asarray(x)))[0]
    order = np.asarray(divprune_order(jnp.asarray(dist[None]), 10))[0]
    for t in range(1, 10):
        prev = order[:t]
        mins = dist[prev].min(axis=0)
        mins[prev] = -np.inf
        assert order[t] == int(np.argmax(mins))


def test_duplicates_give_k_distinct_tokens():
    """Only 3 distinct directions but k=5: still 5 distinct indices (official would repeat)."""
    base = np.eye(3, 6, dtype=np.float32)
    x = np.concatenate([base, base, 2 * base])[None]           # 9 tokens, 3 directions
    res = DivPrune(keep=5).select(_ctx(x), 5)
    idx = np.asarray(res.indices[0])
    assert len(set(idx.tolist())) == 5


def test_registered_and_from_config():
    import ml_collections
    cls = registry.get("divprune")
    assert cls is DivPrune and cls.where == "pre_llm"
    m = registry.from_config(ml_collections.ConfigDict({"method": "divprune", "keep": 64}))
    assert m == DivPrune(keep=64) and m.k(576) == 64
    with pytest.raises(ValueError):
        divprune_order(jnp.zeros((1, 4, 4)), 5)
