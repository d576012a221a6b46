"""OCR-VQA (book covers): exact match.

Reader, two layouts:
* the official `dataset.json` (`{image_id: {imageURL, questions[], answers[], title, genre,
  split}}`, split 1 train / 2 val / 3 test) + images `image_dir/<image_id>.jpg` (default
  `<dir>/images`); every (image, question) pair is one example, qid `<image_id>/<j>`.
* a table (VLMEvalKit `OCRVQA_TEST.tsv`: `index, image, question, answer`; or a HF parquet
  with `image_id, questions[], answers[], image`, expanded the same way).
Prompt: the question plus the short-answer suffix. Metric: exact match as lmms-eval's
`exact_match` metric scores short answers (its GQA task: `ignore_case`, `ignore_punctuation`),
after stripping, against any reference (OCR-VQA has one), in percent.
"""
from __future__ import annotations

import ast
from typing import Any

from covipal_jax.eval import metrics as mt
from covipal_jax.eval.benchmarks import common as cm
from covipal_jax.eval.benchmarks.base import (Benchmark, BenchmarkData, Example, Malformed,
                                              ReadReport, Skip, collect, register)

SPLITS = {"train": 1, "val": 2, "test": 3}


def _answers(v: Any) -> tuple[str, ...]:
    """An answer cell: a string, a list, or a list written as a string ("['a', 'b']")."""
    if isinstance(v, str) and v.strip().startswith("["):
        try:
            v = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            pass
    lst = cm.as_list(v) if not isinstance(v, str) else None
    if lst is not None:
        return tuple(str(a) for a in lst)
    return () if cm.is_missing(v) else (str(v),)


def read_ocrvqa(path: str, image_dir: str | None = None, *, split: str = "test",
                check_images: bool = True, limit: int | None = None) -> BenchmarkData:
    """OCR-VQA questions of `split` (official json; tables hold one split already)."""
    report = ReadReport("ocrvqa", path)
    image_dir = image_dir or cm.join(cm.dirname(path), "images")
    if path.endswith(".json"):
        data = cm.read_json(path)
        items = data.items() if isinstance(data, dict) else enumerate(data)
        rows = [dict(v, _key=k) if isinstance(v, dict) else v for k, v in items]
    else:
        rows = cm.indexed(cm.read_table(path, report))

    def convert(rec: dict[str, Any]) -> list[Example]:
        if "_key" in rec and rec.get("split") is not None and split in SPLITS and int(
                rec["split"]) != SPLITS[split]:
            raise Skip(f"split {rec['split']}")
        qs = rec.get("questions")
        if qs is not None:  # one image, several questions
            questions = [str(q) for q in cm.as_list(qs) or ()]
            answers = [(str(a),) for a in cm.as_list(rec.get("answers")) or ()]
            image_id = rec.get("_key", rec.get("image_id"))
            qids = [f"{image_id}/{j}" for j in range(len(questions))]
        else:
            questions, answers = [rec.get("question")], [_answers(rec.get("answer"))]
            image_id = rec.get("image_id")
            qids = [str(rec.get("question_id", rec.get("index", rec.get("_row"))))]
        if not questions or len(answers) not in (0, len(questions)):
            raise Malformed("questions and answers differ in number")
        if any(cm.is_missing(q) for q in questions):
            raise Malformed("missing question")
        image = rec.get("image")
        if image is None or (not isinstance(image, dict) and cm.is_missing(image)):
            if cm.is_missing(image_id):
                raise Malformed("no image or image id")
            image = cm.path_image(image_dir, str(image_id), check_images)
        else:
            image = cm.coerce_image(image, image_dir, check_images)
        meta = {k: rec[k] for k in ("genre", "title") if isinstance(rec.get(k), str)}
        out = []
        for j, (qid, q) in enumerate(zip(qids, questions)):
            refs = answers[j] if answers else ()
            out.append(Example(qid=qid, image=image, question=q,
                               prompt=cm.short_answer_prompt(q),
                               answer=refs[0] if refs else None, answers=refs, meta=meta))
        return out

    return collect("ocrvqa", rows, convert, report, limit=limit)


def ocrvqa_match(pred: str, answers) -> float:
    p = mt.normalize_short_answer(pred)
    return float(any(p == mt.normalize_short_answer(a) for a in answers))


def ocrvqa_metrics(records) -> dict[str, Any]:
    return mt.mean_metric(records, lambda r: ocrvqa_match(
        r.get("pred") or "", r.get("answers") or [r["answer"]]))


BENCHMARK = register(Benchmark(
    name="ocrvqa", read=read_ocrvqa, score=ocrvqa_metrics, aliases=("ocr_vqa",),
    protocol="OCRVQA: exact match (%), case and punctuation ignored (lmms-eval exact_match)"))
