"""Per-duration (Video-MME), per-task (MVBench) and per-question-type (NExT-QA) tables.

Built from every `<out>/<method>_k<k>/<benchmark>.jsonl.metrics.json` a run wrote (so resumed
and merged runs show up), one markdown table per video benchmark: a row per group, a column per
(method, k), the benchmark's headline score last. Written to `<out>/video_breakdown.md`.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from covipal_jax import paths, pruning
from covipal_jax.eval.benchmarks import mvbench, nextqa, videomme

log = logging.getLogger("covipal_jax.eval")


def groups(benchmark: str, metrics: Mapping[str, Any]) -> dict[str, float | None]:
    """{row label: accuracy} of one benchmark's metrics (headline score last)."""
    if benchmark == "videomme":
        rows = {d: metrics.get(d) for d in videomme.DURATIONS}
        rows["overall"] = metrics.get("score")
    elif benchmark == "mvbench":
        per = metrics.get("by_category") or {}
        rows = {t: per.get(t) for t in mvbench.TASKS}
        rows["mean over tasks"] = metrics.get("score")
        rows["overall (per question)"] = metrics.get("overall")
    elif benchmark == "nextqa":
        rows = {g: metrics.get(g) for g in nextqa.GROUPS}
        rows.update({f"  {t}": v for t, v in sorted((metrics.get("by_category") or {}).items())})
        rows["overall"] = metrics.get("score")
    else:
        raise ValueError(f"no breakdown table for {benchmark!r}")
    return rows


def collect(out: str, benchmark: str) -> dict[str, dict[str, Any]]:
    """{"<method>_k<k>": metrics} for one benchmark under `out`."""
    found = {}
    for f in sorted(paths.as_path(out).glob(f"*/{benchmark}.jsonl.metrics.json")):
        try:
            found[f.parent.name] = json.loads(f.read_text())
        except json.JSONDecodeError:
            log.warning("%s: unreadable metrics file, ignored", f)
    return found


def table(benchmark: str, runs: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown: a row per group, a column per run ("–" where a group has no question)."""
    unpruned = f"{pruning.NoneMethod.name}_k"
    labels = sorted(runs, key=lambda r: (not r.startswith(unpruned), r))
    per = {r: groups(benchmark, runs[r]) for r in labels}
    rows = list(next(iter(per.values()))) if per else []
    lines = [f"| {benchmark} | " + " | ".join(labels) + " |", "|" + "---|" * (len(labels) + 1)]
    for g in rows:
        cells = ["–" if per[r].get(g) is None else f"{per[r][g]:.2f}" for r in labels]
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    n = [str(runs[r].get("n", "?")) for r in labels]
    lines.append("| questions | " + " | ".join(n) + " |")
    return "\n".join(lines) + "\n"


def write(out: str, benchmarks: Sequence[str]) -> str:
    """The breakdown tables of `benchmarks` (those with results), also written to
    `<out>/video_breakdown.md`; returns the markdown."""
    parts = []
    for b in benchmarks:
        runs = collect(out, b)
        if runs:
            parts.append(table(b, runs))
    md = "\n".join(parts)
    if md:
        paths.write_atomic(paths.as_path(out) / "video_breakdown.md",
                           "Video benchmarks: accuracy (%) per group, per (method, k).\n\n" + md)
    return md
