"""The installable package: pyproject metadata, and (slow) a fresh venv with `pip install .`.

The venv is made with `--system-site-packages --without-pip`, and pip runs with `--no-index
--no-build-isolation`: nothing is downloaded, so every pinned dependency must already be
installed at exactly its pinned version (the fast test checks that too).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_POINTS = ("generate", "train", "eval", "demo")


def _pyproject() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _name_version(req: str) -> tuple[str, str]:
    m = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([0-9][^;\s]*)", req)
    assert m, f"not pinned with ==: {req!r}"
    return m.group(1), m.group(2)


def test_pyproject_metadata():
    p = _pyproject()["project"]
    assert p["version"] == "0.2.0"
    assert p["license"] == "Apache-2.0"
    assert "Apache License" in open(os.path.join(ROOT, "LICENSE")).read(200)
    assert set(p["optional-dependencies"]) >= {"tpu", "cuda", "tfds", "test"}
    assert p["optional-dependencies"]["tpu"] == ["jax[tpu]==0.10.2"]
    assert p["optional-dependencies"]["cuda"] == ["jax[cuda12]==0.10.2"]
    # TensorFlow only in the tfds extra: inference does not need it.
    assert not any(r.startswith("tensorflow") for r in p["dependencies"])
    scripts = p["scripts"]
    assert sorted(scripts) == sorted(f"covipal-{n}" for n in ENTRY_POINTS)
    for target in scripts.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func))


def test_pins_match_installed():
    """Every pinned runtime, tfds and test dependency is installed at its pinned version."""
    p = _pyproject()["project"]
    reqs = p["dependencies"] + [r for k in ("tfds", "test")
                                for r in p["optional-dependencies"][k]]
    wrong = []
    for req in reqs:
        name, version = _name_version(req)
        have = importlib.metadata.version(name)
        if have.split("+")[0] != version:
            wrong.append(f"{name}: pinned {version}, installed {have}")
    assert not wrong, wrong


def test_requirements_install_the_package():
    """README's `pip install -r requirements.txt` installs this package (one source of pins)."""
    def lines(name):
        return [ln.strip() for ln in open(os.path.join(ROOT, name))
                if ln.strip() and not ln.lstrip().startswith("#")]

    assert lines("requirements.txt") == ["-e .[tfds]"]
    assert lines("requirements-dev.txt") == ["-e .[tfds,test,tpu]"]


def _copy_tree(dst: str) -> str:
    """The checkout without build outputs (pip builds in the source tree)."""
    src = os.path.join(dst, "src")
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", "build", "*.egg-info", "__pycache__", ".pytest_cache", "workdir*", "out*"))
    return src


def _venv(path: str) -> str:
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                    path], check=True)
    return os.path.join(path, "bin")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["JAX_PLATFORMS"] = env.get("JAX_PLATFORMS", "cpu")
    return env


def _run(cmd, cwd, timeout=600) -> str:
    r = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"{cmd} -> {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


def _pip_install(bindir: str, *args: str) -> None:
    _run([os.path.join(bindir, "python"), "-m", "pip", "install", "--no-index",
          "--no-build-isolation", "--no-deps", "-q", *args], cwd=os.path.dirname(bindir))


@pytest.mark.slow
def test_pip_install_and_run_outside_checkout(tmp_path):
    src = _copy_tree(str(tmp_path))
    bindir = _venv(str(tmp_path / "venv"))
    py = os.path.join(bindir, "python")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    _pip_install(bindir, src)
    # Dependencies are satisfied by the (system) environment at the pinned versions.
    _run([py, "-m", "pip", "check"], cwd=outside)
    where = _run([py, "-c", "import covipal_jax, covipal_jax.configs as c; "
                  "print(covipal_jax.__file__); print(c.path('tiny'))"], cwd=outside)
    assert all(ln.startswith(str(tmp_path / "venv")) for ln in where.split()), where
    for name in ENTRY_POINTS:
        out = _run([os.path.join(bindir, f"covipal-{name}"), "--help"], cwd=outside)
        assert "flags:" in out, out[:500]
        _run([py, "-m", f"covipal_jax.{name}", "--help"], cwd=outside)
    # No --config: the packaged tiny config, random weights, a generated image.
    out = _run([py, "-m", "covipal_jax.generate", "--config.max_new_tokens=2"], cwd=outside)
    assert "answer:" in out and "vision tokens kept: 64 / 64" in out, out
    # A tiny PPM training run with its default config (console script).
    out = _run([os.path.join(bindir, "covipal-train"), "--workdir", str(tmp_path / "run"),
                "--config.train.steps=(3,)", "--config.train.eval_batches=1"], cwd=outside)
    assert "done: step 3" in out, out
    assert (tmp_path / "run" / "ppm").is_dir()
    # Editable install: the same venv now imports the copied source tree.
    _pip_install(bindir, "-e", src)
    where = _run([py, "-c", "import covipal_jax; print(covipal_jax.__file__)"], cwd=outside)
    assert where.strip().startswith(os.path.join(src, "covipal_jax")), where
    _run([os.path.join(bindir, "covipal-generate"), "--help"], cwd=outside)
