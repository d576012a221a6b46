"""AI2D test: diagram multiple choice; option accuracy.

Two accepted layouts:
* JSONL / JSON list / parquet (lmms-eval's `lmms-lab/ai2d`): `{"question_id"?, "image": path
  (relative to `image_dir`, default the file's folder), base64 or HF image cell, "question",
  "options": [...], "answer": index | letter | text}` (lmms-lab/ai2d has an index string).
* VLMEvalKit TSV (`AI2D_TEST.tsv`): `index, question, A..D, answer` (letter), `image`
  (base64), optional `category`.
"""
from __future__ import annotations

from typing import Any

from covipal_jax.eval import metrics as mt
from covipal_jax.eval.benchmarks import common as cm
from covipal_jax.eval.benchmarks.base import (Benchmark, BenchmarkData, Example, Malformed,
                                              ReadReport, collect, register)


def read_ai2d(path: str, image_dir: str | None = None, *, check_images: bool = True,
              limit: int | None = None) -> BenchmarkData:
    """AI2D questions (see the module docstring)."""
    report = ReadReport("ai2d", path)
    rows = cm.indexed(cm.read_table(path, report))
    by_index = cm.tsv_image_index(rows)
    base_dir = image_dir or cm.dirname(path)

    def convert(row: dict[str, Any]) -> Example:
        q = row.get("question")
        if cm.is_missing(q):
            raise Malformed("missing question")
        opts = cm.as_list(row.get("options"))
        options = tuple(str(o) for o in opts) if opts is not None else cm.table_options(row)
        if len(options) < 2:
            raise Malformed("fewer than 2 options")
        answer = cm.optional_letter(row, options)
        qid = row.get("question_id", row.get("index", row["_row"]))
        return Example(
            qid=str(qid), image=cm.tsv_image(row, by_index, base_dir, check_images),
            question=str(q), prompt=cm.mc_prompt(str(q), options), answer=answer,
            answers=() if answer is None else (answer,), options=options,
            meta={"category": row.get("category")} if row.get("category") else {},
        )

    return collect("ai2d", rows, convert, report, limit=limit)


BENCHMARK = register(Benchmark(
    name="ai2d", read=read_ai2d, score=mt.mc_metrics, multiple_choice=True,
    protocol="AI2D: option accuracy (%)"))
