"""Helpers of the video benchmarks: video files, multiple-choice prompts, per-group accuracy.

Video examples hold a `VideoRef` (the file path); the harness hands `(VideoRef, prompt)` pairs
to `covipal_jax.eval.video.predict_video`, the one place where video prediction is wired.
"""
from __future__ import annotations

import collections
import os
import re
from collections.abc import Callable, Sequence
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


# ---------------------------------------------------------------------------- answer parsing
# lmms-eval's parsers of generated answers for these tasks (re-implemented, same rules):
# videomme `extract_characters_regex`, mvbench `mcq_acc.process`, nextqa
# `parse_multi_choice_response` (MMMU's). One difference: where lmms-eval's NExT-QA parser
# finds no letter it picks a random one; here the answer counts as unparsed (wrong).
_VIDEOMME_PREFIXES = ("The best answer is", "The correct answer is", "The answer is",
                      "The answer", "The best option isThe correct option is",
                      "Best answer:Best option:")  # (sic: lmms-eval's list lacks two commas)
_MV_OPTION = re.compile(r"^([A-E])\.\s*(.+)$", re.IGNORECASE)
_MV_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_MV_COMMA = re.compile(r"(\d)(\,)(\d)")
_MV_PUNCT = (";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
             "@", "`", ",", "?", "!")


def videomme_letter(pred: str, options: Sequence[str] = ()) -> str | None:
    """lmms-eval `videomme` (`extract_characters_regex`): drop the answer phrases, then the
    first A-D anywhere ("" when a long answer (> 10 words) has none)."""
    del options
    s = str(pred).strip()
    for prefix in _VIDEOMME_PREFIXES:
        s = s.replace(prefix, "")
    m = re.search(r"[ABCD]", s)
    return m.group(0) if m else None


def mvbench_letter(pred: str, options: Sequence[str] = ()) -> str | None:
    """lmms-eval `mvbench` (`mcq_acc.process`): "X. text" -> X; else punctuation stripped,
    lower-cased, the first standalone a-e word."""
    del options
    m = _MV_OPTION.match(str(pred).strip())
    if m:
        return m.group(1).upper()
    s = str(pred).replace("\n", " ").replace("\t", " ").strip()
    out = s
    for p in _MV_PUNCT:
        if (p + " " in s or " " + p in s) or _MV_COMMA.search(s) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    s = _MV_PERIOD.sub("", out).strip("'").strip('"').strip(")").strip("(").strip().lower()
    m = re.search(r"\b([A-E])\b", s, re.IGNORECASE)
    return m.group(1).upper() if m else None


def nextqa_letter(pred: str, options: Sequence[str]) -> str | None:
    """lmms-eval `nextqa_mc` (`parse_multi_choice_response`): "(X)", then "X ", then "X.",
    then (answers over 5 words) the option texts; several candidates: the last one."""
    choices = LETTERS[:len(options)]
    s = str(pred)
    for ch in (",", ".", "!", "?", ";", ":", "'"):
        s = s.strip(ch)
    s = f" {s} "
    cands = [c for c in choices if f"({c})" in s]
    bracket, by_index = bool(cands), True
    if not cands:
        cands = [c for c in choices if f"{c} " in s]
    if not cands:
        cands = [c for c in choices if f"{c}." in s]
    if not cands and len(s.split()) > 5:
        cands = [c for c, o in zip(choices, options) if str(o).strip().lower() in s.lower()]
        by_index = False
    if not cands:
        return None
    if len(cands) == 1:
        return cands[0]
    if by_index:
        where = [s.rfind(f"({c})" if bracket else f" {c} ") for c in cands]
    else:
        where = [s.lower().rfind(str(options[LETTERS.index(c)]).strip().lower()) for c in cands]
    return cands[max(range(len(cands)), key=lambda i: (where[i], -i))]


def record_choice(r: Any, parse: Callable[[str, Sequence[str]], str | None] | None) -> str | None:
    """The record's letter: its `choice` (option scoring), else `parse(pred, options)` (None:
    the harness's generic `metrics.extract_choice`)."""
    if r.get("choice") or parse is None:
        return mt.mc_choice(r)
    return parse(r.get("pred") or "", tuple(r.get("options") or ()))


def group_accuracy(records: Sequence[Any], groups: dict[str, Sequence[str]] | None = None,
                   key: str = "category",
                   parse: Callable[[str, Sequence[str]], str | None] | None = None
                   ) -> dict[str, Any]:
    """Option accuracy (`score`) plus accuracy per `meta[key]` and per named group of
    categories (`groups`: {group: categories}); `task_mean` = mean of per-category accuracies.
    Letters come from `parse` (one of the parsers above) unless a record has a `choice`."""
    recs, left_out = mt.scored(records)
    choices = [record_choice(r, parse) for r in recs]
    tot: collections.Counter = collections.Counter()
    hit: collections.Counter = collections.Counter()
    for r, c in zip(recs, choices):
        cat = mt.category(r, key)
        tot[cat] += 1
        hit[cat] += int(c is not None and c == r["answer"])
    acc = mt.pct(sum(hit.values()), len(recs))
    m: dict[str, Any] = {"score": acc, "accuracy": acc, "n": len(recs), **left_out,
                         "unparsed": sum(c is None for c in choices)}
    per = {k: mt.pct(hit[k], tot[k]) for k in sorted(tot)}
    m[f"by_{key}"] = per
    m["task_mean"] = sum(per.values()) / len(per) if per else 0.0
    for g, cats in (groups or {}).items():
        n = sum(tot[c] for c in cats)
        m[g] = mt.pct(sum(hit[c] for c in cats), n) if n else None
    return m
