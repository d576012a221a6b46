"""ScienceQA-IMG: multiple choice, only the questions with an image; option accuracy.

Reader: a folder with `problems.json` and `pid_splits.json`; images
`<image_dir>/<split>/<pid>/<problem.image>` (default `<path>/images`). The hint is prefixed
`Context: ` (LLaVA-1.5's prompt). Questions without an image are counted as filtered.
"""
from __future__ import annotations

from typing import Any

from covipal_jax.eval import metrics as mt
from covipal_jax.eval.benchmarks import common as cm
from covipal_jax.eval.benchmarks.base import (Benchmark, BenchmarkData, Example, Malformed,
                                              ReadReport, Skip, collect, register)


def read_scienceqa(path: str, image_dir: str | None = None, *, split: str = "test",
                   check_images: bool = True, limit: int | None = None) -> BenchmarkData:
    """ScienceQA-IMG questions of `split` (see the module docstring)."""
    report = ReadReport("scienceqa", path)
    image_dir = image_dir or cm.join(path, "images")
    problems = cm.read_json(cm.join(path, "problems.json"))
    pids = cm.read_json(cm.join(path, "pid_splits.json"))[split]

    def convert(pid: Any) -> Example:
        prob = problems.get(str(pid))
        if not isinstance(prob, dict):
            raise Malformed("pid not in problems.json")
        if not prob.get("image"):
            raise Skip("no image")
        choices = tuple(str(c) for c in prob.get("choices") or ())
        if len(choices) < 2:
            raise Malformed("fewer than 2 choices")
        answer = cm.letter_answer(prob.get("answer"), choices)
        question = str(prob["question"])
        return Example(
            qid=str(pid),
            image=cm.path_image(cm.join(image_dir, split, str(pid)), prob["image"],
                                check_images),
            question=question,
            prompt=cm.mc_prompt(question, choices, hint=prob.get("hint") or "",
                                hint_prefix="Context: "),
            answer=answer, answers=(answer,), options=choices,
            meta={k: prob.get(k) for k in ("subject", "topic", "category", "grade")
                  if prob.get(k) is not None},
        )

    return collect("scienceqa", pids, convert, report, limit=limit, where=lambda i, pid: pid)


BENCHMARK = register(Benchmark(
    name="scienceqa", read=read_scienceqa, score=mt.mc_metrics, multiple_choice=True,
    aliases=("sqa", "scienceqa_img", "sqa_img"),
    protocol="ScienceQA-IMG: option accuracy (%), questions with an image"))
