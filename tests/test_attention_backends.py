"""Attention backends (covipal_jax/models/attention*.py) against the reference attention.

- "chunked" (CPU/any): f32 parity with the reference on causal + padded + GQA + per-key bias
  inputs, a cache offset, decode (one query), bidirectional, and gradients; the full tiny model
  gives the same logits with "chunked" as with "xla".
- "splash" (TPU Pallas kernel): run in the Pallas interpreter on CPU for parity, and compiled
  ahead of time for a v5e topology in a subprocess (libtpu), on one chip and under a 4-chip mesh.
- "cudnn": only the selection logic and the clean fallback can run without a GPU.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from covipal_jax.models import attention as A
from covipal_jax.models.attention_chunked import chunked_attention
from covipal_jax.models.attention_splash import splash_attention
from covipal_jax.models.config import LlavaConfig
from covipal_jax.models.decoder import attention_backend
from covipal_jax.models.llava import Llava

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reference(q, k, v, mask: A.Mask, bias=None):
    """NumPy softmax attention over the dense mask (the definition every backend must meet)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, n, h = q.shape
    g = n // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(h)
    if bias is not None:
        logits = logits + np.asarray(bias, np.float64)[:, None, None, :]
    dense = mask.dense(b, t, k.shape[1])
    if dense is not None:
        logits = np.where(np.asarray(dense)[:, None], logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", p, v)


def inputs(b=2, t=37, s=50, n=4, kh=2, h=16, seed=0):
    r = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(r[0], (b, t, n, h))
    k = jax.random.normal(r[1], (b, s, kh, h))
    v = jax.random.normal(r[2], (b, s, kh, h))
    bias = jax.random.normal(r[3], (b, s))
    valid = jnp.ones((b, s), bool).at[1, :5].set(False).at[:, s - 5:].set(False)
    return q, k, v, bias, valid


@pytest.mark.parametrize("offset", [0, 8])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("blocks", [(256, 512), (8, 16)])
def test_chunked_matches_reference(offset, with_bias, blocks):
    q, k, v, bias, valid = inputs()
    bias = bias if with_bias else None
    mask = A.Mask.causal(offset, q.shape[1], valid)
    got = chunked_attention(q, k, v, q_index=mask.q_index, key_valid=valid, bias=bias,
                            block_q=blocks[0], block_k=blocks[1])
    np.testing.assert_allclose(got, reference(q, k, v, mask, bias), atol=2e-6, rtol=1e-5)
    xla = A.attention(q, k, v, mask=mask, bias=bias, impl="xla")
    np.testing.assert_allclose(got, xla, atol=2e-6, rtol=1e-5)  # padded rows included


def test_chunked_decode_bidirectional_and_grads():
    q, k, v, bias, valid = inputs()
    dec = A.Mask.causal(jnp.int32(30), 1, valid)  # traced cache index, one query
    np.testing.assert_allclose(A.attention(q[:, :1], k, v, mask=dec, impl="chunked"),
                               reference(q[:, :1], k, v, dec), atol=2e-6)
    bi = A.Mask(key_valid=valid)
    np.testing.assert_allclose(A.attention(q, k, v, mask=bi, impl="chunked"),
                               reference(q, k, v, bi), atol=2e-6)
    mask = A.Mask.causal(0, q.shape[1], valid)

    def loss(b, qq, impl):
        return jnp.sum(A.attention(qq, k, v, mask=mask, bias=b, impl=impl) ** 2)
    g_ref = jax.grad(loss, argnums=(0, 1))(bias, q, "xla")
    g_got = jax.grad(loss, argnums=(0, 1))(bias, q, "chunked")
    for a, b in zip(g_got, g_ref):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)
        assert np.isfinite(np.asarray(a)).all()


@pytest.mark.parametrize("causal", [True, False])
def test_splash_kernel_matches_reference_in_interpreter(causal):
    """The real TPU kernel, run by the Pallas interpreter: real query rows equal the reference
    (padded rows differ by design and stay finite); GQA, key padding, S > T (a cache)."""
    q, k, v, _, valid = inputs(t=100, s=140)
    mask = A.Mask.causal(0, q.shape[1], valid) if causal else A.Mask(key_valid=valid)
    got = splash_attention(q, k, v, q_offset=0, key_valid=valid, causal=causal, interpret=True)
    ref = reference(q, k, v, mask)
    rows = np.asarray(valid[:, :q.shape[1]]) if causal else np.ones(q.shape[:2], bool)
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(np.asarray(got)[rows], ref[rows], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 3e-2)])
def test_splash_kernel_with_key_bias_matches_reference_in_interpreter(dtype, tol):
    """A per-key additive bias through the kernel's extra q/k columns (q' = [q, 1, 1],
    k' = [k, hi, lo]): real rows equal the reference with the bias, causal with a cache;
    the bias carries large negative values (PPM log p of near-dropped tokens) too."""
    q, k, v, bias, valid = inputs(t=100, s=140, seed=1)
    bias = (3.0 * bias).at[0, 10:20].set(-1e4)
    mask = A.Mask.causal(0, q.shape[1], valid)
    cast = lambda x: x.astype(dtype)  # noqa: E731
    got = splash_attention(cast(q), cast(k), cast(v), q_offset=0, key_valid=valid, causal=True,
                           bias=bias, interpret=True)
    ref = reference(cast(q).astype(jnp.float32), cast(k).astype(jnp.float32),
                    cast(v).astype(jnp.float32), mask, bias)
    rows = np.asarray(valid[:, :q.shape[1]])
    got = np.asarray(got.astype(jnp.float32))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got[rows], ref[rows], atol=tol, rtol=tol)
    # and the bias matters: without it the outputs differ
    plain = reference(cast(q).astype(jnp.float32), cast(k).astype(jnp.float32),
                      cast(v).astype(jnp.float32), mask)
    assert np.abs(plain[rows] - ref[rows]).max() > 10 * tol


def test_splash_bias_columns_split_the_bias_exactly():
    """bf16: hi + lo recovers the f32 bias to about 16 bits; f32 uses one column."""
    from covipal_jax.models.attention_splash import bias_columns

    q, k, _, bias, _ = inputs(t=8, s=12)
    bias = 7.3 * bias
    q2, k2 = bias_columns(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), bias)
    assert q2.shape[-1] == q.shape[-1] + 2 and k2.shape[-1] == k.shape[-1] + 2
    rec = k2[..., -2].astype(jnp.float32) + k2[..., -1].astype(jnp.float32)  # [B, S, K]
    np.testing.assert_allclose(np.asarray(rec), np.asarray(bias)[:, :, None].repeat(2, -1),
                               rtol=2e-5, atol=1e-6)
    q1, k1 = bias_columns(q, k, bias)
    assert q1.shape[-1] == q.shape[-1] + 1
    np.testing.assert_array_equal(np.asarray(k1[..., -1]), np.asarray(bias)[:, :, None].repeat(2, -1))


def test_resolve_impl_by_platform():
    q, k, _, bias, valid = inputs()
    long_q = jax.ShapeDtypeStruct((1, 2048, 32, 128), jnp.float32)
    long_k = jax.ShapeDtypeStruct((1, 2048, 32, 128), jnp.float32)
    mask = A.Mask.causal(0, 2048, jnp.ones((1, 2048), bool))
    assert A.resolve_impl("auto", q, k, plat="cpu")[0] == "xla"
    assert A.resolve_impl("auto", long_q, long_k, plat="cpu")[0] == "chunked"
    one = jax.ShapeDtypeStruct((1, 1, 32, 128), jnp.float32)
    assert A.resolve_impl("auto", one, long_k, plat="cpu")[0] == "xla"  # decode
    assert A.resolve_impl("auto", long_q, long_k, mask=mask, plat="tpu")[0] == "splash"
    assert A.resolve_impl("auto", q, k, plat="tpu")[0] == "xla"  # short: XLA
    # a per-key bias rides in extra head-dim columns: no XLA fallback
    assert A.resolve_impl("splash", long_q, long_k, mask=mask, bias=bias, plat="tpu") == (
        "splash", "tpu")
    traced = A.Mask(mask.q_index, mask.key_valid, None)
    assert A.resolve_impl("splash", long_q, long_k, mask=traced, plat="tpu")[0] == "xla"
    assert A.resolve_impl("splash", long_q, long_k, plat="cpu")[0] == "xla"
    bf = jax.ShapeDtypeStruct((1, 2048, 32, 128), jnp.bfloat16)
    assert A.resolve_impl("auto", bf, bf, plat="gpu")[0] == "cudnn"
    assert A.resolve_impl("auto", long_q, long_k, plat="gpu")[0] == "xla"  # f32
    bf_one = jax.ShapeDtypeStruct((1, 1, 32, 128), jnp.bfloat16)
    assert A.resolve_impl("auto", bf_one, bf, plat="gpu")[0] == "xla"  # decode
    assert A.resolve_impl("cudnn", bf, bf, plat="cpu")[0] == "xla"
    assert A.resolve_impl("chunked", q, k, plat="gpu")[0] == "chunked"
    with pytest.raises(ValueError, match="unknown attention"):
        A.resolve_impl("flash", q, k)
    with pytest.raises(ValueError, match="model.attention"):
        LlavaConfig(attention="flash")


def test_forced_cudnn_and_splash_fall_back_on_cpu():
    q, k, v, bias, valid = inputs()
    mask = A.Mask.causal(0, q.shape[1], valid)
    ref = A.attention(q, k, v, mask=mask, bias=bias, impl="xla")
    for impl in ("cudnn", "splash", "auto"):
        np.testing.assert_allclose(A.attention(q, k, v, mask=mask, bias=bias, impl=impl), ref,
                                   atol=1e-6)


def test_legacy_attention_impl_still_selects():
    cfg = LlavaConfig()
    assert attention_backend(cfg) == "auto"
    assert attention_backend(cfg.replace(attention_impl="cudnn")) == "cudnn"
    assert attention_backend(cfg.replace(attention_impl=None)) == "xla"
    assert attention_backend(cfg.replace(attention="chunked", attention_impl="cudnn")) == \
        "chunked"
    assert "attention" not in cfg.architecture_dict()


@pytest.mark.slow
def test_full_model_logits_chunked_equal_xla():
    """The tiny LLaVA's logits (prefill) and a cached decode step agree across backends."""
    model, params = tiny.model_and_params()
    pixels, ids, mask = tiny.batch()
    out = {}
    for impl in ("xla", "chunked"):
        m = Llava(model.cfg.replace(attention=impl))
        logits, seq_mask = jax.jit(m.apply)(params, pixels, ids, mask)
        out[impl] = np.asarray(logits)[np.asarray(seq_mask)]
    np.testing.assert_allclose(out["chunked"], out["xla"], atol=1e-5, rtol=1e-5)


def test_rows_recomputation_independent_of_backend():
    """Decoder.attention_rows is its own exact computation: same rows under every backend."""
    model, params = tiny.model_and_params()
    c = model.cfg.text
    x = jax.random.normal(jax.random.key(1), (2, 11, c.hidden_size))
    valid = jnp.ones((2, 11), bool).at[1, :4].set(False)
    pos = jnp.maximum(jnp.cumsum(valid, 1) - 1, 0)
    rows = jnp.array([[10, 7], [10, 5]], jnp.int32)
    got = [Llava(model.cfg.replace(attention=i)).apply(
        params, x, method=Llava.attention_rows, layer=2, positions=pos, key_valid=valid,
        rows=rows) for i in ("xla", "chunked")]
    np.testing.assert_array_equal(got[0], got[1])


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("XLA_FLAGS", None)
    return env


@pytest.mark.skipif(__import__("importlib").util.find_spec("libtpu") is None,
                    reason="libtpu is not installed: pip install -r requirements-dev.txt")
@pytest.mark.slow
def test_splash_compiles_for_tpu_ahead_of_time():
    """The splash path lowers and compiles for v5e: one chip (GQA, causal with a cache, bf16,
    head dim padded 16 -> 128; bidirectional head dim 64) and under a 4-chip FSDP mesh
    (shard_map over batch); the compiled HLO holds the Mosaic kernel."""
    code = textwrap.dedent("""
        from covipal_jax.tools import aot
        aot.setup_host()
        import json, jax, jax.numpy as jnp, numpy as np
        import flax.linen as nn
        from jax.sharding import NamedSharding, PartitionSpec as P, Mesh, AxisType
        from covipal_jax import sharding as sh
        from covipal_jax.models import attention as A
        devices, _ = aot.topology_devices("v5e:2x2")
        out = {}
        def compile_(name, mesh, b, t, s, n, kh, h, dtype, causal, biased=False):
            sds = lambda shape, dt, spec: jax.ShapeDtypeStruct(
                shape, dt, sharding=NamedSharding(mesh, spec))
            q = sds((b, t, n, h), dtype, P(("data", "fsdp")))
            k = sds((b, s, kh, h), dtype, P(("data", "fsdp")))
            valid = sds((b, s), jnp.bool_, P(("data", "fsdp")))
            bias = sds((b, s), jnp.float32, P(("data", "fsdp"))) if biased else None
            def f(q, k, v, valid, bias):
                m = A.Mask.causal(0, t, valid) if causal else A.Mask(key_valid=valid)
                assert A.resolve_impl("auto", q, k, mask=m, bias=bias)[0] == (
                    "splash" if t >= A.TPU_SPLASH_MIN_T else "xla")
                return A.attention(q, k, v, mask=m, bias=bias, impl="splash")
            with sh.use_mesh(mesh, sh.LOGICAL_AXIS_RULES):
                lowered = jax.jit(f).lower(q, k, k, valid, bias)
                compiled = lowered.compile()
            text = compiled.as_text()
            out[name] = dict(mosaic=("tpu_custom_call" in text) or ("mosaic" in text.lower()),
                             temp=compiled.memory_analysis().temp_size_in_bytes)
        one = Mesh(np.asarray(devices[:1]).reshape(1, 1, 1), sh.MESH_AXES,
                   axis_types=(AxisType.Auto,) * 3)
        four = Mesh(np.asarray(devices).reshape(1, 4, 1), sh.MESH_AXES,
                    axis_types=(AxisType.Auto,) * 3)
        compile_("gqa_cache_bf16", one, 2, 1100, 1200, 8, 2, 16, jnp.bfloat16, True)
        compile_("vision_h64", one, 1, 577, 577, 4, 4, 64, jnp.float32, False)
        compile_("fsdp4", four, 4, 1024, 1024, 4, 4, 128, jnp.bfloat16, True)
        compile_("fsdp4_bias", four, 4, 1024, 1024, 4, 4, 128, jnp.bfloat16, True, True)
        # The whole tiny model's prefill (decoder attention forced to splash) on 4 chips.
        from covipal_jax.configs import tiny
        from covipal_jax.models import attention_splash as S
        calls, orig = [], S.splash_attention
        S.splash_attention = lambda *a, **kw: (calls.append(1), orig(*a, **kw))[1]
        config = tiny.get_config()
        with config.unlocked():
            config.model.attention = "splash"
            config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, -1, 1
        rep = aot.compile_step(aot.Request("prefill", 4, 16, 1.0, "none", 4), config,
                               "v5e:2x2", flops=False)
        out["tiny_prefill"] = dict(mosaic=len(calls) > 0, fits=rep["fits"])
        print("JSON" + json.dumps(out))
    """)
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=900, check=False)
    assert res.returncode == 0, res.stderr[-4000:]
    import json
    line = next(x for x in res.stdout.splitlines() if x.startswith("JSON"))
    out = json.loads(line[4:])
    assert set(out) == {"gqa_cache_bf16", "vision_h64", "fsdp4", "fsdp4_bias", "tiny_prefill"}
    for name, r in out.items():
        assert r["mosaic"], name  # the Mosaic kernel is in the compiled program / was traced
    assert out["tiny_prefill"]["fits"]
