"""PENDING (not collected: rename to tests/test_pruning_new_e2e.py once house's prefill and the
LayerProbe additions in docs/methods_probe_patch.diff are on main).

DivPrune, PyramidDrop and SparseVLM end to end on the tiny LLaVA: selectable from config,
through prefill and generation, one compilation per (bucket, k), stage segments and KV lengths
as the methods' schedules say."""
from __future__ import annotations

import jax
import numpy as np
import pytest

import tiny
from covipal_jax import pruning
from covipal_jax.inference import decoding
from covipal_jax.inference.prefill import prefill


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
        assert seg.cache["k"].shape[2] == length + 3
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
        assert seg.cache["k"].shape[2] == t - 1 + k + 2     # kept + merged tokens
    assert out.kept.shape == (2, stages[-1][1])
    assert np.isfinite(np.asarray(out.last_logits)).all()


def test_divprune_prefill_keeps_its_selection():
    model, params = tiny.model_and_params()
    pixels, ids, mask = tiny.batch()
    spec = spec_for("divprune", 16)
    out = jprefill(model, params, pixels, ids, mask, spec, extra=2)
    assert out.kept.shape == (2, 16)
    assert out.segments[0].cache["k"].shape[2] == ids.shape[1] - 1 + 16 + 2
