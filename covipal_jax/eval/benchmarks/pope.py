"""POPE: object-hallucination yes/no questions in three splits; mean F1 over the splits.

Reader: a folder of `*pope_{adversarial,popular,random}.json[l]` (JSON lines
`{question_id, image, text, label}`, as in the POPE repo), or one table (JSONL, or lmms-eval's
`lmms-lab/POPE` parquet) whose records carry `category` (the split); images
`image_dir/<image>` (COCO val2014; default `<path>/images`). qids are `<split>/<question_id>`.
Metric: LLaVA's `eval_pope.py`: keep the first sentence, drop commas, "no" if the words contain
"No"/"no"/"not", else "yes"; positive = "yes"; accuracy, precision, recall, F1 and yes-ratio
per split, the headline is the mean F1.
"""
from __future__ import annotations

import collections
import re
from collections.abc import Sequence
from typing import Any

from covipal_jax.eval import metrics as mt
from covipal_jax.eval.benchmarks import common as cm
from covipal_jax.eval.benchmarks.base import (Benchmark, BenchmarkData, Example, Malformed,
                                              ReadReport, Skip, collect, register)

POPE_SPLITS = ("adversarial", "popular", "random")


def read_pope(path: str, image_dir: str | None = None, *,
              splits: Sequence[str] = POPE_SPLITS, check_images: bool = True,
              limit: int | None = None) -> BenchmarkData:
    """POPE questions (see the module docstring)."""
    report = ReadReport("pope", path)
    folder = cm.is_dir(path) and not cm.is_table(path)
    image_dir = image_dir or cm.join(path if folder else cm.dirname(path), "images")
    rows: list[dict[str, Any]] = []
    if folder:
        names = cm.listdir(path)
        for split in splits:
            match = [n for n in names if re.search(rf"pope_{split}\.jsonl?$", n)]
            if not match:
                report.skip(f"no file for split {split}")
            for n in match:
                rows += [dict(r, _split=split, _file=n)
                         for r in cm.read_jsonl(cm.join(path, n), report)]
    else:
        rows = cm.read_table(path, report)

    def convert(rec: dict[str, Any]) -> Example:
        sp = rec.get("_split") or rec.get("category")
        if cm.is_missing(sp):
            raise Malformed("no split: use per-split files or a category field")
        if sp not in splits:
            raise Skip(f"split {sp}")
        label = str(rec.get("label", rec.get("answer", ""))).strip().lower()
        if label not in ("yes", "no"):
            raise Malformed(f"label must be yes/no, got {label!r}")
        text = rec.get("text", rec.get("question"))
        image = rec.get("image", rec.get("image_source"))
        if cm.is_missing(text) or (not isinstance(image, (dict, bytes)) and cm.is_missing(image)):
            raise Malformed("missing text or image")
        return Example(
            qid=f"{sp}/{rec.get('question_id')}",
            image=cm.coerce_image(image, image_dir, check_images),
            question=str(text), prompt=cm.short_answer_prompt(str(text)),
            answer=label, answers=(label,), meta={"category": sp},
        )

    return collect("pope", rows, convert, report, limit=limit,
                   where=lambda i, r: f"{r.get('_file', '')}:{r.get('question_id')}")


def pope_metrics(records) -> dict[str, Any]:
    recs, left_out = mt.scored(records)
    by_split: dict[str, tuple[list[str], list[str]]] = collections.defaultdict(
        lambda: ([], []))
    for r in recs:
        preds, labels = by_split[mt.category(r)]
        preds.append(mt.parse_pope_answer(r.get("pred") or ""))
        labels.append(str(r["answer"]).strip().lower())
    splits = {s: mt.binary_metrics(p, y) for s, (p, y) in sorted(by_split.items())}
    mean = {k: sum(m[k] for m in splits.values()) / len(splits) if splits else 0.0
            for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")}
    return {"score": mean["f1"], **mean, "splits": splits, "n": len(recs), **left_out}


BENCHMARK = register(Benchmark(
    name="pope", read=read_pope, score=pope_metrics,
    protocol="POPE: mean F1 (%) over the splits, positive = yes (LLaVA's eval_pope parsing)"))
