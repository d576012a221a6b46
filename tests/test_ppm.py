"""Tests for covipal_jax/pruning/ppm.py: the PPM module, the `ppm` method, the cost model."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jcore

from covipal_jax.pruning import ppm as ppm_lib
from covipal_jax.pruning.base import PruneContext
from covipal_jax.pruning.select import topk_indices

CFG = ppm_lib.PPMConfig(n_v=16, d_model=24, width=16, num_layers=2, num_heads=4, mlp_ratio=2)


def _inputs(seed, b=3, t=7, cfg=CFG, dtype=jnp.float32):
    r = np.random.default_rng(seed)
    hv = jnp.asarray(r.normal(size=(b, cfg.n_v, cfg.d_model)), dtype)
    ht = jnp.asarray(r.normal(size=(b, t, cfg.d_model)), dtype)
    mask = np.ones((b, t), bool)
    for i in range(b):
        mask[i, : (2 * i) % t] = False                      # left padding, 0 / 2 / 4 pads
    return hv, ht, jnp.asarray(mask)


class _Jitted:
    """A PPM whose `apply` is jitted (eager Linen dispatch is slow on the 2-core CI box)."""

    def __init__(self, cfg):
        self.module = ppm_lib.PPM(cfg)
        self.apply = jax.jit(self.module.apply, static_argnames=("deterministic",))


@functools.lru_cache(maxsize=None)
def _init(cfg=CFG, seed=0):
    model = _Jitted(cfg)
    hv, ht, m = _inputs(0, cfg=cfg)
    return model, jax.jit(model.module.init)(jax.random.key(seed), hv, ht, m)


def test_shapes_and_dtypes():
    model, variables = _init()
    for dtype in (jnp.float32, jnp.bfloat16):
        hv, ht, m = _inputs(1, dtype=dtype)
        s = model.apply(variables, hv, ht, m)
        assert s.shape == (3, CFG.n_v) and s.dtype == jnp.float32
        assert bool(jnp.all(jnp.isfinite(s)))
    with pytest.raises(ValueError):
        model.apply(variables, hv[..., :-1], ht, m)          # wrong LLM width
    # a "layout" PPM runs on any number of tokens; a "table" one only on its n_v
    assert model.apply(variables, hv[:, :5], ht, m).shape == (3, 5)
    table = ppm_lib.PPM(ppm_lib.PPMConfig(**dict(vars(CFG), position="table")))
    tvars = table.init(jax.random.key(0), hv, ht, m)
    with pytest.raises(ValueError, match="table"):
        table.apply(tvars, hv[:, :5], ht, m)


def test_padded_text_has_no_influence_but_real_text_does():
    model, variables = _init()
    hv, ht, m = _inputs(2)
    s = model.apply(variables, hv, ht, m)
    garbage = jnp.where(m[..., None], ht, 1e4 * jax.random.normal(jax.random.key(1), ht.shape))
    s2 = model.apply(variables, hv, garbage, m)
    np.testing.assert_array_equal(np.asarray(s), np.asarray(s2))
    nan_pads = jnp.where(m[..., None], ht, jnp.nan)
    np.testing.assert_array_equal(np.asarray(s), np.asarray(model.apply(variables, hv, nan_pads,
                                                                       m)))
    # changing a REAL text token changes the scores of that example only (params scaled up so
    # the freshly initialized attention is far from uniform)
    big = jax.tree.map(lambda x: 5.0 * x, variables)
    s = model.apply(big, hv, ht, m)
    ht3 = ht.at[1, -1].add(jax.random.normal(jax.random.key(2), (CFG.d_model,)))
    s3 = model.apply(big, hv, ht3, m)
    assert np.abs(np.asarray(s3[1] - s[1])).max() > 1e-3
    np.testing.assert_array_equal(np.asarray(s3[0]), np.asarray(s[0]))
    np.testing.assert_array_equal(np.asarray(s3[2]), np.asarray(s[2]))
    # no text at all: attends to vision only, still finite
    s4 = model.apply(variables, hv, ht, jnp.zeros_like(m))
    assert bool(jnp.all(jnp.isfinite(s4)))


def test_batched_equals_per_example():
    model, variables = _init()
    hv, ht, m = _inputs(3)
    s = model.apply(variables, hv, ht, m)
    for b in range(3):
        sb = model.apply(variables, hv[b:b + 1], ht[b:b + 1], m[b:b + 1])
        np.testing.assert_allclose(np.asarray(sb[0]), np.asarray(s[b]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cfg", [
    CFG,
    ppm_lib.PPMConfig(n_v=9, d_model=10, width=8, num_layers=1, num_heads=2, mlp_ratio=3),
    ppm_lib.PPMConfig(n_v=12, d_model=32, width=24, num_layers=3, num_heads=6),
])
def test_param_count_matches_analytic(cfg):
    hv, ht, m = _inputs(0, cfg=cfg)
    shapes = jax.eval_shape(lambda: ppm_lib.PPM(cfg).init(jax.random.key(0), hv, ht, m))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes)))
    assert n == ppm_lib.ppm_param_count(cfg)


def test_logical_axis_names():
    _, variables = _init()
    boxed = jax.tree.leaves(variables["params"],
                            is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert all(isinstance(x, nn.LogicallyPartitioned) for x in boxed)
    p = variables["params"]
    assert p["v_proj"]["kernel"].names == ("embed", "ppm_embed")
    assert p["t_proj"]["kernel"].names == ("embed", "ppm_embed")
    assert p["blocks"]["q"]["kernel"].names == ("layers", "ppm_embed", "ppm_heads", "head_dim")
    assert p["blocks"]["fc1"]["kernel"].names == ("layers", "ppm_embed", "ppm_mlp")
    assert p["blocks"]["o"]["kernel"].value.shape == (CFG.num_layers, CFG.num_heads,
                                                      CFG.head_dim, CFG.width)
    used = {n for x in boxed for n in x.names if n is not None}
    assert used <= {"embed", "ppm_embed", "ppm_mlp", "ppm_heads", "head_dim", "layers"}


def _dot_flops(jaxpr) -> int:
    """Matmul FLOPs (2 x MACs) of every dot_general in a jaxpr, scan bodies x length."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * int(
                np.prod([lhs[i] for i in lc]))
        mult = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for v in eqn.params.values():
            for s in (v if isinstance(v, (list, tuple)) else [v]):
                if isinstance(s, jcore.ClosedJaxpr):
                    total += mult * _dot_flops(s.jaxpr)
                elif isinstance(s, jcore.Jaxpr):
                    total += mult * _dot_flops(s)
    return total


@pytest.mark.parametrize("t", [5, 11])
def test_flops_match_traced_matmuls(t):
    cfg = ppm_lib.PPMConfig(n_v=16, d_model=24, width=16, num_layers=3, num_heads=4)
    model, variables = _init(cfg)
    hv, ht, m = _inputs(4, b=2, t=t, cfg=cfg)
    jaxpr = jax.make_jaxpr(lambda v: model.module.apply(v, hv, ht, m))(variables).jaxpr
    assert _dot_flops(jaxpr) == 2 * ppm_lib.ppm_flops(cfg, cfg.n_v, t)   # batch of 2


def test_llm_cost_model():
    # LLaMA-7B / Vicuna-7B: 6,738,415,616 parameters
    assert ppm_lib.llm_param_count() == 6_738_415_616
    # matmul FLOPs = 2 x (matmul params) x tokens + attention scores/values + last-token head
    s, n_layers, d, f, v = 208, 32, 4096, 11008, 32000
    want = 2 * s * n_layers * (4 * d * d + 3 * d * f) + n_layers * 4 * s * s * d + 2 * d * v
    assert ppm_lib.llm_prefill_flops(s) == want
    # GQA: fewer kv heads, fewer FLOPs
    assert ppm_lib.llm_prefill_flops(s, num_kv_heads=8) < want


def test_budget_for_7b():
    """Default PPM for LLaVA-1.5-7B: < 2% of the LLM's params, < 3% of the pruned prefill."""
    cfg = ppm_lib.PPMConfig(n_v=576, d_model=4096)
    n_v, t, r = 576, 64, 0.25
    k = int(round(r * n_v))
    params = ppm_lib.ppm_param_count(cfg)
    flops = ppm_lib.ppm_flops(cfg, n_v, t)
    llm_params = ppm_lib.llm_param_count()
    llm_flops = ppm_lib.llm_prefill_flops(k + t)
    assert params / llm_params < 0.02, params / llm_params
    assert flops / llm_flops < 0.03, flops / llm_flops
    # and a real init agrees with the analytic count (shape-only, no memory)
    shapes = jax.eval_shape(lambda: ppm_lib.PPM(cfg).init(
        jax.random.key(0), jnp.zeros((1, n_v, 4096)), jnp.zeros((1, t, 4096)),
        jnp.ones((1, t), bool)))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes))) == params


def test_ppm_method_topk_gather_and_jit():
    model, variables = _init()
    traces = []

    @jax.jit
    def run(ctx):
        traces.append(1)
        return ppm_lib.ppm(ctx, 5, module=model.module, variables=variables)

    for seed in (5, 6):
        hv, ht, m = _inputs(seed)
        ctx = PruneContext(vision_tokens=hv, text_embeds=ht, text_mask=m, grid=(4, 4))
        res = run(ctx)
        scores = model.apply(variables, hv, ht, m)
        np.testing.assert_allclose(np.asarray(res.scores), np.asarray(scores), rtol=1e-5,
                                   atol=1e-6)
        idx = np.asarray(res.indices)
        np.testing.assert_array_equal(idx, np.asarray(topk_indices(scores, 5)))
        assert idx.shape == (3, 5) and np.all(np.diff(idx, axis=1) > 0)
        for b in range(3):
            want = np.sort(np.argsort(-np.asarray(scores[b]))[:5])
            np.testing.assert_array_equal(idx[b], want)
            np.testing.assert_array_equal(np.asarray(res.tokens[b]), np.asarray(hv[b, idx[b]]))
    assert len(traces) == 1


def test_trainable_grads_and_dropout():
    cfg = ppm_lib.PPMConfig(n_v=16, d_model=24, width=16, num_layers=2, num_heads=4,
                            dropout=0.1)
    model, variables = _init(cfg)
    hv, ht, m = _inputs(7)
    target = jax.random.normal(jax.random.key(3), (3, cfg.n_v))

    def loss(params):
        s = model.module.apply({"params": params}, hv, ht, m)
        return jnp.mean((s - target) ** 2)

    params = nn.unbox(variables)["params"]
    g = jax.jit(jax.grad(loss))(params)
    for path, leaf in jax.tree_util.tree_leaves_with_path(g):
        assert bool(jnp.all(jnp.isfinite(leaf))), path
        assert float(jnp.abs(leaf).max()) > 0, path
    a = model.apply({"params": params}, hv, ht, m, deterministic=False,
                    rngs={"dropout": jax.random.key(1)})
    a2 = model.apply({"params": params}, hv, ht, m, deterministic=False,
                     rngs={"dropout": jax.random.key(1)})
    np.testing.assert_array_equal(np.asarray(a), np.asarray(a2))
    b = model.apply({"params": params}, hv, ht, m)
    assert not np.allclose(np.asarray(a), np.asarray(b))


def test_config_validation():
    with pytest.raises(ValueError):
        ppm_lib.PPMConfig(n_v=4, d_model=8, width=10, num_heads=4)
    with pytest.raises(ValueError):
        ppm_lib.PPMConfig(n_v=0, d_model=8)


def test_long_inputs_take_blockwise_attention_with_the_same_scores():
    """A long (AnyRes-sized) input runs the PPM's attention blockwise ("auto" on CPU: never
    the [B, N, n_v, T + n_v] scores); scores equal the explicit softmax path's, padding slots
    and padded text included."""
    from covipal_jax.models import attention as attention_lib

    n_v, t_len = 1100, 24
    cfg = ppm_lib.PPMConfig(n_v=n_v, d_model=32, width=32, num_layers=2, num_heads=4,
                            mlp_ratio=2, position="layout")
    rng = np.random.default_rng(0)
    v = jnp.asarray(rng.standard_normal((2, n_v, 32)), jnp.float32)
    t = jnp.asarray(rng.standard_normal((2, t_len, 32)), jnp.float32)
    tm = jnp.asarray(np.arange(t_len)[None] >= np.array([[0], [7]]))   # row 1: left padding
    valid = jnp.asarray(np.arange(n_v)[None] < np.array([[n_v], [900]]))
    model = ppm_lib.PPM(cfg)
    coords = jnp.where(valid[..., None], jnp.stack(
        [jnp.zeros((2, n_v), jnp.int32), jnp.broadcast_to(jnp.arange(n_v) // 40, (2, n_v)),
         jnp.broadcast_to(jnp.arange(n_v) % 40, (2, n_v))], -1), -1)
    params = model.init(jax.random.key(0), v, t, tm, coords=coords, valid=valid)
    q = jnp.zeros((2, n_v, 4, 8))
    k = jnp.zeros((2, n_v + t_len, 4, 8))
    assert attention_lib.resolve_impl("auto", q, k, plat="cpu")[0] == "chunked"

    def scores(impl):
        m = ppm_lib.PPM(cfg.with_attention(impl))          # the same parameters
        return np.asarray(jax.jit(lambda p: m.apply(p, v, t, tm, coords=coords,
                                                    valid=valid))(params))

    auto, dense_scores = scores("auto"), scores("xla")
    np.testing.assert_array_equal(np.isinf(auto), ~np.asarray(valid))
    np.testing.assert_allclose(auto[np.asarray(valid)], dense_scores[np.asarray(valid)],
                               rtol=1e-5, atol=1e-5)
    hlo = jax.jit(lambda p: model.apply(p, v, t, tm, coords=coords, valid=valid)).lower(
        params).as_text()
    assert f"{n_v}x{n_v + t_len}" not in hlo      # no full score matrix in the program
    dense = ppm_lib.PPM(cfg.with_attention("xla"))
    dense_hlo = jax.jit(lambda p: dense.apply(p, v, t, tm, coords=coords,
                                              valid=valid)).lower(params).as_text()
    assert f"{n_v}x{n_v + t_len}" in dense_hlo


def test_attention_backend_is_a_runtime_field():
    """`PPMConfig.attention` picks the backend per PPM (no module-level switch: safe when the
    evaluator traces two methods in two threads); exports and resume metadata leave it out, and
    the FLOP counters' `dense()` method value uses "xla"."""
    cfg = ppm_lib.PPMConfig(n_v=16, d_model=32, width=16, num_heads=2, attention="chunked")
    assert "attention" not in cfg.to_dict()
    assert ppm_lib.PPMConfig(**cfg.to_dict()) == cfg.with_attention("auto")
    with pytest.raises(ValueError, match="attention"):
        ppm_lib.PPMConfig(n_v=16, d_model=32, width=16, num_heads=2, attention="flash")
    m = ppm_lib.PPMMethod(ppm=cfg, keep=0.5)
    assert m.dense().ppm.attention == "xla" and m.dense().keep == 0.5
    assert ppm_lib.PPMMethod().dense() == ppm_lib.PPMMethod()
