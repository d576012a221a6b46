"""Resumable training checkpoints of the PPM (Orbax `CheckpointManager`).

Layout: `<workdir>/checkpoints/<step>/` with two items (`ocp.args.Composite`):
- `state`: `{"step", "params", "opt_state"}` (StandardSave: the PPM params and the optimizer
  state, f32, restored straight into their shardings from an abstract target);
- `meta`: JSON with the stage, the data-iterator position, the PPMConfig, the base model's
  architecture and the whole config (`config.to_json_best_effort()`).
The frozen LLaVA is never saved: it always comes from its own checkpoint directory.

Saves are asynchronous (the device -> host copy happens in `save()`, the writes in the
background) and atomic (Orbax writes a temporary directory and renames it when complete; a run
killed mid-save leaves only the previous finished checkpoints, and the temporary directory is
ignored/cleaned on the next start). The manager keeps the last `keep` checkpoints.

`restore()` reads `meta` first and refuses a checkpoint made for a different base model or PPM
shape (`CheckpointMismatchError`) before touching the arrays.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
    """The checkpoint in the workdir does not fit the current config."""


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Human-readable differences between two JSON-like trees."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            p = f"{prefix}.{k}" if prefix else str(k)
            if k not in a or k not in b:
                out.append(f"{p}: {a.get(k, '<missing>')!r} vs {b.get(k, '<missing>')!r}")
            else:
                out.extend(_diff(a[k], b[k], p))
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        a, b = list(a), list(b)
    return [] if a == b else [f"{prefix}: {a!r} vs {b!r}"]


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


class Checkpointer:
    """Save / restore `{"step", "params", "opt_state"}` + JSON metadata under `directory`."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max(1, int(keep)), create=True,
            enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> bool:
        """Start an async save of `state` (a pytree of jax arrays) at `step`."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  meta=ocp.args.JsonSave(_jsonable(meta)))
        return self.manager.save(int(step), args=args, force=True)

    def read_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    @staticmethod
    def validate(meta: dict, expected: dict, where: str = "") -> None:
        """Raise `CheckpointMismatchError` when the base model or the PPM shape differ."""
        problems = []
        for key in ("base_model", "ppm"):
            if key in expected:
                for d in _diff(_jsonable(meta.get(key)), _jsonable(expected[key]), key):
                    problems.append(d)
        if problems:
            shown = "; ".join(problems[:8]) + (" ..." if len(problems) > 8 else "")
            raise CheckpointMismatchError(
                f"checkpoint {where} was made for a different model: {shown} (checkpoint vs "
                "config). Use a fresh --workdir, or the config the checkpoint was trained with.")

    def restore(self, step: int, abstract_state: Any, expected: dict) -> tuple[Any, dict]:
        """(state, meta) at `step`; `abstract_state`: ShapeDtypeStructs with shardings."""
        meta = self.read_meta(step)
        self.validate(meta, expected, f"{self.directory}/{step}")
        out = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        return out["state"], meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with the arrays' shardings) of a pytree of jax arrays."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        tree)
