"""Helpers of the trainer tests: run `python -m covipal_jax.train` in subprocesses.

Subprocesses get their own device count (`--xla_force_host_platform_device_count`), the CPU
platform, `FAST_COMPILE` XLA flags (every run of a comparison uses the same flags) and one
persistent compilation cache per pytest session, so identical programs (the same config on the
same mesh) compile once per session.

`reference_run()` trains the tiny config once per session (single device, stage 1 for 20
steps then stage 2 for 3, a checkpoint every step, metrics every step); the loop, multi-device,
multi-process and resume tests compare against it.
"""
from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# PPM params whose stage-1 gradient is identically zero under the tiny config's objective: the
# listwise loss is invariant to a constant shift of all scores (the head bias, and the final
# LayerNorm bias, which reaches the scores only through the head as such a shift), attention to
# a per-query constant added to every key logit (the key biases). Their Adam updates are
# g / (sqrt(v) + eps) of pure rounding noise, i.e. +-lr in any direction, so runs that reduce
# in another order (sharded, multi-process) legitimately disagree on them; they change no score
# ranking and no loss.
ZERO_GRADIENT_PARAMS = ("['head']['bias']", "['final_norm']['bias']", "['blocks']['k']['bias']")

_ROOT = tempfile.mkdtemp(prefix="covipal_train_tests_")
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)
CACHE = os.path.join(_ROOT, "jax_cache")
DATA = os.path.join(_ROOT, "tfds")

# XLA CPU flags that cut the tiny programs' compile time ~4x here (LLVM backend optimizations
# and the fusion emitters off); the programs run a bit slower, which does not matter at this size.
FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")

STEPS = (20, 3)
REFERENCE_ARGS = (
    "--config", "configs/ppm_tiny.py:stages=12",
    f"--config.train.steps=({STEPS[0]},{STEPS[1]})",
    "--config.train.save_every=1", "--config.train.keep_checkpoints=100",
    "--config.train.log_every=1", "--config.train.eval_every=10",
    "--config.train.eval_batches=2", "--config.train.progress=False",
)


def env(devices: int = 1) -> dict:
    e = dict(os.environ)
    e.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO,
             XLA_FLAGS=" ".join(FAST_COMPILE + (
                 f"--xla_force_host_platform_device_count={devices}",)),
             JAX_COMPILATION_CACHE_DIR=CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    e.pop("COVIPAL_DISTRIBUTED", None)
    return e


def command(workdir: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "covipal_jax.train", "--workdir", workdir, "--data_dir", DATA,
            *REFERENCE_ARGS, *args]


def start(workdir: str, *args: str, devices: int = 1, log: str | None = None
          ) -> subprocess.Popen:
    out = open(log or os.path.join(_ROOT, os.path.basename(workdir) + ".log"), "w")
    return subprocess.Popen(command(workdir, *args), cwd=REPO, env=env(devices), stdout=out,
                            stderr=subprocess.STDOUT)


def run(workdir: str, *args: str, devices: int = 1, timeout: float = 300
        ) -> subprocess.CompletedProcess:
    return subprocess.run(command(workdir, *args), cwd=REPO, env=env(devices),
                          capture_output=True, text=True, timeout=timeout)


def workdir(name: str) -> str:
    path = os.path.join(_ROOT, name)
    shutil.rmtree(path, ignore_errors=True)
    return path


@functools.lru_cache(maxsize=None)
def build_data() -> str:
    """The synthetic TFDS set, built once (concurrent runs then only read it)."""
    from covipal_jax.data.synthetic import tfds_builder as tfds_synthetic

    tfds_synthetic.builder(DATA, "tiny").download_and_prepare()
    return DATA


_background: dict[str, subprocess.Popen] = {}


def start_reference() -> None:
    """Start the reference run in the background (idempotent)."""
    build_data()
    if "reference" not in _background:
        _background["reference"] = start(workdir("reference"))


@functools.lru_cache(maxsize=None)
def reference_run() -> str:
    """The reference run's workdir (after it finished successfully)."""
    start_reference()
    p = _background["reference"]
    rc = p.wait(timeout=600)
    log = open(os.path.join(_ROOT, "reference.log")).read()
    assert rc == 0, log[-5000:]
    return os.path.join(_ROOT, "reference")


def metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def step_losses(workdir: str) -> dict[int, float]:
    """step -> loss (the last record of each step: a resumed run rewrites repeated steps)."""
    return {r["step"]: r["loss"] for r in metrics(workdir) if "loss" in r}


def checkpoint_params(workdir: str, step: int) -> dict:
    """The PPM params saved at `step` as a flat {path: np.ndarray}."""
    import jax
    import orbax.checkpoint as ocp

    path = os.path.join(workdir, "checkpoints", str(step), "state")
    ckptr = ocp.StandardCheckpointer()
    meta = ckptr.metadata(path).item_metadata     # saved on any mesh: restore onto one device
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), meta)
    tree = ckptr.restore(path, target)
    flat, _ = jax.tree_util.tree_flatten_with_path(tree["params"])
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


def copy_checkpoint(src_workdir: str, step: int, dst_workdir: str) -> None:
    """Seed `dst_workdir` with one finished checkpoint of `src_workdir` (to resume from)."""
    os.makedirs(os.path.join(dst_workdir, "checkpoints"), exist_ok=True)
    shutil.copytree(os.path.join(src_workdir, "checkpoints", str(step)),
                    os.path.join(dst_workdir, "checkpoints", str(step)))
