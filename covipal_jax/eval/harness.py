"""Evaluation harness: static-size batches, resumable JSONL predictions, metrics, tables.

The model side is a `Predictor` (any object with `predict`; optionally `score_options`), so
this module does not import the model code. The lead wires a LLaVA/PPM generator to it:

    class LlavaPredictor:
        def predict(self, batch, max_new_tokens):          # batch: [(PIL image, prompt)]
            return [text, ...]                              # one string per item, same order
        def score_options(self, batch):                     # batch: [(image, prompt, letters)]
            return [[logp("A"), logp("B"), ...], ...]       # optional

`run_benchmark` always calls the predictor with exactly `batch_size` items: the last batch
(and any batch that lost items to unreadable images) is padded by repeating a real item, and
the padded outputs are dropped, so a jitted model sees one static shape.

Command line (metrics from an existing predictions file, and the comparison table):

    python -m covipal_jax.eval.harness score --benchmark mme preds/mme.jsonl
    python -m covipal_jax.eval.harness table --unpruned vanilla results.json
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import math
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import tqdm
from PIL import Image

from covipal_jax import paths
from covipal_jax.eval import benchmarks as bm
from covipal_jax.eval import metrics as mt
from covipal_jax.eval import video as video_lib

log = logging.getLogger(__name__)


@runtime_checkable
class Predictor(Protocol):
    """Generates answers for a batch of `(image, prompt)` pairs (greedy decoding expected)."""

    def predict(self, batch: Sequence[tuple[Image.Image, str]], max_new_tokens: int
                ) -> list[str]:
        ...


@runtime_checkable
class OptionScorer(Protocol):
    """Optional: scores each candidate continuation (option letters) of each prompt;
    higher is better (e.g. the log-likelihood of the letter as the first answer token)."""

    def score_options(self, batch: Sequence[tuple[Image.Image, str, Sequence[str]]]
                      ) -> list[Sequence[float]]:
        ...


def iter_batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of `size` items; the last one may be shorter."""
    batch: list[Any] = []
    for it in items:
        batch.append(it)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def pad_batch(items: Sequence[Any], size: int) -> tuple[list[Any], int]:
    """`items` padded to `size` by repeating the last item; returns (padded, n_real)."""
    if not items:
        raise ValueError("cannot pad an empty batch")
    if len(items) > size:
        raise ValueError(f"batch of {len(items)} exceeds batch_size {size}")
    return list(items) + [items[-1]] * (size - len(items)), len(items)


# --------------------------------------------------------------------------------------------
# JSONL predictions file.
# --------------------------------------------------------------------------------------------
def load_records(files: str | Sequence[str]) -> list[dict[str, Any]]:
    """Records of one or more prediction files, local or `gs://` (a torn last line is
    ignored; later records of a qid replace earlier ones)."""
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    by_qid: dict[str, dict[str, Any]] = {}
    for path in files:
        p = paths.as_path(path)
        if not p.exists():
            continue
        for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s:%d: skipping unparsable line (torn write?)", path, lineno)
                continue
            if isinstance(rec, dict) and "qid" in rec:
                by_qid[str(rec["qid"])] = rec
    return list(by_qid.values())


def _repair_tail(path: str) -> None:
    """Drops a torn (newline-less) last line left by a crash, so appends start clean (local
    files; a remote file is always written whole)."""
    if paths.is_remote(path) or not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        cut = data.rfind(b"\n") + 1
        f.seek(cut)
        f.truncate()
        log.warning("%s: dropped a torn last line (%d bytes)", path, len(data) - cut)


class _LineWriter:
    """Appends JSON lines: a local file is appended to and flushed (optionally fsynced) after
    each batch; a remote one (`gs://`, no append) is rewritten whole after each batch."""

    def __init__(self, path: str, fsync: bool):
        self.path, self.fsync = path, fsync
        self.remote = paths.is_remote(path)
        paths.as_path(path).parent.mkdir(parents=True, exist_ok=True)
        if self.remote:
            p = paths.as_path(path)
            self.text = p.read_text(encoding="utf-8") if p.exists() else ""
            if self.text and not self.text.endswith("\n"):
                self.text = self.text[:self.text.rfind("\n") + 1]
        else:
            _repair_tail(path)
            self.f = open(path, "a", encoding="utf-8")  # noqa: SIM115

    def write(self, lines: Sequence[dict[str, Any]]) -> None:
        text = "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in lines)
        if self.remote:
            self.text += text
            paths.write_atomic(self.path, self.text)
            return
        self.f.write(text)
        self.f.flush()
        if self.fsync:
            os.fsync(self.f.fileno())

    def close(self) -> None:
        if not self.remote:
            self.f.close()


# --------------------------------------------------------------------------------------------
# run_benchmark.
# --------------------------------------------------------------------------------------------
def _media(ex: bm.Example) -> str:
    return "video" if isinstance(ex.image, bm.VideoRef) else "image"


def _load_images(examples: Sequence[bm.Example], pool: concurrent.futures.Executor | None,
                 predictor: Any = None) -> list[Any]:
    """Per example: a PIL image, a video input (`video.load_input`), or the load error."""
    def load(ex: bm.Example) -> Any:
        try:
            if isinstance(ex.image, bm.VideoRef):
                return video_lib.load_input(ex.image, predictor, ex.meta)
            return ex.image.load()
        except Exception as e:  # noqa: BLE001  (any decode error is a per-example failure)
            return e

    return list(pool.map(load, examples)) if pool else [load(ex) for ex in examples]


def run_benchmark(
    predictor: Predictor,
    examples: bm.BenchmarkData | Iterable[bm.Example],
    out_jsonl: str,
    batch_size: int,
    *,
    benchmark: str | None = None,
    max_new_tokens: int = 16,
    use_option_scores: bool = False,
    shard: tuple[int, int] = (0, 1),
    num_workers: int = 4,
    progress: bool = True,
    compute: bool = True,
    fsync: bool = False,
) -> dict[str, Any] | None:
    """Answers every example not yet in `out_jsonl`, then returns the benchmark's metrics.

    Args:
      predictor: a `Predictor`; with `use_option_scores=True` (multiple-choice benchmarks
        only) it must also be an `OptionScorer`, and the chosen letter is stored as `choice`.
      examples: a `BenchmarkData` (its name is the default `benchmark`) or `Example`s.
      out_jsonl: appended to, one JSON line per answered question, flushed after each batch;
        a rerun skips the qids already there (resume after preemption). Examples whose image
        cannot be decoded get a record with an `error` field: left out of the metrics (counted
        under `errors`) and retried by the next run. Metrics are also written to
        `<out_jsonl>.metrics.json`.
      batch_size: every predictor call gets exactly this many items (padded, see module doc).
      shard: (index, count): answer only examples[index::count] (data-parallel evaluation on
        several hosts, each with its own file; merge with `load_records([...])`).
      num_workers: threads decoding images (0: in the calling thread).
      compute: compute metrics (only meaningful on the full set: leave False on shards).
    Returns:
      `metrics.compute_metrics(benchmark, records)` when `compute`, else None.
    """
    if isinstance(examples, bm.BenchmarkData):
        benchmark = benchmark or examples.name
        examples = examples.examples
    if benchmark is None:
        raise ValueError("pass benchmark= when examples is not a BenchmarkData")
    bench = bm.get(benchmark)
    benchmark = bench.name
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if bench.kind == "video" and not video_lib.supports_video(predictor):
        video_lib.predict_video(predictor, [], max_new_tokens)  # raises: what is missing
    if use_option_scores:
        if bench.kind == "video":
            raise ValueError(f"option scoring is not available for video benchmarks ({benchmark})")
        if not bench.multiple_choice:
            raise ValueError(f"option scoring is for multiple-choice benchmarks, not {benchmark}")
        if not isinstance(predictor, OptionScorer):
            raise TypeError("use_option_scores=True needs a predictor with score_options()")
    examples = list(examples)
    qids = [ex.qid for ex in examples]
    if len(set(qids)) != len(qids):
        raise ValueError("duplicate qids in examples; resuming by qid would be ambiguous")
    idx, count = shard
    examples = examples[idx::count]

    out_jsonl = os.fspath(out_jsonl)
    writer = _LineWriter(out_jsonl, fsync)
    done = {r["qid"] for r in load_records(out_jsonl) if not r.get("error")}
    todo = [ex for ex in examples if ex.qid not in done]
    log.info("%s: %d examples, %d already in %s, %d to answer", benchmark, len(examples),
             len(examples) - len(todo), out_jsonl, len(todo))

    pool = (concurrent.futures.ThreadPoolExecutor(num_workers) if num_workers > 0 else None)
    bar = tqdm.tqdm(total=len(todo), desc=benchmark, unit="q", disable=not progress,
                    dynamic_ncols=True)
    stats = {"answered": 0, "image_errors": 0, "batches": 0}
    try:
        for chunk in iter_batches(todo, batch_size):
            images = _load_images(chunk, pool, predictor)
            lines = []
            good: list[tuple[bm.Example, Any]] = []
            for ex, img in zip(chunk, images):
                if isinstance(img, Exception):
                    stats["image_errors"] += 1
                    lines.append(dict(ex.to_record(), pred="", benchmark=benchmark,
                                      error=f"{_media(ex)}: {type(img).__name__}: {img}"))
                else:
                    good.append((ex, img))
            if good:
                padded, n_real = pad_batch(good, batch_size)
                lines += _predict(predictor, padded, n_real, benchmark, max_new_tokens,
                                  use_option_scores)
                stats["batches"] += 1
            writer.write(lines)
            stats["answered"] += len(lines)
            bar.update(len(chunk))
    finally:
        writer.close()
        bar.close()
        if pool is not None:
            pool.shutdown(wait=False)
    if stats["image_errors"]:
        log.warning("%s: %d images could not be loaded (recorded with an `error`, left out "
                    "of the metrics, retried on the next run)", benchmark, stats["image_errors"])
    if not compute:
        return None
    records = load_records(out_jsonl)
    wanted = {ex.qid for ex in examples}
    records = [r for r in records if r["qid"] in wanted]
    result = bench.score(records)
    result["run"] = dict(stats, n_examples=len(examples), out_jsonl=out_jsonl)
    paths.write_atomic(out_jsonl + ".metrics.json", json.dumps(result, indent=1, default=str))
    return result


def _predict(predictor: Any, padded: list[tuple[bm.Example, Image.Image]], n_real: int,
             benchmark: str, max_new_tokens: int, use_option_scores: bool
             ) -> list[dict[str, Any]]:
    size = len(padded)
    out = []
    if use_option_scores:
        batch = [(img, ex.prompt, tuple(bm.LETTERS[:len(ex.options)])) for ex, img in padded]
        scores = predictor.score_options(batch)
        if len(scores) != size:
            raise RuntimeError(f"score_options returned {len(scores)} rows for {size} items")
        for (ex, _), row in list(zip(padded, scores))[:n_real]:
            row = list(row)
            if len(row) != len(ex.options):
                raise RuntimeError(f"{ex.qid}: {len(row)} scores for {len(ex.options)} options")
            best = max(range(len(row)), key=lambda i: row[i])
            out.append(dict(ex.to_record(), pred=bm.LETTERS[best], choice=bm.LETTERS[best],
                            option_scores=[float(x) for x in row], benchmark=benchmark))
        return out
    if isinstance(padded[0][0].image, bm.VideoRef):
        texts = video_lib.predict_video(predictor, [(v, ex.prompt, ex.meta) for ex, v in padded],
                                        max_new_tokens)
    else:
        texts = predictor.predict([(img, ex.prompt) for ex, img in padded], max_new_tokens)
    if len(texts) != size:
        raise RuntimeError(f"predict returned {len(texts)} outputs for a batch of {size}")
    for (ex, _), text in list(zip(padded, texts))[:n_real]:
        out.append(dict(ex.to_record(), pred=str(text), benchmark=benchmark))
    return out


# --------------------------------------------------------------------------------------------
# Comparison table.
# --------------------------------------------------------------------------------------------
def _keep_sort_key(k: Any) -> tuple[int, float | str]:
    try:
        return (0, -float(k))
    except (TypeError, ValueError):
        return (1, str(k))


def _fmt(v: float, digits: int) -> str:
    return f"{v:.1f}" if abs(v) >= 1000 else f"{v:.{digits}f}"


def summary_table(results: Mapping[str, Mapping[Any, Mapping[str, float]]], unpruned_key: str,
                  benchmarks: Sequence[str] | None = None, digits: int = 2,
                  show_ratio: bool = False, avg_columns: Sequence[str] | None = None,
                  keep_label: Any = None) -> str:
    """Markdown table of scores per (keep, method), with the papers' "Avg" column.

    Args:
      results: `{method: {keep: {benchmark: score}}}`; keep is the number of visual tokens
        kept or a ratio. The unpruned method has one keep entry (if several, the largest).
      unpruned_key: the method every score is divided by.
      benchmarks: column order (default: first-seen order across `results`).
      show_ratio: also print each cell's ratio to unpruned, "59.93 (97.1%)".
      avg_columns: the columns Avg is taken over (default: all; e.g. MME-P but not MME total).
      keep_label: keep -> the text of the Keep cell (default: str).
    Returns:
      Rows sorted by keep (descending), unpruned first. Avg = mean over benchmarks of
      score / unpruned score (in %); a method missing a benchmark gets "–" there, and its Avg
      is over the benchmarks it has, marked "(n/N)".
    """
    if unpruned_key not in results or not results[unpruned_key]:
        raise KeyError(f"unpruned method {unpruned_key!r} not in results")
    ref_keep = sorted(results[unpruned_key], key=_keep_sort_key)[0]
    ref = results[unpruned_key][ref_keep]
    if benchmarks is None:
        benchmarks = []
        for per_keep in results.values():
            for scores in per_keep.values():
                benchmarks += [b for b in scores if b not in benchmarks]
    missing_ref = [b for b in benchmarks if b not in ref]
    if missing_ref:
        raise ValueError(f"unpruned scores missing for {missing_ref}")
    header = ["Keep", "Method", *benchmarks, "Avg"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    avg_set = set(avg_columns if avg_columns is not None else benchmarks)
    n_avg = sum(b in avg_set for b in benchmarks)
    label = keep_label or str

    def row(keep: Any, method: str, scores: Mapping[str, float]) -> str:
        cells, ratios = [], []
        for b in benchmarks:
            if b not in scores or scores[b] is None or (
                    isinstance(scores[b], float) and math.isnan(scores[b])):
                cells.append("–")
                continue
            ratio = scores[b] / ref[b] if ref[b] else float("nan")
            if b in avg_set:
                ratios.append(ratio)
            cell = _fmt(scores[b], digits)
            cells.append(f"{cell} ({100 * ratio:.1f}%)" if show_ratio else cell)
        avg = "–" if not ratios else f"{100 * sum(ratios) / len(ratios):.2f}%"
        if ratios and len(ratios) < n_avg:
            avg += f" ({len(ratios)}/{n_avg})"
        return "| " + " | ".join([label(keep), method, *cells, avg]) + " |"

    lines.append(row(ref_keep, unpruned_key, ref))
    keeps = sorted({k for m, pk in results.items() if m != unpruned_key for k in pk},
                   key=_keep_sort_key)
    for keep in keeps:
        for method, per_keep in results.items():
            if method != unpruned_key and keep in per_keep:
                lines.append(row(keep, method, per_keep[keep]))
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# CLI.
# --------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m covipal_jax.eval.harness",
                                     description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("score", help="metrics of prediction JSONL file(s)")
    p.add_argument("--benchmark", required=True)
    p.add_argument("files", nargs="+")
    p = sub.add_parser("table", help="markdown table from {method: {keep: {bench: score}}}")
    p.add_argument("--unpruned", required=True)
    p.add_argument("--ratio", action="store_true")
    p.add_argument("--mme_score", choices=("perception", "total"), default="total",
                   help="the MME column in Avg when both mme_p and mme are present")
    p.add_argument("results_json")
    args = parser.parse_args(argv)
    if args.cmd == "score":
        print(json.dumps(mt.compute_metrics(args.benchmark, load_records(args.files)),
                         indent=1, default=str))
    else:
        results = json.loads(paths.as_path(args.results_json).read_text())
        columns = dict.fromkeys(c for per in results.values() for s in per.values() for c in s)
        drop = {"perception": "mme", "total": "mme_p"}[args.mme_score]
        avg = [c for c in columns if not (c == drop and {"mme", "mme_p"} <= set(columns))]
        print(summary_table(results, args.unpruned, show_ratio=args.ratio, avg_columns=avg),
              end="")
        print(f"\nAvg: mean over {', '.join(avg)} of score / unpruned score")
        print("Protocols:")
        for c in columns:
            print(f"- {c}: {bm.column_protocol(c) or '(not a registered benchmark column)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
