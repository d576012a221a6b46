"""Tests for covipal_jax.eval.harness with fake predictors."""
from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from covipal_jax.eval import benchmarks as bm
from covipal_jax.eval import harness as hs


def _img(path, color=(10, 20, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (4, 4), color).save(path)


class FakePredictor:
    """Answers from a prompt -> answer table; checks the static batch size."""

    def __init__(self, table, batch_size, default="unknown", fail_after=None):
        self.table, self.batch_size, self.default = table, batch_size, default
        self.calls, self.fail_after = [], fail_after

    def predict(self, batch, max_new_tokens):
        assert len(batch) == self.batch_size
        assert all(isinstance(im, Image.Image) for im, _ in batch)
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("preempted")
        self.calls.append([p for _, p in batch])
        return [self.table.get(p, self.default) for _, p in batch]


class FakeScorer(FakePredictor):
    def score_options(self, batch):
        assert len(batch) == self.batch_size
        out = []
        for _, prompt, letters in batch:
            want = self.table.get(prompt)
            out.append([1.0 if letter == want else 0.0 for letter in letters])
        return out


def _gqa(tmp_path, n=5):
    qs = {}
    for i in range(n):
        _img(str(tmp_path / "images" / f"n{i}.jpg"))
        qs[f"q{i}"] = {"imageId": f"n{i}", "question": f"Question {i}?", "answer": f"a{i}"}
    path = tmp_path / "gqa.json"
    path.write_text(json.dumps(qs))
    return bm.read_gqa(str(path))


def _lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_pad_batch():
    assert hs.pad_batch([1, 2], 4) == ([1, 2, 2, 2], 2)
    with pytest.raises(ValueError):
        hs.pad_batch([], 4)
    with pytest.raises(ValueError):
        hs.pad_batch([1, 2, 3], 2)


def test_static_batches_and_padding(tmp_path):
    data = _gqa(tmp_path, n=5)
    # 3 right, q3 wrong, q4 right up to case/period.
    table = {ex.prompt: ex.answer for ex in data}
    table[data.examples[3].prompt] = "wrong"
    table[data.examples[4].prompt] = "A4."
    pred = FakePredictor(table, batch_size=2)
    out = str(tmp_path / "preds" / "gqa.jsonl")
    m = hs.run_benchmark(pred, data, out, batch_size=2, progress=False)
    assert len(pred.calls) == 3
    assert pred.calls[-1][0] == pred.calls[-1][1]  # last batch padded by repetition
    recs = _lines(out)
    assert [r["qid"] for r in recs] == [f"q{i}" for i in range(5)]  # padding dropped
    assert m["score"] == pytest.approx(80.0) and m["n"] == 5
    with open(out + ".metrics.json") as f:
        assert json.load(f)["score"] == pytest.approx(80.0)


def test_resume_after_crash_and_torn_line(tmp_path):
    data = _gqa(tmp_path, n=5)
    table = {ex.prompt: ex.answer for ex in data}
    out = str(tmp_path / "gqa.jsonl")
    crashing = FakePredictor(table, batch_size=2, fail_after=1)
    with pytest.raises(RuntimeError, match="preempted"):
        hs.run_benchmark(crashing, data, out, batch_size=2, progress=False)
    assert [r["qid"] for r in _lines(out)] == ["q0", "q1"]
    with open(out, "a") as f:  # a write cut short by the crash
        f.write('{"qid": "q2", "pred": "a')
    pred = FakePredictor(table, batch_size=2)
    m = hs.run_benchmark(pred, data, out, batch_size=2, progress=False)
    assert len(pred.calls) == 2  # only q2..q4 were asked
    assert sorted(r["qid"] for r in _lines(out)) == [f"q{i}" for i in range(5)]
    assert m["score"] == 100.0
    again = FakePredictor(table, batch_size=2)
    hs.run_benchmark(again, data, out, batch_size=2, progress=False)
    assert again.calls == []


def test_unreadable_image_is_recorded_and_retried(tmp_path):
    data = _gqa(tmp_path, n=3)
    bad = data.examples[1].image.path
    with open(bad, "wb") as f:
        f.write(b"not an image")
    table = {ex.prompt: ex.answer for ex in data}
    out = str(tmp_path / "gqa.jsonl")
    pred = FakePredictor(table, batch_size=4)
    m = hs.run_benchmark(pred, data, out, batch_size=4, progress=False, num_workers=0)
    assert m["errors"] == 1 and m["n"] == 2 and m["score"] == 100.0
    assert len(pred.calls) == 1 and len(set(pred.calls[0])) == 2
    _img(bad)  # fixed: the next run answers only that question
    pred2 = FakePredictor(table, batch_size=4)
    m2 = hs.run_benchmark(pred2, data, out, batch_size=4, progress=False)
    assert len(pred2.calls) == 1 and set(pred2.calls[0]) == {data.examples[1].prompt}
    assert m2["errors"] == 0 and m2["n"] == 3


def test_option_scoring_mmbench(tmp_path):
    import base64
    import csv
    import io
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    img = base64.b64encode(buf.getvalue()).decode()
    path = tmp_path / "mmb.tsv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["index", "question", "hint", "A", "B", "C", "D", "answer", "category",
                    "l2-category", "image"])
        w.writerow([1, "Q1", "", "a", "b", "c", "d", "B", "x", "l", img])
        w.writerow([2, "Q2", "", "a", "b", "", "", "A", "y", "l", img])
    data = bm.read_mmbench(str(path))
    table = {ex.prompt: ex.answer for ex in data}
    # Q2 rotation 1 answered wrong -> Q2 fails circular eval but passes plain.
    q2r1 = next(ex for ex in data if ex.qid == "2@1")
    table[q2r1.prompt] = "A" if q2r1.answer == "B" else "B"
    scorer = FakeScorer(table, batch_size=4)
    m = hs.run_benchmark(scorer, data, str(tmp_path / "mmb.jsonl"), batch_size=4,
                         use_option_scores=True, progress=False)
    assert m["circular"] == 50.0 and m["plain"] == 100.0
    recs = _lines(str(tmp_path / "mmb.jsonl"))
    assert all(r["choice"] in "ABCD" and len(r["option_scores"]) == len(r["options"])
               for r in recs)
    with pytest.raises(ValueError):
        hs.run_benchmark(scorer, _gqa(tmp_path), str(tmp_path / "x.jsonl"), batch_size=4,
                         use_option_scores=True, progress=False)


def test_generation_mmbench_free_form(tmp_path):
    import base64
    import csv
    import io
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    path = tmp_path / "mmb.tsv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["index", "question", "A", "B", "C", "answer", "category", "image"])
        w.writerow([7, "Q", "cat", "dog", "cow", "C", "x",
                    base64.b64encode(buf.getvalue()).decode()])
    data = bm.read_mmbench(str(path))
    table = {ex.prompt: f"The answer is ({ex.answer})." for ex in data}
    m = hs.run_benchmark(FakePredictor(table, 2), data, str(tmp_path / "o.jsonl"),
                         batch_size=2, progress=False)
    assert m["circular"] == 100.0 and m["n"] == 3


def test_wrong_output_count_raises(tmp_path):
    data = _gqa(tmp_path, n=2)

    class Short:
        def predict(self, batch, max_new_tokens):
            return ["x"]

    with pytest.raises(RuntimeError, match="1 outputs for a batch of 2"):
        hs.run_benchmark(Short(), data, str(tmp_path / "o.jsonl"), batch_size=2,
                         progress=False)


def test_shards_merge(tmp_path):
    data = _gqa(tmp_path, n=5)
    table = {ex.prompt: ex.answer for ex in data}
    files = []
    for i in range(2):
        out = str(tmp_path / f"shard{i}.jsonl")
        assert hs.run_benchmark(FakePredictor(table, 2), data, out, batch_size=2,
                                shard=(i, 2), compute=False, progress=False) is None
        files.append(out)
    assert len(_lines(files[0])) == 3 and len(_lines(files[1])) == 2
    recs = hs.load_records(files)
    from covipal_jax.eval import metrics as mt
    assert mt.compute_metrics("gqa", recs)["n"] == 5


def test_duplicate_qids_rejected(tmp_path):
    data = _gqa(tmp_path, n=1)
    with pytest.raises(ValueError, match="duplicate"):
        hs.run_benchmark(FakePredictor({}, 1), data.examples * 2, str(tmp_path / "o.jsonl"),
                         batch_size=1, benchmark="gqa", progress=False)


# ---------------------------------------------------------------------------- summary table
RESULTS = {
    "unpruned": {576: {"GQA": 60.0, "MME": 1800.0}},
    "PPM": {64: {"GQA": 54.0, "MME": 1620.0}, 192: {"GQA": 57.0, "MME": 1710.0}},
    "FastV": {192: {"GQA": 30.0}},
}


def test_summary_table():
    table = hs.summary_table(RESULTS, "unpruned")
    lines = table.strip().split("\n")
    assert lines[0] == "| Keep | Method | GQA | MME | Avg |"
    assert lines[2] == "| 576 | unpruned | 60.00 | 1800.0 | 100.00% |"
    assert lines[3] == "| 192 | PPM | 57.00 | 1710.0 | 95.00% |"
    assert lines[4] == "| 192 | FastV | 30.00 | – | 50.00% (1/2) |"
    assert lines[5] == "| 64 | PPM | 54.00 | 1620.0 | 90.00% |"
    ratio = hs.summary_table(RESULTS, "unpruned", benchmarks=["MME"], show_ratio=True)
    assert "| 64 | PPM | 1620.0 (90.0%) | 90.00% |" in ratio
    with pytest.raises(KeyError):
        hs.summary_table(RESULTS, "vanilla")


def test_cli_score_and_table(tmp_path, capsys):
    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps({"qid": "1", "pred": "Yes", "answer": "yes"}) + "\n"
                     + json.dumps({"qid": "2", "pred": "no", "answer": "yes"}) + "\n")
    assert hs.main(["score", "--benchmark", "gqa", str(preds)]) == 0
    assert json.loads(capsys.readouterr().out)["score"] == 50.0
    res = tmp_path / "r.json"
    res.write_text(json.dumps(RESULTS))
    assert hs.main(["table", "--unpruned", "unpruned", str(res)]) == 0
    assert "| 64 | PPM | 54.00 | 1620.0 | 90.00% |" in capsys.readouterr().out
