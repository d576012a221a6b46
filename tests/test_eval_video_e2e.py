"""Video benchmarks end to end on a tiny random LLaVA-OneVision (`configs/tiny_ov.py`).

Small video files (coloured noise, written with PyAV here) for Video-MME, MVBench and NExT-QA;
`suite.run` (what `python -m covipal_jax.eval` calls) decodes them, samples 4 frames, answers
through `LlavaPredictor.predict_frames` -> the Sampler's video path, unpruned and pruned
(DivPrune at keep 0.25), writes the predictions, metrics and tables, resumes, and compiles one
prefill / decode program per (frames bucket, text bucket, k). Random weights: the answers are
noise; the metrics are recomputed here from the written predictions with lmms-eval's parsing
rules. The lmms-eval adapter answers a video request (a path as the visual) on the same model.
"""
from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from covipal_jax.configs import tiny_ov
from covipal_jax.eval import benchmarks as bm
from covipal_jax.eval import harness as hs
from covipal_jax.eval import suite
from covipal_jax.eval.benchmarks import video_common as vc

# Compile-heavy (tiny models, many programs): run in the CI step for slow tests.
pytestmark = pytest.mark.slow

av = pytest.importorskip("av")

FRAMES = 4
PARSERS = {"videomme": vc.videomme_letter, "mvbench": vc.mvbench_letter,
           "nextqa": vc.nextqa_letter}


def write_video(path, n=8, h=32, w=40, seed=0):
    """n frames of coloured noise (mpeg4, 10 fps)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        s = out.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for _ in range(n):
            x = (rng.integers(0, 256, (h, w, 3)) * rng.uniform(0.2, 1.0, 3)).astype(np.uint8)
            for pkt in s.encode(av.VideoFrame.from_ndarray(x, format="rgb24")):
                out.mux(pkt)
        for pkt in s.encode():
            out.mux(pkt)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("video_bench")
    # Video-MME: 2 videos, 3 questions (short, medium, long).
    vm = root / "videomme"
    rows = []
    for i, (vid, dur) in enumerate([("v1", "short"), ("v2", "medium"), ("v1", "long")]):
        write_video(vm / "data" / f"{vid}.mp4", seed=i)
        rows.append({"videoID": vid, "duration": dur, "domain": "d", "task_type": "Counting",
                     "question_id": f"q{i}", "question": "how many objects are there ?",
                     "options": ["A. one", "B. two", "C. three", "D. four"],
                     "answer": "ABCD"[i]})
    pq.write_table(pa.Table.from_pylist(rows), vm / "videomme.parquet")
    # MVBench: a bounded task (Action Sequence: start/end) and an unbounded one.
    mv = root / "mvbench"
    (mv / "json").mkdir(parents=True)
    write_video(mv / "video" / "star" / "Charades_v1_480" / "a.mp4", n=12, seed=3)
    write_video(mv / "video" / "ssv2_video" / "b.mp4", seed=4)
    (mv / "json" / "action_sequence.json").write_text(json.dumps([
        {"video": "a.mp4", "question": "what did the person do first ?",
         "candidates": ["sat", "stood", "ran"], "answer": "stood", "start": 0.2, "end": 0.9},
        {"video": "a.mp4", "question": "what next ?", "candidates": ["sat", "ran"],
         "answer": "sat", "start": 0.0, "end": 1.1}]))
    (mv / "json" / "action_antonym.json").write_text(json.dumps([
        {"video": "b.mp4", "question": "which action ?", "candidates": ["push", "pull"],
         "answer": "pull"}]))
    # NExT-QA: val.csv + NExTVideo/<video>.mp4
    nq = root / "nextqa"
    write_video(nq / "NExTVideo" / "7771.mp4", seed=5)
    with open(nq / "val.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video", "question", "answer", "qid", "type", "a0", "a1", "a2", "a3", "a4"])
        w.writerow(["7771", "what is the dog doing", 1, 1, "CW", "a", "b", "c", "d", "e"])
        w.writerow(["7771", "what happens after", 4, 2, "TN", "a", "b", "c", "d", "e"])
    return dict(videomme=str(vm / "videomme.parquet"), mvbench=str(mv),
                nextqa=str(nq / "val.csv"), root=root)


def config():
    c = tiny_ov.get_config(f"frames={FRAMES}")
    c.text_buckets = (128,)  # every prompt of the three benchmarks: one text bucket
    c.max_new_tokens = 2
    c.batch_size = 2
    return c


def _recomputed_accuracy(records, parse):
    """Accuracy (%) from the raw predictions, with the benchmark's lmms-eval parser."""
    hit = [parse(r["pred"], r["options"]) == r["answer"] for r in records]
    return 100.0 * sum(hit) / len(hit)


def test_video_benchmarks_end_to_end_pruned_resumable_one_compile(data, tmp_path, monkeypatch):
    made = []
    real = suite.predictors

    def spy(*a, **kw):
        for item in real(*a, **kw):
            made.append(item[-1])
            yield item

    monkeypatch.setattr(suite, "predictors", spy)
    out = tmp_path / "out"
    names = ["videomme", "mvbench", "nextqa"]
    methods = [("none", None), ("divprune", 0.25), ("visionzip", 0.25)]
    summary = suite.run(config(), names, {b: data[b] for b in names}, str(out),
                        methods=methods, progress=False, num_workers=0)
    (none, div, vz) = made
    assert none.num_frames == div.num_frames == vz.num_frames == FRAMES
    assert vz.video_unsupported() is None        # VisionZip prunes each frame (per view)
    n_q = {"videomme": 3, "mvbench": 3, "nextqa": 2}
    for run in ("none_k16", "divprune_k4", "visionzip_k4"):
        for b in names:
            recs = hs.load_records(str(out / run / f"{b}.jsonl"))
            assert len(recs) == n_q[b] and not any(r.get("error") for r in recs)
            assert all(isinstance(r["pred"], str) for r in recs)
            metrics = json.loads((out / run / f"{b}.jsonl.metrics.json").read_text())
            acc = _recomputed_accuracy(recs, PARSERS[b])
            overall = metrics["overall"] if b == "mvbench" else metrics["score"]
            assert overall == pytest.approx(acc)
            assert bm.get(b).score(recs)["score"] == pytest.approx(metrics["score"])
            result = json.loads((out / run / f"{b}.result.json").read_text())
            assert result["num_frames"] == FRAMES and result["answered_now"] == n_q[b]
    # per-duration / per-task / per-type tables
    md = (out / "video_breakdown.md").read_text()
    assert summary["breakdown"] and "| short |" in md and "| Action Sequence |" in md
    assert "| causal |" in md and "none_k16" in md and "divprune_k4" in md
    assert set(json.loads((out / "results.json").read_text())) == {"none", "divprune",
                                                                    "visionzip"}
    # pruned: the LLM sees keep x the video's slots (4 frames x 2 x 2 + newline = 17 -> 4),
    # one program per (frames bucket, text bucket, k) across all three benchmarks
    frames = np.zeros((FRAMES, 32, 40, 3), np.uint8)
    pred = div.generate_frames([(frames, "what is it ?")], 2)
    assert pred.kept.shape == (1, 4) and pred.num_vision_tokens == 4
    comp = none.sampler.compilations()
    assert comp["prefill"] == 3 and comp["decode"] == 3, comp  # one per method
    with pytest.raises(ValueError, match="num_frames=4"):
        div.generate_frames([(frames[:3], "x")], 2)
    # resume: a rerun answers nothing and reproduces the tables
    made.clear()
    again = suite.run(config(), names, {b: data[b] for b in names}, str(out),
                      methods=methods, progress=False, num_workers=0)
    for b in names:
        result = json.loads((out / "divprune_k4" / f"{b}.result.json").read_text())
        assert result["answered_now"] == 0
    assert again["breakdown"] == summary["breakdown"]
    assert made[0].sampler.compilations()["prefill"] == 0


def test_mvbench_bound_samples_inside_the_clip(data):
    """The official MVBench sampling: frames inside [start, end] seconds."""
    from covipal_jax.data import video as video_data
    from covipal_jax.eval import video as video_eval

    path = f"{data['mvbench']}/video/star/Charades_v1_480/a.mp4"  # 12 frames at 10 fps
    np.testing.assert_array_equal(video_eval.bounded_indices(0.2, 0.9, 10.0, 12, 4),
                                  [2, 4, 6, 7])
    clip = video_eval.load_clip(path, 4, 0.2, 0.9)
    every = video_data.load_video(path, 12)
    np.testing.assert_array_equal(clip, every[[2, 4, 6, 7]])

    class P:
        num_frames, use_bounds = 4, True

        def predict_frames(self, batch, n):
            return []

    ref = bm.VideoRef(path=path)
    np.testing.assert_array_equal(video_eval.load_input(ref, P(), {"start": 0.2, "end": 0.9}),
                                  clip)
    P.use_bounds = False  # lmms-eval's protocol: the whole video
    np.testing.assert_array_equal(video_eval.load_input(ref, P(), {"start": 0.2, "end": 0.9}),
                                  every[[0, 3, 6, 9]])
    with pytest.raises(ValueError, match="holds no frame"):
        video_eval.bounded_indices(5.0, 6.0, 10.0, 12, 4)


def test_mvbench_bound_on_a_frame_folder(tmp_path):
    """Frame folders (MVBench's tvqa frames, 3 fps) number frames from 1 as the official code."""
    from PIL import Image

    from covipal_jax.eval import video as video_eval

    for i in range(10):
        Image.new("RGB", (8, 6), (20 * i, 0, 0)).save(tmp_path / f"{i + 1:05d}.png")
    clip = video_eval.load_clip(str(tmp_path), 4, 0.0, 100.0)
    # official: start 1, end min(300, 10), segments of 2.25 -> frames 2, 4, 6, 9 (1-based)
    assert [int(f[0, 0, 0]) // 20 for f in clip] == [1, 3, 5, 8]
    clip = video_eval.load_clip(str(tmp_path), 2, 1.0, 2.0)  # frames 3..6
    assert [int(f[0, 0, 0]) // 20 + 1 for f in clip] == [3, 5]


def test_lmms_eval_adapter_answers_video_requests(data):
    """lmms-eval hands video tasks' visuals as paths: decoded, 4 frames, predict_frames."""
    from covipal_jax.eval.lmms_eval_model import CovipalJax

    class Request:
        def __init__(self, *args):
            self.args = args

    model = CovipalJax.create_from_arg_string(
        "config=tiny_ov,method=random,keep=0.25,max_new_tokens=2,frames=4", {"batch_size": 2})
    assert model.predictor.num_frames == 4 and model.spec["method"] == "random"
    video = f"{data['root']}/nextqa/NExTVideo/7771.mp4"
    model.task_dict = {"nextqa": {"test": [{"v": video, "q": "what happens ?"}] * 3}}
    reqs = [Request("what happens ?", {"max_new_tokens": 2, "until": ["\n\n"]},
                    lambda d: [d["v"]], i, "nextqa", "test") for i in range(3)]
    texts = model.generate_until(reqs)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert texts[0] == texts[1] == texts[2]  # same video and prompt: same draw, greedy


def test_eval_cli_runs_the_video_benchmarks(data, tmp_path):
    """`python -m covipal_jax.eval` on the three video benchmarks (tiny OneVision, --frames)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "cli"
    args = [sys.executable, "-m", "covipal_jax.eval", "--config", "configs/tiny_ov.py",
            "--benchmark", "videomme,mvbench,nextqa",
            f"--data_dir=videomme={data['videomme']},mvbench={data['mvbench']},"
            f"nextqa={data['nextqa']}", f"--frames={FRAMES}", "--config.text_buckets=(128,)",
            "--config.batch_size=2", "--config.max_new_tokens=2", f"--out={out}",
            "--noprogress", "--novideo_bounds"]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_backend_optimization_level=0")
    proc = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    assert "| mvbench | none_k16 |" in proc.stdout and "video_breakdown.md" in proc.stdout
    for b, n in (("videomme", 3), ("mvbench", 3), ("nextqa", 2)):
        result = json.loads((out / "none_k16" / f"{b}.result.json").read_text())
        assert result["num_frames"] == FRAMES and result["n_examples"] == n
        recs = hs.load_records(str(out / "none_k16" / f"{b}.jsonl"))
        score = json.loads((out / "none_k16" / f"{b}.jsonl.metrics.json").read_text())
        assert bm.get(b).score(recs)["score"] == pytest.approx(score["score"])


def test_unsupported_reason_names_single_view_methods():
    """A method reading one view's tower statistics (and not pruning per view) is refused on
    packed input with a reason; the suite skips it on video benchmarks with that note."""
    import dataclasses
    from typing import ClassVar

    from covipal_jax import pruning
    from covipal_jax.inference import visual_inputs as vi

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class ClsOnly(pruning.PreLLMMethod):
        name: ClassVar[str] = "cls_only_test"
        needs: ClassVar[frozenset[str]] = frozenset({"cls_attention"})

        def select(self, ctx, k, variables=None):
            raise AssertionError("never called")

    why = vi.unsupported_reason(ClsOnly(keep=0.25))
    assert why and "cls_only_test" in why and "cls_attention" in why
    assert vi.unsupported_reason(pruning.get("visionzip")(keep=0.25)) is None   # per view
    assert vi.unsupported_reason(pruning.get("divprune")(keep=0.25)) is None
