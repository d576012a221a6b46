"""covipal_jax/train/objectives.py: stage-1 targets against a brute-force attention reference,
the stage-1 losses and recall, the stage-2 attention bias (p = 1 / p -> 0 / hard top-k), the
stage-2 loss terms, and NaN fault injection."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from covipal_jax.models.config import LlavaConfig
from covipal_jax.models.llava import Llava, init_params
from covipal_jax.pruning.ppm import PPM, PPMConfig
from covipal_jax.train import objectives as ob

N_V = 64  # the tiny model: 64 patches of 8 on a 64x64 image, CLS dropped
# Small programs: compile fast (XLA's CPU backend optimizations dominate compile time here).
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                                                   "xla_cpu_use_fusion_emitters": False})


def _batch(seed=0):
    """Three left-padded prompt + answer rows: real lengths 10, 7, 12 in a bucket of 12, the
    image at 2, 1, 0 (index among the real tokens), answers of 3, 2, 4 tokens at the end."""
    pixels, ids, mask = tiny.batch(lengths=(10, 7, 12), bucket=12, image_at=(2, 1, 0),
                                   seed=seed)
    loss_mask = np.zeros_like(mask)
    for b, n in enumerate((3, 2, 4)):
        loss_mask[b, -n:] = True
    return dict(pixels=jnp.asarray(pixels), ids=jnp.asarray(ids), mask=jnp.asarray(mask),
                loss_mask=jnp.asarray(loss_mask), weight=jnp.ones(3, jnp.float32))


@functools.lru_cache(maxsize=None)
def _sharp_model():
    """The tiny random LLaVA with q/k kernels x16: peaked attention, so that choosing the
    wrong query rows changes the targets by far more than the tolerance."""
    cfg = LlavaConfig.from_config(tiny.config().model)
    model = Llava(cfg)
    params = jit(lambda r: nn.unbox(init_params(cfg, r)))(jax.random.key(0))
    stack = params["params"]["language_model"]["layers"]["stack"]
    stack = dict(stack, q={**stack["q"], "kernel": stack["q"]["kernel"] * 16.0},
                 k={**stack["k"], "kernel": stack["k"]["kernel"] * 16.0})
    lm = dict(params["params"]["language_model"], layers={"stack": stack})
    return model, {"params": dict(params["params"], language_model=lm)}


# ----------------------------------------------------------------------------- reference

@functools.lru_cache(maxsize=None)
def _encode_and_run(model, lg):
    """Jitted: the batch's spliced sequence and the input of layer lg (the fused path)."""

    def f(params, batch):
        enc = ob.encode(model, params, batch)
        h, _ = model.apply(params, enc.seq, method=Llava.run, positions=enc.positions,
                           key_valid=enc.seq_mask, stop=lg)
        return enc, h

    return jit(f)


def _rope(x, pos, theta):
    h = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, h, 2, dtype=np.float64) / h)
    f = pos[..., None].astype(np.float64) * inv
    emb = np.concatenate([f, f], -1)[:, :, None, :]
    x1, x2 = np.split(x, 2, -1)
    return x * np.cos(emb) + np.concatenate([-x2, x1], -1) * np.sin(emb)


def _layout(ids, mask, loss_mask, n_v):
    """Per row of the spliced sequence: (is_vision, real, answer, text index) by hand."""
    t = ids.shape[0]
    p = int(np.argmax(ids == tiny.IMAGE_TOKEN))
    out = []
    for j in range(t - 1 + n_v):
        if j < p:
            out.append((False, bool(mask[j]), bool(loss_mask[j]), j))
        elif j < p + n_v:
            out.append((True, True, False, None))
        else:
            tt = j - n_v + 1
            out.append((False, bool(mask[tt]), bool(loss_mask[tt]), tt))
    return p, out


def reference_labels(model, params, batch, lg, queries, include_answer):
    """All L x L attention probabilities of layer lg, materialized in NumPy (f64), then the
    query rows picked by hand, summed over heads and rows, normalized."""
    cfg = model.cfg.text
    enc, h = _encode_and_run(model, lg)(params, batch)
    x = np.asarray(h, np.float64)
    lp = jax.tree.map(lambda a: np.asarray(a[lg], np.float64),
                      params["params"]["language_model"]["layers"]["stack"])
    xn = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.rms_norm_eps)
    xn = xn * lp["input_norm"]["scale"]
    q = np.einsum("bld,dnh->blnh", xn, lp["q"]["kernel"])
    k = np.einsum("bld,dnh->blnh", xn, lp["k"]["kernel"])
    ids, mask, lmask = (np.asarray(batch[n]) for n in ("ids", "mask", "loss_mask"))
    labels = []
    for b in range(ids.shape[0]):
        p, rows = _layout(ids[b], mask[b], lmask[b], N_V)
        real = np.array([r[1] for r in rows])
        pos = np.maximum(np.cumsum(real) - 1, 0)
        np.testing.assert_array_equal(pos, np.asarray(enc.positions[b]))
        qb = _rope(q[b:b + 1], pos[None], cfg.rope_theta)[0]         # [L, N, H]
        kb = _rope(k[b:b + 1], pos[None], cfg.rope_theta)[0]         # [L, K, H]
        g = cfg.num_heads // cfg.num_kv_heads
        kb = np.repeat(kb, g, axis=1)
        logits = np.einsum("inh,jnh->nij", qb, kb) / np.sqrt(cfg.head_dim)
        length = len(rows)
        allowed = (np.arange(length)[None, :] <= np.arange(length)[:, None]) & real[None, :]
        logits = np.where(allowed[None], logits, -1e30)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)                         # [N, L, L]
        ok = [j for j, (vis, r, ans, _) in enumerate(rows) if r and (include_answer or not ans)]
        if queries == "text_after_image":
            q_rows = [j for j in ok if j >= p + N_V]
        elif queries == "all":
            q_rows = ok
        else:
            q_rows = [max(j for j, (vis, r, ans, _) in enumerate(rows) if r and not ans)]
        a = probs[:, q_rows, p:p + N_V].sum(axis=(0, 1))
        labels.append(a / a.sum())
    return np.stack(labels)


@pytest.mark.parametrize("queries,include_answer,lg", [
    ("text_after_image", True, 2), ("text_after_image", False, 1), ("all", True, 2),
    ("last", True, 3)])
def test_labels_match_full_attention_reference(queries, include_answer, lg):
    model, params = _sharp_model()
    batch = _batch()
    spec = ob.ObjectiveSpec(stage=1, n_v=N_V, k=16, guide_layer=lg, label_queries=queries,
                            label_answer_queries=include_answer)
    fn = jit(lambda p, b: ob.guide_labels(model, p, ob.encode(model, p, b), spec)[:2])
    labels, ok = fn(params, batch)
    ref = reference_labels(model, params, batch, lg, queries, include_answer)
    assert bool(np.all(ok))
    np.testing.assert_allclose(np.asarray(labels).sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(labels, ref, rtol=2e-4, atol=1e-7)
    # Discriminative: the targets are peaked, and another query set gives other targets.
    assert float(np.max(ref)) > 5.0 / N_V
    other = "last" if queries != "last" else "all"
    ref_other = reference_labels(model, params, batch, lg, other, include_answer)
    assert np.max(np.abs(ref_other - ref)) > 100 * 2e-4 * np.max(ref)


def test_query_rows_static_shapes():
    model, params = _sharp_model()
    enc, _ = _encode_and_run(model, 0)(params, _batch())
    t = 12
    for q, r in (("text_after_image", t - 1), ("all", t - 1 + N_V), ("last", 1)):
        rows, valid = ob.query_rows(enc, N_V, q)
        assert rows.shape == (3, r) and valid.shape == (3, r)
    rows, valid = ob.query_rows(enc, N_V, "text_after_image", include_answer=False)
    # Row 0: 10 real tokens, image at real index 2, 3 answer tokens: 10 - 3 - 3 = 4 prompt
    # tokens after the image.
    assert int(valid[0].sum()) == 4
    rows, valid = ob.query_rows(enc, N_V, "text_after_image", include_answer=True)
    assert int(valid[0].sum()) == 7


# ----------------------------------------------------------------------------- stage-1 losses

def test_topk_recall():
    s = jnp.array([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    y = jnp.array([[0.3, 0.0, 0.25, 0.05, 0.4, 0.0]])
    # TopK(s, 3) = {0, 1, 2}; TopK(y, 3) = {4, 0, 2}: overlap 2.
    np.testing.assert_allclose(ob.topk_recall(s, y, 3), [2 / 3])
    np.testing.assert_allclose(ob.topk_recall(y, y, 3), [1.0])


def test_stage1_losses():
    rng = np.random.default_rng(0)
    y = rng.dirichlet(np.ones(16) * 0.3, size=4).astype(np.float32)
    y = jnp.asarray(y)
    good = jnp.log(y + 1e-6)
    rand = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    # MSE on n_v-scaled targets.
    mse = ob.stage1_per_example(rand, y, "mse", 4)
    np.testing.assert_allclose(mse, np.mean((np.asarray(rand) - 16 * np.asarray(y)) ** 2, -1),
                               rtol=1e-6)
    assert float(jnp.max(ob.stage1_per_example(16 * y, y, "mse", 4))) < 1e-10
    # KL(y || softmax(s)) is 0 at s = log y (+ const) and positive elsewhere.
    assert float(jnp.max(jnp.abs(ob.stage1_per_example(jnp.log(y) + 3.0, y, "kl", 4)))) < 1e-5
    assert float(jnp.min(ob.stage1_per_example(rand, y, "kl", 4))) > 0
    # Ranking losses prefer the right order to a random one and to the reversed one.
    for kind in ("pairwise", "listwise", "kl", "mse"):
        lg = ob.stage1_per_example(good if kind != "mse" else 16 * y, y, kind, 4)
        lr = ob.stage1_per_example(rand, y, kind, 4)
        lrev = ob.stage1_per_example(-good, y, kind, 4)
        assert bool(jnp.all(lg < lr)) and bool(jnp.all(lg < lrev)), kind
    with pytest.raises(ValueError):
        ob.stage1_per_example(rand, y, "nope", 4)


# ----------------------------------------------------------------------------- stage 2

def _run(model, params, enc, key_valid=None, bias=None):
    kv = enc.seq_mask if key_valid is None else key_valid
    h, _ = model.apply(params, enc.seq, method=Llava.run, positions=enc.positions,
                       key_valid=kv, bias=bias)
    return model.apply(params, h, method=Llava.logits)


@functools.lru_cache(maxsize=None)
def _runner():
    """(model, params, enc, jitted run(key_valid, bias) -> logits) on the sharp model."""
    model, params = _sharp_model()
    enc, _ = _encode_and_run(model, 0)(params, _batch())
    run = jit(lambda kv, bias: _run(model, params, enc, kv, bias))
    return model, params, enc, run


def test_bias_keep_all_equals_unpruned_and_zero_equals_masked():
    model, params, enc, run = _runner()
    zero = jnp.zeros(enc.seq_mask.shape, jnp.float32)
    ref = run(enc.seq_mask, zero)
    text_rows = np.asarray(enc.seq_mask & ~enc.is_vis)

    scores = jnp.full((3, N_V), 30.0)                       # p = 1 - 1e-13
    bias, p = ob.keep_bias(scores, enc, 16)
    assert bias.shape == enc.seq_mask.shape and float(jnp.min(p)) > 0.999
    out = run(enc.seq_mask, bias)
    np.testing.assert_allclose(np.asarray(out)[text_rows], np.asarray(ref)[text_rows],
                               atol=1e-5)

    drop = np.zeros((3, N_V), bool)
    drop[0, [3, 40]] = drop[1, 0] = drop[2, 63] = True
    scores = jnp.where(jnp.asarray(drop), -1e4, 30.0)     # log p = -1e4 on dropped tokens
    bias, _ = ob.keep_bias(scores, enc, 16)
    soft = run(enc.seq_mask, bias)
    masked_keys = enc.seq_mask & ~(ob.vision_key_bias(jnp.asarray(drop, jnp.float32), enc) > 0)
    hard = run(masked_keys, zero)
    np.testing.assert_allclose(np.asarray(soft)[text_rows], np.asarray(hard)[text_rows],
                               atol=1e-5)
    # ... and dropping them does change the answer logits (the test can fail).
    assert np.max(np.abs(np.asarray(soft)[text_rows] - np.asarray(ref)[text_rows])) > 1e-3


def test_hard_straight_through():
    model, params, enc, run = _runner()
    scores = jnp.asarray(np.random.default_rng(1).normal(size=(3, N_V)), jnp.float32)
    k = 16
    kept = ob.select.keep_mask(ob.select.topk_indices(scores, k), N_V)
    bias, _ = ob.keep_bias(scores, enc, k, hard=True)
    key_valid = enc.seq_mask & ~(ob.vision_key_bias((~kept).astype(jnp.float32), enc) > 0)
    text_rows = np.asarray(enc.seq_mask & ~enc.is_vis)
    zero = jnp.zeros(enc.seq_mask.shape, jnp.float32)
    np.testing.assert_allclose(np.asarray(run(enc.seq_mask, bias))[text_rows],
                               np.asarray(run(key_valid, zero))[text_rows], atol=1e-4)

    def out(s):
        b, _ = ob.keep_bias(s, enc, k, hard=True)
        return jnp.sum(_run(model, params, enc, bias=b)[:, -1, :5])

    g = jit(jax.grad(out))(scores)
    assert bool(jnp.all(jnp.isfinite(g)))
    assert float(jnp.max(jnp.abs(jnp.where(kept, g, 0.0)))) > 0


@functools.lru_cache(maxsize=None)
def _ppm_module():
    pcfg = PPMConfig(n_v=N_V, d_model=64, width=16, num_layers=1, num_heads=2, mlp_ratio=2)
    module = PPM(pcfg)
    v = jit(module.init)(jax.random.key(0), jnp.zeros((1, N_V, 64)), jnp.zeros((1, 4, 64)),
                         jnp.ones((1, 4), bool))
    return module, nn.unbox(v)["params"]


def _ppm(head_bias=None):
    module, params = _ppm_module()
    if head_bias is not None:
        params = dict(params, head={"kernel": jnp.zeros_like(params["head"]["kernel"]),
                                    "bias": jnp.full_like(params["head"]["bias"], head_bias)})
    return module, params


@functools.lru_cache(maxsize=None)
def _loss_fn(spec):
    model, frozen = _sharp_model()
    module, _ = _ppm_module()
    batch = _batch()

    def f(p, step):
        prep = ob.prepare(model, frozen, batch, spec)
        return ob.loss_fn(p, ppm_module=module, model=model, params=frozen, prep=prep,
                          batch=batch, spec=spec, step=step)

    return jit(f)


def _loss(spec, params, step=0):
    return _loss_fn(spec)(params, jnp.asarray(step, jnp.int32))


def test_stage2_loss_terms():
    spec = ob.ObjectiveSpec(stage=2, n_v=N_V, k=16, guide_layer=2, lambda_kl=0.5,
                            lambda_budget=2.0)
    _, params = _ppm(head_bias=30.0)                 # p = 1: the soft-pruned model = teacher
    loss, m = _loss(spec, params)
    assert abs(float(m["kl"])) < 1e-5
    np.testing.assert_allclose(m["budget"], (1 - 0.25) ** 2, rtol=1e-5)
    np.testing.assert_allclose(loss, m["lm"] + 0.5 * m["kl"] + 2.0 * m["budget"], rtol=1e-6)
    assert float(m["answer_tokens"]) == 3 + 2 + 4   # the answer tokens are targets ids[:, 1:]
    _, params = _ppm()                               # a random PPM prunes softly: KL > 0
    loss2, m2 = _loss(spec, params)
    assert float(m2["kl"]) > 1e-4 and np.isfinite(float(loss2))


def test_stage1_loss_and_nan_injection():
    _, params = _ppm()
    spec = ob.ObjectiveSpec(stage=1, n_v=N_V, k=16, guide_layer=2, inject_nan_step=3)
    loss, m = _loss(spec, params, step=2)
    assert np.isfinite(float(loss)) and 0 <= float(m["recall"]) <= 1
    loss, _ = _loss(spec, params, step=3)
    assert np.isnan(float(loss))


def test_spec_validation():
    with pytest.raises(ValueError):
        ob.ObjectiveSpec(stage=3, n_v=8, k=2)
    with pytest.raises(ValueError):
        ob.ObjectiveSpec(n_v=8, k=2, label_queries="first")
    with pytest.raises(ValueError):
        ob.ObjectiveSpec(n_v=8, k=9)
