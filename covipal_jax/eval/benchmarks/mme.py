"""MME: yes/no questions, two per image; reported as perception (MME-P) AND total.

Reader: the `MME_Benchmark_release_version/` folder, one subfolder per task, holding either
per-image `<stem>.txt` (`question\\tanswer` lines) next to `<stem>.png|jpg`, or `images/` +
`questions_answers_YN/`; or `<task>/<task>.txt` with `image\\tquestion\\tanswer` lines (the
eval_tool layout). Or a flat table (TSV/CSV/JSONL/parquet, e.g. lmms-eval's `lmms-lab/MME`)
with `category, question, answer, image|image_path|question_id`.

Metric: the official `eval_tool/calculation.py`: an answer is "yes"/"no" when it is exactly
that, else the first 4 characters are searched for "yes", then "no", else "other". Per task
`acc` = % questions right, `acc+` = % images with both questions right, score = acc + acc+.
Perception = sum over the 10 perception tasks (max 2000), cognition over the 4 cognition tasks
(max 800), total = both (max 2800). Tables show both `mme_p` and `mme`.
"""
from __future__ import annotations

import collections
import os
from typing import Any

from covipal_jax.eval import metrics as mt
from covipal_jax.eval.benchmarks import common as cm
from covipal_jax.eval.benchmarks.base import (Benchmark, BenchmarkData, Example, ImageRef,
                                              Malformed, ReadReport, collect, register)

MME_PERCEPTION = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
    "artwork", "OCR",
)
MME_COGNITION = (
    "commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning",
)


def _qa_lines(txt: str, report: ReadReport, n_fields: int):
    for lineno, line in enumerate(cm.read_text(txt).splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < n_fields:
            report.bad(f"{os.path.basename(txt)}:{lineno}", f"expected {n_fields} tab fields")
            continue
        yield [x.strip() for x in fields[:n_fields]]


def _folder_rows(path: str, report: ReadReport, check: bool):
    """Rows `{task, image (ImageRef | error), key, question, answer}` of the release folder."""
    for task in cm.listdir(path):
        tdir = cm.join(path, task)
        if not cm.is_dir(tdir):
            continue
        summary_txt = cm.join(tdir, f"{task}.txt")
        if cm.is_file(summary_txt):  # eval_tool layout: image \t question \t answer
            img_dir = cm.join(tdir, "images") if cm.is_dir(cm.join(tdir, "images")) else tdir
            for name, q, a in _qa_lines(summary_txt, report, 3):
                yield dict(task=task, image=lambda d=img_dir, n=name: cm.path_image(d, n, check),
                           key=name, question=q, answer=a, where=f"{task}/{name}")
            continue
        if cm.is_dir(cm.join(tdir, "images")):
            img_dir = cm.join(tdir, "images")
            qa_dir = next((cm.join(tdir, d) for d in ("questions_answers_YN",
                                                      "questions_answer_YES_NO")
                           if cm.is_dir(cm.join(tdir, d))), tdir)
        else:
            img_dir = qa_dir = tdir
        for txt in cm.listdir(qa_dir):
            if not txt.endswith(".txt"):
                continue
            img_path = cm.find_image(img_dir, txt[:-4])
            if img_path is None:
                report.bad(f"{task}/{txt}", "no image with this stem")
                continue
            for q, a in _qa_lines(cm.join(qa_dir, txt), report, 2):
                yield dict(task=task, image=lambda p=img_path: ImageRef(path=p),
                           key=os.path.basename(img_path), question=q, answer=a,
                           where=f"{task}/{txt}")


def _table_rows(path: str, report: ReadReport, check: bool):
    rows = cm.read_table(path, report)
    by_index = cm.tsv_image_index(rows)
    base = cm.dirname(path)
    for i, row in enumerate(rows):
        # acc+ groups the two questions of one image: by image path / question_id, else by
        # the index an image cell refers to, else by the row's own index.
        ipath = row.get("image_path", row.get("question_id"))
        cell = row.get("image")
        if not cm.is_missing(ipath):
            key = os.path.basename(str(ipath))
        elif isinstance(cell, str) and cell.strip() in by_index:
            key = cell.strip()
        else:
            key = str(row.get("index", i))
        yield dict(task=row.get("category"), key=key, question=row.get("question"),
                   answer=row.get("answer"), where=row.get("index", i),
                   image=lambda r=row: cm.tsv_image(r, by_index, base, check))


def read_mme(path: str, *, check_images: bool = True, limit: int | None = None
             ) -> BenchmarkData:
    """MME (see the module docstring). `meta["image_key"]` groups an image's two questions."""
    report = ReadReport("mme", path)
    rows = (_table_rows if cm.is_table(path) else _folder_rows)(
        path, report, check_images)
    counts: collections.Counter = collections.Counter()

    def numbered(rows):
        for row in rows:  # qid = task/image/n: n counts an image's questions, bad ones too
            counts[(row["task"], row["key"])] += 1
            yield dict(row, n=counts[(row["task"], row["key"])] - 1)

    def convert(row: dict[str, Any]) -> Example:
        task, q, a = row["task"], row["question"], row["answer"]
        if cm.is_missing(task) or cm.is_missing(q) or cm.is_missing(a):
            raise Malformed("missing category/question/answer")
        ans = str(a).strip().lower()
        if ans not in ("yes", "no"):
            raise Malformed(f"MME answer must be yes/no, got {a!r}")
        task, key = str(task), row["key"]
        return Example(
            qid=f"{task}/{key}/{row['n']}", image=row["image"](), question=str(q),
            prompt=cm.short_answer_prompt(str(q)), answer=ans, answers=(ans,),
            meta={"category": task, "image_key": f"{task}/{key}"})

    return collect("mme", numbered(rows), convert, report, limit=limit,
                   where=lambda i, row: row["where"])


def mme_metrics(records) -> dict[str, Any]:
    recs, left_out = mt.scored(records)
    tasks: dict[str, list[bool]] = collections.defaultdict(list)
    images: dict[str, dict[str, list[bool]]] = collections.defaultdict(
        lambda: collections.defaultdict(list))
    for r in recs:
        task = mt.category(r)
        ok = mt.parse_mme_answer(r.get("pred") or "") == str(r["answer"]).strip().lower()
        tasks[task].append(ok)
        images[task][(r.get("meta") or {}).get("image_key", r["qid"])].append(ok)
    per_task = {}
    for task, oks in sorted(tasks.items()):
        acc = mt.pct(sum(oks), len(oks))
        acc_plus = mt.pct(sum(all(v) for v in images[task].values()), len(images[task]))
        per_task[task] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus,
                          "n": len(oks), "n_images": len(images[task])}
    lower = {t.lower(): s["score"] for t, s in per_task.items()}
    perception = sum(lower.get(t.lower(), 0.0) for t in MME_PERCEPTION)
    cognition = sum(lower.get(t.lower(), 0.0) for t in MME_COGNITION)
    known = {t.lower() for t in MME_PERCEPTION + MME_COGNITION}
    return {
        "score": perception + cognition, "total": perception + cognition,
        "perception": perception, "cognition": cognition, "tasks": per_task,
        "missing_tasks": [t for t in MME_PERCEPTION + MME_COGNITION if t.lower() not in lower],
        "unknown_tasks": sorted(t for t in per_task if t.lower() not in known),
        "n": len(recs), **left_out,
    }


PROTOCOLS = {
    "mme_p": "MME-P: perception = sum over the 10 perception tasks of acc + acc+ (max 2000)",
    "mme": "MME: total = perception + cognition, 14 tasks, acc + acc+ each (max 2800)",
}

BENCHMARK = register(Benchmark(
    name="mme", read=read_mme, score=mme_metrics, protocol=PROTOCOLS["mme"],
    columns=lambda m: {"mme_p": float(m["perception"]), "mme": float(m["total"])},
    column_protocols=PROTOCOLS))
