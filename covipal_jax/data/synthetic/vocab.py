"""Words of the synthetic VQA task: answer lists, the question vocabulary, held-out combinations."""
from __future__ import annotations

import numpy as np

from covipal_jax.data.synthetic.config import (
    NUMBER_WORDS,
    RELATION_PHRASES,
    SyntheticConfig,
    counts_for,
)


def count_word(n: int) -> str:
    return NUMBER_WORDS[n]


def answers_for(qtype: str, cfg: SyntheticConfig, split: str = "train") -> list[str]:
    """Possible answers of one question type (`split="test"` drops a count of zero)."""
    if qtype == "color":
        return list(cfg.colors)
    if qtype == "shape":
        return list(cfg.shapes)
    if qtype in ("exist", "position"):
        return ["yes", "no"]
    if qtype == "count":
        return [count_word(n) for n in counts_for(split, cfg)]
    raise ValueError(qtype)


def answer_set(cfg: SyntheticConfig | None = None) -> list[str]:
    """All answer words of the configured question types, in a fixed order."""
    cfg = cfg or SyntheticConfig()
    out: list[str] = []
    for q in cfg.qtypes:
        for a in answers_for(q, cfg):
            if a not in out:
                out.append(a)
    return out


def _template_fills(cfg: SyntheticConfig) -> dict[str, list[str]]:
    return {
        "shape": list(cfg.shapes),
        "color": list(cfg.colors),
        "shape2": list(cfg.shapes),
        "color2": list(cfg.colors),
        "rel": [RELATION_PHRASES[r] for r in cfg.relations],
    }


def vocabulary(cfg: SyntheticConfig | None = None) -> list[str]:
    """Every whitespace-separated word of any question or answer, sorted (no special tokens)."""
    cfg = cfg or SyntheticConfig()
    fills = _template_fills(cfg)
    words: set[str] = set(answer_set(cfg))
    for q in cfg.qtypes:
        for t in cfg.templates[q]:
            for tok in t.split():
                if tok.startswith("{") and tok.endswith("}"):
                    for v in fills[tok[1:-1]]:
                        words.update(v.split())
                else:
                    words.add(tok)
    return sorted(words)


def heldout_combos(cfg: SyntheticConfig | None = None) -> list[tuple[str, str]]:
    """Held-out (shape, colour) combinations: no two share a shape or a colour."""
    cfg = cfg or SyntheticConfig()
    rng = np.random.default_rng(cfg.heldout_seed)
    si = rng.permutation(len(cfg.shapes))[: cfg.n_heldout]
    ci = rng.permutation(len(cfg.colors))[: cfg.n_heldout]
    return sorted((cfg.shapes[s], cfg.colors[c]) for s, c in zip(si, ci))
