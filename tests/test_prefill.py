"""Pruned prefill: gather == mask realization, pruned generation == hand-removed tokens,
one compilation per (bucket, k), in-LLM segments."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from covipal_jax.inference import decoding
from covipal_jax.models.llava import Llava
from covipal_jax import pruning
from covipal_jax.inference.prefill import forward, prefill


def jprefill(model, params, pixels, ids, mask, spec, extra):
    return jax.jit(lambda p, a, b, c: prefill(model, p, a, b, c, spec, extra=extra))(
        params, pixels, ids, mask)


def spec_for(method, keep, positions="contiguous", **extra):
    c = tiny.config()
    c.pruning.method, c.pruning.keep, c.pruning.positions = method, keep, positions
    for k, v in extra.items():
        c.pruning[k] = v
    return pruning.from_config(c.pruning)


@pytest.mark.parametrize("method", ["random", "pool"])
def test_gather_equals_mask(method):
    model, params = tiny.model_and_params()
    pixels, ids, mask = tiny.batch()
    spec = spec_for(method, 0.25)
    rng = jax.random.key(1)
    fwd = jax.jit(lambda p, a, b, c, r, realize: forward(model, p, a, b, c, spec,
                                                          realize=realize, rng=r),
                  static_argnums=5)
    lg, mg, kept_g = fwd(params, pixels, ids, mask, rng, "gather")
    lm, mm, kept_m = fwd(params, pixels, ids, mask, rng, "mask")
    np.testing.assert_array_equal(kept_g, kept_m)
    # Compare the logits at every real (unmasked) position, in order.
    for b in range(ids.shape[0]):
        a = np.asarray(lg[b])[np.asarray(mg[b])]
        m = np.asarray(lm[b])[np.asarray(mm[b])]
        np.testing.assert_allclose(a, m, atol=2e-5)


def test_prefill_matches_unpruned_forward():
    model, params = tiny.model_and_params()
    pixels, ids, mask = tiny.batch()
    ref, _ = model.apply(params, pixels, ids, mask)
    out = jprefill(model, params, pixels, ids, mask, spec_for("none", 1.0), extra=4)
    np.testing.assert_allclose(out.last_logits, ref[:, -1], atol=2e-5)


def _greedy_by_hand(model, params, embeds, n_new):
    """Greedy decoding with full recomputation (no cache) from explicit embeddings.

    embeds: list of f32[L_b, D] per example (no padding); pads left to a common length.
    """
    @jax.jit
    def step(x, valid, pos):
        h, _ = model.apply(params, x, method=Llava.run, positions=pos, key_valid=valid)
        return jnp.argmax(model.apply(params, h[:, -1:], method=Llava.logits)[:, 0], -1)

    embed = jax.jit(lambda t: model.apply(params, t, method=Llava.embed_text))
    toks = []
    seqs = [np.asarray(e) for e in embeds]
    for _ in range(n_new):
        length = max(len(s) for s in seqs)
        x = np.stack([np.pad(s, ((length - len(s), 0), (0, 0))) for s in seqs])
        valid = np.stack([np.arange(length) >= length - len(s) for s in seqs])
        pos = np.maximum(np.cumsum(valid, 1) - 1, 0)
        nxt = np.asarray(step(jnp.asarray(x), valid, pos))
        toks.append(nxt)
        emb = np.asarray(embed(jnp.asarray(nxt[:, None])))
        seqs = [np.concatenate([s, e]) for s, e in zip(seqs, emb)]
    return np.stack(toks, 1)


@pytest.mark.parametrize("method", ["pool", "visionzip"])
def test_pruned_generation_equals_hand_removed_tokens(method):
    """Generating from the pruned prefix == generating from an input from which the pruned
    vision tokens were removed by hand (batch 2, different lengths and image positions)."""
    model, params = tiny.model_and_params()
    pixels, ids, mask = tiny.batch(lengths=(9, 6), image_at=(3, 0))
    spec = spec_for(method, 0.25)
    gen = decoding.Generator(model, spec, max_new_tokens=5, eos_id=-1)
    out = gen(params, pixels, ids, mask)
    # By hand: the kept tokens the method produced, spliced with Python lists.
    from covipal_jax.inference.prefill import build_context, select_pre_llm
    ctx, text = jax.jit(lambda p: build_context(model, p, pixels, ids, mask, spec))(params)
    res = jax.jit(lambda p, c: select_pre_llm(model, p, c, spec))(params, ctx)
    np.testing.assert_array_equal(res.indices, out.kept)
    embeds = []
    for b in range(ids.shape[0]):
        real = np.where(mask[b])[0]
        p = int(np.where(ids[b] == tiny.IMAGE_TOKEN)[0][0])
        before = [np.asarray(text[b, j]) for j in real if j < p]
        after = [np.asarray(text[b, j]) for j in real if j > p]
        vis = [np.asarray(res.tokens[b, j]) for j in range(spec.k(model.cfg.num_vision_tokens))]
        embeds.append(np.stack(before + vis + after))
    ref = _greedy_by_hand(model, params, embeds, 5)
    np.testing.assert_array_equal(out.tokens, ref)


def test_prefill_compiles_once_per_bucket_and_k():
    model, params = tiny.model_and_params()
    gen = decoding.Generator(model, spec_for("pool", 0.25), max_new_tokens=3, eos_id=-1)
    for n in range(3, 9):
        pixels, ids, mask = tiny.batch(lengths=(n, max(2, n - 2)), bucket=12, seed=n)
        gen(params, pixels, ids, mask)
    assert gen.compilations()["prefill"] == 1
    assert gen.compilations()["decode"] == 1
    pixels, ids, mask = tiny.batch(lengths=(5, 4), bucket=16)  # a new bucket: one more
    gen(params, pixels, ids, mask)
    assert gen.compilations()["prefill"] == 2


@pytest.mark.parametrize("method", ["fastv", "dart"])
def test_in_llm_segments(method):
    model, params = tiny.model_and_params()
    pixels, ids, mask = tiny.batch()
    spec = spec_for(method, 0.25)
    out = jprefill(model, params, pixels, ids, mask, spec, extra=3)
    n_v, t = model.cfg.num_vision_tokens, ids.shape[1]
    full, pruned = t - 1 + n_v, t - 1 + spec.k(n_v)
    a, b = out.segments
    assert (a.start, a.stop, b.start, b.stop) == (0, spec.layer, spec.layer,
                                                  model.cfg.text.num_layers)
    assert a.cache["k"].shape[3] == full + 3 and b.cache["k"].shape[3] == pruned + 3  # [L, B, K, S, H]
    assert out.kept.shape == (2, spec.k(n_v))
    assert np.all(np.diff(np.asarray(out.kept), axis=1) > 0)
    # Keeping every token at layer K reproduces the unpruned model.
    spec_all = spec_for(method, 1.0)
    ref, _ = model.apply(params, pixels, ids, mask)
    full_out = jprefill(model, params, pixels, ids, mask, spec_all, extra=3)
    np.testing.assert_allclose(full_out.last_logits, ref[:, -1], atol=2e-5)


def test_original_positions_with_all_tokens_equal_contiguous():
    model, params = tiny.model_and_params()
    pixels, ids, mask = tiny.batch()
    a = jprefill(model, params, pixels, ids, mask, spec_for("pool", 1.0), extra=2)
    b = jprefill(model, params, pixels, ids, mask, spec_for("pool", 1.0, "original"), extra=2)
    np.testing.assert_allclose(a.last_logits, b.last_logits, atol=1e-6)
    c = jprefill(model, params, pixels, ids, mask, spec_for("pool", 0.25, "original"), extra=2)
    n_v = model.cfg.num_vision_tokens
    k = spec_for("pool", 0.25).k(n_v)
    # The next position after an "original"-positions prompt counts all n_v vision slots.
    np.testing.assert_array_equal(np.asarray(c.next_position) - np.asarray(a.next_position), 0)
    d = jprefill(model, params, pixels, ids, mask, spec_for("pool", 0.25), extra=2)
    np.testing.assert_array_equal(np.asarray(a.next_position) - np.asarray(d.next_position),
                                  n_v - k)


def test_keep_out_of_range_is_a_config_error():
    with pytest.raises(ValueError, match="keep"):
        spec_for("pool", 1.5)
    with pytest.raises(ValueError, match="keep"):
        spec_for("pool", 0)
    with pytest.raises(ValueError, match="unknown pruning method"):
        spec_for("nope", 0.5)
