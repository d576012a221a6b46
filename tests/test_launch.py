"""Tests for launch/tpu_pod.py (dry runs, no gcloud needed) and launch/run_on_worker.sh."""
from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "tpu_pod.py")
WORKER_SH = os.path.join(ROOT, "launch", "run_on_worker.sh")

_spec = importlib.util.spec_from_file_location("tpu_pod", SCRIPT)
tpu_pod = importlib.util.module_from_spec(_spec)
sys.modules["tpu_pod"] = tpu_pod  # dataclasses look the module up while decorating
_spec.loader.exec_module(tpu_pod)

PROGRAM = ["--config", "configs/ppm_llava15_7b.py", "--workdir", "gs://bucket/covipal/ppm64",
           "--config.checkpoint=gs://bucket/llava15_7b", "--config.mesh.data=-1",
           "--config.mesh.fsdp=4"]


def _dry(*args, env=None):
    """Runs the launcher as a subprocess with gcloud hidden from PATH; returns command argvs."""
    env = dict(os.environ if env is None else env, PATH="/nonexistent")
    res = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                         env=env, check=False)
    assert res.returncode == 0, res.stderr
    cmds = []
    for line in res.stdout.splitlines():
        if not line or line.startswith("#"):
            continue
        argv = shlex.split(line)
        if argv[-1] == "&":  # a spawned log streamer: "cmd >> file 2>&1 &"
            argv = argv[:argv.index(">>")]
        cmds.append(argv)
    return cmds, res.stdout


def _flag(argv, name):
    for a in argv:
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


@pytest.mark.parametrize("acc, hosts, chips", [
    ("v5litepod-16", 4, 16), ("v5e-16", 4, 16), ("v5litepod-8", 1, 8), ("v5litepod-4", 1, 4),
    ("v5litepod-256", 64, 256), ("v4-8", 1, 4), ("v4-16", 2, 8), ("v4-32", 4, 16),
    ("v5p-8", 1, 4), ("v5p-32", 4, 16), ("v3-8", 1, 4), ("v3-32", 4, 16), ("v2-8", 1, 4),
    ("v6e-8", 1, 8), ("v6e-16", 4, 16), ("v6e-1", 1, 1),
])
def test_worker_count(acc, hosts, chips):
    topo = tpu_pod.parse_accelerator(acc)
    assert (topo.hosts, topo.chips) == (hosts, chips)
    assert tpu_pod.num_workers(acc) == hosts


@pytest.mark.parametrize("bad", ["v5litepod-18", "v4-7", "tpu-8", "v9-8", "v5litepod"])
def test_bad_accelerator(bad):
    with pytest.raises(ValueError):
        tpu_pod.parse_accelerator(bad)


def test_up_dry_run_v5e16_queued_spot():
    cmds, out = _dry("up", "--name", "covipal-v5e", "--zone", "us-west4-a",
                     "--accelerator-type", "v5litepod-16", "--queued", "--spot", "--dry-run",
                     "--env", "HF_HOME=/tmp/hf", "--", *PROGRAM)
    assert "16 chips on 4 host(s)" in out
    gcloud = [c for c in cmds if c[0] == "gcloud"]
    assert all(_flag(c, "--zone") == "us-west4-a" for c in gcloud)

    create = next(c for c in gcloud if c[1:5] == ["compute", "tpus", "queued-resources",
                                                     "create"])
    assert create[5] == "covipal-v5e-qr" and _flag(create, "--node-id") == "covipal-v5e"
    assert _flag(create, "--accelerator-type") == "v5litepod-16"
    assert _flag(create, "--runtime-version") == "v2-alpha-tpuv5-lite"
    assert "--spot" in create

    scp = next(c for c in gcloud if c[3:5] == ["tpu-vm", "scp"])
    assert "--worker=all" in scp and "covipal-v5e:covipal_jax.tar.gz" in scp
    assert any(c[:2] == ["bash", "-c"] and "tar -czf" in c[2] for c in cmds)  # local tarball

    ssh_all = [c for c in gcloud if c[3:5] == ["tpu-vm", "ssh"] and "--worker=all" in c]
    remote = [_flag(c, "--command") for c in ssh_all]
    assert any("tar -xzf" in r for r in remote)            # copy: unpack on every worker
    assert any("run_on_worker.sh --install-only" in r for r in remote)
    run = next(r for r in remote if "covipal_jax.train" in r)
    assert "COVIPAL_DISTRIBUTED=1" in run and "HF_HOME=/tmp/hf" in run
    assert "nohup" in run and "logs/train.log" in run and "logs/train.pid" in run
    # the program's flags arrive intact after the module name
    words = shlex.split(run.split("nohup", 1)[1].split(">", 1)[0])
    i = words.index("covipal_jax.train")
    assert words[i + 1:] == PROGRAM

    # one log streamer per worker, into a local file each
    tails = [c for c in gcloud if (_flag(c, "--command") or "").startswith("tail")]
    assert sorted(_flag(c, "--worker") for c in tails) == ["0", "1", "2", "3"]
    assert "logs/covipal-v5e/train.worker3.log" in out

    # order: create before copy before install before run
    order = [next(i for i, c in enumerate(cmds) if pred(c)) for pred in (
        lambda c: "create" in c,
        lambda c: "scp" in c,
        lambda c: "--install-only" in " ".join(c),
        lambda c: "covipal_jax.train" in " ".join(c))]
    assert order == sorted(order)


def test_create_tpu_vm_and_best_effort():
    cmds, _ = _dry("create", "--name", "n", "--zone", "us-central2-b", "--accelerator-type",
                   "v4-8", "--project", "proj", "--dry-run")
    assert cmds == [["gcloud", "compute", "tpus", "tpu-vm", "create", "n", "--zone=us-central2-b",
                     "--project=proj", "--accelerator-type=v4-8",
                     "--version=tpu-ubuntu2204-base"]]
    cmds, _ = _dry("create", "--name", "n", "--zone", "z", "--accelerator-type", "v5p-8",
                   "--queued", "--best-effort", "--no-wait", "--dry-run")
    assert cmds[0][:2] == ["gcloud", "alpha"] and "--best-effort" in cmds[0]
    assert _flag(cmds[0], "--runtime-version") == "v2-alpha-tpuv5"
    assert len(cmds) == 1  # --no-wait: no polling


def test_options_before_subcommand_and_env_defaults():
    env = dict(os.environ, COVIPAL_TPU_NAME="envname", COVIPAL_TPU_ZONE="europe-west4-b")
    cmds, _ = _dry("--dry-run", "--accelerator-type", "v6e-16", "delete", env=env)
    assert cmds == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "envname",
                     "--zone=europe-west4-b", "--quiet"]]
    cmds, _ = _dry("--dry-run", "delete", "--queued", env=env)
    assert cmds[0][4:7] == ["delete", "envname-qr", "--zone=europe-west4-b"]
    assert "--force" in cmds[0]


def test_copy_variants_and_stop():
    base = ["--name", "n", "--zone", "z", "--dry-run"]
    cmds, _ = _dry("copy", *base, "--git-url", "https://example.com/covipal_jax.git",
                   "--git-ref", "v1")
    assert len(cmds) == 1 and "--worker=all" in cmds[0]
    assert "git clone -q https://example.com/covipal_jax.git" in _flag(cmds[0], "--command")
    cmds, _ = _dry("copy", *base, "--recurse")
    scp = cmds[-1]
    assert scp[3:6] == ["tpu-vm", "scp", "--recurse"] and "--worker=all" in scp
    cmds, _ = _dry("stop", *base, "--run-name", "eval1")
    assert "--worker=all" in cmds[0] and "logs/eval1.pid" in _flag(cmds[0], "--command")
    cmds, _ = _dry("logs", *base, "--accelerator-type", "v4-32", "--no-follow")
    assert len(cmds) == 4 and all("-F" not in _flag(c, "--command") for c in cmds)


def test_missing_gcloud_without_dry_run_fails_cleanly():
    res = subprocess.run([sys.executable, SCRIPT, "status", "--name", "n", "--zone", "z"],
                         capture_output=True, text=True, env=dict(os.environ, PATH="/nonexistent"))
    assert res.returncode != 0 and "gcloud not found" in res.stderr


def test_program_args_rejected_where_meaningless():
    res = subprocess.run([sys.executable, SCRIPT, "delete", "--name", "n", "--zone", "z",
                          "--dry-run", "--", "--config", "x"], capture_output=True, text=True)
    assert res.returncode != 0


def test_run_on_worker_sh_execs_module(tmp_path):
    """Skips the install (stamp matches), exports COVIPAL_DISTRIBUTED and execs the module."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    os.symlink(sys.executable, venv / "bin" / "python")
    (venv / "bin" / "activate").write_text(f'export PATH="{venv}/bin:$PATH"\n')
    blob = b"".join(open(os.path.join(ROOT, f), "rb").read()
                    for f in ("requirements.txt", "pyproject.toml"))
    sha = subprocess.run(["sha256sum"], input=blob, capture_output=True,
                         check=True).stdout.split()[0].decode()
    (venv / ".covipal_install_stamp").write_text(f"{sha} jax[tpu]==0.10.2\n")
    mod = tmp_path / "mods"
    mod.mkdir()
    (mod / "probe_mod.py").write_text(
        "import os, sys\n"
        "print('DIST', os.environ.get('COVIPAL_DISTRIBUTED'), 'CWD', os.getcwd(),"
        " 'ARGS', ' '.join(sys.argv[1:]))\n")
    env = dict(os.environ, COVIPAL_PYTHON=sys.executable, COVIPAL_VENV=str(venv),
               PYTHONPATH=str(mod))
    env.pop("COVIPAL_DISTRIBUTED", None)
    res = subprocess.run(["bash", WORKER_SH, "probe_mod", "--config.mesh.data=-1", "a b"],
                         capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert f"DIST 1 CWD {ROOT} ARGS --config.mesh.data=-1 a b" in res.stdout
    assert "skipping pip" in res.stderr
    res = subprocess.run(["bash", WORKER_SH], capture_output=True, text=True, env=env)
    assert res.returncode == 2 and "usage" in res.stderr
