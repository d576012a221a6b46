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

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import train_util as tu

STEPS = 30
LOAD_BACK = """
import json, sys
import jax
from covipal_jax.configs import ppm_tiny
from covipal_jax.models.config import LlavaConfig
from covipal_jax.weights import ppm_io
cfg = LlavaConfig.from_config(ppm_tiny.get_config().model)
module, variables, info = ppm_io.load_ppm(sys.argv[1], cfg)
print(json.dumps(dict(trained_steps=info["trained_steps"], stages=info["stages"],
                      n_v=module.cfg.n_v, num_vision_tokens=cfg.num_vision_tokens,
                      params=len(jax.tree.leaves(variables["params"])))))
"""


@pytest.fixture(scope="module")
def emulator():
    import gcs_emulator

    server, env = gcs_emulator.start("bucket")
    # The subprocesses get all of `env`; this process reads the bucket with gcsfs only.
    saved = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = env["STORAGE_EMULATOR_HOST"]
    try:
        yield env
    finally:
        if saved is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = saved
        server.stop()


def _cmd(workdir: str) -> list[str]:
    return [sys.executable, "-m", "covipal_jax.train", "--workdir", workdir,
            "--data_dir", tu.DATA, "--config", "configs/ppm_tiny.py",
            f"--config.train.steps=({STEPS},)", "--config.train.save_every=2",
            "--config.train.log_every=1", "--config.train.eval_batches=0",
            "--config.train.progress=False"]


def _fs(env: dict):
    import gcsfs

    # A request timeout (gcsfs retries a timed-out request): the emulator serves one
    # connection at a time, and a request caught by the SIGKILL of the trainer once left this
    # client waiting forever (a slow-step run hung here at `_checkpoints`).
    return gcsfs.GCSFileSystem(endpoint_url=env["STORAGE_EMULATOR_HOST"], token="anon",
                               requests_timeout=5, skip_instance_cache=True)


def _checkpoints(fs) -> list[int]:
    fs.invalidate_cache()
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
    fs = _fs(emulator)
    log = open(os.path.join(os.path.dirname(tu.DATA), "gcs_run.log"), "w")
    first = subprocess.Popen(_cmd(w), cwd=tu.REPO, env=env, stdout=log,
                             stderr=subprocess.STDOUT)
    try:
        # Step 5 logged: save(4) has waited for save(2), so checkpoint 2 is complete.
        deadline = time.time() + 300
        while time.time() < deadline and first.poll() is None:
            if "step 5 stage 1:" in open(log.name).read():
                break
            time.sleep(0.05)
        assert first.poll() is None, open(log.name).read()[-4000:]
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert _checkpoints(fs), open(log.name).read()[-4000:]
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

    records = [json.loads(x) for x in fs.cat("bucket/run/metrics.jsonl").decode().splitlines()]
    assert [x["step"] for x in records if "loss" in x] == list(range(1, STEPS + 1))

    # Load it back from the bucket as a user's process would (epath picks its gs:// backend once
    # per process: a fresh process, with the emulator's environment).
    load = subprocess.run([sys.executable, "-c", LOAD_BACK, f"{w}/ppm"], cwd=tu.REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert load.returncode == 0, load.stderr[-3000:]
    info = json.loads(load.stdout.strip().splitlines()[-1])
    assert info["trained_steps"] == STEPS and info["stages"] == [1]
    assert info["n_v"] == info["num_vision_tokens"] and info["params"]
    print(f"\ngs:// on the emulator: killed after checkpoint {killed_at}, resumed from "
          f"{resumed[0]}, exported and loaded the PPM from {w}/ppm")
