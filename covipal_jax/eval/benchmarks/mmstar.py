"""MMStar: multiple choice with the options inline in the question; option accuracy.

Reader: VLMEvalKit TSV (or lmms-eval's `Lin-Chen/MMStar` parquet): `index, question` (options
inline: "Options: A: ..., B: ..."), `answer` (letter), `category`, `l2_category`, `image`
(base64); `A..D` columns are used when present. The prompt is the question as given plus
`MC_SUFFIX` (lmms-eval / VLMEvalKit).
"""
from __future__ import annotations

import re
from typing import Any

from covipal_jax.eval import metrics as mt
from covipal_jax.eval.benchmarks import common as cm
from covipal_jax.eval.benchmarks.base import (LETTERS, MC_SUFFIX, Benchmark, BenchmarkData,
                                              Example, Malformed, ReadReport, collect, register)

_OPTION_MARK = re.compile(r"(?:^|[\s,])([A-F])\s*[:\.]\s*")


def parse_inline_options(question: str) -> tuple[str, ...]:
    """`... Options: A: x, B: y, C: z` -> ("x", "y", "z") (MMStar's inline format)."""
    m = re.search(r"Options?\s*:\s*(.*)$", question, flags=re.S)
    if not m:
        return ()
    text = m.group(1)
    marks = list(_OPTION_MARK.finditer(text))
    letters = [mk.group(1) for mk in marks]
    if not letters or letters != list(LETTERS[:len(letters)]):
        return ()
    opts = []
    for j, mk in enumerate(marks):
        end = marks[j + 1].start() if j + 1 < len(marks) else len(text)
        opts.append(text[mk.end():end].strip().rstrip(",").strip())
    return tuple(opts)


def read_mmstar(path: str, *, check_images: bool = True, limit: int | None = None
                ) -> BenchmarkData:
    """MMStar questions (see the module docstring)."""
    report = ReadReport("mmstar", path)
    rows = cm.indexed(cm.read_table(path, report))
    by_index = cm.tsv_image_index(rows)

    def convert(row: dict[str, Any]) -> Example:
        q = row.get("question")
        if cm.is_missing(q):
            raise Malformed("missing question")
        q = str(q)
        options = cm.table_options(row)
        inline = parse_inline_options(q)
        prompt = (f"{q.strip()}\n{MC_SUFFIX}" if inline or not options
                  else cm.mc_prompt(q, options))
        options = options or inline
        answer = cm.optional_letter(row, options)
        return Example(
            qid=str(row.get("index", row["_row"])),
            image=cm.tsv_image(row, by_index, cm.dirname(path), check_images),
            question=q, prompt=prompt, answer=answer,
            answers=() if answer is None else (answer,), options=options,
            meta={"category": row.get("category"),
                  "l2_category": row.get("l2_category", row.get("l2-category"))},
        )

    return collect("mmstar", rows, convert, report, limit=limit)


BENCHMARK = register(Benchmark(
    name="mmstar", read=read_mmstar, score=mt.mc_metrics, multiple_choice=True,
    protocol="MMStar: option accuracy (%)"))
