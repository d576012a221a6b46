"""The trainer under an operator's mistakes and accidents (issue 15): a checkpoint write that
fails, a corrupted checkpoint, a resume with another stage plan, two runs on one workdir, a
stale lock after kill -9, and metrics after a resume.

Every run is the tiny config for 6 steps (a checkpoint every 2), in a subprocess; a base run
stops at step 4 (`--stop_after`), and each test works on a copy of its workdir.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import train_util as tu

ARGS = ("--config", "configs/ppm_tiny.py", "--config.train.save_every=2", "--config.train.keep_checkpoints=10",
        "--config.train.log_every=1", "--config.train.eval_batches=0",
        "--config.train.progress=False")


def _cmd(workdir: str, *args: str, steps: int = 6) -> list[str]:
    return [sys.executable, "-m", "covipal_jax.train", "--workdir", workdir,
            "--data_dir", tu.DATA, *ARGS, f"--config.train.steps=({steps},)", *args]


def _run(workdir: str, *args: str, steps: int = 6, timeout: float = 240
         ) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(workdir, *args, steps=steps), cwd=tu.REPO, env=tu.env(), capture_output=True,
                          text=True, timeout=timeout)


def _steps(workdir: str) -> list[int]:
    return [r["step"] for r in tu.metrics(workdir) if "loss" in r]


@pytest.fixture(scope="module")
def base() -> str:
    """A run stopped at step 4: checkpoints 2 and 4, metrics of steps 1-4."""
    tu.build_data()
    w = tu.workdir("fail_base")
    r = _run(w, "--stop_after=4")
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert sorted(os.listdir(os.path.join(w, "checkpoints"))) == ["2", "4"]
    return w


def _ppm_info(path: str) -> dict:
    """The metadata of the exported PPM at `path` (loaded as inference loads it)."""
    from covipal_jax.configs import ppm_tiny
    from covipal_jax.models.config import LlavaConfig
    from covipal_jax.weights import ppm_io

    cfg = LlavaConfig.from_config(ppm_tiny.get_config().model)
    return ppm_io.load_ppm(path, cfg)[2]


def _copy(base: str, name: str) -> str:
    w = tu.workdir(name)
    shutil.copytree(base, w)
    return w


def _unwritable_dir(root: str) -> str:
    """A directory in which nothing can be created (a stand-in for a full disk or a lost
    bucket permission): a read-only directory, or for root (whom permissions do not stop) an
    empty directory of the read-only sysfs."""
    if os.geteuid() != 0:
        d = os.path.join(root, "read_only")
        os.makedirs(d, exist_ok=True)
        os.chmod(d, 0o555)
        return d
    for d in ("/sys/class/dma", "/sys/kernel/software_nodes", "/sys/kernel/iommu_groups",
              "/sys/class/nd", "/sys/class/devlink"):
        if os.path.isdir(d) and not any(n.isdigit() for n in os.listdir(d)):
            try:
                os.mkdir(os.path.join(d, "covipal_probe"))
            except OSError:
                return d
            os.rmdir(os.path.join(d, "covipal_probe"))
    raise RuntimeError("no read-only directory found for the failed-write test")


@pytest.mark.slow
def test_failed_checkpoint_write_exits_with_an_error(base):
    w = tu.workdir("fail_write")     # (after `base`: the data and the compilation cache exist)
    os.makedirs(w)
    os.symlink(_unwritable_dir(w), os.path.join(w, "checkpoints"))
    t0 = time.time()
    # Before the fix: the error was logged and the process never exited (alive at 300 s).
    r = _run(w, "--config.train.save_every=1", timeout=150)
    secs = time.time() - t0
    assert r.returncode == 4, (r.stdout + r.stderr)[-3000:]
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith("error: writing checkpoint ") and "/checkpoints/1 failed" in err, err
    assert "run the same command again" in err
    print(f"\nfailed checkpoint write: exit 4 after {secs:.0f} s: {err[:160]}")


@pytest.mark.slow
def test_corrupt_latest_checkpoint_resumes_from_the_previous(base):
    w = _copy(base, "fail_corrupt")
    state = os.path.join(w, "checkpoints", "4", "state")
    n = 0
    for d, _, files in os.walk(state):          # truncate every array data file
        if os.path.basename(d) == "d":
            for f in files:
                open(os.path.join(d, f), "wb").close()
                n += 1
    assert n
    r = _run(w)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert f"checkpoint {w}/checkpoints/4 is unreadable" in out, out[-3000:]
    assert "Traceback" not in r.stdout
    assert os.path.isdir(os.path.join(w, "corrupt_checkpoints", "4"))
    assert "resumed from checkpoint step 2" in r.stdout
    # Metrics: every step once (steps 3 and 4 of the first run were dropped, then redone).
    assert _steps(w) == [1, 2, 3, 4, 5, 6]
    before = {r["step"]: r["loss"] for r in tu.metrics(base) if "loss" in r}
    after = {r["step"]: r["loss"] for r in tu.metrics(w) if "loss" in r}
    for s in (3, 4):
        assert abs(after[s] - before[s]) <= 1e-5 * abs(before[s]), (s, after[s], before[s])
    info = _ppm_info(os.path.join(w, "ppm"))
    assert info["trained_steps"] == 6 and info["stages"] == [1]
    assert info["stage_steps"] == [6]


@pytest.mark.slow
def test_no_readable_checkpoint_is_refused_with_the_fix(base):
    w = _copy(base, "fail_corrupt_all")
    for s in ("2", "4"):
        with open(os.path.join(w, "checkpoints", s, "meta", "metadata"), "w") as f:
            f.write("{not json")
    r = _run(w)
    assert r.returncode == 2, (r.stdout + r.stderr)[-4000:]
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith(f"error: no readable checkpoint in {w}/checkpoints"), err
    assert f"mv {w}/checkpoints {w}/checkpoints.corrupt" in err
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_metrics_do_not_repeat_after_resume(base):
    w = _copy(base, "fail_metrics")
    with open(os.path.join(w, "metrics.jsonl"), "a") as f:   # steps after the checkpoint,
        f.write(json.dumps({"step": 5, "stage": 1, "loss": 1.0}) + "\n")  # then a torn line
        f.write('{"step": 6, "sta')
    r = _run(w)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "resumed from checkpoint step 4" in r.stdout
    assert _steps(w) == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_stage_change_on_resume_is_refused(base):
    w = _copy(base, "fail_stages")
    before = open(os.path.join(w, "config.json")).read()
    r = _run(w, "--config.train.stages=(2,)")
    assert r.returncode == 2, (r.stdout + r.stderr)[-4000:]
    err = r.stderr.strip().splitlines()[-1]
    assert "stages=(1,) steps=(6,)" in err and "stages=(2,) steps=(6,)" in err, err
    assert "--config.train.stages='(1,)'" in err and "init_from" in err
    assert open(os.path.join(w, "config.json")).read() == before      # not overwritten
    assert sorted(os.listdir(os.path.join(w, "checkpoints"))) == ["2", "4"]


@pytest.mark.slow
def test_workdir_lock_refuses_a_second_run_and_a_dead_owner_is_taken_over():
    tu.build_data()
    w = tu.workdir("fail_lock")
    first = subprocess.Popen(_cmd(w, steps=400), cwd=tu.REPO,
                             env=tu.env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        lock = os.path.join(w, ".lock")
        deadline = time.time() + 120
        while time.time() < deadline and first.poll() is None:
            if os.path.exists(lock) and json.load(open(lock)).get("pid") == first.pid:
                break
            time.sleep(0.1)
        assert first.poll() is None
        second = _run(w)
        assert second.returncode == 2, (second.stdout + second.stderr)[-3000:]
        err = second.stderr.strip().splitlines()[-1]
        assert f"{w} is in use by another training run" in err and str(first.pid) in err, err
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # kill -9 left its lock behind: the same command resumes (the lock's pid is dead).
    assert json.load(open(os.path.join(w, ".lock")))["pid"] == first.pid
    r = _run(w, "--stop_after=5", steps=400)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert not os.path.exists(os.path.join(w, ".lock"))
