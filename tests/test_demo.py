"""End-to-end tests of the main job (`python -m covipal_jax.demo --quick`) and its helpers."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from covipal_jax.configs import demo as demo_config
from covipal_jax.demo import lib as demo_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("ppm", "fastv", "visionzip", "dart", "random", "pool", "divprune", "pdrop",
           "sparsevlm")
MERGING = ("sparsevlm",)   # recycled tokens: its last stage holds kept + merged tokens
RATIOS = (1.0, 0.5, 0.25, 0.125, 0.0625)
STAR = "pdrop_star"        # PDrop*: the LLaVA fine-tuned with PyramidDrop on, swept with pdrop


def _run_quick(workdir, *extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    # The demo's own XLA flags (`__main__.DEMO_XLA_FLAGS`), not conftest's (whose optimization level 0 makes the
    # pretraining steps 2x slower).
    env.pop("XLA_FLAGS", None)
    res = subprocess.run([sys.executable, "-m", "covipal_jax.demo", "--workdir", str(workdir),
                          "--quick", *extra], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=False, timeout=1800)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return res


def _results(workdir):
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo_quick")
    res = _run_quick(workdir)
    return workdir, res


@pytest.mark.slow   # the quick demo (~4 min): with the determinism test, in the slow step
def test_quick_end_to_end(quick_run):
    workdir, res = quick_run
    results = _results(workdir)
    assert set(results) == {"unpruned", "methods"}
    assert set(results["methods"]) == set(METHODS) | {STAR}
    for method, by_ratio in results["methods"].items():
        assert {float(r) for r in by_ratio} == set(RATIOS), method
        for acc in by_ratio.values():
            assert 0.0 <= acc <= 1.0
    with open(os.path.join(workdir, "results_detail.json")) as f:
        detail = json.load(f)
    # Above chance (a uniform guess among each question type's answers) even after a few steps:
    # yes/no questions alone give 0.5, so a model that reads the question beats 0.37.
    assert results["unpruned"] > detail["chance"]
    kept = {(r["method"], r["ratio"]): r["k"] for r in detail["rows"]}
    n_v = detail["n_v"]
    for m in METHODS + (STAR,):
        for r in RATIOS:
            if m in MERGING:
                assert 1 <= kept[(m, r)] <= n_v
            else:
                assert kept[(m, r)] == max(1, round(r * n_v)), (m, r)
    # Keeping every token is the unpruned model for selection methods.
    for m in ("ppm", "fastv", "dart", "random", "pool", "divprune", "pdrop"):
        assert results["methods"][m][repr(1.0)] == pytest.approx(results["unpruned"], abs=0.01)
    # PDrop*: its own model (fine-tuned), at r = 1 its unpruned accuracy; in the table.
    assert results["methods"][STAR][repr(1.0)] == pytest.approx(detail[f"{STAR}_unpruned"],
                                                                abs=0.01)
    with open(os.path.join(workdir, STAR, "done.json")) as f:
        star = json.load(f)
    assert star["steps"] == demo_config.get_config().quick.pdrop_star.steps
    assert np.isfinite(star["loss_last"])
    assert "| pdrop* |" in open(os.path.join(workdir, "results.md")).read()
    png = os.path.join(workdir, "accuracy_vs_keep.png")
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    assert "| method |" in res.stdout


@pytest.mark.slow   # the quick demo (~4 min): with the determinism test, in the slow step
def test_rerun_reuses_stages(quick_run):
    workdir, _ = quick_run
    before = _results(workdir)
    res = _run_quick(workdir)
    for stage in ("data", "pretrain", "ppm", "evaluate"):
        assert f"[{stage}] reusing" in res.stdout, res.stdout[-2000:]
    assert _results(workdir) == before


@pytest.mark.slow
def test_quick_is_deterministic(quick_run, tmp_path):
    workdir, _ = quick_run
    _run_quick(tmp_path / "again")
    with open(os.path.join(workdir, "results.json")) as f, \
            open(tmp_path / "again" / "results.json") as g:
        assert f.read() == g.read()


@pytest.mark.slow   # the quick demo (~4 min): with the determinism test, in the slow step
def test_real_checkpoint_path(quick_run, tmp_path):
    """Steps 3-4 on a given Hugging Face checkpoint and a TFDS set under --data_dir (the
    README's real-checkpoint command; here the quick run's exported LLaVA plays the real one)."""
    from tests import train_util

    workdir, _ = quick_run
    data_dir = train_util.build_data()
    # --config.tokenizer= : the checkpoint's own tokenizer (configs/demo.py names the built-in
    # one, which the real-checkpoint configs do not).
    # PDrop*: a given fine-tuned checkpoint (a real run has no synthetic set to fine-tune on).
    res = _run_quick(tmp_path / "real", f"--config.checkpoint={workdir}/llava",
                     "--config.tokenizer=", "--data_dir", data_dir, "--config.data.name=tiny",
                     f"--config.pdrop_star.checkpoint={workdir}/{STAR}/llava")
    assert "[pretrain]" not in res.stdout  # steps 1-2 skipped: the checkpoint is given
    results = _results(tmp_path / "real")
    assert set(results["methods"]) == set(METHODS) | {STAR}
    assert results["methods"][STAR] == pytest.approx(_results(workdir)["methods"][STAR],
                                                     abs=1e-6)
    assert os.path.exists(tmp_path / "real" / "ppm_train" / "ppm" / "config.json")
    # The same checkpoint and held-out split as the quick run: the same unpruned accuracy.
    assert results["unpruned"] == pytest.approx(_results(workdir)["unpruned"], abs=1e-6)


def test_apply_quick_merges_sections():
    c = demo_config.get_config()
    q = demo_lib.apply_quick(c)
    assert q.demo.n_train == c.quick.demo.n_train < c.demo.n_train
    assert tuple(q.train.steps) == tuple(c.quick.train.steps)
    assert q.model.vision.image_size == q.task.image_size == 32  # a section's key replaced
    assert q.model.text == c.model.text and q.template == c.template  # the rest untouched
    assert c.demo.n_train != q.demo.n_train  # a copy


def test_fingerprint_changes_with_config():
    c = demo_config.get_config()
    a = demo_lib.fingerprint(c.pretrain)
    with c.unlocked():
        c.pretrain.lr = 0.5
    assert demo_lib.fingerprint(c.pretrain) != a


def test_queried_kept():
    queried = np.zeros((2, 4), bool)
    queried[0, 1] = queried[1, 3] = True
    kept = np.array([[1, 2], [0, 2]])
    assert demo_lib._queried_kept(queried, kept, 4) == 0.5


def test_format_table_and_plot(tmp_path):
    rows = [dict(method="none", ratio=1.0, k=4, accuracy=0.9, seconds=1.0, queried_kept=1.0)]
    for m in ("ppm", "random"):
        for r, k in ((1.0, 4), (0.5, 2)):
            rows.append(dict(method=m, ratio=r, k=k, accuracy=0.5 + r / 4, seconds=r,
                             queried_kept=r))
    table = demo_lib.format_table(rows)
    assert "| unpruned | 1 | 4 | 1.00 | 0.9000 | 100.0% |" in table
    assert "| ppm | 0.750 | 0.625 |" in table
    demo_lib.plot(rows, str(tmp_path / "p.png"), chance=0.3)
    with Image.open(tmp_path / "p.png") as im:
        assert im.format == "PNG"
