"""In-LLM methods (FastV, DART, PyramidDrop, SparseVLM) and VisionZip per image on several images
per prompt (OneVision multi-image, issue 12): a batch of two prompts with 2 and 1 images ("2+1":
the lone image is tiled, as transformers does), left-padded text between the images.

In-LLM: the whole visual input (both images' valid slots, newlines kept) is the candidate set,
text between the images is never pruned, padding / absent images never kept, exact per-example
budgets; the cached prefill (and the greedy decode after it) equals a cache-free reference that
realizes each stage's drops with masks; batched == per example; one compilation per (images,
bucket, text bucket, k). VisionZip: the official LLaVA-NeXT rule applied to each image on its
own (the torch port of tests/test_pruning_visionzip_packed.py)."""
from __future__ import annotations

import functools
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from covipal_jax import pruning
from covipal_jax.configs import tiny_next, tiny_ov
from covipal_jax.data import anyres as data_anyres
from covipal_jax.inference import decoding, in_llm
from covipal_jax.inference import prefill as P
from covipal_jax.inference import visual_inputs as vi
from covipal_jax.models import anyres
from covipal_jax.models import multimodal as mm
from covipal_jax.models.config import LlavaConfig
from covipal_jax.models.llava import Llava, init_params
from covipal_jax.pruning import views as views_lib
from test_multi_image import _prompt as multi_prompt
from test_prune_packed_inllm import _recording, run_masked  # log: (probe, k, result)
from test_pruning_visionzip_packed import official_sequence

# Compile-heavy (tiny models, many programs): run in the CI step for slow tests.
pytestmark = pytest.mark.slow

ATOL = 1e-5
LAYERS = 6
ROWS = [[(37, 91), (60, 50)], [(77, 53)]]      # 2 + 1 images (the lone one tiled)


@functools.lru_cache(maxsize=None)
def _model(name="ov"):
    c = {"ov": tiny_ov, "next": tiny_next}[name].get_config()
    c.model.text.num_layers = LAYERS
    cfg = LlavaConfig.from_config(c.model)
    return cfg, Llava(cfg), nn.unbox(init_params(cfg, jax.random.key(0)))


def _multi(name="ov", rows=ROWS, seed=0, **kw):
    cfg = _model(name)[0]
    rng = np.random.default_rng(seed)
    imgs = [[rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in r] for r in rows]
    x = data_anyres.preprocess_multi(imgs, data_anyres.AnyResConfig.for_model(cfg), **kw)
    return vi.MultiImage.from_layout(cfg, jnp.asarray(x.pixels), x.layout, x.image_valid)


def _prompt(counts=(2, 1), t=16, seed=0, name="ov"):
    """Left-padded row 0; placeholders at 3, 5, ... with text between them."""
    return multi_prompt(counts, t, _model(name)[0].image_token_id, seed)


def _row(vis, ids, mask, b):
    one = jax.tree.map(lambda a: a[b:b + 1], vis)
    return one, ids[b:b + 1], mask[b:b + 1]


METHODS = {
    "fastv": lambda: pruning.FastV(keep=0.4),
    "dart": lambda: pruning.DART(keep=0.4),
    "pdrop": lambda: pruning.PyramidDrop(),            # lam 0.5 at layers 2/3/4 of 6
    "sparsevlm": lambda: pruning.SparseVLM(),          # 1/3, layers 1/2/4, recycling on
}


@functools.lru_cache(maxsize=None)
def _traced(name):
    """(out, ctx, [(k, stage record)]) of the jitted prefill of METHODS[name] on the 2+1 batch."""
    _, model, params = _model()
    vis, (ids, mask) = _multi(), _prompt()
    rec, log = _recording(METHODS[name]())

    def f(p, v, i, m):
        out = P.prefill(model, p, v, i, m, rec, extra=2)
        ctx, _, _ = vi.packed_context(model, p, v, i, m, rec)
        stages = [dict(kept=r.kept, ok=r.valid,
                       merged=None if r.merged is None else r.merged_valid,
                       mpos=r.merged_positions) for *_, r in log]
        return out, ctx, stages

    out, ctx, stages = jax.jit(f)(params, vis, ids, mask)
    return out, ctx, list(zip([k for _, k, _ in log], stages))


def _walk(log, n):
    """Per stage: (src i32[B, n_s] source slot of each current token, seen bool[B, n_s])."""
    src, seen, out = np.broadcast_to(np.arange(n), (2, n)), np.ones((2, n), bool), []
    for *_, rec in log:
        kept = np.asarray(rec["kept"])
        ok = np.ones(kept.shape, bool) if rec["ok"] is None else np.asarray(rec["ok"])
        nsrc = np.take_along_axis(src, kept, 1)
        nseen = ok & np.take_along_axis(seen, kept, 1)
        if rec["merged"] is not None:
            nsrc = np.concatenate([nsrc, np.take_along_axis(src, np.asarray(rec["mpos"]), 1)], 1)
            nseen = np.concatenate([nseen, np.asarray(rec["merged"])], 1)
        src, seen = nsrc, nseen
        out.append((src, seen))
    return out


# ----------------------------------------------------------------------------- selection

@pytest.mark.parametrize("name", list(METHODS))
def test_candidates_are_all_images_valid_slots_exact_budgets(name):
    cfg = _model()[0]
    out, ctx, log = _traced(name)
    vis = _multi()
    valid0 = np.asarray(ctx.valid)
    newline = np.asarray(ctx.coords[..., 0] == anyres.KIND_NEWLINE) & valid0
    n, n1 = ctx.n_v, vis.image_slots(cfg)
    method = METHODS[name]()
    stages = method.stages(n, LAYERS)
    budgets = [np.asarray(b) for b in in_llm.stage_budgets(method, stages, n, ctx.valid)]
    assert len(log) == len(stages)
    prev_src, prev_seen = np.broadcast_to(np.arange(n), (2, n)), valid0
    for s, ((src, seen), (k, rec), budget) in enumerate(zip(_walk(log, n), log, budgets)):
        assert k == stages[s][1]
        m = 0 if rec["merged"] is None else rec["merged"].shape[1]
        n_kept = np.asarray(rec["kept"]).shape[1]
        assert n_kept + m == k
        for b in range(2):
            real = src[b, :n_kept][seen[b, :n_kept]]
            assert len(set(real.tolist())) == len(real)
            assert valid0[b, real].all(), f"stage {s}: a padding / absent slot was kept"
            assert set(np.flatnonzero(newline[b]).tolist()) <= set(real.tolist())
            # exact budget (SparseVLM: the kept part is the budget less the merged slots)
            want = min(max(budget[b] - m, 1), n_kept) if m else budget[b]
            assert len(real) == want, f"stage {s}, row {b}: {len(real)} != {want}"
            if s == 0 and b == 0:   # one top-k over both images: both keep tokens
                assert len(set((real // n1).tolist())) == 2
        prev_src, prev_seen = src, seen
    np.testing.assert_array_equal(np.asarray(out.kept), np.where(prev_seen, prev_src, -1))
    assert (np.asarray(out.kept)[1] < n1).all()    # row 1 has one image: slots of image 0 only


@pytest.mark.parametrize("name", list(METHODS))
def test_batched_equals_per_example(name):
    _, model, params = _model()
    vis, (ids, mask) = _multi(seed=1), _prompt(seed=1)
    method = METHODS[name]()
    run = jax.jit(lambda p, v, i, m: P.prefill(model, p, v, i, m, method, extra=2))
    out = run(params, vis, ids, mask)
    for b in range(2):
        one = run(params, *_row(vis, ids, mask, b))
        np.testing.assert_array_equal(one.kept[0], out.kept[b])
        np.testing.assert_allclose(one.last_logits[0], out.last_logits[b], atol=ATOL)
        np.testing.assert_array_equal(one.next_position[0], out.next_position[b])


def test_keeping_everything_equals_unpruned():
    """FastV keeping every real token = the unpruned prefill (itself HF-parity tested in
    tests/test_multi_image.py): the spans, masks and positions of the in-LLM path are HF's."""
    _, model, params = _model()
    vis, (ids, mask) = _multi(), _prompt()
    ref = P.prefill(model, params, vis, ids, mask, pruning.NoneMethod(), extra=2)
    out = P.prefill(model, params, vis, ids, mask, pruning.FastV(keep=1.0), extra=2)
    assert float(jnp.max(jnp.abs(out.last_logits - ref.last_logits))) <= ATOL
    np.testing.assert_array_equal(out.kept, ref.kept)
    np.testing.assert_array_equal(out.next_position, ref.next_position)


# ----------------------------------------------------------------------------- reference

def _masked_reference(method, log, generated):
    """f32[B, V]: next-token logits of the prompt + generated i32[B, t] without a cache, all
    slots spliced at their placeholders (`mm.splice_packed`, HF-parity tested) and each
    stage's drops realized by masking (positions renumbered for renumbering methods)."""
    cfg, model, params = _model()
    vis, (ids, mask) = _multi(), _prompt()
    ctx, text, pos = vi.packed_context(model, params, vis, ids, mask, method)
    n, b = ctx.n_v, 2
    img = jnp.broadcast_to(jnp.arange(n) // vis.image_slots(cfg), (b, n))
    h, seq_mask, positions, is_vis = mm.splice_packed(text, mask, pos, vi.image_counts(vis),
                                                      ctx.vision_tokens, img, ctx.valid)
    rows = np.stack([np.flatnonzero(r) for r in np.asarray(is_vis)])      # slot -> sequence
    assert rows.shape == (b, n)
    slots = []
    for src, seen in _walk(log, n):
        m = np.zeros((b, n), bool)
        for r in range(b):
            m[r, src[r][seen[r]]] = True
        slots.append(m)
    return run_masked(model, params, h, seq_mask, positions, rows, slots, method, generated)


REFERENCE = {   # SparseVLM without recycling: merged tokens have no masked realization
    "fastv": METHODS["fastv"], "dart": METHODS["dart"], "pdrop": METHODS["pdrop"],
    "sparsevlm": lambda: pruning.SparseVLM(recycle=False),
}


@pytest.mark.parametrize("name", list(REFERENCE))
def test_cached_prefill_and_decode_equal_masked_reference(name):
    _, model, params = _model()
    vis, (ids, mask) = _multi(), _prompt()
    method = REFERENCE[name]()
    rec, log = _recording(method)

    def f(p, v, i, m):
        out = P.prefill(model, p, v, i, m, rec, extra=2)
        return out, [(r.kept, r.valid) for *_, r in log]

    out, stages = jax.jit(f)(params, vis, ids, mask)
    log = [(k, dict(kept=np.asarray(kept), ok=None if ok is None else np.asarray(ok),
                    merged=None, mpos=None)) for (_, k, _), (kept, ok) in zip(log, stages)]
    ref = _masked_reference(method, log, jnp.zeros((2, 0), jnp.int32))
    assert float(np.max(np.abs(np.asarray(out.last_logits) - ref))) <= 1e-4
    if name in ("fastv", "pdrop"):      # keep-positions and renumbering: decode steps too
        tokens = decoding.Generator(model, method, max_new_tokens=3, eos_id=-1)(
            params, vis, ids, mask).tokens
        np.testing.assert_array_equal(tokens[:, 0], np.argmax(ref, axis=-1))
        for t in (1, 2):
            ref_t = _masked_reference(method, log, jnp.asarray(tokens[:, :t]))
            np.testing.assert_array_equal(tokens[:, t], np.argmax(ref_t, axis=-1))


@pytest.mark.parametrize("name", list(METHODS))
def test_generation_compiles_once_per_images_bucket_text_and_k(name):
    _, model, params = _model()
    gen = decoding.Generator(model, METHODS[name](), max_new_tokens=2, eos_id=-1)
    ids, mask = _prompt()
    a = _multi(seed=0, num_views=10)
    b = _multi(rows=[[(90, 30), (50, 52)], [(40, 70)]], seed=3, num_views=10)
    assert a.pixels.shape == b.pixels.shape and a.capacity == b.capacity
    for vis in (a, b):
        out = gen(params, vis, ids, mask)
        assert out.tokens.shape == (2, 2) and (out.kept >= 0).any(axis=1).all()
    assert gen.compilations()["prefill"] == 1 and gen.compilations()["decode"] == 1


def test_per_image_budget_inside_the_llm_refused_clearly():
    _, model, params = _model()
    vis, (ids, mask) = _multi().replace(budget="per_image"), _prompt()
    with pytest.raises(ValueError, match="budget='per_image'"):
        P.prefill(model, params, vis, ids, mask, METHODS["fastv"](), extra=2)


# ----------------------------------------------------------------------------- VisionZip

def _vz_select(name, vis, method):
    cfg, model, params = _model(name)
    ids, mask = _prompt(tuple(int(c) for c in np.asarray(vis.image_valid).sum(1)), name=name)
    ctx, _, _ = vi.packed_context(model, params, vis, ids, mask, method)
    ctx = ctx.replace(project=lambda f: model.apply(params, f, method=Llava.project))
    return ctx, method.select(ctx, method.k(ctx.n_v))


@pytest.mark.parametrize("name,keep", [("ov", 0.5), ("next", 6)])
def test_visionzip_per_image_matches_official_rule(name, keep):
    cfg = _model(name)[0]
    vis = _multi(name)
    method = pruning.get("visionzip")(keep=keep)
    ctx, res = _vz_select(name, vis, method)
    g, p = cfg.vision.grid[0], vis.max_images
    n1 = vis.image_slots(cfg)
    k_v = pruning.resolve_keep(keep, g * g)
    dominant, contextual = pruning.visionzip.split_budget(k_v)
    split = types.SimpleNamespace(views=views_lib.split_images(ctx.views))
    newline = ctx.vision_tokens.reshape(2 * p, n1, -1)[:, g * g]
    plan = np.asarray(split.views.plan)
    k1 = res.tokens.shape[1] // p
    assert k1 == vis.pixels.shape[2] * k_v + 1
    valid, idx = np.asarray(res.valid), np.asarray(res.indices)
    for b in range(2):
        for i in range(p):
            seg = slice(i * k1, (i + 1) * k1)
            ours = np.asarray(res.tokens[b, seg])[valid[b, seg]]
            if not vis.image_valid[b, i]:
                assert ours.shape[0] == 0         # an absent image contributes nothing
                continue
            ref = official_sequence(split, b * p + i, dominant, contextual, ctx.project,
                                    newline, plan)
            assert ours.shape == ref.shape, (b, i, ours.shape, ref.shape)
            np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)
            # indices: real slots of THIS image
            assert np.asarray(ctx.valid[b])[idx[b, seg][valid[b, seg]]].all()
            assert (idx[b, seg][valid[b, seg]] // n1 == i).all()
    # row 0: two untiled images, k_v + newline each; row 1: one tiled image, no newline
    n_views = 1 + plan[2, 0] * plan[2, 1]
    np.testing.assert_array_equal(valid.sum(1), [2 * (k_v + 1), n_views * k_v])


def test_visionzip_multi_image_prefill_equals_forward_and_compiles_once():
    _, model, params = _model()
    method = pruning.get("visionzip")(keep=0.5)
    vis, (ids, mask) = _multi(), _prompt()
    logits, _, kept = P.forward_packed(model, params, vis, ids, mask, method)
    out = P.prefill(model, params, vis, ids, mask, method, extra=2)
    np.testing.assert_array_equal(out.kept, kept)
    assert float(jnp.max(jnp.abs(out.last_logits - logits[:, -1]))) <= ATOL
    gen = decoding.Generator(model, method, max_new_tokens=2, eos_id=-1)
    a = _multi(seed=0, num_views=10)
    b = _multi(rows=[[(90, 30), (50, 52)], [(40, 70)]], seed=3, num_views=10)
    for v in (a, b):
        assert gen(params, v, ids, mask).tokens.shape == (2, 2)
    assert gen.compilations()["prefill"] == 1 and gen.compilations()["decode"] == 1


def test_unsupported_reason_accepts_in_llm_and_visionzip():
    for name in ("fastv", "dart", "pdrop", "sparsevlm", "visionzip"):
        assert vi.unsupported_reason(pruning.get(name)()) is None


# ----------------------------------------------------------------------------- pool

def test_pool_keeps_a_sub_grid_per_image():
    """pool (stride) on several images: each image's base view keeps its own uniform sub-grid,
    the images sharing the example's budget in proportion to their sizes (was: image 0 got
    every pick)."""
    from covipal_jax.pruning.simple import pool_indices

    cfg, model, params = _model()
    vis, (ids, mask) = _multi(), _prompt()
    method = pruning.get("pool")(keep=0.25)
    ctx, _, _ = vi.packed_context(model, params, vis, ids, mask, method)
    res = method.select(ctx, method.k(ctx.n_v))
    g, n1 = cfg.vision.grid[0], vis.image_slots(cfg)
    kept = np.asarray(res.indices)[0][np.asarray(res.valid)[0]]
    budget = int(np.round(0.25 * vis.num_real_tokens(cfg)[0]))
    m = budget - 2                                   # less the two newlines
    for i, share in enumerate([m // 2, m - m // 2]):
        mine = np.sort(kept[kept // n1 == i] - i * n1)
        np.testing.assert_array_equal(mine, np.append(np.sort(pool_indices(g, g, share)), g * g))


# ----------------------------------------------------------------------------- CLI

def test_generate_cli_two_images_in_llm(tmp_path):
    from PIL import Image

    from covipal_jax import generate

    rng = np.random.default_rng(2)
    paths = []
    for i, (h, w) in enumerate([(37, 91), (60, 50)]):
        paths.append(str(tmp_path / f"img{i}.png"))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    c = tiny_ov.get_config()
    c.max_new_tokens = 2
    c.pruning.method, c.pruning.keep, c.pruning.layer = "fastv", 0.5, 1
    r = generate.run(c, paths, "<image> what is <image> it ?")
    per_image = _model()[0].vision.grid[0] ** 2 + 1
    assert r["input"] == "multi_image" and r["vision_tokens_total"] == 2 * per_image
    assert r["vision_tokens_kept"] == round(0.5 * 2 * per_image)
    kept = np.asarray(r["kept_indices"])
    assert set(np.unique(kept // per_image).tolist()) <= {0, 1} and isinstance(r["answer"], str)
