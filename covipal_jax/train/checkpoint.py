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

A failed write (full disk, lost bucket permission) raises `CheckpointWriteError` naming the
step and directory: at the next `save()` or `wait()` (the background write of an async save
reports its error there). A checkpoint that cannot be read (`CheckpointCorruptError`) can be
moved aside (`quarantine`) so that the run resumes from the newest complete one.
"""
from __future__ import annotations

import json
from typing import Any

import jax
import orbax.checkpoint as ocp

from covipal_jax import paths


class CheckpointMismatchError(ValueError):
    """The checkpoint in the workdir does not fit the current config."""


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed (the run cannot continue safely)."""


class CheckpointCorruptError(RuntimeError):
    """A checkpoint exists but cannot be read."""


def _short(e: BaseException) -> str:
    """One line naming an exception (no traceback)."""
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[-1][:400] if msg else ''}"


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

    def __init__(self, directory: paths.PathLike, *, keep: int = 3, async_save: bool = True):
        path = paths.as_path(directory)
        self.path = path if paths.is_remote(path) else path.absolute()
        self.directory = str(self.path)
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=max(1, int(keep)), create=True,
            enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
        self._pending: int | None = None     # step of the last save not yet known to be done
        self._open()

    def _open(self) -> None:
        self.manager = ocp.CheckpointManager(self.path, options=self._options,
                                             item_names=("state", "meta"))

    def _write_error(self, step: int | None, e: BaseException) -> CheckpointWriteError:
        where = self.directory if step is None else f"{self.directory}/{step}"
        return CheckpointWriteError(
            f"writing checkpoint {where} failed ({_short(e)}). Check that the directory is "
            "writable and has space (or the bucket's permissions), then run the same command "
            "again: it resumes from the last complete checkpoint.")

    def check(self) -> None:
        """Raise `CheckpointWriteError` if a background write has failed."""
        try:
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001 (Orbax re-raises the writer's own error)
            raise self._write_error(self._pending, e) from e

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> bool:
        """Start an async save of `state` (a pytree of jax arrays) at `step`."""
        self.check()
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  meta=ocp.args.JsonSave(_jsonable(meta)))
        try:
            saved = self.manager.save(int(step), args=args, force=True)
        except Exception as e:  # noqa: BLE001
            raise self._write_error(self._pending if self._pending is not None else step,
                                    e) from e
        self._pending = int(step)
        return saved

    def read_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        try:
            out = self.manager.restore(step,
                                       args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            meta = dict(out["meta"])
        except Exception as e:  # noqa: BLE001
            raise CheckpointCorruptError(
                f"checkpoint {self.directory}/{step} is unreadable: its metadata "
                f"({self.directory}/{step}/meta) failed to load ({_short(e)})") from e
        for key in ("step", "stage_index", "stage_step", "data_position"):
            if not isinstance(meta.get(key), int):
                raise CheckpointCorruptError(
                    f"checkpoint {self.directory}/{step} is unreadable: its metadata has no "
                    f"integer {key!r}")
        return meta

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
        try:
            out = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
            state = out["state"]
            jax.block_until_ready(state)
        except Exception as e:  # noqa: BLE001
            raise CheckpointCorruptError(
                f"checkpoint {self.directory}/{step} is unreadable: its arrays "
                f"({self.directory}/{step}/state) failed to load ({_short(e)})") from e
        return state, meta

    def quarantine(self, step: int) -> str:
        """Move the checkpoint of `step` to `<directory>/../corrupt_checkpoints/<step>` (kept
        for inspection, out of Orbax's sight); returns the new path."""
        dst_dir = self.path.parent / "corrupt_checkpoints"
        dst_dir.mkdir(parents=True, exist_ok=True)
        dst = dst_dir / str(step)
        n = 1
        while dst.exists():
            dst, n = dst_dir / f"{step}-{n}", n + 1
        (self.path / str(step)).rename(dst)
        return str(dst)

    def reload(self) -> None:
        """Re-read the directory (after `quarantine`)."""
        self.manager.reload()

    def wait(self) -> None:
        """Wait for pending writes; `CheckpointWriteError` if one failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._write_error(self._pending, e) from e
        self.check()
        self._pending = None

    def close(self) -> None:
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with the arrays' shardings) of a pytree of jax arrays."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        tree)
