"""Step 4 of the demo: the pruning sweep (methods x keep ratios) and its LLM-budget
accounting (see `covipal_jax/demo/lib.py`)."""
from __future__ import annotations

import copy
import math
import os
import time
from typing import Any

import numpy as np


from covipal_jax.demo.evaluation import make_evaluator
from covipal_jax.demo.common import section
from covipal_jax.demo.data_stage import _progress, load_split


# ----------------------------------------------------------------------------- step 4: evaluate

def sweep(config: Any, llava_config: Any, ppm_dir: str, data_dir: str, log,
          *, cased: bool = False, progress: bool = True, star_dir: str | None = None) -> dict:
    """Accuracy / tokens / prefill time for unpruned and every method x ratio on `test`.

    star_dir: the PDrop* LLaVA (`finetune_stage`): evaluated with method pdrop (the demo
    schedule of `spec_for`) at every ratio, rows "pdrop_star", with the same compiled programs
    (same architecture, other weights); its unpruned accuracy goes to `pdrop_star_unpruned`."""
    from covipal_jax import sharding
    from covipal_jax.inference import loading
    from covipal_jax import pruning

    ev_cfg = section(config, "eval")
    loaded = loading.load(llava_config)
    cfg = loaded.cfg
    n_v = cfg.num_vision_tokens
    test = load_split(data_dir, "test")
    qtypes = test["qtype"]
    mk = lambda split: make_evaluator(loaded.model, loaded.params, loaded.processor,
                                      loaded.tokenizer, llava_config.template, split,
                                      buckets=llava_config.text_buckets,
                                      batch_size=int(ev_cfg.batch_size), cased=cased,
                                      seed=int(config.get("seed", 0)))
    out: dict[str, Any] = {"n_v": n_v, "n_test": int(len(qtypes)), "rows": []}

    def record(method, ratio, spec, res):
        hit = _queried_kept(test["queried_patches"], res.kept, n_v)
        row = dict(method=method, ratio=ratio, k=res.k, accuracy=res.accuracy,
                   seconds=res.seconds, queried_kept=hit,
                   llm_budget=llm_budget(spec, n_v, cfg.text.num_layers),
                   by_qtype={q: float(res.correct[qtypes == q].mean())
                             for q in sorted(set(qtypes.tolist()))})
        out["rows"].append(row)
        return row

    var_of: dict = {}  # method value -> its trained variables (trainable methods only)

    def spec_for(method, ratio):
        cls = pruning.get(method)
        pc = copy.deepcopy(config.pruning)
        with pc.unlocked():
            pc.method, pc.keep = method, ratio if cls.budgeted else 1.0
            pc.layer = int(ev_cfg.get("in_llm_layer", pc.layer))
            pc.update(staged_schedule(method, ratio, n_v, ev_cfg.get("staged_layers", {})))
            if cls.trainable and not pc.get("ppm_checkpoint"):
                pc.ppm_checkpoint = ppm_dir
        m = cls.from_config(pc)
        if m.trainable:
            m, var_of[m] = m.load_variables(cfg)
        return m

    star = _load_star(star_dir, llava_config) if star_dir else None  # outside the mesh context
    with sharding.use_mesh(loaded.mesh, loaded.rules):
        ev = mk(test)
        runs = [(pruning.NoneMethod.name, 1.0)] + [(m, float(r)) for m in ev_cfg.methods
                                    for r in ev_cfg.ratios]
        specs = [spec_for(m, r) for m, r in runs]
        t0 = time.perf_counter()
        ev.compile(specs, var_of.get, workers=int(ev_cfg.get("compile_workers", 2)))
        log(f"[evaluate] compiled {len(set(specs))} prefill programs in "
            f"{time.perf_counter() - t0:.0f} s")
        bar = _progress(list(zip(runs, specs)), len(runs), "evaluate", progress)
        for (method, ratio), spec in bar:
            bar.set_postfix_str(f"{method} {ratio}")
            res = ev.accuracy(spec, var_of.get(spec))
            record(method, ratio, spec, res)
        if star is not None:
            _sweep_star(star, star_dir, ev, spec_for, record, ev_cfg, out, log)
        for name in ("dev", "validation"):
            path = os.path.join(data_dir, f"{name}.npz")
            if os.path.exists(path):
                split = load_split(data_dir, name)
                r = mk(split).accuracy(pruning.NoneMethod())
                out[f"{name}_unpruned"] = r.accuracy
    return out


def _load_star(star_dir, llava_config):
    """The PDrop* LLaVA (`loading.Loaded`)."""
    from covipal_jax.inference import loading

    c = copy.deepcopy(llava_config)
    with c.unlocked():
        c.checkpoint, c.tokenizer = star_dir, ""
    return loading.load(c)


def _sweep_star(star, star_dir, ev, spec_for, record, ev_cfg, out, log) -> None:
    """PDrop* rows: the evaluator's weights swapped for the fine-tuned LLaVA's."""
    from covipal_jax.demo.finetune_stage import STAR
    from covipal_jax import pruning
    from covipal_jax.pruning.pdrop import PyramidDrop

    if star.cfg.architecture_dict() != ev.model.cfg.architecture_dict():
        raise ValueError(f"{STAR}: {star_dir} is not the architecture of the swept LLaVA")
    base_params = ev.params
    ev.params = star.params
    try:
        t0 = time.perf_counter()
        out[f"{STAR}_unpruned"] = ev.accuracy(pruning.NoneMethod()).accuracy
        for ratio in ev_cfg.ratios:
            spec = spec_for(PyramidDrop.name, float(ratio))
            record(STAR, float(ratio), spec, ev.accuracy(spec))
        log(f"[evaluate] {STAR} ({star_dir}): unpruned {out[f'{STAR}_unpruned']:.4f}, "
            f"{len(ev_cfg.ratios)} ratios in {time.perf_counter() - t0:.0f} s")
    finally:
        ev.params = base_params


def staged_schedule(method: str, ratio: float, n_v: int, staged_layers) -> dict:
    """Config overrides of the multi-stage in-LLM methods at demo ratio r (`staged_layers`:
    {method: stage layers in 32-layer units}): stages keep sqrt(r), then r of the n_v vision
    tokens (PDrop `ratios`, SparseVLM `counts`, before its recycled tokens). {} otherwise."""
    if method not in staged_layers:
        return {}
    layers = tuple(int(l) for l in staged_layers[method])
    if len(layers) != 2:
        raise ValueError(f"eval.staged_layers.{method}: two stage layers, got {layers}")
    from covipal_jax import pruning

    keys, fractions = pruning.get(method).config_keys, (math.sqrt(ratio), ratio)
    if "ratios" in keys:           # PDrop: kept ratios of n_v per stage
        return {"layers": layers, "ratios": fractions}
    if "counts" in keys:           # SparseVLM: kept counts per stage (before recycling)
        return {"layers": layers, "counts": tuple(max(1, round(x * n_v)) for x in fractions)}
    raise ValueError(f"eval.staged_layers: no demo schedule for {method!r} (it takes neither "
                     "`ratios` nor `counts`)")


def llm_budget(spec, n_v: int, num_layers: int) -> float:
    """The share of the LLM's (vision token, layer) pairs a method computes: k / n_v for a
    pre-LLM method; (K n_v + (N - K) k) / (N n_v) for an in-LLM method pruning at layer K of N
    (FastV / DART run layers [0, K) on every token). The equal-budget axis of the comparison:
    the paper's K = 2 of 32 layers costs 6% of the depth, K = 1 of the demo's 3 layers 33%."""
    if spec.where != "in_llm":
        return spec.k(n_v) / n_v
    pairs, start, tokens = 0, 0, n_v
    for kk, k in spec.stages(n_v, num_layers):
        pairs += (kk - start) * tokens
        start, tokens = kk, k
    pairs += (num_layers - start) * tokens
    return pairs / (num_layers * n_v)


def _queried_kept(queried: np.ndarray, kept: np.ndarray, n_v: int) -> float:
    """Share of examples whose queried objects' patches all enter the LLM."""
    if queried.shape[1] != n_v:
        return float("nan")
    keep = np.zeros_like(queried)
    np.put_along_axis(keep, np.clip(kept, 0, n_v - 1), True, axis=1)
    return float(np.mean(np.all(~queried | keep, axis=1)))
