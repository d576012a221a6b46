"""InfographicVQA (InfoVQA) val: ANLS with the official threshold 0.5.

Reader: the official `infographicsVQA_val_v1.0_withQT.json` (`{"data": [{questionId, question,
image_local_name, answers[]}]}`) + images `image_dir/<image_local_name>` (default
`<dir>/infographicsvqa_images`), or lmms-eval's `lmms-lab/DocVQA` "InfographicVQA" parquet
(`questionId, question, answers, image`). Prompt: the question plus the short-answer suffix
(lmms-eval's `infovqa` prompt). Metric: `metrics.anls` per question (best reference; a
similarity under 0.5 counts 0), averaged, in percent.
"""
from __future__ import annotations

from typing import Any

from covipal_jax.eval import metrics as mt
from covipal_jax.eval.benchmarks import common as cm
from covipal_jax.eval.benchmarks.base import (Benchmark, BenchmarkData, Example, Malformed,
                                              ReadReport, collect, register)


def read_infovqa(path: str, image_dir: str | None = None, *, check_images: bool = True,
                 limit: int | None = None) -> BenchmarkData:
    """InfoVQA questions (see the module docstring)."""
    report = ReadReport("infovqa", path)
    image_dir = image_dir or cm.join(cm.dirname(path), "infographicsvqa_images")
    rows = cm.read_table(path, report)

    def convert(rec: dict[str, Any]) -> Example:
        qid = rec.get("questionId", rec.get("question_id"))
        q = rec.get("question")
        if qid is None or cm.is_missing(q):
            raise Malformed("missing questionId or question")
        answers = tuple(str(a) for a in cm.as_list(rec.get("answers")) or ())
        image = rec.get("image")
        if image is None or (not isinstance(image, dict) and cm.is_missing(image)):
            name = rec.get("image_local_name")
            if cm.is_missing(name):
                raise Malformed("no image or image_local_name")
            image = cm.path_image(image_dir, str(name), check_images)
        else:
            image = cm.coerce_image(image, image_dir, check_images)
        return Example(
            qid=str(qid), image=image, question=str(q),
            prompt=cm.short_answer_prompt(str(q)),
            answer=answers[0] if answers else None, answers=answers)

    return collect("infovqa", rows, convert, report, limit=limit)


def infovqa_metrics(records) -> dict[str, Any]:
    return mt.mean_metric(records, lambda r: mt.anls(
        r.get("pred") or "", r.get("answers") or [r["answer"]]),
        threshold=mt.ANLS_THRESHOLD)


BENCHMARK = register(Benchmark(
    name="infovqa", read=read_infovqa, score=infovqa_metrics,
    aliases=("infographicvqa", "infographics_vqa", "info_vqa"),
    protocol="InfoVQA: ANLS (%), threshold 0.5, best over the reference answers"))
