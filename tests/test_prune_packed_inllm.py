"""In-LLM methods (FastV, DART, PyramidDrop, SparseVLM) on packed inputs (issue 12): a OneVision
AnyRes batch (two examples with different crop counts, left-padded text) and a video.

Per stage: padding never kept, newlines kept, exactly the example's budget; batched == per
example; with nothing pruned the logits and the greedy generation equal the unpruned ones; the
cached decode equals a cache-free reference realized with masks (the per-example position
shift of renumbering methods); one compilation per (bucket, k)."""
from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from covipal_jax import pruning
from covipal_jax.configs import tiny_ov
from covipal_jax.data import anyres as data_anyres
from covipal_jax.inference import decoding, in_llm
from covipal_jax.inference import prefill as P
from covipal_jax.inference import visual_inputs as vi
from covipal_jax.models import anyres
from covipal_jax.models import multimodal as mm
from covipal_jax.models.config import LlavaConfig
from covipal_jax.models.llava import Llava, init_params
from covipal_jax.pruning.base import InLLMResult

# Compile-heavy (tiny models, many programs): run in the CI step for slow tests.
pytestmark = pytest.mark.slow

ATOL = 1e-5
SHAPES = [(37, 91), (60, 50)]      # 68 and 106 real slots of a 139-slot bucket
LAYERS = 6


@functools.lru_cache(maxsize=None)
def _model():
    c = tiny_ov.get_config()
    c.model.text.num_layers = LAYERS
    cfg = LlavaConfig.from_config(c.model)
    return cfg, Llava(cfg), nn.unbox(init_params(cfg, jax.random.key(0)))


def _anyres(shapes=SHAPES, seed=0, num_views=None):
    cfg = _model()[0]
    rng = np.random.default_rng(seed)
    imgs = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    x = data_anyres.preprocess(imgs, data_anyres.AnyResConfig.for_model(cfg),
                               num_views=num_views)
    plan = anyres.pack_plan(x.layout, cfg.vision.grid[0], cfg.anyres_max_crops)
    cap = anyres.bucket_capacity(cfg, x.pixels.shape[1])
    return vi.AnyResImage(jnp.asarray(x.pixels), jnp.asarray(plan), cap)


def _video(seed=0):
    rng = np.random.default_rng(seed)
    return vi.Video(jnp.asarray(rng.standard_normal((2, 4, 28, 28, 3)).astype(np.float32)))


def _input(kind, seed=0):
    cfg = _model()[0]
    vis = _anyres(seed=seed) if kind == "anyres" else _video(seed)
    token = cfg.image_token_id if kind == "anyres" else cfg.video_token_id
    rng = np.random.default_rng(seed + 7)
    ids = rng.integers(10, 100, (2, 16)).astype(np.int32)
    ids[:, 3] = token
    mask = np.ones((2, 16), bool)
    ids[0, :2], mask[0, :2] = 0, False           # left padding on row 0
    return vis, jnp.asarray(ids), jnp.asarray(mask)


def _row(vis, i):
    return jax.tree.map(lambda a: a[i:i + 1], vis)


METHODS = {
    "fastv": lambda: pruning.FastV(keep=0.4),
    "dart": lambda: pruning.DART(keep=0.4),
    "pdrop": lambda: pruning.PyramidDrop(),            # lam 0.5 at layers 2/3/4 of 6
    "sparsevlm": lambda: pruning.SparseVLM(),          # 1/3: the "192" table, layers 1/2/4
}
UNPRUNED = {      # the same methods keeping every real token
    "fastv": lambda: pruning.FastV(keep=1.0),
    "dart": lambda: pruning.DART(keep=1.0),
    "pdrop": lambda: pruning.PyramidDrop(lam=1.0),
    # SparseVLM has no unpruned setting: every stage drops >= 1 token (official `min(c, n - 1)`)
}


def _recording(method):
    """The method, recording (probe masks, result) per stage (call prefill un-jitted)."""
    log = []

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Rec(type(method)):
        def select_in_llm(self, probe, k, stage):
            res = super().select_in_llm(probe, k, stage)
            log.append((probe, k, res if isinstance(res, InLLMResult) else InLLMResult(res)))
            return res

    return Rec(**{f.name: getattr(method, f.name) for f in dataclasses.fields(method)}), log


def _traced_prefill(vis, ids, mask, method):
    """Jitted prefill with a recording method: (out, ctx, [(k, record)] per stage)."""
    _, model, params = _model()
    rec, log = _recording(method)

    def f(p, v, i, m):
        out = P.prefill(model, p, v, i, m, rec, extra=2)
        ctx, _, _ = vi.packed_context(model, p, v, i, m, rec)
        stages = [dict(seen=probe.vision_valid, kept=res.kept, ok=res.valid,
                       merged=None if res.merged is None else res.merged_valid,
                       mpos=res.merged_positions) for probe, _, res in log]
        return out, ctx, stages

    out, ctx, stages = jax.jit(f)(params, vis, ids, mask)
    return out, ctx, list(zip([k for _, k, _ in log], stages))


# ----------------------------------------------------------------------------- selection

@pytest.mark.parametrize("kind", ["anyres", "video"])
@pytest.mark.parametrize("name", list(METHODS))
def test_padding_never_kept_newlines_kept_exact_budget(name, kind):
    vis, ids, mask = _input(kind)
    method = METHODS[name]()
    out, ctx, log = _traced_prefill(vis, ids, mask, method)
    valid0 = np.asarray(ctx.valid)
    newline0 = np.asarray(ctx.coords[..., 0] == anyres.KIND_NEWLINE)
    n = ctx.n_v
    stages = method.stages(n, LAYERS)
    budgets = [np.asarray(b) for b in in_llm.stage_budgets(method, stages, n, ctx.valid)]
    assert len(log) == len(stages)
    src = np.broadcast_to(np.arange(n), (2, n))          # source slot of each current token
    seen = valid0.copy()
    for s, ((k, rec), (_, k_s), budget) in enumerate(zip(log, stages, budgets)):
        assert k == k_s
        np.testing.assert_array_equal(np.asarray(rec["seen"]), seen)
        kept = np.asarray(rec["kept"])
        ok = np.ones(kept.shape, bool) if rec["ok"] is None else np.asarray(rec["ok"])
        m = 0 if rec["merged"] is None else rec["merged"].shape[1]
        assert kept.shape[1] + m == k
        for b in range(2):
            real = kept[b][ok[b]]
            assert len(set(real.tolist())) == len(real)
            assert seen[b, real].all(), f"stage {s}: a padding / dropped slot was kept"
            assert valid0[b, src[b, real]].all()
            nl = set(np.flatnonzero(newline0[b, src[b]] & seen[b]).tolist())
            assert nl <= set(real.tolist()), f"stage {s}: a newline was dropped"
            if m:      # SparseVLM: the kept part is the budget less the merged slots
                assert len(real) == min(max(budget[b] - m, 1), kept.shape[1])
            else:
                assert len(real) == budget[b], f"stage {s}: {len(real)} != {budget[b]}"
        new_src = np.take_along_axis(src, kept, axis=1)
        new_seen = ok & np.take_along_axis(seen, kept, axis=1)
        if m:
            mv = np.asarray(rec["merged"])
            assert mv.any()
            mp = np.asarray(rec["mpos"])
            assert np.take_along_axis(seen, mp, axis=1)[mv].all()
            new_src = np.concatenate([new_src, np.take_along_axis(src, mp, axis=1)], axis=1)
            new_seen = np.concatenate([new_seen, mv], axis=1)
        src, seen = new_src, new_seen
    # the prefill's kept: the last stage's tokens, -1 where the LLM sees nothing
    np.testing.assert_array_equal(np.asarray(out.kept), np.where(seen, src, -1))
    # the KV segments see exactly the text + the kept tokens of each stage
    n_text = np.asarray(ctx.text_mask).sum(1)
    for seg, (_, rec) in zip(out.segments[1:], log[1:]):
        np.testing.assert_array_equal(np.asarray(seg.key_valid).sum(1),
                                      n_text + np.asarray(rec["seen"]).sum(1))
    np.testing.assert_array_equal(np.asarray(out.segments[-1].key_valid).sum(1),
                                  n_text + seen.sum(1))


@pytest.mark.parametrize("kind", ["anyres", "video"])
@pytest.mark.parametrize("name", list(METHODS))
def test_batched_equals_per_example(name, kind):
    _, model, params = _model()
    vis, ids, mask = _input(kind, seed=1)
    method = METHODS[name]()
    run = jax.jit(lambda p, v, i, m: P.prefill(model, p, v, i, m, method, extra=2))
    out = run(params, vis, ids, mask)
    for b in range(2):
        one = run(params, _row(vis, b), ids[b:b + 1], mask[b:b + 1])
        np.testing.assert_array_equal(one.kept[0], out.kept[b])
        np.testing.assert_allclose(one.last_logits[0], out.last_logits[b], atol=ATOL)
        np.testing.assert_array_equal(one.next_position[0], out.next_position[b])


# ----------------------------------------------------------------------------- unpruned

@functools.lru_cache(maxsize=None)
def _unpruned_prefill(kind):
    _, model, params = _model()
    vis, ids, mask = _input(kind)
    return jax.jit(lambda p, v, i, m: P.prefill(model, p, v, i, m, pruning.NoneMethod(),
                                                extra=3))(params, vis, ids, mask)


@pytest.mark.parametrize("kind", ["anyres", "video"])
@pytest.mark.parametrize("name", list(UNPRUNED))
def test_keeping_everything_equals_unpruned(name, kind):
    _, model, params = _model()
    vis, ids, mask = _input(kind)
    ref = _unpruned_prefill(kind)
    out = jax.jit(lambda p, v, i, m: P.prefill(model, p, v, i, m, UNPRUNED[name](), extra=3))(
        params, vis, ids, mask)
    assert float(jnp.max(jnp.abs(out.last_logits - ref.last_logits))) <= ATOL
    np.testing.assert_array_equal(out.kept, ref.kept)      # every real slot, -1 for padding
    np.testing.assert_array_equal(out.next_position, ref.next_position)


@pytest.mark.parametrize("name,kind", [("fastv", "anyres"), ("pdrop", "video")])
def test_unpruned_generation_equals_none(name, kind):
    _, model, params = _model()
    vis, ids, mask = _input(kind)
    gen = decoding.Generator(model, UNPRUNED[name](), max_new_tokens=3, eos_id=-1)
    gen_ref = decoding.Generator(model, pruning.NoneMethod(), max_new_tokens=3, eos_id=-1)
    np.testing.assert_array_equal(gen(params, vis, ids, mask).tokens,
                                  gen_ref(params, vis, ids, mask).tokens)


# ----------------------------------------------------------------------------- decoding

def _seen_slots(log, n):
    """bool[B, N] per stage: the source slots the LLM still sees after the stage."""
    src = np.broadcast_to(np.arange(n), (2, n))
    seen, out = None, []
    for _, rec in log:
        kept = np.asarray(rec["kept"])
        ok = np.ones(kept.shape, bool) if rec["ok"] is None else np.asarray(rec["ok"])
        prev = np.ones(kept.shape, bool) if seen is None else np.take_along_axis(seen, kept, 1)
        src, seen = np.take_along_axis(src, kept, axis=1), ok & prev
        slots = np.zeros((2, n), bool)
        for b in range(2):
            slots[b, src[b][seen[b]]] = True
        out.append(slots)
    return out


def _masked_reference(vis, ids, mask, method, log, generated):
    """f32[B, V]: next-token logits of the prompt + generated i32[B, t], no cache, the stages'
    drops realized by masking the full sequence (positions renumbered over what is seen for
    renumbering methods, the unpruned ones otherwise)."""
    cfg, model, params = _model()
    ctx, text, pos = vi.packed_context(model, params, vis, ids, mask, method)
    n = ctx.n_v
    h, seq_mask, _, is_vis = mm.splice(text, mask, pos, ctx.vision_tokens, None, "contiguous")
    seq_mask, positions = anyres.mask_invalid_slots(seq_mask, is_vis, pos, ctx.valid)
    rows = np.asarray(pos)[:, None] + np.arange(n)[None]
    return run_masked(model, params, h, seq_mask, positions, rows, _seen_slots(log, n), method,
                      generated)


def run_masked(model, params, h, seq_mask, positions, rows, stage_slots, method, generated):
    """f32[B, V]: next-token logits of the spliced prompt h [B, L, D] (+ generated i32[B, t])
    through the decoder without a cache, each stage's drops realized by masking: before stage
    s's layer the vision rows i32[B, n] of the sequence are masked to stage_slots[s] bool[B, n]
    (positions renumbered over what is seen for renumbering methods)."""
    b, t = h.shape[0], generated.shape[1]
    if t:
        h = jnp.concatenate([h, model.apply(params, generated, method=Llava.embed_text)], 1)
        seq_mask = jnp.concatenate([seq_mask, jnp.ones((b, t), bool)], axis=1)
        positions = jnp.concatenate(
            [positions, positions[:, -1:] + 1 + jnp.arange(t, dtype=jnp.int32)[None]], axis=1)
    start = 0
    for (kk, _), slots in zip(method.stages(rows.shape[1], model.cfg.text.num_layers),
                              stage_slots):
        h, _ = model.apply(params, h, method=Llava.run, positions=positions,
                           key_valid=seq_mask, start=start, stop=kk)
        seq_mask = seq_mask.at[jnp.arange(b)[:, None], rows].set(jnp.asarray(slots))
        if in_llm.renumbers_stages(method):
            positions = mm.text_positions(seq_mask)
        start = kk
    h, _ = model.apply(params, h, method=Llava.run, positions=positions, key_valid=seq_mask,
                       start=start)
    return np.asarray(model.apply(params, h[:, -1:], method=Llava.logits)[:, 0])


@pytest.mark.parametrize("name,kind", [("fastv", "anyres"), ("dart", "video"),
                                       ("pdrop", "anyres"), ("pdrop", "video")])
def test_cached_decode_equals_masked_reference(name, kind):
    """Greedy generation through the stage segments (per-example drops, static offsets) equals
    the cache-free masked realization of the same selections, token after token."""
    _, model, params = _model()
    vis, ids, mask = _input(kind, seed=2)
    method = METHODS[name]()
    out, _, log = _traced_prefill(vis, ids, mask, method)
    ref = _masked_reference(vis, ids, mask, method, log, jnp.zeros((2, 0), jnp.int32))
    assert float(np.max(np.abs(np.asarray(out.last_logits) - ref))) <= 1e-4
    tokens = decoding.Generator(model, method, max_new_tokens=3, eos_id=-1)(
        params, vis, ids, mask).tokens
    for t in (1, 2):
        ref = _masked_reference(vis, ids, mask, method, log, jnp.asarray(tokens[:, :t]))
        np.testing.assert_array_equal(tokens[:, t], np.argmax(ref, axis=-1))


@pytest.mark.parametrize("name", list(METHODS))
def test_generation_compiles_once_per_bucket_and_k(name):
    _, model, params = _model()
    gen = decoding.Generator(model, METHODS[name](), max_new_tokens=2, eos_id=-1)
    _, ids, mask = _input("anyres")
    a = _anyres(seed=0, num_views=10)                       # same crop bucket, other plans
    b = _anyres([(90, 30), (50, 52)], seed=1, num_views=10)
    assert a.capacity == b.capacity and a.pixels.shape == b.pixels.shape
    for vis in (a, b):
        out = gen(params, vis, ids, mask)
        assert out.tokens.shape == (2, 2) and (out.kept >= 0).any(axis=1).all()
    assert gen.compilations()["prefill"] == 1 and gen.compilations()["decode"] == 1
    _, vids, vmask = _input("video", seed=0)
    for seed in (0, 1):
        gen(params, _video(seed), vids, vmask)
    assert gen.compilations()["prefill"] == 2 and gen.compilations()["decode"] == 2
