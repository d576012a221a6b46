"""Tests for covipal_jax/tools/aot.py: TPU ahead-of-time compiles of the tiny config (in a
subprocess: libtpu's environment must not touch this process's CPU backend), and the FLOP
count of unrolled layers (in process, CPU only)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from covipal_jax.tools import aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_libtpu = pytest.mark.skipif(
    not aot.libtpu_available(),
    reason="libtpu is not installed: pip install -r requirements-dev.txt (jax[tpu]==0.10.2)")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("XLA_FLAGS", None)  # conftest's fast-compile CPU flags: not for the TPU compiler
    return env


def _python(code: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def tiny_reports():
    """Compile the tiny config's steps for v5e:2x2 (4 chips) in one subprocess."""
    if not aot.libtpu_available():
        pytest.skip("libtpu is not installed")
    res = _python("""
        import json
        from covipal_jax.tools import aot
        aot.setup_host()
        from covipal_jax.configs import tiny
        out = {}
        def run(name, mode, keep=1.0, mesh=None, batch=4, **kw):
            config = tiny.get_config()
            with config.unlocked():
                for k, v in (mesh or dict(data=1, fsdp=-1, tensor=1)).items():
                    config.mesh[k] = v
            method = "none" if keep == 1.0 else "ppm"
            req = aot.Request(mode, batch, 16, keep, method, 4, **kw)
            out[name] = aot.compile_step(req, config, "v5e:2x2")
        run("prefill", "prefill")
        run("prefill_pruned", "prefill", keep=0.25)
        run("prefill_replicated", "prefill", mesh=dict(data=4, fsdp=1, tensor=1))
        run("decode", "decode", keep=0.25)
        run("train", "train_ppm", batch=8)
        print("JSON" + json.dumps(out))
    """)
    assert res.returncode == 0, res.stderr[-4000:]
    line = next(x for x in res.stdout.splitlines() if x.startswith("JSON"))
    return json.loads(line[4:])


@pytest.mark.slow
@needs_libtpu
def test_tiny_steps_compile_for_v5e(tiny_reports):
    for name, r in tiny_reports.items():
        assert r["devices"] == 4 and r["chip"] == "v5e", name
        assert r["hbm_bytes"] == 16 * 2 ** 30
        b = r["bytes"]
        assert b["argument"] > 0 and b["total"] > 0 and r["fits"], name
        assert r["flops_global"] > 0 and r["est_step_s"] > 0, name
        assert r["flops_per_device"] == pytest.approx(r["flops_global"] / 4)
    assert tiny_reports["prefill"]["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert tiny_reports["train"]["mode"] == "train_ppm" and tiny_reports["train"]["stage"] == 1


@pytest.mark.slow
@needs_libtpu
def test_pruning_cuts_flops_and_cache(tiny_reports):
    full, pruned = tiny_reports["prefill"], tiny_reports["prefill_pruned"]
    assert pruned["k"] == 16 and full["k"] == 64
    assert pruned["flops_global"] < 0.75 * full["flops_global"]
    assert pruned["bytes"]["output"] < full["bytes"]["output"]  # the KV cache is an output


@pytest.mark.slow
@needs_libtpu
def test_fsdp_shards_the_parameters(tiny_reports):
    """FSDP over 4 chips holds less per chip than replicated parameters. (Not a quarter:
    TPU layouts pad the tiny model's minor dimensions (16, 64) to 128-wide tiles.)"""
    fsdp = tiny_reports["prefill"]["bytes"]["argument"]
    replicated = tiny_reports["prefill_replicated"]["bytes"]["argument"]
    assert fsdp < 0.8 * replicated


@pytest.mark.slow
@needs_libtpu
def test_decode_and_train_donate_their_state(tiny_reports):
    assert tiny_reports["decode"]["bytes"]["alias"] > 0
    assert tiny_reports["train"]["bytes"]["alias"] > 0


@needs_libtpu
def test_cli_json_and_exit_status(tmp_path):
    """The CLI writes its report, and exits 1 when the step does not fit the HBM given."""
    out = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "covipal_jax.tools.aot", "--config", "configs/tiny.py",
           "--topology", "v5e-4", "--mode", "prefill", "--batch", "4", "--text_len", "16",
           "--noflops", "--hbm_gib", "1e-6", "--json", str(out)]
    res = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=600, check=False)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "DOES NOT FIT" in res.stdout
    r = json.loads(out.read_text())
    assert r["topology"] == "v5e:2x2" and not r["fits"] and "flops_global" not in r
    bad = subprocess.run(cmd[:5] + ["--topology", "v9z:1x1", "--mode", "prefill"], cwd=ROOT,
                         env=_env(), capture_output=True, text=True, timeout=600, check=False)
    assert bad.returncode == 2 and "unknown topology" in bad.stderr


def test_resolve_topology():
    assert aot.resolve_topology("v5e-8") == ("v5e:2x4", "v5e")
    assert aot.resolve_topology("v4-8") == ("v4:2x2x1", "v4")
    assert aot.resolve_topology("v5p:2x2x1") == ("v5p:2x2x1", "v5p")
    with pytest.raises(ValueError, match="unknown topology"):
        aot.resolve_topology("v9z-8")


def _tiny_config(layers: int):
    from covipal_jax.configs import tiny

    config = tiny.get_config()
    with config.unlocked():
        config.model.text.num_layers = layers
    return config


def test_hlo_flops_count_every_layer():
    """XLA counts a scanned loop body once; the unrolled count grows by one layer per layer,
    and one layer costs at least its matmuls."""
    req = aot.Request("prefill", 2, 16, 1.0, "none", 4)
    f = [aot.hlo_flops(req, _tiny_config(n)) for n in (2, 3, 4)]
    step = f[1] - f[0]
    assert f[2] - f[1] == pytest.approx(step, rel=1e-6)
    cfg = aot.model_config(_tiny_config(2))
    t = cfg.text
    seq = 16 - 1 + cfg.num_vision_tokens
    matmuls = 2 * 2 * seq * (t.hidden_size * (t.num_heads + 2 * t.num_kv_heads) * t.head_dim
                             + t.num_heads * t.head_dim * t.hidden_size
                             + 3 * t.hidden_size * t.intermediate_size)
    assert matmuls <= step <= 2 * matmuls


def test_hlo_flops_include_every_ppm_block():
    req = aot.Request("prefill", 1, 16, 0.25, "ppm", 4)
    config = _tiny_config(2)
    one = aot.hlo_flops(req, config)
    with config.unlocked():
        config.ppm.num_layers = 3
    three = aot.hlo_flops(req, config)
    from covipal_jax.weights import ppm_io

    pcfg = ppm_io.ppm_config(config, aot.model_config(config))
    block = aot.ppm_block_cost(pcfg, 1, 16, grad=False)
    assert block > 0
    assert three - one == pytest.approx(block, rel=1e-6)  # 2 blocks (default) -> 3 blocks


@needs_libtpu
def test_cli_config_batch_is_fitted_to_the_mesh():
    """The README's command (a config batch of 1 on a topology whose default mesh splits the
    batch 4 ways) compiles the smallest batch that divides the mesh and says so; a --batch
    that does not divide is an error that names one that does."""
    cmd = [sys.executable, "-m", "covipal_jax.tools.aot", "--config", "configs/tiny.py",
           "--config.batch_size=1", "--topology", "v5e:2x2", "--mode", "prefill",
           "--text_len", "16", "--noflops"]
    res = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=600, check=False)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert ("note: batch 1 (from the config) does not divide data x fsdp = 4 x 1 = 4: "
            "compiled batch 4") in res.stdout
    assert ", batch 4," in res.stdout and "FITS" in res.stdout
    bad = subprocess.run(cmd + ["--batch", "6"], cwd=ROOT, env=_env(), capture_output=True,
                         text=True, timeout=600, check=False)
    assert bad.returncode == 2, bad.stderr[-3000:]
    assert "batch 6 is not divisible by data x fsdp = 4 x 1 = 4: use --batch 8" in bad.stderr


def test_fitting_batch():
    from types import SimpleNamespace

    from covipal_jax.train import state as state_lib

    mesh = SimpleNamespace(shape={"data": 2, "fsdp": 4, "tensor": 1})
    assert state_lib.data_parallelism(mesh) == 8
    assert [state_lib.fitting_batch(b, mesh) for b in (1, 8, 9, 16)] == [8, 8, 16, 16]
    assert state_lib.fitting_batch(8, mesh, hosts=3) == 24
    # the trainers' batch check (PPM Trainer and PDrop* FinetuneTrainer share it)
    assert state_lib.batch_geometry(mesh, 16, 2, max_len=20, n_v=64) == (16, 83)
    for batch, hosts in ((12, 1), (8, 3)):
        with pytest.raises(ValueError, match="must be divisible by the data x fsdp"):
            state_lib.batch_geometry(mesh, batch, hosts, max_len=20, n_v=64)
