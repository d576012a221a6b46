r"""Evaluate (pruned) LLaVA on image benchmarks; one method or a sweep, with the papers' table.

One method (the config's `pruning`):

    python -m covipal_jax.eval --config configs/llava15_7b.py \
        --config.checkpoint=/ckpt/llava-1.5-7b-hf --benchmark pope --data_dir /data/pope \
        --image_dir /data/coco/val2014 --config.pruning.method=ppm --config.pruning.keep=0.25 \
        --config.pruning.ppm_checkpoint=/ckpt/ppm --config.batch_size=16 --out results/

A sweep over methods x keeps (token counts or ratios; the unpruned model is added as `none`):

    python -m covipal_jax.eval --config configs/llava15_7b.py --config.checkpoint=... \
        --benchmark pope,mme,gqa --data_dir pope=/data/pope,mme=/data/MME,gqa=/data/gqa.json \
        --sweep --methods ppm,visionzip,fastv,dart --keeps 192,128,64 --out results/

Several benchmarks: `--benchmark a,b` with `--data_dir a=PATH,b=PATH` (or paths in the same
order); `--image_dir` likewise. Output layout under `--out`:

    <method>_k<k>/<benchmark>.jsonl         predictions (resumable: a rerun skips done qids)
    <method>_k<k>/<benchmark>.jsonl.metrics.json
    results.json    {method: {k: {benchmark: headline score}}}, merged across runs (the input
                    of `python -m covipal_jax.eval.harness table --unpruned none results.json`)
    runs.json       per (method, k, benchmark): metrics summary, examples, model seconds
    summary.md      the papers' table: absolute scores + Avg relative to unpruned (`none`)
    summary.json    the same numbers: scores, ratios to unpruned, their average per row

The batch (`--config.batch_size` rows, static) is sharded over the local devices along the
mesh's (data, fsdp) axes. Multiple-choice benchmarks are answered by generation (LLaVA's
protocol) unless `--score_options` (likelihood of the option letters as the first token).
"""
from __future__ import annotations

from covipal_jax import configs as configs_lib
import fractions
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", configs_lib.path("tiny"), "Config file.",
                                          lock_config=True)
_BENCHMARK = flags.DEFINE_list("benchmark", None, "Benchmark name(s): gqa, mme, pope, textvqa, "
                               "scienceqa, mmbench, seed, ai2d, mmstar.")
_DATA_DIR = flags.DEFINE_list("data_dir", None, "Benchmark path(s): one per --benchmark, in "
                              "order, or NAME=PATH items (see covipal_jax/eval/README.md).")
_IMAGE_DIR = flags.DEFINE_list("image_dir", [], "Image folder(s), as --data_dir (optional).")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_LIMIT = flags.DEFINE_integer("limit", None, "Use the first N examples of each benchmark.")
_SWEEP = flags.DEFINE_bool("sweep", False, "Sweep --methods x --keeps (+ unpruned).")
_METHODS = flags.DEFINE_list("methods", [], "Sweep methods (default: ppm if "
                             "pruning.ppm_checkpoint is set, visionzip, fastv, dart).")
_KEEPS = flags.DEFINE_list("keeps", ["192", "128", "64"], "Sweep budgets: token counts (64), "
                           "ratios (0.25) or fractions (1/9).")
_UNPRUNED = flags.DEFINE_bool("unpruned", True, "Sweep: also run the unpruned model (`none`).")
_LABEL = flags.DEFINE_string("label", None, "Method name in the tables (default: the method).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", None, "Default: config.max_new_tokens.")
_SCORE = flags.DEFINE_bool("score_options", False, "Multiple choice by option-letter "
                           "likelihood instead of generation.")
_PAD = flags.DEFINE_bool("pad_to_square", False, "Pad images to square with the mean colour "
                         "(the original LLaVA-1.5 evaluation); default: the checkpoint's "
                         "processor.")
_MME = flags.DEFINE_enum("mme_score", "total", ["total", "perception"], "MME headline score.")
_WORKERS = flags.DEFINE_integer("num_workers", 4, "Image decoding threads.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Progress bars.")

log = logging.getLogger("covipal_jax.eval")
UNPRUNED = "none"


# ----------------------------------------------------------------------------- small helpers

def parse_keep(s: str | float | int) -> float | int:
    """"64" -> 64 (tokens), "0.25" -> 0.25, "1/9" -> 0.111... (ratios)."""
    if isinstance(s, (int, float)):
        return s
    s = s.strip()
    if "/" in s:
        return float(fractions.Fraction(s))
    return int(s) if s.isdigit() else float(s)


def parse_named(values: Sequence[str], names: Sequence[str], what: str) -> dict[str, str]:
    """`["a=x", "b=y"]` or `["x", "y"]` (in `names` order) -> {name: value}."""
    values = [v for v in values if v]
    if not values:
        return {}
    if all("=" in v for v in values):
        out = dict(v.split("=", 1) for v in values)
        unknown = sorted(set(out) - set(names))
        if unknown:
            raise ValueError(f"--{what} names {unknown} that are not in --benchmark {names}")
        return out
    if len(values) != len(names):
        raise ValueError(f"--{what} needs one entry per benchmark ({len(names)}) or NAME=PATH "
                         f"items, got {values}")
    return dict(zip(names, values))


def run_label(method: str, k: int) -> str:
    return f"{method}_k{k}"


def _read_json(path: str, default: Any) -> Any:
    if not os.path.exists(path):
        return default
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- tables

def summarize(results: dict[str, dict[str, dict[str, float]]], unpruned: str = UNPRUNED,
              benchmarks: Sequence[str] | None = None) -> dict[str, Any]:
    """Scores, ratios to the unpruned row and their average (the papers' "Avg"), per row."""
    from covipal_jax.eval import harness

    if unpruned not in results:
        return dict(unpruned=None, rows=[], markdown=None)
    ref = results[unpruned][sorted(results[unpruned], key=lambda k: -float(k))[0]]
    benchmarks = list(benchmarks or dict.fromkeys(b for per in results.values()
                                                  for s in per.values() for b in s))
    no_ref = [b for b in benchmarks if b not in ref]
    benchmarks = [b for b in benchmarks if b in ref]  # ratios need the unpruned score
    rows = []
    for method, per_keep in results.items():
        for keep, scores in per_keep.items():
            rel = {b: (scores[b] / ref[b] if ref.get(b) else None)
                   for b in benchmarks if b in scores and b in ref}
            vals = [v for v in rel.values() if v is not None]
            rows.append(dict(method=method, keep=keep, scores=dict(scores), relative=rel,
                             avg_relative=sum(vals) / len(vals) if vals else None,
                             n_benchmarks=len(vals)))
    rows.sort(key=lambda r: (r["method"] != unpruned, -float(r["keep"]), r["method"]))
    md = harness.summary_table(results, unpruned, benchmarks=benchmarks, show_ratio=True) \
        if benchmarks else None
    return dict(unpruned=unpruned, benchmarks=benchmarks, rows=rows, markdown=md,
                benchmarks_without_unpruned=no_ref)


def write_tables(out: str, benchmarks: Sequence[str]) -> dict[str, Any]:
    results = _read_json(os.path.join(out, "results.json"), {})
    summary = summarize(results, UNPRUNED, [b for b in benchmarks])
    runs = _read_json(os.path.join(out, "runs.json"), {})
    summary["runs"] = runs
    _write_json(os.path.join(out, "summary.json"), summary)
    if summary["markdown"]:
        with open(os.path.join(out, "summary.md"), "w", encoding="utf-8") as f:
            f.write("Scores per benchmark (ratio to unpruned); Avg = mean ratio to unpruned "
                    f"(`{UNPRUNED}`).\n\n" + summary["markdown"])
    return summary


# ----------------------------------------------------------------------------- runs

def run(config: Any, benchmarks: Sequence[str], data_dirs: dict[str, str], out: str, *,
        methods: Sequence[tuple[str, Any]] | None = None, image_dirs: dict[str, str] | None = None,
        limit: int | None = None, max_new_tokens: int | None = None,
        score_options: bool = False, pad_to_square: bool = False, label: str | None = None,
        mme_score: str = "total", num_workers: int = 4, progress: bool = True,
        loaded: Any = None) -> dict[str, Any]:
    """Evaluate every (method, keep) in `methods` (default: the config's pruning) on every
    benchmark; returns `summarize(...)` of `out/results.json` (see the module docstring)."""
    import dataclasses

    from covipal_jax.inference import loading
    from covipal_jax.eval import benchmarks as bm
    from covipal_jax.eval import harness, metrics
    from covipal_jax.eval.predictor import LlavaPredictor, prune_spec

    names = [bm.canonical_name(b) for b in benchmarks]
    if not names:
        raise ValueError("--benchmark is required")
    missing = [b for b in names if b not in data_dirs]
    if missing:
        raise ValueError(f"no --data_dir for {missing}")
    for b in names:
        if not os.path.exists(data_dirs[b]):
            raise FileNotFoundError(f"{b}: data path {data_dirs[b]!r} does not exist")
    image_dirs = image_dirs or {}
    os.makedirs(out, exist_ok=True)

    datasets = {}
    for b in names:
        kw = dict(limit=limit)
        if b in image_dirs:
            kw["image_dir"] = image_dirs[b]
        data = bm.load_benchmark(b, data_dirs[b], **kw)
        log.info(data.report.summary())
        print(data.report.summary(), flush=True)
        if not data.examples:
            raise ValueError(f"{b}: no examples read from {data_dirs[b]!r}")
        datasets[b] = data

    loaded = loaded or loading.load(config)
    n_v = loaded.cfg.num_vision_tokens
    processor = dataclasses.replace(loaded.processor, pad_to_square=True) if pad_to_square \
        else loaded.processor
    if methods is None:
        specs = [(label, prune_spec(config, config.pruning.method, config.pruning.keep, n_v))]
    else:
        specs = [(None, prune_spec(config, m, keep, n_v)) for m, keep in methods]
    max_new = max_new_tokens or config.max_new_tokens
    base = None
    ppm = None
    results_path, runs_path = os.path.join(out, "results.json"), os.path.join(out, "runs.json")
    for name, spec in specs:
        if base is None:
            base = LlavaPredictor.from_config(config, loaded, spec, processor=processor)
            pred = base
        else:
            if spec.method == "ppm" and ppm is None:
                from covipal_jax.weights import ppm_io
                ppm = ppm_io.load_for_inference(config, loaded.cfg)
            pred = base.with_spec(spec, ppm=ppm)
        ppm = ppm or pred.ppm
        method = name or spec.method
        k = spec.k or n_v
        rdir = os.path.join(out, run_label(method, k))
        for b in names:
            use_scores = score_options and b in bm.MULTIPLE_CHOICE
            if use_scores:
                n_opt = max(len(ex.options) for ex in datasets[b].examples)
                if not pred.supports_option_scoring(bm.LETTERS[:n_opt]):
                    raise ValueError(f"--score_options: the tokenizer has no distinct tokens "
                                     f"for the option letters {bm.LETTERS[:n_opt]}")
            before = dict(pred.stats)
            m = harness.run_benchmark(
                pred, datasets[b], os.path.join(rdir, f"{b}.jsonl"), config.batch_size,
                benchmark=b, max_new_tokens=max_new, use_option_scores=use_scores,
                num_workers=num_workers, progress=progress)
            score = metrics.headline_score(b, m, mme=mme_score) if b == "mme" else \
                metrics.headline_score(b, m)
            results = _read_json(results_path, {})
            results.setdefault(method, {}).setdefault(str(k), {})[b] = score
            _write_json(results_path, results)
            runs = _read_json(runs_path, {})
            runs[f"{run_label(method, k)}/{b}"] = dict(
                method=method, spec=dataclasses.asdict(spec), k=k, n_v=n_v, benchmark=b,
                score=score, n_examples=m.get("run", {}).get("n_examples"),
                answered_now=m.get("run", {}).get("answered"),
                model_seconds=pred.stats["seconds"] - before["seconds"],
                items_now=pred.stats["items"] - before["items"],
                option_scores=use_scores, batch_size=config.batch_size,
                max_new_tokens=max_new)
            _write_json(runs_path, runs)
            print(f"{method:>10s} k={k:<4d} {b:>10s}: {score:.2f}", flush=True)
    return write_tables(out, names)


def sweep_methods(methods: Sequence[str], keeps: Sequence[Any], unpruned: bool,
                  has_ppm: bool) -> list[tuple[str, Any]]:
    methods = [m for m in methods if m] or (["ppm"] if has_ppm else []) + [
        "visionzip", "fastv", "dart"]
    grid = [(UNPRUNED, None)] if unpruned else []
    grid += [(m, parse_keep(k)) for k in keeps for m in methods if m != UNPRUNED]
    return grid


def main(argv):
    del argv
    config = _CONFIG.value
    try:
        if not _OUT.value:
            raise ValueError("--out is required")
        if not _BENCHMARK.value or not _DATA_DIR.value:
            raise ValueError("--benchmark and --data_dir are required")
        from covipal_jax.eval import benchmarks as bm
        names = [bm.canonical_name(b) for b in _BENCHMARK.value]
        data_dirs = parse_named(_DATA_DIR.value, names, "data_dir")
        image_dirs = parse_named(_IMAGE_DIR.value, names, "image_dir")
        methods = None
        if _SWEEP.value:
            methods = sweep_methods(_METHODS.value, _KEEPS.value, _UNPRUNED.value,
                                    bool(config.pruning.ppm_checkpoint))
        summary = run(config, names, data_dirs, _OUT.value, methods=methods,
                      image_dirs=image_dirs, limit=_LIMIT.value, max_new_tokens=_MAX_NEW.value,
                      score_options=_SCORE.value, pad_to_square=_PAD.value, label=_LABEL.value,
                      mme_score=_MME.value, num_workers=_WORKERS.value,
                      progress=_PROGRESS.value)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if summary["markdown"]:
        print()
        print(summary["markdown"], end="")
    else:
        print(f"(no unpruned `{UNPRUNED}` run in {_OUT.value}/results.json yet: no table; run "
              f"--config.pruning.method=none or --sweep)")
    print(f"wrote {_OUT.value}/results.json, summary.json" +
          (", summary.md" if summary["markdown"] else ""))


if __name__ == "__main__":
    from covipal_jax import cli

    cli.run(main)
