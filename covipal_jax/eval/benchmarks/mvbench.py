"""MVBench: 20 temporal tasks, multiple choice; accuracy per task and their mean.

Reader: the official release folder: `json/<task>.json` (lists of `{video, question,
candidates[], answer (candidate text), [start, end]}`) + videos under
`video_dir/<task's prefix>/<video>` (default `<path>/video`), with the 20 tasks' files and
prefixes of the official `mvbench.ipynb` (`TASKS` below). Prompt: the official system line
(as a hint), the question, lettered options, `MC_SUFFIX`. Metric: option accuracy per task (letters
parsed as lmms-eval's `mvbench` does: `video_common.mvbench_letter`),
`score` = the mean over the tasks present (each has 200 questions), plus the overall accuracy.
"""
from __future__ import annotations

from typing import Any

from covipal_jax.eval.benchmarks import common as cm
from covipal_jax.eval.benchmarks import video_common as vc
from covipal_jax.eval.benchmarks.base import (Benchmark, BenchmarkData, Example, Malformed,
                                              ReadReport, collect, register)

# task: (json file, video prefix, bound (start/end used))
TASKS = {
    "Action Sequence": ("action_sequence.json", "star/Charades_v1_480/", True),
    "Action Prediction": ("action_prediction.json", "star/Charades_v1_480/", True),
    "Action Antonym": ("action_antonym.json", "ssv2_video/", False),
    "Fine-grained Action": ("fine_grained_action.json", "Moments_in_Time_Raw/videos/", False),
    "Unexpected Action": ("unexpected_action.json", "FunQA_test/test/", False),
    "Object Existence": ("object_existence.json", "clevrer/video_validation/", False),
    "Object Interaction": ("object_interaction.json", "star/Charades_v1_480/", True),
    "Object Shuffle": ("object_shuffle.json", "perception/videos/", False),
    "Moving Direction": ("moving_direction.json", "clevrer/video_validation/", False),
    "Action Localization": ("action_localization.json", "sta/sta_video/", True),
    "Scene Transition": ("scene_transition.json", "scene_qa/video/", False),
    "Action Count": ("action_count.json", "perception/videos/", False),
    "Moving Count": ("moving_count.json", "clevrer/video_validation/", False),
    "Moving Attribute": ("moving_attribute.json", "clevrer/video_validation/", False),
    "State Change": ("state_change.json", "perception/videos/", False),
    "Fine-grained Pose": ("fine_grained_pose.json", "nturgbd/", False),
    "Character Order": ("character_order.json", "perception/videos/", False),
    "Egocentric Navigation": ("egocentric_navigation.json", "vlnqa/", False),
    "Episodic Reasoning": ("episodic_reasoning.json", "tvqa/frames_fps3_hq/", True),
    "Counterfactual Inference": ("counterfactual_inference.json", "clevrer/video_validation/",
                                 False),
}
SYSTEM = ("Carefully watch the video and pay attention to the cause and sequence of events, "
          "the detail and movement of objects, and the action and pose of persons. Based on "
          "your observations, select the best option that accurately addresses the question.")


def read_mvbench(path: str, video_dir: str | None = None, *, tasks=tuple(TASKS),
                 check_videos: bool = True, limit: int | None = None) -> BenchmarkData:
    """MVBench questions of `tasks` (see the module docstring); `limit` is per task."""
    report = ReadReport("mvbench", path)
    video_dir = video_dir or cm.join(path, "video")
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown MVBench tasks {unknown}; known: {sorted(TASKS)}")
    rows: list[dict[str, Any]] = []
    for task in tasks:
        file, prefix, bound = TASKS[task]
        jpath = cm.join(path, "json", file)
        if not cm.is_file(jpath):
            report.skip(f"no file for task {task}")
            continue
        recs = cm.read_json(jpath)
        rows += [dict(r, _task=task, _j=j, _prefix=prefix, _bound=bound)
                 for j, r in enumerate(recs[:limit] if limit else recs) if isinstance(r, dict)]
        report.malformed += sum(not isinstance(r, dict) for r in recs)

    def convert(rec: dict[str, Any]) -> Example:
        cands = tuple(str(c) for c in cm.as_list(rec.get("candidates")) or ())
        if len(cands) < 2 or cm.is_missing(rec.get("question")) or cm.is_missing(
                rec.get("video")):
            raise Malformed("missing question, video or candidates")
        answer = cm.optional_letter(rec, cands)
        task = rec["_task"]
        meta = {"category": task}
        if rec["_bound"] and rec.get("start") is not None:
            meta.update(start=float(rec["start"]), end=float(rec["end"]))
        return Example(
            qid=f"{task}/{rec['_j']}",
            image=vc.video_ref(cm.join(video_dir, rec["_prefix"]), str(rec["video"]),
                               check_videos),
            question=str(rec["question"]),
            prompt=cm.mc_prompt(str(rec["question"]), cands, hint=SYSTEM),
            answer=answer, answers=() if answer is None else (answer,), options=cands,
            meta=meta)

    return collect("mvbench", rows, convert, report,
                   where=lambda i, r: f"{r.get('_task')}/{r.get('_j')}")


def mvbench_metrics(records) -> dict[str, Any]:
    m = vc.group_accuracy(records, parse=vc.mvbench_letter)
    m["overall"] = m["score"]
    m["score"] = m["task_mean"]
    m["missing_tasks"] = sorted(set(TASKS) - set(m["by_category"]))
    return m


BENCHMARK = register(Benchmark(
    name="mvbench", read=read_mvbench, score=mvbench_metrics, multiple_choice=True,
    kind="video", protocol="MVBench: mean over the 20 tasks of option accuracy (%)"))
