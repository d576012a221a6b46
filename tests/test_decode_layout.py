"""The heads-major KV cache, the transpose-free decode attention, and the per-params cache of
the decoder layers' weight slices."""
import jax
import jax.numpy as jnp
import numpy as np

from covipal_jax import pruning
from covipal_jax.inference import decoding
from covipal_jax.models import attention as attn_lib
from covipal_jax.models.decoder import init_cache
from tests import tiny


def test_cache_is_heads_major():
    model, _ = tiny.model_and_params()
    t = model.cfg.text
    c = init_cache(model.cfg, batch=3, size=11)
    assert c["k"].shape == c["v"].shape == (t.num_layers, 3, t.num_kv_heads, 11, t.head_dim)


def test_decode_attention_matches_attention():
    """One query row on the heads-major cache == the reference path on [B, S, K, H]."""
    b, n, kh, s, h = 2, 8, 2, 13, 16
    r = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(r[0], (b, 1, n, h))
    k = jax.random.normal(r[1], (b, kh, s, h))
    v = jax.random.normal(r[2], (b, kh, s, h))
    bias = jax.random.normal(r[3], (b, s))
    valid = jnp.arange(s)[None, :] < jnp.array([[9], [13]])
    mask = attn_lib.Mask.causal(jnp.int32(8), 1, valid)
    for bb in (None, bias):
        ref = attn_lib.attention(q, k.swapaxes(1, 2), v.swapaxes(1, 2), mask=mask, bias=bb,
                                 impl="xla")
        got = attn_lib.decode_attention(q, k, v, mask=mask, bias=bb)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # Keys past the query index change nothing (causal).
    k2 = k.at[:, :, 9:].set(100.0)
    np.testing.assert_allclose(attn_lib.decode_attention(q, k2, v, mask=mask),
                               attn_lib.decode_attention(q, k, v, mask=mask), atol=1e-6)


def test_decode_step_hlo_has_no_cache_transpose():
    """The compiled decode loop never transposes a whole cache buffer (XLA:CPU)."""
    model, params = tiny.model_and_params()
    pixels, ids, mask = tiny.batch()
    gen = decoding.Generator(model, pruning.NoneMethod(), max_new_tokens=4, eos_id=-1,
                             unstack_layers=True)
    state, _ = gen.prefill(params, None, pixels, ids, mask, jax.random.key(0))
    c = state.segments[0].cache["k"]
    hlo = gen._decode.lower(params, state, gen.layer_slices(params)).compile().as_text()
    _, b, kh, s, h = c.shape
    # [B, S, K, H] = the old layout's transpose target / source of a per-step cache copy
    bad = [ln for ln in hlo.splitlines() if " transpose(" in ln
           and (f"[{b},{s},{kh},{h}]" in ln or f"[{b},{kh},{s},{h}]" in ln
                or f"[1,{b},{s},{kh},{h}]" in ln)]
    assert not bad, bad


def test_decode_loop_hlo_has_no_kernel_transpose():
    """The twin's kernels are stored [*out, *in] and every decoder matmul in the compiled loop
    contracts the kernel's minor axis, with no per-step transposed copy of a kernel (3-D q/k/v/o
    kernels given to one dot_general as is were transposed at every step; docs/decode_dots.md)."""
    model, params = tiny.model_and_params()
    pixels, ids, mask = tiny.batch()
    gen = decoding.Generator(model, pruning.NoneMethod(), max_new_tokens=4, eos_id=-1,
                             unstack_layers=True)
    state, _ = gen.prefill(params, None, pixels, ids, mask, jax.random.key(0))
    layers = gen.layer_slices(params)
    stack = params["params"]["language_model"]["layers"]["stack"]
    for name, mod in layers.layers[0].items():
        if "kernel" in mod:   # [1, *out, *in] vs the checkpoint's [L, *in, *out]
            k, ref = mod["kernel"][0], stack[name]["kernel"][0]
            n_in = 2 if name == "o" else 1
            assert k.shape == ref.shape[n_in:] + ref.shape[:n_in], name
    hlo = gen._decode.lower(params, state, layers).compile().as_text()
    sizes = {int(np.prod(mod["kernel"].shape)) for mod in layers.layers[0].values()
             if "kernel" in mod}
    dims = lambda ln: ln.split("= ")[1].split("{")[0].split("[")[1].split("]")[0]
    bad = [ln for ln in hlo.splitlines() if (" transpose(" in ln or " copy(" in ln)
           and int(np.prod([int(d) for d in dims(ln).split(",") if d])) in sizes]
    assert not bad, bad


def test_layer_slices_cached_per_params():
    model, params = tiny.model_and_params()
    pixels, ids, mask = tiny.batch()
    gen = decoding.Generator(model, pruning.NoneMethod(), max_new_tokens=5, eos_id=-1,
                             unstack_layers=True)
    a = gen.layer_slices(params)
    assert gen.layer_slices(params) is a                        # sliced once
    assert len(a.layers) == model.cfg.text.num_layers
    out1 = gen(params, pixels, ids, mask).tokens
    assert gen.layer_slices(params) is a                        # decode reused them
    # New weights (a new stacked array) are sliced again and change the output.
    p2 = jax.tree.map(lambda x: x, params)
    lm = p2["params"]["language_model"]
    lm["layers"] = {"stack": jax.tree.map(lambda x: x * 1.5, lm["layers"]["stack"])}
    b = gen.layer_slices(p2)
    assert b is not a
    out2 = gen(p2, pixels, ids, mask).tokens
    ref2 = decoding.Generator(model, pruning.NoneMethod(), max_new_tokens=5, eos_id=-1,
                              unstack_layers=False)(p2, pixels, ids, mask).tokens
    np.testing.assert_array_equal(out2, ref2)
    assert not np.array_equal(out1, out2)
    # A new LM head alone (same decoder stack) is prepared again too.
    p3 = jax.tree.map(lambda x: x, p2)
    lm3 = p3["params"]["language_model"]
    if "lm_head" in lm3:
        lm3["lm_head"] = jax.tree.map(lambda x: -x, lm3["lm_head"])
        assert gen.layer_slices(p3) is not gen.layer_slices(p2)
        ref3 = decoding.Generator(model, pruning.NoneMethod(), max_new_tokens=5, eos_id=-1,
                                  unstack_layers=False)(p3, pixels, ids, mask).tokens
        np.testing.assert_array_equal(gen(p3, pixels, ids, mask).tokens, ref3)
    gen.clear_layer_slices()
    assert gen._sliced is None



def test_dense_out_first_matches_in_out():
    """`Dense(out_first=True)` on the transposed kernel == the checkpoint-layout `Dense`, for
    one and two contracted axes and several output axes (q: D -> [N, H]; o: [N, H] -> D)."""
    import flax.linen as nn
    from covipal_jax.models.layers import dense, kernel_out_first
    r = jax.random.split(jax.random.key(0), 3)
    cases = (((3, 4), -1, ("d", "n", "h"), (2, 1, 5)),        # q-like: [D] -> [N, H]
             (6, (-2, -1), ("n", "h", "d"), (2, 1, 3, 4)))    # o-like: [N, H] -> [D]
    for feats, axis, names, x_shape in cases:
        ref = dense(feats, names, axis=axis)
        x = jax.random.normal(r[0], x_shape)
        p = nn.unbox(ref.init(r[1], x))["params"]
        p = {"kernel": p["kernel"], "bias": jax.random.normal(r[2], p["bias"].shape)}
        n_in = len(axis) if isinstance(axis, tuple) else 1
        p_of = {"kernel": kernel_out_first(p["kernel"], n_in), "bias": p["bias"]}
        got = ref.clone(out_first=True).apply({"params": p_of}, x)
        want = ref.apply({"params": p}, x)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
