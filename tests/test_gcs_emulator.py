"""`--workdir gs://...` end to end, against a GCS emulator started by the test on 127.0.0.1.

The emulator is `gcp-storage-emulator` (requirements-dev.txt), in memory, in this process, with
the generation preconditions tensorstore needs (tests/gcs_emulator.py says which and how each
client library is pointed at it: etils.epath through gcsfs with `EPATH_USE_TF=false` and
`STORAGE_EMULATOR_HOST`, tensorstore with `TENSORSTORE_GCS_HTTP_URL` and
`GOOGLE_AUTH_TOKEN_FOR_TESTING`).

What runs against the emulator: the tiny PPM trains with `--workdir gs://bucket/run` (local TFDS
data dir), is killed (SIGKILL) after its first checkpoint, resumed by the same command from its
newest checkpoint in the bucket (the dead run's lock is taken over), exports its PPM to
`gs://bucket/run/ppm`, and the PPM is loaded back from the bucket with `ppm_io.load_ppm`.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import train_util as tu

STEPS = 30


@pytest.fixture(scope="module")
def emulator():
    import gcs_emulator

    server, env = gcs_emulator.start("bucket")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)               # this process reads the bucket back too
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def _cmd(workdir: str) -> list[str]:
    return [sys.executable, "-m", "covipal_jax.train", "--workdir", workdir,
            "--data_dir", tu.DATA, "--config", "configs/ppm_tiny.py",
            f"--config.train.steps=({STEPS},)", "--config.train.save_every=2",
            "--config.train.log_every=1", "--config.train.eval_batches=0",
            "--config.train.progress=False"]


def _fs():
    import gcsfs

    return gcsfs.GCSFileSystem(endpoint_url=os.environ["STORAGE_EMULATOR_HOST"], token="anon")


def _checkpoints(fs) -> list[int]:
    try:
        names = [p.rstrip("/").split("/")[-1] for p in fs.ls("bucket/run/checkpoints",
                                                            refresh=True)]
    except FileNotFoundError:
        return []
    return sorted(int(n) for n in names if n.isdigit()
                  and fs.exists(f"bucket/run/checkpoints/{n}/commit_success.txt"))


@pytest.mark.slow
def test_train_kill_resume_export_load_on_gcs(emulator):
    tu.build_data()
    env = {**tu.env(), **emulator}
    w = "gs://bucket/run"
    fs = _fs()
    log = open(os.path.join(os.path.dirname(tu.DATA), "gcs_run.log"), "w")
    first = subprocess.Popen(_cmd(w), cwd=tu.REPO, env=env, stdout=log,
                             stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and first.poll() is None and not _checkpoints(fs):
            time.sleep(0.2)
        assert first.poll() is None, open(log.name).read()[-4000:]
        assert _checkpoints(fs), "no checkpoint in the bucket within 240 s"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    killed_at = _checkpoints(fs)[-1]
    assert killed_at < STEPS
    assert fs.exists("bucket/run/.lock") and fs.exists("bucket/run/config.json")

    r = subprocess.run(_cmd(w), cwd=tu.REPO, env=env, capture_output=True, text=True,
                       timeout=400)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    resumed = [int(line.split()[4]) for line in r.stdout.splitlines()
               if line.startswith("resumed from checkpoint step")]
    assert resumed and resumed[0] >= killed_at
    assert f"exported PPM to {w}/ppm" in r.stdout
    assert not fs.exists("bucket/run/.lock")
    assert not os.path.exists(os.path.join(tu.REPO, "gs:"))      # nothing local named gs:

    import json

    records = [json.loads(x) for x in fs.cat("bucket/run/metrics.jsonl").decode().splitlines()]
    assert [x["step"] for x in records if "loss" in x] == list(range(1, STEPS + 1))

    from covipal_jax.configs import ppm_tiny
    from covipal_jax.models.config import LlavaConfig
    from covipal_jax.weights import ppm_io

    cfg = LlavaConfig.from_config(ppm_tiny.get_config().model)
    module, variables, info = ppm_io.load_ppm(f"{w}/ppm", cfg)
    assert info["trained_steps"] == STEPS and info["stages"] == [1]
    assert module.cfg.n_v == cfg.num_vision_tokens and "params" in variables
    print(f"\ngs:// on the emulator: killed after checkpoint {killed_at}, resumed from "
          f"{resumed[0]}, exported and loaded the PPM from {w}/ppm")
