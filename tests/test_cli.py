"""The shared command-line setup (`covipal_jax.cli`): help, logs, platforms, compilation cache,
TFDS's build message, and inference / eval without TensorFlow installed."""
from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from covipal_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A sitecustomize that makes TensorFlow and TFDS look uninstalled: `import tensorflow` raises
# ModuleNotFoundError and `importlib.util.find_spec("tensorflow")` is None, as without them.
NO_TF = textwrap.dedent("""\
    import sys

    _BLOCKED = ("tensorflow", "tensorflow_datasets")


    class _Hide:
        def __init__(self, inner):
            self._inner = inner

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in _BLOCKED:
                return None
            find = getattr(self._inner, "find_spec", None)
            return find(name, path, target) if find else None

        def __getattr__(self, attr):
            return getattr(self._inner, attr)


    sys.meta_path[:] = [_Hide(f) for f in sys.meta_path]
    """)


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env["PYTHONPATH"] = ROOT
    env.update(extra)
    return env


def _run(args, env, cwd, timeout=300):
    r = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (args, r.stdout[-2000:], r.stderr[-4000:])
    return r


def test_help_exits_zero_with_examples(tmp_path):
    for module, example in (("generate", "--config.checkpoint=/path/to/llava-1.5-7b-hf"),
                            ("train", "--workdir DIR"),
                            ("eval", "--benchmark pope,mme,gqa"),
                            ("demo", "--quick")):
        flag = "-h" if module == "demo" else "--help"
        r = _run([sys.executable, "-m", f"covipal_jax.{module}", flag], _env(), tmp_path,
                 timeout=120)
        assert example in r.stdout and "flags:" in r.stdout, r.stdout
        assert "--verbosity" in r.stdout and "--compilation_cache" in r.stdout
        if module == "generate":   # line continuations survive (raw module docstrings)
            assert "configs/llava15_7b.py \\\n        --config.checkpoint" in r.stdout


def test_default_platforms(monkeypatch):
    devices: list[str] = []
    monkeypatch.setattr(cli.glob, "glob",
                        lambda pat: [d for d in devices if fnmatch.fnmatch(d, pat)])
    assert cli.default_platforms() == "cpu"          # no accelerator: never probe for a TPU
    devices[:] = ["/dev/accel0"]
    assert cli.default_platforms() is None            # a TPU VM: JAX chooses
    devices[:] = ["/dev/vfio/0"]
    assert cli.tpu_present() and cli.default_platforms() is None
    monkeypatch.setenv("JAX_PLATFORMS", "tpu")
    devices[:] = []
    cli.configure_environment()
    assert os.environ["JAX_PLATFORMS"] == "tpu"     # the user's choice is kept
    monkeypatch.delenv("JAX_PLATFORMS")
    monkeypatch.setitem(sys.modules, "jax", sys.modules.get("jax") or __import__("jax"))
    updates = []
    monkeypatch.setattr(sys.modules["jax"].config, "update", lambda *a: updates.append(a))
    cli.configure_environment()
    assert os.environ["JAX_PLATFORMS"] == "cpu" and ("jax_platforms", "cpu") in updates


def test_verbosity_default_warning_and_flag(tmp_path):
    """absl INFO (Orbax, TFDS, JAX) hidden by default, back with --verbosity=0; ours stay."""
    script = tmp_path / "prog.py"
    script.write_text(textwrap.dedent("""\
        import logging as std_logging
        from absl import logging
        from covipal_jax import cli

        def main(argv):
            logging.info("third-party info")
            logging.warning("third-party warning")
            std_logging.getLogger("covipal_jax.x").info("our info")
            print("main ran")

        if __name__ == "__main__":
            cli.run(main)
        """))
    r = _run([sys.executable, str(script), "--compilation_cache="], _env(), tmp_path)
    assert "main ran" in r.stdout
    assert "third-party info" not in r.stderr and "third-party warning" in r.stderr
    assert "our info" in r.stderr
    r = _run([sys.executable, str(script), "--verbosity=0", "--compilation_cache="], _env(),
             tmp_path)
    assert "third-party info" in r.stderr


def test_tfds_local_build_message(tmp_path, capsys):
    from covipal_jax.data.synthetic import tfds_builder

    tfds_builder.builder(str(tmp_path), "tiny").download_and_prepare()
    out = capsys.readouterr().out
    assert "Unknown size" not in out and "Downloading" not in out
    assert "Building dataset covipal_synthetic_vqa/tiny locally in" in out


@pytest.mark.slow
def test_generate_and_eval_without_tensorflow_quiet_and_cached(tmp_path):
    """No TensorFlow/TFDS, JAX_PLATFORMS unset: generate and a tiny eval run, print no INFO
    or TPU lines, and fill the compilation cache."""
    block = tmp_path / "no_tf"
    block.mkdir()
    (block / "sitecustomize.py").write_text(NO_TF)
    cache = tmp_path / "xla"
    env = _env(PYTHONPATH=f"{block}{os.pathsep}{ROOT}",
               XLA_FLAGS="--xla_backend_optimization_level=0")
    check = subprocess.run([sys.executable, "-c", "import tensorflow_datasets"], env=env,
                           capture_output=True, text=True, cwd=tmp_path)
    assert check.returncode != 0 and "ModuleNotFoundError" in check.stderr
    r = _run([sys.executable, "-m", "covipal_jax.generate", "--config.max_new_tokens=2",
              f"--compilation_cache={cache}"], env, tmp_path)
    assert "answer:" in r.stdout
    noisy = [ln for ln in r.stderr.splitlines()
             if ln.startswith("I") or "tpu" in ln.lower() or "tensorflow" in ln.lower()]
    assert not noisy, r.stderr
    assert any(os.scandir(cache)), "compilation cache is empty"
    # A tiny POPE eval (2 questions) on the same environment.
    pope = tmp_path / "pope"
    (pope / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(pope / "coco_pope_random.json", "w") as f:
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(
                pope / "images" / f"img{i}.jpg")
            f.write(json.dumps(dict(question_id=i, image=f"img{i}.jpg",
                                    text="is there a red circle ?",
                                    label="yes" if i else "no")) + "\n")
    out = tmp_path / "out"
    _run([sys.executable, "-m", "covipal_jax.eval", "--benchmark", "pope",
          f"--data_dir={pope}", f"--out={out}", "--config.batch_size=2",
          "--config.max_new_tokens=2", "--noprogress", f"--compilation_cache={cache}"],
         env, tmp_path)
    results = json.loads((out / "results.json").read_text())
    assert "pope" in json.dumps(results)
