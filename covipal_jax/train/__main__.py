"""Train the PPM: `python -m covipal_jax.train --config configs/ppm_tiny.py --workdir DIR`.

PDrop* (the LLaVA fine-tuned with PyramidDrop active, `train/finetune_trainer.py`): a config
with `train.mode="finetune"`, e.g. `--config configs/pdrop_star_tiny.py` (exports the model to
`DIR/llava`).

Resumes from `DIR/checkpoints` when present (run the same command again after a crash or a
preemption). Overrides: `--config.train.steps='(500,)'`, `--config.train.stages='(1,2)'`,
`--config.checkpoint=/path/to/llava-hf`, `--config.data.json=...`, `--data_dir=...`.

Several hosts: `jax.distributed.initialize()` runs only when asked: with `--coordinator`,
`--num_processes` and `--process_id` (explicit, e.g. local tests over 127.0.0.1), or with the
environment variable `COVIPAL_DISTRIBUTED=1` (JAX's own cluster detection: TPU pods, SLURM,
...). A single host never initializes the distributed runtime.

Exit status: 0 done; 1 unexpected error; 2 bad config / data / checkpoint mismatch / an
unreadable checkpoint with no older one to resume from / the workdir in use by another run;
3 non-finite loss (the last good checkpoint is left as it was); 4 a checkpoint write failed
(full disk, lost permission). A failing run always exits: Orbax's background threads of a
failed asynchronous save would hold the interpreter open, so errors leave with `os._exit`.
"""
from __future__ import annotations

from covipal_jax import configs as configs_lib
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", configs_lib.path("ppm_tiny"), "Config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, ppm/).",
                               required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir (default <workdir>/data).")
_COORDINATOR = flags.DEFINE_string("coordinator", None,
                                   "host:port of process 0 (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_STOP_AFTER = flags.DEFINE_integer("stop_after", None,
                                   "Stop (with a checkpoint) once this global step is reached; "
                                   "run again to continue.")
_PREPARE = flags.DEFINE_bool("prepare_data", False,
                             "Only build the TFDS training data (offline) and exit: do it once "
                             "before a multi-host run of a large LLaVA-format set.")
_CPU_DEVICES = flags.DEFINE_integer("num_cpu_devices", None,
                                    "Fake CPU devices per process (tests; before JAX starts).")


def _init_jax() -> None:
    import jax

    if _CPU_DEVICES.value:
        jax.config.update("jax_num_cpu_devices", int(_CPU_DEVICES.value))
    explicit = _COORDINATOR.value is not None
    if explicit or os.environ.get("COVIPAL_DISTRIBUTED") == "1":
        # Cross-process collectives of the CPU backend (tests, CPU hosts); other backends
        # ignore it.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if explicit:
            if _NUM_PROCESSES.value is None or _PROCESS_ID.value is None:
                raise app.UsageError("--coordinator needs --num_processes and --process_id")
            jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                                       num_processes=_NUM_PROCESSES.value,
                                       process_id=_PROCESS_ID.value)
        else:
            jax.distributed.initialize()


def main(argv):
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    _init_jax()
    from covipal_jax.train import checkpoint, loop

    if _PREPARE.value:
        from covipal_jax.data import pipeline

        d = pipeline.data_dir(_CONFIG.value, _WORKDIR.value, _DATA_DIR.value)
        source, skipped = pipeline.build_source(_CONFIG.value, d)
        print(f"data ready in {d}: {len(source)} examples"
              + (f", skipped {skipped}" if skipped else ""))
        return
    from covipal_jax import paths

    runner = loop
    if _CONFIG.value.train.get("mode", "ppm") == "finetune":   # PDrop* (configs/pdrop_star_*)
        from covipal_jax.train import finetune_trainer as runner
    try:
        summary = runner.train(_CONFIG.value, _WORKDIR.value, data_dir=_DATA_DIR.value,
                               stop_after=_STOP_AFTER.value)
    except loop.NonFiniteLossError as e:
        _exit(3, e)
    except checkpoint.CheckpointWriteError as e:
        _exit(4, e)
    except (checkpoint.CheckpointMismatchError, checkpoint.CheckpointCorruptError,
            paths.WorkdirLockedError, ValueError, FileNotFoundError) as e:
        _exit(2, e)
    except Exception:  # noqa: BLE001 (never hang on Orbax's threads: print, then leave)
        import traceback

        traceback.print_exc()
        _exit(1, "training failed (traceback above)")
    last = [s["last"] for s in summary["stages"] if s.get("last")]
    if last and jax_process_index() == 0:
        stopped = any(s.get("stopped_at") is not None for s in summary["stages"])
        recall = last[-1].get("recall")
        print(f"{'stopped' if stopped else 'done'}: step {summary['step']}, "
              f"loss {last[-1]['loss']:.4g}"
              + (f", recall {recall:.3f}" if recall is not None else ""))


def _exit(code: int, message: object) -> None:
    """Print `error: message` and leave now (see the exit status in the module docstring)."""
    print(f"error: {message}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def jax_process_index() -> int:
    import jax

    return jax.process_index()


if __name__ == "__main__":
    from covipal_jax import cli

    cli.run(main)
