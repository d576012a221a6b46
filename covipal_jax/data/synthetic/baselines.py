"""Image-free baselines of the synthetic VQA task: uniform chance and the per-type majority answer."""
from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from covipal_jax.data.synthetic.config import SyntheticConfig, qtype_probs
from covipal_jax.data.synthetic.vocab import answers_for


def chance_accuracy(cfg: SyntheticConfig | None = None, split: str = "test") -> dict[str, float]:
    """Expected accuracy of a uniform guess among each question type's answer words.

    Also ``"overall"``: the mean over types weighted by `qtype_weights`.
    """
    cfg = cfg or SyntheticConfig()
    out = {q: 1.0 / len(answers_for(q, cfg, split)) for q in cfg.qtypes}
    w = qtype_probs(cfg)
    out["overall"] = float(sum(p * out[q] for q, p in zip(cfg.qtypes, w)))
    return out


def majority_baseline(
    train: Iterable[Mapping[str, Any]], evaluation: Iterable[Mapping[str, Any]]
) -> dict[str, float]:
    """Accuracy on `evaluation` of answering each qtype with its most frequent `train` answer.

    A blind (image-free, question-type-only) baseline; ``"overall"`` is the plain mean over
    `evaluation` examples. Types missing from `train` count as wrong.
    """
    freq: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for ex in train:
        freq[_s(ex["qtype"])][_s(ex["answer"])] += 1
    best = {q: c.most_common(1)[0][0] for q, c in freq.items()}
    hits: dict[str, list[bool]] = collections.defaultdict(list)
    for ex in evaluation:
        q = _s(ex["qtype"])
        hits[q].append(best.get(q) == _s(ex["answer"]))
    out = {q: float(np.mean(h)) for q, h in hits.items()}
    allh = [x for h in hits.values() for x in h]
    out["overall"] = float(np.mean(allh)) if allh else 0.0
    return out


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)
