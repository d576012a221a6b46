"""Model internals: scan vs unrolled vs remat, recomputed attention rows, tower signals."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from covipal_jax.models import attention as attn_lib
from covipal_jax.models.llava import Llava
from covipal_jax.models.vit import VisionLayer


@pytest.mark.parametrize("variant", [dict(scan_layers=False),
                                     dict(remat_policy="full"),
                                     dict(scan_layers=False, remat_policy="dots_saveable")])
def test_execution_variants_agree(variant):
    model, params = tiny.model_and_params()
    other = Llava(model.cfg.replace(**variant))
    pixels, ids, mask = tiny.batch()
    ref, _ = jax.jit(model.apply)(params, pixels, ids, mask)
    out, _ = jax.jit(other.apply)(params, pixels, ids, mask)
    np.testing.assert_allclose(out, ref, atol=1e-5)

    def loss(p, m):
        logits, _ = m.apply(p, pixels, ids, mask)
        return jnp.mean(logits ** 2)
    g_ref = jax.jit(jax.grad(lambda p: loss(p, model)))(params)
    g_out = jax.jit(jax.grad(lambda p: loss(p, other)))(params)
    for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_out)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_layer_range_composes():
    model, params = tiny.model_and_params()
    x = jax.random.normal(jax.random.key(0), (2, 9, model.cfg.text.hidden_size))
    pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
    valid = jnp.ones((2, 9), bool).at[1, :3].set(False)
    run = jax.jit(lambda s, e, h: model.apply(params, h, method=Llava.run, positions=pos,
                                              key_valid=valid, start=s, stop=e)[0],
                  static_argnums=(0, 1))
    full = run(0, 4, x)
    parts = run(3, 4, run(1, 3, run(0, 1, x)))
    np.testing.assert_allclose(parts, full, atol=1e-5)


def test_attention_rows_match_full_attention():
    """Recomputed rows == rows of an explicitly materialized attention matrix."""
    model, params = tiny.model_and_params()
    cfg = model.cfg.text
    b, s = 2, 11
    x = jax.random.normal(jax.random.key(1), (b, s, cfg.hidden_size))
    valid = jnp.ones((b, s), bool).at[1, :4].set(False)
    pos = jnp.maximum(jnp.cumsum(valid, 1) - 1, 0)
    rows = jnp.array([[10, 7], [10, 5]], jnp.int32)
    got = model.apply(params, x, method=Llava.attention_rows, layer=2, positions=pos,
                      key_valid=valid, rows=rows)
    # Reference: q, k of layer 2 and a full softmax over a causal, padded mask.
    from covipal_jax.models.decoder import DecoderLayer
    lp = jax.tree.map(lambda a: a[2], params["params"]["language_model"]["layers"]["stack"])
    q, k, _ = DecoderLayer(cfg).apply({"params": lp}, x, pos, method=DecoderLayer.qkv)
    g = cfg.num_heads // cfg.num_kv_heads
    k_rep = np.repeat(np.asarray(k), g, axis=2)
    logits = np.einsum("bqnh,bsnh->bnqs", np.asarray(q), k_rep) / np.sqrt(cfg.head_dim)
    causal = np.tril(np.ones((s, s), bool))[None] & np.asarray(valid)[:, None, :]
    logits = np.where(causal[:, None], logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    ref = np.stack([probs[i][:, np.asarray(rows[i])] for i in range(b)])
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_vision_attention_signals():
    model, params = tiny.model_and_params()
    pixels, _, _ = tiny.batch()
    out, tokens = jax.jit(lambda p, x: model.apply(p, x, True, method=Llava.encode_image))(
        params, pixels)
    v = model.cfg.vision
    n_v = v.num_vision_tokens
    assert out.features.shape == (2, n_v, v.hidden_size)
    assert tokens.shape == (2, n_v, model.cfg.text.hidden_size)
    assert out.cls_attention.shape == (2, v.num_heads, n_v)
    # CLS row over patches: probabilities that, with the CLS column, sum to 1 per head.
    assert np.all(np.asarray(out.cls_attention.sum(-1)) < 1.0 + 1e-6)
    assert np.allclose(np.asarray(out.attention_received).sum(-1) * 1.0,
                       np.asarray(out.attention_received).sum(-1))
    # Reference from the feature layer's own q, k on the input of that layer.
    lp = jax.tree.map(lambda a: a[v.num_run_layers - 1],
                      params["params"]["vision_tower"]["layers"]["stack"])
    x = model.apply(params, pixels, method=lambda m, p: m.vision_tower.embed(p))
    x, _ = model.apply(params, x, method=lambda m, h: m.vision_tower.layers(
        h, start=0, stop=v.num_run_layers - 1))
    q, k = VisionLayer(v).apply({"params": lp}, x, method=VisionLayer.qk)
    probs = jax.nn.softmax(jnp.einsum("bqnh,bsnh->bnqs", q, k) / np.sqrt(v.head_dim), -1)
    np.testing.assert_allclose(out.cls_attention, probs[:, :, 0, 1:], atol=1e-6)
    np.testing.assert_allclose(out.attention_received, probs.mean((1, 2))[:, 1:], atol=1e-6)


def test_causal_mask_keeps_padded_rows_finite():
    valid = jnp.array([[False, False, True, True]])
    m = attn_lib.causal_mask(jnp.arange(4), valid)
    assert bool(m[0, 0, 0]) and not bool(m[0, 0, 1])  # a pad query sees only itself
    assert np.array_equal(np.asarray(m[0, 3]), [False, False, True, True])
