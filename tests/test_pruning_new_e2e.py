"""DivPrune, PyramidDrop and SparseVLM end to end on the tiny LLaVA: selectable from config,
through prefill and generation, one compilation per (bucket, k), stage segments and KV lengths
as the methods' schedules say."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from covipal_jax import pruning
from covipal_jax.inference import decoding
from covipal_jax.inference.prefill import build_context, prefill
from covipal_jax.models import multimodal as mm
from covipal_jax.models.llava import Llava


def spec_for(method, keep, **extra):
    c = tiny.config()
    c.pruning.method, c.pruning.keep = method, keep
    for k, v in extra.items():
        c.pruning[k] = v
    return pruning.from_config(c.pruning)


def jprefill(model, params, pixels, ids, mask, spec, extra):
    return jax.jit(lambda p, a, b, c: prefill(model, p, a, b, c, spec, extra=extra))(
        params, pixels, ids, mask)


@pytest.mark.parametrize("name,keep,cls", [("divprune", 0.25, "DivPrune"),
                                           ("pdrop", 1.0, "PyramidDrop"),
                                           ("pdrop", 0.5, "PyramidDrop"),
                                           ("sparsevlm", 1 / 3, "SparseVLM")])
def test_selectable_and_generation_compiles_once(name, keep, cls):
    model, params = tiny.model_and_params()
    spec = spec_for(name, keep)
    assert type(spec).__name__ == cls
    gen = decoding.Generator(model, spec, max_new_tokens=3, eos_id=-1)
    outs = []
    for n in range(4, 8):
        pixels, ids, mask = tiny.batch(lengths=(n, max(3, n - 2)), bucket=12, seed=n)
        out = gen(params, pixels, ids, mask)
        assert out.tokens.shape == (2, 3)
        outs.append(np.asarray(out.tokens))
    assert gen.compilations()["prefill"] == 1
    assert gen.compilations()["decode"] == 1


def test_pdrop_segments_follow_the_schedule():
    model, params = tiny.model_and_params()
    pixels, ids, mask = tiny.batch()
    spec = spec_for("pdrop", 1.0)
    n_v, t, n_layers = model.cfg.num_vision_tokens, ids.shape[1], model.cfg.text.num_layers
    stages = spec.stages(n_v, n_layers)
    assert stages == ((1, n_v // 2), (2, n_v // 4), (3, n_v // 8))
    out = jprefill(model, params, pixels, ids, mask, spec, extra=3)
    assert len(out.segments) == len(stages) + 1
    lengths = [t - 1 + n_v] + [t - 1 + k for _, k in stages]
    bounds = [0] + [kk for kk, _ in stages] + [n_layers]
    for seg, length, a, b in zip(out.segments, lengths, bounds, bounds[1:]):
        assert (seg.start, seg.stop) == (a, b)
        assert seg.cache["k"].shape[3] == length + 3
    assert out.kept.shape == (2, n_v // 8)
    kept = np.asarray(out.kept)
    assert np.all(np.diff(kept, axis=1) > 0) and not np.array_equal(kept[0], kept[1])


def test_sparsevlm_recycles_into_the_next_stage():
    model, params = tiny.model_and_params()
    pixels, ids, mask = tiny.batch()
    spec = spec_for("sparsevlm", 1 / 3)
    n_v, t = model.cfg.num_vision_tokens, ids.shape[1]
    stages = spec.stages(n_v, model.cfg.text.num_layers)
    out = jprefill(model, params, pixels, ids, mask, spec, extra=2)
    for seg, (_, k) in zip(out.segments[1:], stages):
        assert seg.cache["k"].shape[3] == t - 1 + k + 2     # kept + merged tokens
    assert out.kept.shape == (2, stages[-1][1])
    assert np.isfinite(np.asarray(out.last_logits)).all()


def test_divprune_prefill_keeps_its_selection():
    model, params = tiny.model_and_params()
    pixels, ids, mask = tiny.batch()
    spec = spec_for("divprune", 16)
    out = jprefill(model, params, pixels, ids, mask, spec, extra=2)
    assert out.kept.shape == (2, 16)
    assert out.segments[0].cache["k"].shape[3] == ids.shape[1] - 1 + 16 + 2


# ----------------------------------------------------------------------------- positions

_STAGE_KEPT: list = []


@dataclasses.dataclass(frozen=True, kw_only=True)
class _RecordingPDrop(pruning.PyramidDrop):
    """PyramidDrop that records each stage's kept set (run un-jitted)."""

    def select_in_llm(self, probe, k, stage):
        kept = super().select_in_llm(probe, k, stage)
        _STAGE_KEPT.append(np.asarray(kept))
        return kept


def _reference_logits(model, params, pixels, ids, mask, spec, stage_kept, generated, renumber):
    """f32[B, V]: next-token logits of the prompt + `generated` i32[B, t], no cache, with the
    vision tokens pruned by hand between the stages' layers (rows dropped with NumPy; positions
    renumbered `0..` per stage when `renumber`, else the unpruned ones kept)."""
    ctx, text = build_context(model, params, pixels, ids, mask, spec)
    n_v, b = ctx.n_v, ids.shape[0]
    image_pos = np.asarray(mm.image_positions(ids, model.cfg.image_token_id))
    src = jnp.broadcast_to(jnp.arange(n_v, dtype=jnp.int32), (b, n_v))
    h, seq_mask, positions, _ = mm.splice(text, mask, image_pos, ctx.vision_tokens, src,
                                          "contiguous", n_v)
    t = generated.shape[1]
    if t:
        h = jnp.concatenate([h, model.apply(params, generated, method=Llava.embed_text)], 1)
        seq_mask = jnp.concatenate([seq_mask, jnp.ones((b, t), bool)], axis=1)
        positions = jnp.concatenate(
            [positions, positions[:, -1:] + 1 + jnp.arange(t, dtype=jnp.int32)[None]], axis=1)
    seq_mask, positions = np.asarray(seq_mask), np.asarray(positions)
    vis_rows = image_pos[:, None] + np.arange(n_v)[None]          # current vision rows
    start = 0
    for (kk, _), kept in zip(spec.stages(n_v, model.cfg.text.num_layers), stage_kept):
        h, _ = model.apply(params, h, method=Llava.run, positions=jnp.asarray(positions),
                           key_valid=jnp.asarray(seq_mask), start=start, stop=kk)
        rows, new_vis = [], []
        for i in range(b):
            drop = set(vis_rows[i].tolist()) - set(vis_rows[i][kept[i]].tolist())
            r = [j for j in range(h.shape[1]) if j not in drop]
            rows.append(r)
            new_vis.append([r.index(j) for j in vis_rows[i][kept[i]]])
        rows, vis_rows = np.asarray(rows), np.asarray(new_vis)
        h = jnp.take_along_axis(h, jnp.asarray(rows)[..., None], axis=1)
        seq_mask = np.take_along_axis(seq_mask, rows, axis=1)
        positions = np.take_along_axis(positions, rows, axis=1)
        if renumber:
            positions = np.maximum(np.cumsum(seq_mask, axis=1) - 1, 0).astype(np.int32)
        start = kk
    h, _ = model.apply(params, h, method=Llava.run, positions=jnp.asarray(positions),
                       key_valid=jnp.asarray(seq_mask), start=start)
    return np.asarray(model.apply(params, h[:, -1:], method=Llava.logits)[:, 0])


@pytest.mark.slow
@pytest.mark.parametrize("positions", ["contiguous", "original"])
def test_pdrop_generation_matches_hand_pruned_reference(positions, monkeypatch):
    """Prefill + cached decode of PyramidDrop == the model run without cache on the sequence
    pruned by hand before each stage's layers: with "contiguous" every stage renumbers its
    positions and its KV segment decodes at position - (n_v - k_s) (the official PDrop);
    with "original" the kept tokens keep their ids. The other mode's reference must differ."""
    model, params = tiny.model_and_params()
    pixels, ids, mask = tiny.batch()
    spec = spec_for("pdrop", 1.0, positions=positions)
    rec = _RecordingPDrop(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)})
    logits = []

    def greedy(lg, rng, sampling):
        logits.append(np.asarray(lg))
        return jnp.argmax(lg, axis=-1).astype(jnp.int32)

    monkeypatch.setattr(decoding, "sample", greedy)
    _STAGE_KEPT.clear()
    steps = 3
    gen = decoding.Generator(model, rec, max_new_tokens=steps, eos_id=-1, unstack_layers=False)
    state, _ = gen.prefill_fn(params, None, pixels, ids, mask, jax.random.key(0))
    stage_kept = list(_STAGE_KEPT)
    assert len(stage_kept) == len(spec.stages(model.cfg.num_vision_tokens,
                                               model.cfg.text.num_layers))
    if positions == "contiguous":
        n_v = model.cfg.num_vision_tokens
        offsets = [seg.offset for seg in state.segments]
        assert offsets == [0] + [n_v - k for _, k in spec.stages(n_v, model.cfg.text.num_layers)]
    for _ in range(steps - 1):
        state = gen.decode_step_fn(params, state)
    tokens = np.asarray(state.tokens)
    assert len(logits) == steps
    worst_other = 0.0
    for t in range(steps):
        args = (model, params, pixels, ids, mask, spec, stage_kept, jnp.asarray(tokens[:, :t]))
        ref = _reference_logits(*args, renumber=positions == "contiguous")
        np.testing.assert_allclose(logits[t], ref, rtol=1e-4, atol=1e-4)
        other = _reference_logits(*args, renumber=positions != "contiguous")
        worst_other = max(worst_other, float(np.abs(other - logits[t]).max()))
    assert worst_other > 1e-3          # 10x the tolerance: the test tells the schemes apart


# ----------------------------------------------------------------------------- entry points

def test_generate_cli_selects_pdrop_from_config():
    """`python -m covipal_jax.generate --config.pruning.method=pdrop` (the in-process run)."""
    from covipal_jax import generate

    c = tiny.config()
    c.max_new_tokens = 2
    c.pruning.method, c.pruning.keep = "pdrop", 1.0
    r = generate.run(c, None, None)
    n_v = r["vision_tokens_total"]
    assert r["method"] == "pdrop" and r["vision_tokens_kept"] == n_v // 8
    assert len(set(r["kept_indices"])) == n_v // 8


def test_eval_harness_selects_the_new_methods():
    """`python -m covipal_jax.eval --config.pruning.method=sparsevlm` builds its predictor from
    config.pruning; `--sweep --methods=divprune,pdrop` goes through `method_for`."""
    from covipal_jax.eval import __main__ as eval_cli
    from covipal_jax.eval.predictor import LlavaPredictor, method_for
    from covipal_jax.inference import loading

    c = tiny.config()
    c.pruning.method, c.pruning.keep = "sparsevlm", 1 / 3
    c.batch_size = 2
    pred = LlavaPredictor.from_config(c, loading.load(c))
    assert type(pred.method).__name__ == "SparseVLM"
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(2)]
    out = pred.generate([(im, "what color is the square ?") for im in images], 2)
    n_v = pred.sampler.loaded.cfg.num_vision_tokens
    assert len(out.texts) == 2 and out.num_vision_tokens == pred.method.stages(
        n_v, pred.sampler.loaded.cfg.text.num_layers)[-1][1]
    grid = eval_cli.sweep_methods(["divprune", "pdrop"], ["16"], False, False)
    assert [type(method_for(c, m, k)).__name__ for m, k in grid] == ["DivPrune", "PyramidDrop"]
