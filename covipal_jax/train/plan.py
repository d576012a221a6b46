"""The stage plan of a PPM training run and each stage's optimizer.

`train.stages` (or `train.stage` alone) and `train.steps` give the stages to run, sharing one
global step counter; each stage starts a fresh AdamW (warmup + cosine over its own steps).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import optax


@dataclasses.dataclass(frozen=True)
class StagePlan:
    index: int      # position in the plan
    stage: int      # 1 | 2
    steps: int
    start: int      # global step at which the stage begins

    @property
    def stop(self) -> int:
        return self.start + self.steps


def stage_plan(train_cfg: Any) -> list[StagePlan]:
    """`train.stage` (1|2, 0 = use `train.stages`) and `train.steps` -> the stages to run."""
    t = train_cfg
    steps = t.steps
    steps = tuple(steps) if isinstance(steps, (tuple, list)) else (int(steps),)
    if int(t.get("stage", 0)):
        stages = (int(t.stage),)
        if len(steps) != 1:
            steps = (steps[list(t.stages).index(int(t.stage))] if int(t.stage) in t.stages
                     else steps[0],)
    else:
        stages = tuple(int(s) for s in t.stages)
    if len(stages) != len(steps):
        raise ValueError(f"train.stages {stages} and train.steps {steps} differ in length")
    out, start = [], 0
    for i, (s, n) in enumerate(zip(stages, steps)):
        if s not in (1, 2) or int(n) < 1:
            raise ValueError(f"bad stage {s} with {n} steps")
        out.append(StagePlan(i, s, int(n), start))
        start += int(n)
    return out


def make_optimizer(train_cfg: Any, steps: int, stage: int) -> tuple[optax.GradientTransformation,
                                                                    Callable]:
    """AdamW with linear warmup (from peak / warmup_steps) + cosine decay to
    `peak * end_lr_ratio`, and global-norm clipping.

    Weight decay applies to matrices (kernels, the position table), not to biases / norms.
    """
    t = train_cfg
    peak = float(t.lr if stage == 1 or not t.get("lr_stage2") else t.lr_stage2)
    warmup = min(int(t.warmup_steps), max(steps - 1, 0))
    # Linear warmup from peak / warmup (the first update is not a no-op), then cosine.
    sched = optax.warmup_cosine_decay_schedule(
        init_value=peak / warmup if warmup else peak, peak_value=peak, warmup_steps=warmup,
        decay_steps=max(steps, warmup + 1), end_value=peak * float(t.end_lr_ratio))
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
    tx = optax.chain(
        optax.clip_by_global_norm(float(t.clip_norm)),
        optax.adamw(sched, b1=float(t.b1), b2=float(t.b2), eps=1e-8,
                    weight_decay=float(t.weight_decay), mask=decay_mask))
    return tx, sched
