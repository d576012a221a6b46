"""Vocabulary constants and `SyntheticConfig` of the synthetic VQA task (see `task.py`).

Also the two config-derived helpers shared by the answer lists and the generator: the question-type
probabilities and the count answers of a split.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

SPLIT_CODES: dict[str, int] = {"train": 0, "validation": 1, "test": 2}

COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 210),
    "orange": (245, 140, 30),
    "cyan": (40, 210, 220),
    "white": (235, 235, 235),
    "pink": (250, 130, 190),
}

SHAPE_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "diamond")

NUMBER_WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
)

RELATION_PHRASES: dict[str, str] = {
    "left": "left of",
    "right": "right of",
    "above": "above",
    "below": "below",
}

QTYPES: tuple[str, ...] = ("color", "shape", "exist", "count", "position")

# One template per type by default (the demo trains a word-level model from scratch).
# Placeholders: {shape} {color} (the queried object), {shape2} {color2} (second object of a
# position question), {rel} (a RELATION_PHRASES value).
DEFAULT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "color": ("what color is the {shape} ?",),
    "shape": ("what shape is the {color} object ?",),
    "exist": ("is there a {color} {shape} ?",),
    "count": ("how many {color} objects are there ?",),
    "position": ("is the {color} {shape} {rel} the {color2} {shape2} ?",),
}

# Optional paraphrases (pass as `templates=PARAPHRASE_TEMPLATES`).
PARAPHRASE_TEMPLATES: dict[str, tuple[str, ...]] = {
    "color": ("what color is the {shape} ?", "which color does the {shape} have ?"),
    "shape": ("what shape is the {color} object ?", "which shape is {color} ?"),
    "exist": ("is there a {color} {shape} ?", "does the image contain a {color} {shape} ?"),
    "count": ("how many {color} objects are there ?", "count the {color} objects ."),
    "position": (
        "is the {color} {shape} {rel} the {color2} {shape2} ?",
        "is the {color} {shape} located {rel} the {color2} {shape2} ?",
    ),
}


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of the synthetic VQA task (all sizes in pixels)."""

    image_size: int = 64
    cell_size: int = 8  # grid cell = ViT patch size -> each object inside one patch
    object_size: tuple[int, int] = (5, 8)  # inclusive range of the object's side, <= cell_size
    n_objects: tuple[int, int] = (2, 5)  # inclusive range of objects per image
    shapes: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring")
    colors: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple")
    qtypes: tuple[str, ...] = QTYPES
    qtype_weights: tuple[float, ...] | None = None  # None: uniform over `qtypes`
    templates: Mapping[str, tuple[str, ...]] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_TEMPLATES)
    )
    counts: tuple[int, ...] = (1, 2, 3)  # possible answers of `count` questions
    relations: tuple[str, ...] = ("left", "right", "above", "below")
    n_heldout: int = 5  # held-out (shape, colour) combinations, <= min(#shapes, #colours)
    heldout_seed: int = 0
    heldout_distractors_in_train: bool = False  # let held-out combos be train/val distractors
    background: tuple[int, int] = (10, 60)  # range of the background grey level
    noise_std: float = 4.0  # Gaussian pixel noise (0-255 scale)
    color_jitter: int = 20  # per-object uniform jitter of each channel, +- jitter/2
    separate: bool = True  # objects never in 8-neighbouring cells
    near_miss_prob: float = 0.5  # `exist`: prob. of a same-shape and of a same-colour distractor

    def __post_init__(self):
        g = self.grid
        if self.image_size % self.cell_size:
            raise ValueError(f"image_size {self.image_size} not a multiple of {self.cell_size}")
        lo, hi = self.object_size
        if not 1 <= lo <= hi <= self.cell_size:
            raise ValueError(f"object_size {self.object_size} must fit in cell {self.cell_size}")
        if not 2 <= self.n_objects[0] <= self.n_objects[1] <= g * g:
            raise ValueError(f"bad n_objects {self.n_objects}")
        for s in self.shapes:
            if s not in SHAPE_NAMES:
                raise ValueError(f"unknown shape {s!r}; known: {SHAPE_NAMES}")
        for c in self.colors:
            if c not in COLOR_RGB:
                raise ValueError(f"unknown colour {c!r}; known: {tuple(COLOR_RGB)}")
        if len(set(self.shapes)) < 2 or len(set(self.colors)) < 2:
            raise ValueError("need at least two distinct shapes and colours")
        if not 0 <= self.n_heldout <= min(len(self.shapes), len(self.colors)):
            raise ValueError("n_heldout must be <= min(#shapes, #colours)")
        for q in self.qtypes:
            if q not in QTYPES:
                raise ValueError(f"unknown qtype {q!r}; known: {QTYPES}")
            if not self.templates.get(q):
                raise ValueError(f"no template for qtype {q!r}")
        if self.qtype_weights is not None and len(self.qtype_weights) != len(self.qtypes):
            raise ValueError("qtype_weights must match qtypes")
        if any(r not in RELATION_PHRASES for r in self.relations):
            raise ValueError(f"relations must be in {tuple(RELATION_PHRASES)}")
        if not self.counts or min(self.counts) < 0 or max(self.counts) >= len(NUMBER_WORDS):
            raise ValueError(f"counts must be in 0..{len(NUMBER_WORDS) - 1}")
        if max(self.counts) > min(len(self.shapes) - 1, self.n_objects[1] - 1):
            raise ValueError("max count must leave room for a distractor and a held-out shape")
        if self.n_objects[1] < 3 and "position" in self.qtypes:
            raise ValueError("position questions need n_objects max >= 3 (two named + one)")

    @property
    def grid(self) -> int:
        """Cells per side."""
        return self.image_size // self.cell_size


def qtype_probs(cfg: SyntheticConfig) -> np.ndarray:
    w = np.ones(len(cfg.qtypes)) if cfg.qtype_weights is None else np.asarray(cfg.qtype_weights)
    return w / w.sum()


def counts_for(split: str, cfg: SyntheticConfig) -> tuple[int, ...]:
    if split == "test" and cfg.n_heldout > 0:
        return tuple(n for n in cfg.counts if n >= 1)
    return cfg.counts
