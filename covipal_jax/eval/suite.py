"""Runs of benchmarks x methods x keeps, resumable, and the papers' tables.

One evaluation `run` answers every (method, keep, benchmark) into
`<out>/<method>_k<k>/<benchmark>.jsonl` (resumable: a rerun skips the qids already there) and
writes that cell's result to `<out>/<method>_k<k>/<benchmark>.result.json`. The tables are
rebuilt from every result file under `<out>`, so runs that were interrupted, or that added
methods or benchmarks later, merge:

    results.json    {method: {k: {column: score}}}  (`harness table` reads it)
    runs.json       per cell: the method's spec, examples, model seconds, answered now
    summary.md      absolute scores (ratio to unpruned) and Avg = mean of score / unpruned,
                    with the protocol of every column under the table
    summary.json    the same numbers

A suite names a fixed list of benchmarks and settings: `covipal_table1` is CoViPAL's Table 1
(GQA, MME, SEED, MMStar, AI2D, OCRVQA, TextVQA, InfoVQA; MME-P in the average, MME total shown).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from covipal_jax import paths
from covipal_jax.eval import benchmarks as bm
from covipal_jax.eval import harness
from covipal_jax import pruning
from covipal_jax.pruning import parse_keep

log = logging.getLogger("covipal_jax.eval")
UNPRUNED = pruning.NoneMethod.name  # the unpruned row of every table


@dataclasses.dataclass(frozen=True)
class Suite:
    """A named benchmark list; `mme_score` picks the MME column that enters the average."""

    name: str
    benchmarks: tuple[str, ...]
    mme_score: str = "perception"
    title: str = ""


SUITES = {
    "covipal_table1": Suite(
        "covipal_table1",
        ("gqa", "mme", "seed", "mmstar", "ai2d", "ocrvqa", "textvqa", "infovqa"),
        title="CoViPAL Table 1 (image benchmarks)"),
}
MME_COLUMN = {"perception": "mme_p", "total": "mme"}
DATA_EXTS = ("", ".json", ".jsonl", ".tsv", ".csv", ".parquet")


# ----------------------------------------------------------------------------- small helpers

def parse_named(values: Sequence[str], names: Sequence[str], what: str) -> dict[str, str]:
    """`["a=x", "b=y"]` or `["x", "y"]` (in `names` order) -> {name: value}."""
    values = [v for v in values if v]
    if not values:
        return {}
    if all("=" in v for v in values):
        out = {_bench_key(k, names): v for k, v in (x.split("=", 1) for x in values)}
        unknown = sorted(set(out) - set(names))
        if unknown:
            raise ValueError(f"--{what} names {unknown} that are not in --benchmark {names}")
        return out
    if len(values) != len(names):
        raise ValueError(f"--{what} needs one entry per benchmark ({len(names)}) or NAME=PATH "
                         f"items, got {values}")
    return dict(zip(names, values))


def _bench_key(key: str, names: Sequence[str]) -> str:
    if key in names:
        return key
    try:
        return bm.canonical_name(key)
    except KeyError:
        return key


def data_root_paths(root: str, names: Sequence[str]) -> dict[str, str]:
    """`<root>/<name>` or `<root>/<name>.<ext>` for each benchmark that has one."""
    out = {}
    for b in names:
        for ext in DATA_EXTS:
            p = paths.as_path(root) / f"{b}{ext}"
            if p.exists():
                out[b] = os.fspath(p)
                break
    return out


def run_label(method: str, k: int) -> str:
    return f"{method}_k{k}"


def sweep_methods(methods: Sequence[str], keeps: Sequence[Any], unpruned: bool,
                  has_ppm: bool) -> list[tuple[str, Any]]:
    methods = [m for m in methods if m] or (["ppm"] if has_ppm else []) + [
        "visionzip", "fastv", "dart"]
    grid = [(UNPRUNED, None)] if unpruned else []
    grid += [(m, parse_keep(k)) for k in keeps for m in methods if pruning.get(m).budgeted]
    return grid


def _read_json(path: Any, default: Any) -> Any:
    p = paths.as_path(path)
    return json.loads(p.read_text()) if p.exists() else default


def _write_json(path: Any, obj: Any) -> None:
    paths.write_atomic(path, json.dumps(obj, indent=1, default=str) + "\n")


# ----------------------------------------------------------------------------- tables

def collect_results(out: str) -> tuple[dict, dict, dict]:
    """(results, runs, protocols) merged from every `<out>/*/*.result.json`."""
    results: dict[str, dict[str, dict[str, float]]] = {}
    runs: dict[str, Any] = {}
    protocols: dict[str, str] = {}
    root = paths.as_path(out)
    for f in sorted(root.glob("*/*.result.json")):
        try:
            r = json.loads(f.read_text())
        except json.JSONDecodeError:
            log.warning("%s: unreadable result file, ignored", f)
            continue
        results.setdefault(r["method"], {}).setdefault(str(r["k"]), {}).update(r["columns"])
        runs[f"{run_label(r['method'], r['k'])}/{r['benchmark']}"] = r
        protocols.update(r.get("protocols", {}))
    return results, runs, protocols


def summarize(results: Mapping[str, Mapping[str, Mapping[str, float]]],
              unpruned: str = UNPRUNED, benchmarks: Sequence[str] | None = None,
              avg_columns: Sequence[str] | None = None,
              keep_label=None) -> dict[str, Any]:
    """Scores, ratios to the unpruned row and their average (the papers' "Avg"), per row.

    `benchmarks` are the table's columns (default: all, first-seen order); `avg_columns` the
    ones the average is taken over (default: all columns)."""
    if unpruned not in results:
        return dict(unpruned=None, rows=[], markdown=None)
    ref = results[unpruned][sorted(results[unpruned], key=lambda k: -float(k))[0]]
    benchmarks = list(benchmarks or dict.fromkeys(b for per in results.values()
                                                  for s in per.values() for b in s))
    no_ref = [b for b in benchmarks if b not in ref]
    benchmarks = [b for b in benchmarks if b in ref]  # ratios need the unpruned score
    avg_cols = [b for b in (avg_columns or benchmarks) if b in benchmarks]
    rows = []
    for method, per_keep in results.items():
        for keep, scores in per_keep.items():
            rel = {b: (scores[b] / ref[b] if ref.get(b) else None)
                   for b in benchmarks if b in scores and b in ref}
            vals = [rel[b] for b in avg_cols if rel.get(b) is not None]
            rows.append(dict(method=method, keep=keep, scores=dict(scores), relative=rel,
                             avg_relative=sum(vals) / len(vals) if vals else None,
                             n_benchmarks=len(vals)))
    rows.sort(key=lambda r: (r["method"] != unpruned, -float(r["keep"]), r["method"]))
    md = harness.summary_table(results, unpruned, benchmarks=benchmarks, show_ratio=True,
                               avg_columns=avg_cols, keep_label=keep_label) \
        if benchmarks else None
    return dict(unpruned=unpruned, benchmarks=benchmarks, avg_columns=avg_cols, rows=rows,
                markdown=md, benchmarks_without_unpruned=no_ref)


def table_columns(names: Sequence[str], mme_score: str) -> tuple[list[str], list[str]]:
    """(columns, columns in the average) of benchmarks `names`: MME gives mme_p and mme."""
    cols, avg = [], []
    for b in names:
        own = list(bm.get(b).protocols())
        cols += own
        avg.append(MME_COLUMN[mme_score] if b == "mme" else own[0])
    return cols, avg


def write_tables(out: str, names: Sequence[str], mme_score: str = "total",
                 title: str = "", n_v: int | None = None) -> dict[str, Any]:
    """Rebuilds results.json, runs.json, summary.json and summary.md from the result files."""
    results, runs, protocols = collect_results(out)
    cols, avg = table_columns(names, mme_score)
    keep_label = None
    if n_v:
        keep_label = lambda k: f"{k} ({100 * int(k) / n_v:.1f}%)"  # noqa: E731
    summary = summarize(results, UNPRUNED, cols, avg_columns=avg, keep_label=keep_label)
    summary.update(runs=runs, protocols={c: protocols[c] for c in cols if c in protocols},
                   title=title)
    root = paths.as_path(out)
    _write_json(root / "results.json", results)
    _write_json(root / "runs.json", runs)
    _write_json(root / "summary.json", summary)
    if summary["markdown"]:
        summary["markdown"] = (f"{title}\n\n" if title else "") + summary["markdown"] + \
            protocol_notes(summary, cols)
        paths.write_atomic(root / "summary.md", (
            "Scores per benchmark (ratio to unpruned); Avg = mean ratio to unpruned "
            f"(`{UNPRUNED}`).\n\n") + summary["markdown"])
    return summary


def protocol_notes(summary: Mapping[str, Any], cols: Sequence[str]) -> str:
    """The footnote naming every column's protocol and what the average is over."""
    lines = ["", "Protocols:"]
    for c in summary["benchmarks"]:
        lines.append(f"- {c}: {summary['protocols'].get(c, '(no protocol recorded)')}")
    lines.append(f"- Avg: mean over {', '.join(summary['avg_columns'])} of score / unpruned "
                 "score")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- runs

def load_datasets(names: Sequence[str], data_dirs: Mapping[str, str],
                  image_dirs: Mapping[str, str], limit: int | None) -> dict[str, Any]:
    """Reads every benchmark (clear errors for a missing path or an empty read)."""
    missing = [b for b in names if b not in data_dirs]
    if missing:
        raise ValueError(f"no --data_dir for {missing}")
    datasets = {}
    for b in names:
        if not paths.as_path(data_dirs[b]).exists():
            raise FileNotFoundError(f"{b}: data path {data_dirs[b]!r} does not exist")
        kw: dict[str, Any] = dict(limit=limit)
        if b in image_dirs:
            kw["video_dir" if bm.get(b).kind == "video" else "image_dir"] = image_dirs[b]
        data = bm.load_benchmark(b, data_dirs[b], **kw)
        log.info(data.report.summary())
        print(data.report.summary(), flush=True)
        if not data.examples:
            raise ValueError(f"{b}: no examples read from {data_dirs[b]!r}")
        datasets[b] = data
    return datasets


def predictors(config: Any, loaded: Any, methods: Sequence[tuple[str | None, str, Any]],
               processor: Any, num_frames: int | None = None):
    """Yields (label, method name, k, method dict, predictor) per (label, method, keep): the one
    place the eval suite builds predictors (`covipal_jax/eval/predictor.py`). Every predictor
    shares one `Sampler` (weights, compiled programs, a PPM loaded once)."""
    from covipal_jax.eval.predictor import LlavaPredictor, method_for  # noqa: PLC0415

    n_v = loaded.cfg.num_vision_tokens
    base = None
    for label, name, keep in methods:
        method = method_for(config, name, keep)
        if base is None:
            pred = base = LlavaPredictor.from_config(config, loaded, method, processor=processor,
                                                     num_frames=num_frames)
        else:
            pred = base.with_method(method)
        yield label or method.name, method.name, method.k(n_v), method.to_dict(n_v), pred


def run(config: Any, benchmarks: Sequence[str], data_dirs: dict[str, str], out: str, *,
        methods: Sequence[tuple[str, Any]] | None = None, image_dirs: dict[str, str] | None = None,
        limit: int | None = None, max_new_tokens: int | None = None,
        score_options: bool = False, pad_to_square: bool = False, label: str | None = None,
        mme_score: str = "total", num_workers: int = 4, progress: bool = True,
        loaded: Any = None, title: str = "", num_frames: int | None = None,
        video_bounds: bool = True) -> dict[str, Any]:
    """Evaluate every (method, keep) in `methods` (default: the config's pruning) on every
    benchmark, under a lock on `out`; returns `write_tables(...)` (see the module docstring).

    Video benchmarks sample `num_frames` frames per video (default `config.video_frames`, else
    32; MVBench inside its bounds unless `video_bounds=False`); a method that cannot prune video
    input (it reads single-view tower statistics) is skipped there with a note.
    """
    from covipal_jax.inference import loading  # noqa: PLC0415

    names = [bm.canonical_name(b) for b in benchmarks]
    if not names:
        raise ValueError("--benchmark (or --suite) is required")
    with paths.WorkdirLock(out, what="evaluation"):
        datasets = load_datasets(names, data_dirs, image_dirs or {}, limit)
        loaded = loaded or loading.load(config)
        n_v = loaded.cfg.num_vision_tokens
        processor = dataclasses.replace(loaded.processor, pad_to_square=True) \
            if pad_to_square else loaded.processor
        grid = ([(label, config.pruning.method, config.pruning.keep)] if methods is None
                else [(None, m, keep) for m, keep in methods])
        max_new = max_new_tokens or config.max_new_tokens
        for name, method, k, spec, pred in predictors(config, loaded, grid, processor,
                                                      num_frames):
            rdir = paths.as_path(out) / run_label(name, k)
            pred.use_bounds = video_bounds
            for b in names:
                bench = bm.get(b)
                if bench.kind == "video":
                    pred.check_video()
                    why = pred.video_unsupported()
                    if why:
                        print(f"{name:>10s} k={k:<4d} {b:>10s}: skipped ({why})", flush=True)
                        continue
                use_scores = score_options and bench.multiple_choice and bench.kind == "image"
                if use_scores:
                    n_opt = max(len(ex.options) for ex in datasets[b].examples)
                    if not pred.supports_option_scoring(bm.LETTERS[:n_opt]):
                        raise ValueError(f"--score_options: the tokenizer has no distinct "
                                         f"tokens for the option letters {bm.LETTERS[:n_opt]}")
                before = dict(pred.stats)
                m = harness.run_benchmark(
                    pred, datasets[b], os.fspath(rdir / f"{b}.jsonl"), config.batch_size,
                    benchmark=b, max_new_tokens=max_new, use_option_scores=use_scores,
                    num_workers=num_workers, progress=progress)
                columns = bench.table_columns(m)
                _write_json(rdir / f"{b}.result.json", dict(
                    method=name, k=k, n_v=n_v, benchmark=b, spec=spec, columns=columns,
                    protocols=bench.protocols(), score=m["score"],
                    n_examples=m.get("run", {}).get("n_examples"),
                    answered_now=m.get("run", {}).get("answered"),
                    model_seconds=pred.stats["seconds"] - before["seconds"],
                    items_now=pred.stats["items"] - before["items"],
                    option_scores=use_scores, batch_size=config.batch_size,
                    max_new_tokens=max_new, **({"num_frames": pred.num_frames}
                                               if bench.kind == "video" else {})))
                shown = ", ".join(f"{c}={v:.2f}" for c, v in columns.items())
                print(f"{name:>10s} k={k:<4d} {b:>10s}: {shown}", flush=True)
        summary = write_tables(out, names, mme_score=mme_score, title=title, n_v=n_v)
        video = [b for b in names if bm.get(b).kind == "video"]
        if video:
            from covipal_jax.eval import video_tables  # noqa: PLC0415

            summary["breakdown"] = video_tables.write(out, video)
        return summary
