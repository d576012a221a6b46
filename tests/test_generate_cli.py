"""The generate entry point: tiny random model, pruning from config, clear errors."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import tiny
from covipal_jax import generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**pruning):
    c = tiny.config()
    c.max_new_tokens = 3
    for k, v in pruning.items():
        c.pruning[k] = v
    return c


@pytest.mark.slow
def test_run_tiny_with_pruning(tmp_path):
    img = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), np.uint8)).save(img)
    r = generate.run(_config(method="visionzip", keep=0.25), str(img), "what color is the ring ?")
    assert r["vision_tokens_kept"] == 16 and r["vision_tokens_total"] == 64
    assert isinstance(r["answer"], str)
    r = generate.run(_config(method="fastv", keep=8), None, None)  # generated image + question
    assert r["vision_tokens_kept"] == 8 and len(set(r["kept_indices"])) == 8


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="cannot read image"):
        generate.run(_config(), str(tmp_path / "missing.png"), "what ?")
    with pytest.raises(ValueError, match="bucket"):
        generate.run(_config(), None, " ".join(["red"] * 200))
    with pytest.raises(ValueError, match="image"):
        generate.run(_config(), None, "what color is the ring ?", raw=True)
    c = _config()
    c.checkpoint = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        generate.run(c, str(tmp_path / "x.png"), "what ?")
    (tmp_path / "empty").mkdir()
    c.checkpoint = str(tmp_path / "empty")
    with pytest.raises((FileNotFoundError, ValueError), match="config.json"):
        generate.run(c, str(tmp_path / "x.png"), "what ?")
    with pytest.raises(ValueError, match="keep"):
        generate.run(_config(method="pool", keep=100), None, None)  # > n_v = 64


def test_cli_subprocess():
    r = subprocess.run(
        [sys.executable, "-m", "covipal_jax.generate", "--config", "configs/tiny.py",
         "--config.max_new_tokens=2", "--config.pruning.method=pool",
         "--config.pruning.keep=0.25"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "answer:" in r.stdout and "vision tokens kept: 16 / 64" in r.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "covipal_jax.generate", "--config", "configs/tiny.py",
         "--image", "/nonexistent.png", "--prompt", "hi"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "cannot read image" in bad.stderr
