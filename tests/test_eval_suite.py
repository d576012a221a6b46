"""`python -m covipal_jax.eval --suite covipal_table1` on the tiny model with tiny fixtures.

The first run answers the eight image benchmarks for the unpruned model and two keeps of one
method (random weights: the answers are noise). The prediction files are then edited to known
answers (all right for the unpruned model, every other question right for the pruned ones),
and the rerun must answer nothing (resume), recompute every cell and print the Table 1 layout
with exactly the expected scores, ratios and relative average.
"""
from __future__ import annotations

import base64
import csv
import io
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

pytestmark = pytest.mark.slow  # two tiny-model evaluations of 24 cells: ~2-4 min on 2 cores

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHES = ("gqa", "mme", "seed", "mmstar", "ai2d", "ocrvqa", "textvqa", "infovqa")
RUNS = ("none_k64", "pool_k32", "pool_k16")


def _png_bytes(rng) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def build_fixtures(root):
    """Two questions per benchmark (MME: two tasks x one image x two questions)."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    for name in ("g0", "g1", "b0", "b1"):
        (root / "images" / f"{name}.jpg").write_bytes(_png_bytes(rng))
    (root / "gqa.json").write_text(json.dumps({
        f"q{i}": {"imageId": f"g{i}", "question": "what color is the square ?",
                  "answer": "red"} for i in range(2)}))
    for task in ("existence", "code_reasoning"):
        (root / "mme" / task).mkdir(parents=True)
        (root / "mme" / task / "1.png").write_bytes(_png_bytes(rng))
        (root / "mme" / task / f"{task}.txt").write_text(
            "1.png\tis there a circle ?\tYes\n1.png\tis there a square ?\tNo\n")
    (root / "SEED-Bench-image").mkdir()
    (root / "SEED-Bench-image" / "s.jpg").write_bytes(_png_bytes(rng))
    (root / "seed.json").write_text(json.dumps({"questions": [
        {"question_id": str(i), "data_id": "s.jpg", "data_type": "image",
         "question": "what shape ?", "choice_a": "circle", "choice_b": "square",
         "choice_c": "star", "choice_d": "cross", "answer": "AB"[i]} for i in range(2)]}))
    b64 = base64.b64encode(_png_bytes(rng)).decode()
    with open(root / "mmstar.tsv", "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["index", "question", "answer", "category", "image"])
        for i in range(2):
            w.writerow([i, "which shape ?\nOptions: A: circle, B: square", "AB"[i], "cp", b64])
    (root / "ai2d_imgs").mkdir()
    (root / "ai2d_imgs" / "a.png").write_bytes(_png_bytes(rng))
    (root / "ai2d.jsonl").write_text("\n".join(json.dumps(dict(
        question_id=f"a{i}", image="ai2d_imgs/a.png", question="which stage ?",
        options=["egg", "larva", "adult"], answer=i)) for i in range(2)))
    (root / "ocrvqa.json").write_text(json.dumps({
        "b0": {"questions": ["who wrote this book ?", "is this a comic book ?"],
               "answers": ["jane austen", "no"], "split": 3}}))
    (root / "train_images").mkdir()
    (root / "train_images" / "t.jpg").write_bytes(_png_bytes(rng))
    (root / "textvqa.json").write_text(json.dumps({"data": [
        {"question_id": i, "image_id": "t", "question": "what does the sign say ?",
         "answers": ["stop"] * 10} for i in range(2)]}))
    img = {"bytes": _png_bytes(rng), "path": "i.png"}
    pq.write_table(pa.Table.from_pylist([
        {"questionId": str(i), "question": "which year ?", "answers": ["2019"], "image": img}
        for i in range(2)]), root / "infovqa.parquet")


def _env(cache):
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0",
                JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _lines(path):
    return [json.loads(x) for x in open(path, encoding="utf-8") if x.strip()]


def _right(rec):
    """The prediction that scores 100% for this record."""
    return rec["answer"] if rec["answer"] is not None else rec["answers"][0]


def _wrong(rec):
    ans = str(_right(rec))
    if ans in ("yes", "no"):
        return "no" if ans == "yes" else "yes"
    if len(ans) == 1 and ans.isupper():
        return "C" if ans != "C" else "A"
    return "zzzz"


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    build_fixtures(root / "data")
    out = root / "out"
    args = [sys.executable, "-m", "covipal_jax.eval", "--suite", "covipal_table1",
            "--methods=pool", "--keeps=0.5,0.25", f"--data_root={root / 'data'}",
            f"--out={out}", "--config.batch_size=2", "--config.text_buckets=(64,)",
            "--config.max_new_tokens=2", "--noprogress"]
    proc = subprocess.run(args, cwd=ROOT, env=_env(str(root / "cache")), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-4000:])
    return dict(root=root, out=out, args=args, first=proc)


def test_suite_first_run_writes_every_cell(suite_run):
    out = suite_run["out"]
    for run in RUNS:
        for b in BENCHES:
            res = json.loads((out / run / f"{b}.result.json").read_text())
            assert res["benchmark"] == b and res["answered_now"] == len(
                _lines(out / run / f"{b}.jsonl"))
    assert not (out / ".lock").exists()  # released
    assert "| Keep | Method | gqa | mme_p | mme | seed | mmstar | ai2d | ocrvqa | textvqa | " \
           "infovqa | Avg |" in suite_run["first"].stdout


def test_suite_rerun_resumes_and_prints_table1(suite_run):
    out = suite_run["out"]
    for run in RUNS:  # known answers: unpruned all right, pruned every other one right
        for b in BENCHES:
            path = out / run / f"{b}.jsonl"
            recs = sorted(_lines(path), key=lambda r: r["qid"])
            for i, r in enumerate(recs):
                r["pred"] = _right(r) if run == "none_k64" or i % 2 == 0 else _wrong(r)
            path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    proc = subprocess.run(suite_run["args"], cwd=ROOT, env=_env(str(suite_run["root"] / "cache")),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-4000:])
    runs = json.loads((out / "runs.json").read_text())
    assert len(runs) == 24 and all(r["answered_now"] == 0 for r in runs.values())
    results = json.loads((out / "results.json").read_text())
    ref = results["none"]["64"]
    assert ref == {"gqa": 100.0, "mme_p": 200.0, "mme": 400.0, "seed": 100.0, "mmstar": 100.0,
                   "ai2d": 100.0, "ocrvqa": 100.0, "textvqa": 100.0, "infovqa": 100.0}
    # MME: each task has acc 50 and acc+ 0 -> 50 per task: perception 50, total 100.
    for k in ("32", "16"):
        assert results["pool"][k] == dict({b: 50.0 for b in ref}, mme_p=50.0, mme=100.0)
    md = proc.stdout
    # Avg over the eight benchmarks with MME-P: (7 x 0.5 + 0.25) / 8 = 46.875%.
    assert "| 64 (100.0%) | none | 100.00 (100.0%) | 200.00 (100.0%) | 400.00 (100.0%) |" in md
    assert ("| 32 (50.0%) | pool | 50.00 (50.0%) | 50.00 (25.0%) | 100.00 (25.0%) | "
            "50.00 (50.0%) | 50.00 (50.0%) | 50.00 (50.0%) | 50.00 (50.0%) | 50.00 (50.0%) | "
            "50.00 (50.0%) | 46.88% |") in md
    assert "| 16 (25.0%) | pool |" in md
    assert "CoViPAL Table 1" in md and "- mme_p: MME-P: perception" in md
    assert "- mme: MME: total = perception + cognition" in md
    assert "- Avg: mean over gqa, mme_p, seed, mmstar, ai2d, ocrvqa, textvqa, infovqa" in md
    summary = json.loads((out / "summary.json").read_text())
    rows = {(r["method"], r["keep"]): r for r in summary["rows"]}
    assert rows[("pool", "16")]["avg_relative"] == pytest.approx(0.46875)
    assert rows[("pool", "16")]["n_benchmarks"] == 8


def test_second_eval_on_one_out_is_refused(suite_run, tmp_path):
    out = tmp_path / "locked"
    out.mkdir()
    (out / ".lock").write_text(json.dumps(
        {"host": socket.gethostname(), "pid": os.getpid(), "token": "other"}))
    args = [a if not a.startswith("--out=") else f"--out={out}" for a in suite_run["args"]]
    proc = subprocess.run(args, cwd=ROOT, env=_env(str(suite_run["root"] / "cache")),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "in use by another evaluation" in proc.stderr
    assert not list(out.glob("*/*.jsonl"))
