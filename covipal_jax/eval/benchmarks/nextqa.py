"""NExT-QA multiple choice (5 options): accuracy overall and per question group.

Reader: the official `val.csv` / `test.csv` (or lmms-eval's `lmms-lab/NExTQA` MC parquet):
`video, question, answer (index 0-4), qid, type, a0..a4`; videos `video_dir/<video>.mp4`, or
through `map_vid_vidorID.json` (`{video: "1025/xxxx"}`) when it sits in `video_dir` (default
`<dir>/NExTVideo`). Metric: option accuracy (letters parsed as lmms-eval's
`nextqa_mc` does: `video_common.nextqa_letter`); `causal` (CW, CH), `temporal` (TN, TC, TP),
`descriptive` (DC, DL, DO) group accuracies, per type in `by_category`.
"""
from __future__ import annotations

from typing import Any

from covipal_jax.eval.benchmarks import common as cm
from covipal_jax.eval.benchmarks import video_common as vc
from covipal_jax.eval.benchmarks.base import (Benchmark, BenchmarkData, Example, Malformed,
                                              ReadReport, collect, register)

GROUPS = {"causal": ("CW", "CH"), "temporal": ("TN", "TC", "TP"),
          "descriptive": ("DC", "DL", "DO")}


def read_nextqa(path: str, video_dir: str | None = None, *, check_videos: bool = True,
                limit: int | None = None) -> BenchmarkData:
    """NExT-QA MC questions (see the module docstring)."""
    report = ReadReport("nextqa", path)
    video_dir = video_dir or cm.join(cm.dirname(path), "NExTVideo")
    mapping_file = cm.join(video_dir, "map_vid_vidorID.json")
    mapping = cm.read_json(mapping_file) if cm.is_file(mapping_file) else {}
    rows = cm.read_table(path, report)

    def convert(rec: dict[str, Any]) -> Example:
        options = tuple(str(rec.get(f"a{i}", "")).strip() for i in range(5))
        if any(cm.is_missing(o) for o in options) or cm.is_missing(rec.get("question")):
            raise Malformed("missing question or a0..a4")
        answer = cm.optional_letter(rec, options)
        video = str(rec.get("video", "")).strip()
        if not video:
            raise Malformed("missing video")
        if video.endswith(".0"):  # pandas read the id as a float
            video = video[:-2]
        q = str(rec["question"]).strip()
        q = q if q.endswith("?") else q + "?"
        return Example(
            qid=f"{video}_{rec.get('qid')}",
            image=vc.video_ref(video_dir, mapping.get(video, video), check_videos),
            question=q, prompt=cm.mc_prompt(q, options), answer=answer,
            answers=() if answer is None else (answer,), options=options,
            meta={"category": str(rec.get("type"))})

    return collect("nextqa", rows, convert, report, limit=limit)


def nextqa_metrics(records) -> dict[str, Any]:
    return vc.group_accuracy(records, GROUPS, parse=vc.nextqa_letter)


BENCHMARK = register(Benchmark(
    name="nextqa", read=read_nextqa, score=nextqa_metrics, multiple_choice=True, kind="video",
    aliases=("next_qa", "nextqa_mc"), protocol="NExT-QA (MC, 5 options): option accuracy (%)"))
