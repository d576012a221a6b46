"""MMBench: multiple choice with CircularEval (a question counts only if every rotation of its
options is answered right).

Reader: OpenCompass / VLMEvalKit TSV (or lmms-eval's `lmms-lab/MMBench` parquet):
`index, question, hint, A..D, answer, category, l2-category, image` (base64; a short `image`
cell is the `index` of the row holding it). With `circular=True` every question yields one
example per rotation of its options (qid `<index>@<k>`, rotation 0 the original order);
TSVs that already hold the circular copies (`index + k * 1e6`) are grouped as they are. Rows
without an answer (test split) are kept with `answer=None`.
"""
from __future__ import annotations

import collections
from typing import Any

from covipal_jax.eval import metrics as mt
from covipal_jax.eval.benchmarks import common as cm
from covipal_jax.eval.benchmarks.base import (LETTERS, Benchmark, BenchmarkData, Example,
                                              Malformed, ReadReport, collect, register)

MMBENCH_CIRCULAR_OFFSET = 1_000_000  # OpenCompass circular copies: index + k * 1e6.


def read_mmbench(path: str, *, circular: bool = True, check_images: bool = True,
                 limit: int | None = None) -> BenchmarkData:
    """MMBench questions (see the module docstring)."""
    report = ReadReport("mmbench", path)
    rows = cm.read_table(path, report)
    by_index = cm.tsv_image_index(rows)
    base_dir = cm.dirname(path)
    indices = set()
    for r in rows:
        try:
            indices.add(int(float(r.get("index"))))
        except (TypeError, ValueError):
            pass
    pre_circular = any(i >= MMBENCH_CIRCULAR_OFFSET and i % MMBENCH_CIRCULAR_OFFSET in indices
                       for i in indices)

    def convert(row: dict[str, Any]) -> list[Example]:
        try:
            idx = int(float(row.get("index")))
        except (TypeError, ValueError) as e:
            raise Malformed(f"bad index: {e}") from e
        options = cm.table_options(row)
        if len(options) < 2:
            raise Malformed("fewer than 2 options")
        q = row.get("question")
        if cm.is_missing(q):
            raise Malformed("missing question")
        answer = cm.optional_letter(row, options)
        image = cm.tsv_image(row, by_index, base_dir, check_images)
        hint = None if cm.is_missing(row.get("hint")) else str(row["hint"])
        meta = {"category": row.get("category"),
                "l2_category": row.get("l2-category", row.get("l2_category"))}
        if pre_circular or not circular:
            base, rot = idx % MMBENCH_CIRCULAR_OFFSET, idx // MMBENCH_CIRCULAR_OFFSET
            shifts = [(rot, options, answer)]
        else:
            base, n = idx, len(options)
            shifts = [(k, options[k:] + options[:k],
                       None if answer is None else LETTERS[(LETTERS.index(answer) - k) % n])
                      for k in range(n)]
        return [Example(qid=f"{base}@{k}", image=image, question=str(q),
                        prompt=cm.mc_prompt(str(q), opts, hint=hint), answer=ans,
                        answers=() if ans is None else (ans,), options=tuple(opts),
                        meta=dict(meta, base_index=base, rotation=k))
                for k, opts, ans in shifts]

    return collect("mmbench", rows, convert, report, limit=limit)


def mmbench_metrics(records) -> dict[str, Any]:
    """CircularEval (all rotations right) and plain (rotation 0) accuracy, per category too."""
    recs, left_out = mt.scored(records)
    groups: dict[Any, list[bool]] = collections.defaultdict(list)
    first: dict[Any, Any] = {}
    plain_ok = []
    for r in recs:
        meta = r.get("meta") or {}
        base = meta.get("base_index", r["qid"])
        ok = mt.mc_choice(r) == r["answer"]
        groups[base].append(ok)
        first.setdefault(base, r)
        if meta.get("rotation", 0) == 0:
            plain_ok.append(ok)
    bases = sorted(groups, key=str)
    circ_ok = [all(groups[b]) for b in bases]
    circ = mt.pct(sum(circ_ok), len(bases))
    return {
        "score": circ, "circular": circ, "plain": mt.pct(sum(plain_ok), len(plain_ok)),
        "n_questions": len(bases), "n": len(recs), **left_out,
        "by_category": mt.by_category([first[b] for b in bases], circ_ok),
        "by_l2_category": mt.by_category([first[b] for b in bases], circ_ok, "l2_category"),
    }


BENCHMARK = register(Benchmark(
    name="mmbench", read=read_mmbench, score=mmbench_metrics, multiple_choice=True,
    aliases=("mmb",), protocol="MMBench: CircularEval accuracy (%)"))
