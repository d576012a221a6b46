"""TextVQA val: VQA accuracy over the 10 human answers (EvalAI normalisation).

Reader: `TextVQA_0.5.1_val.json` (`{"data": [{question_id, image_id, question, answers[10]}]}`)
+ `train_images/` (val images live there), or lmms-eval's parquet (`lmms-lab/textvqa`:
`question_id, question, image, answers`). `ocr_json` (`TextVQA_Rosetta_OCR_v0.2_val.json`) adds
LLaVA-1.5's "Reference OCR token: ..." line, which LLaVA-1.5's reported 58.2 uses; without it
the prompt is the plain short-answer one (lmms-eval's default).
"""
from __future__ import annotations

import collections
from typing import Any

from covipal_jax.eval import metrics as mt
from covipal_jax.eval.benchmarks import common as cm
from covipal_jax.eval.benchmarks.base import (Benchmark, BenchmarkData, Example, Malformed,
                                              ReadReport, collect, register)


def read_textvqa(path: str, image_dir: str | None = None, *, ocr_json: str | None = None,
                 check_images: bool = True, limit: int | None = None) -> BenchmarkData:
    """TextVQA questions (see the module docstring)."""
    report = ReadReport("textvqa", path)
    image_dir = image_dir or cm.join(cm.dirname(path), "train_images")
    records = cm.read_table(path, report)
    ocr: dict[str, list[str]] = {}
    if ocr_json:
        odata = cm.read_json(ocr_json)
        for r in odata["data"] if isinstance(odata, dict) else odata:
            ocr[str(r.get("image_id"))] = list(r.get("ocr_tokens") or [])

    def convert(rec: dict[str, Any]) -> Example:
        q, image_id = rec.get("question"), rec.get("image_id")
        if cm.is_missing(q) or cm.is_missing(image_id) or "question_id" not in rec:
            raise Malformed("missing question/image_id/question_id")
        answers = tuple(str(a) for a in cm.as_list(rec.get("answers")) or ())
        prompt_q = str(q)
        if ocr_json and ocr.get(str(image_id)):
            prompt_q += "\nReference OCR token: " + ", ".join(ocr[str(image_id)])
        image = (cm.coerce_image(rec["image"], image_dir, check_images)
                 if rec.get("image") is not None
                 else cm.path_image(image_dir, str(image_id), check_images))
        return Example(
            qid=str(rec["question_id"]), image=image,
            question=str(q), prompt=cm.short_answer_prompt(prompt_q),
            answer=collections.Counter(answers).most_common(1)[0][0] if answers else None,
            answers=answers, meta={"image_id": str(image_id)},
        )

    return collect("textvqa", records, convert, report, limit=limit)


def textvqa_metrics(records) -> dict[str, Any]:
    return mt.mean_metric(records, lambda r: mt.vqa_accuracy(
        r.get("pred") or "", r.get("answers") or [r["answer"]]))


BENCHMARK = register(Benchmark(
    name="textvqa", read=read_textvqa, score=textvqa_metrics, aliases=("vqa_text",),
    protocol="TextVQA: VQA accuracy (%), EvalAI normalisation, leave-one-out over 10 answers"))
