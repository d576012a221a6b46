"""GQA testdev-balanced: exact match after normalisation.

Reader: `testdev_balanced_questions.json` (`{qid: {imageId, question, answer, types}}`), or a
JSON list / JSONL / parquet of `{question_id, image|imageId, question|text, answer}`; images
`image_dir/<imageId>.jpg` (default `<dir>/images`). Metric: lower case, punctuation and a
trailing period removed, whitespace collapsed (lmms-eval's `exact_match(ignore_case,
ignore_punctuation)`, LLaVA's `convert_gqa_for_eval`); also per structural type.
"""
from __future__ import annotations

from typing import Any

from covipal_jax.eval import metrics as mt
from covipal_jax.eval.benchmarks import common as cm
from covipal_jax.eval.benchmarks.base import (Benchmark, BenchmarkData, Example, Malformed,
                                              ReadReport, collect, register)


def read_gqa(path: str, image_dir: str | None = None, *, check_images: bool = True,
             limit: int | None = None) -> BenchmarkData:
    """GQA questions (see the module docstring); `image_dir` defaults to `<dir>/images`."""
    report = ReadReport("gqa", path)
    image_dir = image_dir or cm.join(cm.dirname(path), "images")
    if path.endswith(".parquet") or cm.is_dir(path):
        rows = cm.read_table(path, report)
    else:
        data = cm.read_json_or_jsonl(path, report)
        rows = ([dict(v, _key=k) if isinstance(v, dict) else v for k, v in data.items()]
                if isinstance(data, dict) else data)

    def convert(rec: dict[str, Any]) -> Example:
        qid = rec.get("_key", rec.get("question_id", rec.get("qid")))
        if qid is None:
            raise Malformed("record without a question id")
        question = rec.get("question", rec.get("text"))
        answer = rec.get("answer")
        image = rec.get("imageId", rec.get("image"))
        if cm.is_missing(question) or (not isinstance(image, dict) and cm.is_missing(image)):
            raise Malformed("missing question or image")
        types = rec.get("types") or {}
        img = (cm.coerce_image(image, image_dir, check_images) if isinstance(image, dict)
               else cm.path_image(image_dir, str(image), check_images))
        return Example(
            qid=str(qid), image=img, question=str(question),
            prompt=cm.short_answer_prompt(str(question)),
            answer=None if cm.is_missing(answer) else str(answer),
            answers=() if cm.is_missing(answer) else (str(answer),),
            meta={k: types[k] for k in ("structural", "semantic", "detailed") if k in types},
        )

    return collect("gqa", rows, convert, report, limit=limit)


def gqa_metrics(records) -> dict[str, Any]:
    recs, left_out = mt.scored(records)
    correct = [mt.normalize_short_answer(r.get("pred") or "") == mt.normalize_short_answer(
        r["answer"]) for r in recs]
    acc = mt.pct(sum(correct), len(recs))
    return {"score": acc, "accuracy": acc, "n": len(recs), **left_out,
            "by_structural": mt.by_category(recs, correct, "structural")}


BENCHMARK = register(Benchmark(
    name="gqa", read=read_gqa, score=gqa_metrics,
    protocol="GQA: exact match (%) after lower-case / punctuation / trailing-period "
             "normalisation"))
