"""Video-MME without subtitles: multiple choice, accuracy overall and per duration.

Reader: lmms-eval's `lmms-lab/Video-MME` parquet (or a JSON / JSONL / TSV export) with
`videoID, duration (short|medium|long), domain, sub_category, task_type, question_id,
question, options ["A. ...", ...], answer (letter)`; videos `video_dir/<videoID>.mp4`
(default `<dir>/data`). Prompt (lmms-eval's `videomme`, no subtitles): its instruction line,
the question, the lettered options, and `MC_SUFFIX`. Metric: option accuracy, the letter parsed from the answer as lmms-eval's
`videomme` does (`video_common.videomme_letter`); `short`,
`medium`, `long` per duration; per task type in `by_task_type`.
"""
from __future__ import annotations

from typing import Any

from covipal_jax.eval.benchmarks import common as cm
from covipal_jax.eval.benchmarks import video_common as vc
from covipal_jax.eval.benchmarks.base import (MC_SUFFIX, Benchmark, BenchmarkData, Example,
                                              Malformed, ReadReport, Skip, collect,
                                              register)

DURATIONS = ("short", "medium", "long")
INSTRUCTION = ("Select the best answer to the following multiple-choice question based on "
               "the video and the subtitles. Respond with only the letter (A, B, C, or D) of "
               "the correct option.")
INSTRUCTION_NO_SUBS = INSTRUCTION.replace(" and the subtitles", "")


def read_videomme(path: str, video_dir: str | None = None, *, check_videos: bool = True,
                  durations=DURATIONS, limit: int | None = None) -> BenchmarkData:
    """Video-MME questions (see the module docstring)."""
    report = ReadReport("videomme", path)
    video_dir = video_dir or cm.join(cm.dirname(path), "data")
    rows = cm.read_table(path, report)

    def convert(rec: dict[str, Any]) -> Example:
        duration = str(rec.get("duration", "")).lower()
        if duration not in DURATIONS:
            raise Malformed(f"duration must be one of {DURATIONS}, got {duration!r}")
        if duration not in durations:
            raise Skip(f"duration {duration}")
        opts = cm.as_list(rec.get("options")) or []
        options = tuple(vc.strip_letter(o, i) for i, o in enumerate(opts))
        if len(options) < 2 or cm.is_missing(rec.get("question")):
            raise Malformed("missing question or options")
        answer = cm.optional_letter(rec, options)
        vid = rec.get("videoID", rec.get("video_id"))
        if cm.is_missing(vid):
            raise Malformed("missing videoID")
        q = str(rec["question"])
        prompt = "\n".join([INSTRUCTION_NO_SUBS, q.strip(),
                            *(f"{cm.LETTERS[i]}. {o}" for i, o in enumerate(options)),
                            MC_SUFFIX])
        return Example(
            qid=str(rec.get("question_id")), image=vc.video_ref(video_dir, str(vid),
                                                                check_videos),
            question=q, prompt=prompt, answer=answer,
            answers=() if answer is None else (answer,), options=options,
            meta={"category": duration, "task_type": rec.get("task_type"),
                  "domain": rec.get("domain")})

    return collect("videomme", rows, convert, report, limit=limit)


def videomme_metrics(records) -> dict[str, Any]:
    m = vc.group_accuracy(records, {d: (d,) for d in DURATIONS}, parse=vc.videomme_letter)
    m["by_duration"] = m.pop("by_category")
    m["by_task_type"] = vc.group_accuracy(records, key="task_type",
                                          parse=vc.videomme_letter)["by_task_type"]
    return m


BENCHMARK = register(Benchmark(
    name="videomme", read=read_videomme, score=videomme_metrics, multiple_choice=True,
    kind="video", aliases=("video_mme",),
    protocol="Video-MME (w/o subtitles): option accuracy (%), overall; short/medium/long "
             "in the metrics",
    columns=lambda m: {"videomme": m["score"], **{f"videomme_{d}": m[d] for d in DURATIONS
                                                 if m.get(d) is not None}},
    column_protocols={"videomme": "Video-MME (w/o subs): option accuracy (%), all durations",
                      **{f"videomme_{d}": f"Video-MME (w/o subs): accuracy (%), {d} videos"
                         for d in DURATIONS}}))
