"""Helpers of the video benchmarks: video files, multiple-choice prompts, per-group accuracy.

Video examples hold a `VideoRef` (the file path); the harness hands `(VideoRef, prompt)` pairs
to `covipal_jax.eval.video.predict_video`, the one place where video prediction is wired.
"""
from __future__ import annotations

import collections
import os
from collections.abc import Sequence
from typing import Any

from covipal_jax.eval import metrics as mt
from covipal_jax.eval.benchmarks import common as cm
from covipal_jax.eval.benchmarks.base import LETTERS, Malformed, VideoRef

VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".avi", ".mov")


def video_ref(directory: str, name: str, check: bool) -> VideoRef:
    """`directory/name` (or `name.<ext>` when `name` has no video extension)."""
    if os.path.splitext(name)[1].lower() in VIDEO_EXTS or not check:
        path = cm.join(directory, name) if directory else name
        if check and not (cm.is_file(path) or cm.is_dir(path)):  # frame folders are dirs
            raise Malformed(f"video not found: {path}")
        return VideoRef(path=path)
    for ext in VIDEO_EXTS:
        path = cm.join(directory, name + ext)
        if cm.is_file(path):
            return VideoRef(path=path)
    path = cm.join(directory, name)
    if cm.is_dir(path):
        return VideoRef(path=path)
    raise Malformed(f"video not found: {path}.*")


def strip_letter(option: str, i: int) -> str:
    """"A. cat" / "(A) cat" -> "cat" when the option is already lettered as the i-th."""
    s = str(option).strip()
    for prefix in (f"{LETTERS[i]}. ", f"({LETTERS[i]}) ", f"{LETTERS[i]}."):
        if s.startswith(prefix):
            return s[len(prefix):].strip()
    return s


def group_accuracy(records: Sequence[Any], groups: dict[str, Sequence[str]] | None = None,
                   key: str = "category") -> dict[str, Any]:
    """Option accuracy (`score`) plus accuracy per `meta[key]` and per named group of
    categories (`groups`: {group: categories}); `task_mean` = mean of per-category accuracies."""
    m = mt.mc_metrics(records)
    recs, _ = mt.scored(records)
    tot: collections.Counter = collections.Counter()
    hit: collections.Counter = collections.Counter()
    for r in recs:
        cat = mt.category(r, key)
        tot[cat] += 1
        hit[cat] += int(mt.mc_choice(r) == r["answer"])
    per = {k: mt.pct(hit[k], tot[k]) for k in sorted(tot)}
    m[f"by_{key}"] = per
    m["task_mean"] = sum(per.values()) / len(per) if per else 0.0
    for g, cats in (groups or {}).items():
        n = sum(tot[c] for c in cats)
        m[g] = mt.pct(sum(hit[c] for c in cats), n) if n else None
    return m
