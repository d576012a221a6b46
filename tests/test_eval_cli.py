"""End-to-end wiring of `python -m covipal_jax.eval` and `LlavaPredictor` on the tiny model.

Random weights: the answers are noise; what is checked is the plumbing (files, resume, tables,
option scores equal to an independent forward pass, sharded batches). Every model run is a
subprocess with `--xla_backend_optimization_level=0` (fast CPU compiles) sharing one
persistent compilation cache.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from covipal_jax.eval import __main__ as cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = ("none_k64", "visionzip_k16", "pool_k16", "visionzip_k32", "pool_k32")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """POPE (2 splits x 3 questions) and AI2D (3 multiple-choice questions) fixtures."""
    root = tmp_path_factory.mktemp("bench")
    rng = np.random.default_rng(0)
    (root / "pope" / "images").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(
            root / "pope" / "images" / f"img{i}.jpg")
    for split in ("random", "popular"):
        with open(root / "pope" / f"coco_pope_{split}.json", "w") as f:
            for i in range(3):
                f.write(json.dumps(dict(question_id=i, image=f"img{i}.jpg",
                                        text="is there a red circle ?",
                                        label="yes" if i % 2 else "no")) + "\n")
    (root / "ai2d" / "imgs").mkdir(parents=True)
    with open(root / "ai2d" / "ai2d.jsonl", "w") as f:
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (64, 40, 3), dtype=np.uint8)).save(
                root / "ai2d" / "imgs" / f"a{i}.png")
            f.write(json.dumps(dict(question_id=f"a{i}", image=f"imgs/a{i}.png",
                                    question="what shape is the blue object ?",
                                    options=["circle", "square", "triangle"],
                                    answer=i % 3)) + "\n")
    from covipal_jax.data.synthetic import task as synthetic
    from covipal_jax.data import text as text_lib

    # The tiny model's word tokenizer plus the option letters (for option scoring).
    tok = text_lib.BuiltinTokenizer(list(synthetic.vocabulary()) + list("ABCD"))
    return dict(root=root, pope=str(root / "pope"), ai2d=str(root / "ai2d" / "ai2d.jsonl"),
                cache=str(root / "xla_cache"), tokenizer=tok.save(str(root / "tok.json")))


def _env(cache, devices=1):
    flags = "--xla_backend_optimization_level=0"
    if devices > 1:
        flags += f" --xla_force_host_platform_device_count={devices}"
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags,
                JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _run(args, cache, devices=1, timeout=300):
    proc = subprocess.run(args, cwd=ROOT, env=_env(cache, devices), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc


def _lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(x) for x in f if x.strip()]


def test_parse_helpers():
    assert cli.parse_keep("64") == 64 and isinstance(cli.parse_keep("64"), int)
    assert cli.parse_keep("0.25") == 0.25
    assert cli.parse_keep("1/9") == pytest.approx(1 / 9)
    assert cli.parse_named(["a=x", "b=y"], ["a", "b"], "d") == {"a": "x", "b": "y"}
    assert cli.parse_named(["x", "y"], ["a", "b"], "d") == {"a": "x", "b": "y"}
    with pytest.raises(ValueError):
        cli.parse_named(["x"], ["a", "b"], "d")
    with pytest.raises(ValueError):
        cli.parse_named(["c=x"], ["a", "b"], "d")
    grid = cli.sweep_methods(["visionzip", "fastv"], ["16", "0.5"], True, False)
    assert grid == [("none", None), ("visionzip", 16), ("fastv", 16), ("visionzip", 0.5),
                    ("fastv", 0.5)]
    assert [m for m, _ in cli.sweep_methods([], ["8"], False, True)] == [
        "ppm", "visionzip", "fastv", "dart"]


def test_option_token_ids():
    from covipal_jax.data.synthetic import task as synthetic
    from covipal_jax.data import text as text_lib
    from covipal_jax.eval.predictor import option_token_ids

    words = text_lib.BuiltinTokenizer(synthetic.vocabulary())
    assert option_token_ids(words, "plain") == {}  # no letter tokens: no option scoring
    letters = text_lib.BuiltinTokenizer(list(synthetic.vocabulary()) + ["A", "B", "C"])
    ids = option_token_ids(letters, "plain")
    assert ids == {c: letters.token_to_id(c) for c in "ABC"}


def test_summarize_relative_average():
    results = {"none": {"64": {"pope": 80.0, "mme": 1500.0}},
               "ppm": {"16": {"pope": 76.0, "mme": 1350.0}, "32": {"pope": 80.0}}}
    s = cli.summarize(results, "none", ["pope", "mme"])
    rows = {(r["method"], r["keep"]): r for r in s["rows"]}
    assert rows[("ppm", "16")]["avg_relative"] == pytest.approx((0.95 + 0.9) / 2)
    assert rows[("ppm", "32")]["n_benchmarks"] == 1
    assert s["rows"][0]["method"] == "none"
    assert "| 16 | ppm | 76.00 (95.0%) | 1350.0 (90.0%) | 92.50% |" in s["markdown"]


@pytest.mark.slow
def test_sweep_writes_jsonl_tables_and_resumes(data, tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "covipal_jax.eval", "--config", "configs/tiny.py",
            "--benchmark", "pope,ai2d", f"--data_dir=pope={data['pope']},ai2d={data['ai2d']}",
            "--sweep", "--methods=visionzip,pool", "--keeps=16,0.5", f"--out={out}",
            "--config.batch_size=2", "--config.text_buckets=(64,)",
            f"--config.tokenizer={data['tokenizer']}", "--score_options",
            "--config.max_new_tokens=3", "--noprogress"]
    proc = _run(args, data["cache"])
    pope_qids = {f"{s}/{i}" for s in ("random", "popular") for i in range(3)}
    for run in RUNS:
        pope = _lines(out / run / "pope.jsonl")
        assert sorted(r["qid"] for r in pope) == sorted(pope_qids)
        assert all(isinstance(r["pred"], str) and r["benchmark"] == "pope" for r in pope)
        ai2d = _lines(out / run / "ai2d.jsonl")
        assert [r["qid"] for r in ai2d] == ["a0", "a1", "a2"]
        assert [r["answer"] for r in ai2d] == ["A", "B", "C"]
        for r in ai2d:  # multiple choice by option scores (log-probabilities)
            assert len(r["option_scores"]) == 3 and max(r["option_scores"]) <= 0
            assert r["choice"] == "ABC"[int(np.argmax(r["option_scores"]))]
        assert (out / run / "pope.jsonl.metrics.json").exists()
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"none", "visionzip", "pool"}
    assert set(results["none"]) == {"64"} and set(results["pool"]) == {"16", "32"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["unpruned"] == "none" and summary["benchmarks"] == ["pope", "ai2d"]
    assert len(summary["rows"]) == 5
    for row in summary["rows"]:
        ref = results["none"]["64"]["pope"]
        want = row["scores"]["pope"] / ref if ref else None
        assert row["relative"]["pope"] == (pytest.approx(want) if want is not None else None)
    md = (out / "summary.md").read_text()
    assert "| Keep | Method | pope | ai2d | Avg |" in md
    assert sum(line.startswith("| ") for line in md.splitlines()) == 6  # header + 5 rows
    assert "| Keep | Method" in proc.stdout
    runs = json.loads((out / "runs.json").read_text())
    assert runs["pool_k16/pope"]["spec"]["method"] == "pool"
    assert runs["pool_k16/pope"]["spec"]["k"] == 16 and runs["pool_k16/pope"]["n_v"] == 64
    assert runs["visionzip_k32/ai2d"]["answered_now"] == 3
    assert runs["visionzip_k32/ai2d"]["option_scores"] and not runs["none_k64/pope"][
        "option_scores"]

    # Resume: drop two answers (and leave a torn line) in one file; the rerun answers exactly
    # those, and leaves every other file untouched.
    target = out / "visionzip_k16" / "pope.jsonl"
    lines = target.read_text().splitlines(keepends=True)
    target.write_text("".join(lines[:4]) + lines[4][:10])
    before = {p: p.read_bytes() for p in out.glob("*/*.jsonl") if p != target}
    _run(args, data["cache"])
    after = target.read_text().splitlines(keepends=True)
    assert after[:4] == lines[:4]
    assert sorted(json.loads(x)["qid"] for x in after) == sorted(pope_qids)
    for p, content in before.items():
        assert p.read_bytes() == content, f"{p} was rewritten"
    runs = json.loads((out / "runs.json").read_text())
    assert runs["visionzip_k16/pope"]["answered_now"] == 2
    assert runs["none_k64/pope"]["answered_now"] == 0


PREDICTOR_CHECK = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from covipal_jax.configs import tiny
    from covipal_jax.inference import loading
    from covipal_jax.data import image as image_lib, synthetic, text as text_lib
    from covipal_jax.eval.predictor import LlavaPredictor, prune_spec
    from covipal_jax.inference.prefill import forward

    config = tiny.get_config()
    config.tokenizer = sys.argv[1]
    config.batch_size = 2
    loaded = loading.load(config)
    assert len(jax.devices()) == 2 and loaded.mesh.shape["data"] == 2

    # The predictor against an independent full forward pass, one item at a time.
    spec = prune_spec(config, "pool", 16, 64)
    pred = LlavaPredictor.from_config(config, loaded, spec)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (40 + 8 * i, 64, 3), dtype=np.uint8) for i in range(3)]
    prompts = ["what color is the square ?", "is there a red circle ?\\nA. yes\\nB. no",
               "how many objects are there ?"]
    letters = [("A", "B", "C", "D"), ("A", "B"), ("A", "B", "C")]
    scores = pred.score_options([(im, p, ls) for im, p, ls in zip(images, prompts, letters)])
    texts = pred.predict(list(zip(images, prompts)), 3)
    tok = loaded.tokenizer
    ids_abcd = [tok.token_to_id(c) for c in "ABCD"]
    checked = 0
    for im, p, ls, sc, text in zip(images, prompts, letters, scores, texts):
        pix = image_lib.preprocess([im], pred.processor)
        ids, mask = text_lib.encode_prompts(tok, [p], template="plain", buckets=(64,))
        logits, _, _ = forward(loaded.model, loaded.params, pix, ids, mask, spec)
        logp = np.asarray(jax.nn.log_softmax(logits[0, -1].astype(np.float32)))
        np.testing.assert_allclose(sc, logp[ids_abcd[:len(ls)]], atol=2e-4)
        first = tok.decode([int(np.argmax(logp))])  # "" for a special (stop, pad) token
        if first:
            assert text.split(" ")[0] == first, (text, first)
            checked += 1
    print("CHECK-OK", checked)
""")


@pytest.mark.slow
def test_sharded_predictor_matches_forward(data):
    """2 CPU devices (batch sharded over `data`), 3 items in batches of 2 (the last padded),
    prompts in the smallest bucket: option scores equal the log-softmax of an unsharded forward
    pass of each item alone (bucket 64); greedy answers start with its argmax."""
    proc = _run([sys.executable, "-c", PREDICTOR_CHECK, data["tokenizer"]],
                data["cache"] + "_2dev", devices=2)
    ok = [line for line in proc.stdout.splitlines() if line.startswith("CHECK-OK")]
    assert ok and int(ok[0].split()[1]) >= 1, proc.stdout  # some answers compared
