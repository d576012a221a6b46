"""Resuming a PPM training run: which checkpoint to restore, and the metrics after it.

- `check_plan`: a checkpoint's stages up to its own must be this config's (else
  `CheckpointMismatchError` with the flags that resume it, before anything is written);
- `restore_latest`: the newest readable checkpoint; unreadable ones are named, moved to
  `<workdir>/corrupt_checkpoints/` when an older complete one exists, and otherwise refused
  with the command that starts the run again;
- `truncate_metrics`: `metrics.jsonl` without the records after the restored step (a resumed
  run writes them again) and without a line torn by a kill.
"""
from __future__ import annotations

import json
from typing import Any, Callable

from covipal_jax import paths
from covipal_jax.train import checkpoint as ckpt_lib
from covipal_jax.train import state as state_lib
from covipal_jax.train.plan import StagePlan, make_optimizer


def check_plan(meta: dict, plan: list[StagePlan], where: str) -> None:
    """Refuse a checkpoint whose stages up to its own differ from `plan` (stages after it may
    be added or changed)."""
    i = int(meta["stage_index"])
    saved = [(int(p["stage"]), int(p["steps"])) for p in meta.get("plan", [])]
    now = [(p.stage, p.steps) for p in plan]
    if i < len(now) and saved[:i + 1] == now[:i + 1]:
        return
    fmt = lambda pl: (f"stages={tuple(s for s, _ in pl)} steps="  # noqa: E731
                      f"{tuple(n for _, n in pl)}")
    raise ckpt_lib.CheckpointMismatchError(
        f"checkpoint {where} was written by a run with {fmt(saved)} (at stage "
        f"{meta['stage']}, step {meta['stage_step']} of it), but this config has "
        f"{fmt(now)}. Resume with --config.train.stages='{tuple(s for s, _ in saved)}' "
        f"--config.train.steps='{tuple(n for _, n in saved)}' (stages after the "
        f"checkpoint's may be added), or start a new stage from an exported PPM in a fresh "
        f"--workdir with --config.train.init_from=<workdir>/ppm.")


def restore_latest(ckpt: ckpt_lib.Checkpointer, plan: list[StagePlan], train_cfg: Any,
                   expected_meta: dict, params: Any, param_sh: Any, mesh, *,
                   log: Callable[[str], None], primary: bool = True,
                   process_count: int = 1) -> tuple[dict, Any] | None:
    """(meta, state) of the newest readable checkpoint, or None when there is none.

    params / param_sh: the PPM params (or their shapes) and shardings the state is restored
    into. A checkpoint for another model, PPM or stage plan raises `CheckpointMismatchError`.
    """
    bad: list[tuple[int, Exception]] = []
    found = None
    for step in sorted(ckpt.all_steps(), reverse=True):
        where = f"{ckpt.directory}/{step}"
        try:
            meta = ckpt.read_meta(step)
            ckpt.validate(meta, expected_meta, where)
            check_plan(meta, plan, where)
            stage = plan[int(meta["stage_index"])]
            tx, _ = make_optimizer(train_cfg, stage.steps, stage.stage)
            abstract, _ = state_lib.abstract_state(params, param_sh, tx, mesh)
            state, _ = ckpt.restore(step, abstract, expected_meta)
        except ckpt_lib.CheckpointCorruptError as e:
            log(f"warning: {e}")
            bad.append((step, e))
            continue
        found = (meta, state)
        break
    if bad and found is None:
        steps = ", ".join(str(s) for s, _ in bad)
        raise ckpt_lib.CheckpointCorruptError(
            f"no readable checkpoint in {ckpt.directory} (steps {steps}: {bad[0][1]}). To "
            f"train again from step 0, move them aside: mv {ckpt.directory} "
            f"{ckpt.directory}.corrupt")
    if bad:
        if primary:
            for s, _ in bad:
                dst = ckpt.quarantine(s)
                log(f"moved the unreadable checkpoint {ckpt.directory}/{s} to {dst}; resuming "
                    f"from step {found[0]['step']}")
        if process_count > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("covipal_quarantine")
        ckpt.reload()
    return found


def truncate_metrics(path: paths.PathLike, step: int | None) -> list[str]:
    """Rewrite the JSON-lines file `path` without the records after `step` (all of them when
    None) and without unparsable (torn) lines; returns the kept lines."""
    path = paths.as_path(path)
    if not path.exists():
        return []
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:          # a line torn by a kill
            dropped += 1
            continue
        if step is not None and int(rec.get("step", 0)) <= step:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        paths.write_atomic(path, "".join(kept))
    return kept
