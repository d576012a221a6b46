"""SEED-Bench(-1), image questions: option accuracy (+ per question type).

Reader: `SEED-Bench.json` (`{"questions": [...], "question_type": {name: id}}`) + images
`image_dir/<data_id>` (default `<dir>/SEED-Bench-image`); or lmms-eval's `lmms-lab/SEED-Bench`
parquet (`question_id, question, choice_a..d, answer, data_type, question_type_id, image`).
Only `data_type == "image"` (14,233 questions); video questions are counted as filtered.
"""
from __future__ import annotations

from typing import Any

from covipal_jax.eval import metrics as mt
from covipal_jax.eval.benchmarks import common as cm
from covipal_jax.eval.benchmarks.base import (Benchmark, BenchmarkData, Example, Malformed,
                                              ReadReport, Skip, collect, register)


def read_seed(path: str, image_dir: str | None = None, *, check_images: bool = True,
              limit: int | None = None) -> BenchmarkData:
    """SEED-Bench image questions (see the module docstring)."""
    report = ReadReport("seed", path)
    image_dir = image_dir or cm.join(cm.dirname(path), "SEED-Bench-image")
    if path.endswith(".json"):
        data = cm.read_json(path)
    else:
        data = cm.read_table(path, report)
    questions = cm.indexed(data["questions"] if isinstance(data, dict) else data)
    type_names = {v: k for k, v in (data.get("question_type") or {}).items()} if isinstance(
        data, dict) else {}

    def convert(rec: dict[str, Any]) -> Example:
        if rec.get("data_type", "image") != "image":
            raise Skip(f"data_type {rec.get('data_type')}")
        options = tuple(str(rec.get(f"choice_{c}", "")) for c in "abcd")
        if any(cm.is_missing(o) for o in options):
            raise Malformed("missing choice_a..choice_d")
        answer = cm.letter_answer(rec.get("answer"), options)
        q = rec.get("question")
        image = rec.get("image")
        if image is None or (isinstance(image, list) and not image):
            if cm.is_missing(rec.get("data_id")):
                raise Malformed("missing data_id")
            image = cm.path_image(image_dir, str(rec["data_id"]), check_images)
        else:
            image = cm.coerce_image(image[0] if isinstance(image, list) else image, image_dir,
                                    check_images)
        if cm.is_missing(q):
            raise Malformed("missing question")
        qtype = rec.get("question_type_id")
        return Example(
            qid=str(rec.get("question_id", rec["_row"])), image=image,
            question=str(q), prompt=cm.mc_prompt(str(q), options), answer=answer,
            answers=(answer,), options=options,
            meta={"category": type_names.get(qtype, str(qtype))},
        )

    return collect("seed", questions, convert, report, limit=limit)


BENCHMARK = register(Benchmark(
    name="seed", read=read_seed, score=mt.mc_metrics, multiple_choice=True,
    aliases=("seedbench", "seed_bench", "seed_img"),
    protocol="SEED-Bench (image): option accuracy (%)"))
