"""Video benchmarks from local files: Video-MME, MVBench, NExT-QA readers, metrics (answers
parsed with lmms-eval's rules), and the harness path through
`covipal_jax.eval.video.predict_video` (video files are empty stand-ins: nothing here decodes a
video; `test_eval_video_e2e.py` runs real files through the tiny OneVision model)."""
from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from covipal_jax.eval import benchmarks as bm
from covipal_jax.eval import harness as hs
from covipal_jax.eval.benchmarks import mvbench
from covipal_jax.eval.benchmarks import video_common as vc


class VideoPredictor:
    """Answers the letter stored for each prompt; records what it was given."""

    def __init__(self, table, batch_size):
        self.table, self.batch_size, self.seen = table, batch_size, []

    def predict(self, batch, max_new_tokens):
        raise AssertionError("video examples must not go through predict()")

    def predict_video(self, batch, max_new_tokens):
        assert len(batch) == self.batch_size
        self.seen += [(v.path, meta) for v, _, meta in batch]
        return [self.table.get(p, "Z") for _, p, _ in batch]


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


# ---------------------------------------------------------------------------- Video-MME
def _videomme(tmp_path):
    for v in ("v1", "v2", "v3"):
        _touch(tmp_path / "data" / f"{v}.mp4")
    rows = []
    for i, (vid, dur) in enumerate([("v1", "short"), ("v1", "short"), ("v2", "medium"),
                                    ("v3", "long"), ("v3", "long"), ("v9", "long"),
                                    ("v3", "huge")]):
        rows.append({"video_id": str(i), "videoID": vid, "duration": dur, "domain": "d",
                     "task_type": "Counting Problem" if i % 2 else "OCR Problems",
                     "question_id": f"{i:03d}", "question": f"How many? {i}",
                     "options": ["A. 1", "B. 2", "C. 3", "D. 4"], "answer": "ABCD"[i % 4]})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "videomme.parquet")
    return str(tmp_path / "videomme.parquet")


def test_videomme_reader_metric_and_harness(tmp_path):
    data = bm.load_benchmark("video-mme", _videomme(tmp_path))
    assert [e.qid for e in data] == ["000", "001", "002", "003", "004"]
    assert data.report.malformed == 2  # missing video file, unknown duration
    ex = data.examples[0]
    assert isinstance(ex.image, bm.VideoRef) and ex.image.path.endswith("data/v1.mp4")
    assert ex.options == ("1", "2", "3", "4") and ex.answer == "A"
    assert ex.prompt.splitlines()[0].startswith("Select the best answer") and \
        "subtitles" not in ex.prompt
    assert ex.prompt.splitlines()[2:6] == ["A. 1", "B. 2", "C. 3", "D. 4"]
    # right: 000 (short), 002 (medium), 003 (long); wrong: 001 (short), 004 (long)
    table = {e.prompt: (e.answer if e.qid in ("000", "002", "003")
                        else "(" + "BCDA"["ABCD".index(e.answer)] + ")") for e in data}
    table[data.examples[3].prompt] = f"The answer is {data.examples[3].answer}."
    pred = VideoPredictor(table, batch_size=2)
    m = hs.run_benchmark(pred, data, str(tmp_path / "o.jsonl"), batch_size=2, progress=False)
    assert m["score"] == 60.0
    assert (m["short"], m["medium"], m["long"]) == (50.0, 100.0, 50.0)
    assert m["by_duration"] == {"long": 50.0, "medium": 100.0, "short": 50.0}
    assert bm.get("videomme").table_columns(m) == {
        "videomme": 60.0, "videomme_short": 50.0, "videomme_medium": 100.0,
        "videomme_long": 50.0}
    assert len(pred.seen) == 6  # 3 batches of 2 (the last padded)
    short = bm.read_videomme(str(tmp_path / "videomme.parquet"), durations=("short",))
    assert [e.qid for e in short] == ["000", "001"]
    assert short.report.filtered["duration long"] == 3  # v9 too: filtered before checked


def test_video_benchmark_needs_a_video_predictor(tmp_path):
    data = bm.load_benchmark("videomme", _videomme(tmp_path))

    class ImageOnly:
        def predict(self, batch, max_new_tokens):
            return ["A"] * len(batch)

    out = tmp_path / "o.jsonl"
    with pytest.raises(NotImplementedError, match="no predict_frames or predict_video"):
        hs.run_benchmark(ImageOnly(), data, str(out), batch_size=2, progress=False)
    assert not out.exists()
    with pytest.raises(ValueError, match="video"):
        hs.run_benchmark(VideoPredictor({}, 2), data, str(out), batch_size=2,
                         use_option_scores=True, progress=False)


# ---------------------------------------------------------------------------- MVBench
def test_mvbench_tasks_bounds_and_task_mean(tmp_path):
    (tmp_path / "json").mkdir()
    seq = [{"video": "a.mp4", "question": "What happened first?",
            "candidates": ["opened the door", "sat down", "ate"], "answer": "sat down",
            "start": 1.5, "end": 7.0},
           {"video": "b.mp4", "question": "What next?", "candidates": ["x", "y"],
            "answer": "x", "start": 0, "end": 3},
           {"video": "missing.mp4", "question": "?", "candidates": ["x", "y"], "answer": "x"}]
    (tmp_path / "json" / "action_sequence.json").write_text(json.dumps(seq))
    for v in ("a.mp4", "b.mp4"):
        _touch(tmp_path / "video" / "star" / "Charades_v1_480" / v)
    anto = [{"video": "c.webm", "question": "Which action?", "candidates": ["push", "pull"],
             "answer": "pull"}]
    (tmp_path / "json" / "action_antonym.json").write_text(json.dumps(anto))
    _touch(tmp_path / "video" / "ssv2_video" / "c.webm")
    data = bm.load_benchmark("mvbench", str(tmp_path))
    assert [e.qid for e in data] == ["Action Sequence/0", "Action Sequence/1",
                                     "Action Antonym/0"]
    assert data.report.malformed == 1 and data.report.filtered["no file for task State Change"]
    ex = data.examples[0]
    assert ex.answer == "B" and ex.meta == {"category": "Action Sequence", "start": 1.5,
                                            "end": 7.0}
    assert ex.prompt.startswith(mvbench.SYSTEM + "\nWhat happened first?\nA. opened the door")
    assert "start" not in data.examples[2].meta  # Action Antonym has no bound
    assert len(mvbench.TASKS) == 20
    # Action Sequence 1/2 right, Action Antonym 1/1 right: task mean 75, overall 66.7.
    table = {data.examples[0].prompt: "B", data.examples[1].prompt: "B",
             data.examples[2].prompt: "B"}
    pred = VideoPredictor(table, batch_size=3)
    m = hs.run_benchmark(pred, data, str(tmp_path / "o.jsonl"), batch_size=3, progress=False)
    assert m["score"] == 75.0 and m["overall"] == pytest.approx(200 / 3)
    assert len(m["missing_tasks"]) == 18
    assert pred.seen[0][1]["start"] == 1.5  # bounds reach the predictor
    with pytest.raises(ValueError, match="unknown MVBench tasks"):
        bm.read_mvbench(str(tmp_path), tasks=("Juggling",))


# ---------------------------------------------------------------------------- NExT-QA
def test_nextqa_csv_mapping_and_groups(tmp_path):
    vdir = tmp_path / "NExTVideo"
    _touch(vdir / "1025" / "4882821564.mp4")
    _touch(vdir / "7771.mp4")
    (vdir / "map_vid_vidorID.json").write_text(json.dumps({"4882821564": "1025/4882821564"}))
    header = ["video", "frame_count", "width", "height", "question", "answer", "qid", "type",
              "a0", "a1", "a2", "a3", "a4"]
    rows = [["4882821564", 100, 640, 480, "why did the boy pick up the ball", 2, 6, "CW",
             "fall", "play", "throw it", "eat", "sleep"],
            ["7771", 90, 640, 480, "what did the girl do after sitting", 0, 1, "TN",
             "stand", "sit", "run", "jump", "walk"],
            ["7771", 90, 640, 480, "where is this", 4, 2, "DL",
             "park", "home", "beach", "school", "road"],
            ["404", 90, 640, 480, "missing video", 0, 3, "DO", "a", "b", "c", "d", "e"],
            ["7771", 90, 640, 480, "four options", 0, 4, "DO", "a", "b", "c", "d", ""]]
    with open(tmp_path / "val.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    data = bm.load_benchmark("nextqa", str(tmp_path / "val.csv"))
    assert [e.qid for e in data] == ["4882821564_6", "7771_1", "7771_2"]
    assert data.report.malformed == 2
    ex = data.examples[0]
    assert ex.image.path.endswith("NExTVideo/1025/4882821564.mp4")
    assert ex.answer == "C" and ex.question == "why did the boy pick up the ball?"
    assert len(ex.options) == 5 and ex.meta["category"] == "CW"
    table = {data.examples[0].prompt: "C", data.examples[1].prompt: "B",
             data.examples[2].prompt: "E"}
    m = hs.run_benchmark(VideoPredictor(table, 2), data, str(tmp_path / "o.jsonl"),
                         batch_size=2, progress=False)
    assert m["score"] == pytest.approx(200 / 3)
    assert (m["causal"], m["temporal"], m["descriptive"]) == (100.0, 0.0, 100.0)


class FramesPredictor:
    """A predictor that takes decoded frames (the interface a video LlavaPredictor will have)."""

    num_frames = 4

    def __init__(self, batch_size):
        self.batch_size, self.shapes = batch_size, []

    def predict(self, batch, max_new_tokens):
        raise AssertionError("video examples must not go through predict()")

    def predict_frames(self, batch, max_new_tokens):
        assert len(batch) == self.batch_size
        self.shapes += [frames.shape for frames, _ in batch]
        # answer with the option whose index is the first frame's red value // 50
        return ["ABCDE"[int(frames[0, 0, 0, 0]) // 50] for frames, _ in batch]


def test_frames_are_decoded_per_example_with_data_video(tmp_path):
    """Frame folders go through `covipal_jax.data.video.load` (4 frames sampled); a video with
    too few frames becomes an error record, left out of the metrics and retried."""
    from PIL import Image

    vdir = tmp_path / "NExTVideo"
    for vid, n, red in (("100", 6, 100), ("200", 2, 0)):
        (vdir / vid).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (12, 8), (red, i, 0)).save(vdir / vid / f"{i:03d}.png")
    with open(tmp_path / "val.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video", "question", "answer", "qid", "type", "a0", "a1", "a2", "a3", "a4"])
        w.writerow(["100", "what happens", 2, 1, "TN", "a", "b", "c", "d", "e"])
        w.writerow(["200", "what happens", 0, 2, "TN", "a", "b", "c", "d", "e"])
    data = bm.read_nextqa(str(tmp_path / "val.csv"))
    pred = FramesPredictor(batch_size=2)
    out = tmp_path / "o.jsonl"
    m = hs.run_benchmark(pred, data, str(out), batch_size=2, progress=False, num_workers=0)
    assert pred.shapes == [(4, 8, 12, 3), (4, 8, 12, 3)]  # one real + its padding copy
    assert m["score"] == 100.0 and m["n"] == 1 and m["errors"] == 1
    bad = [json.loads(x) for x in out.read_text().splitlines() if "error" in json.loads(x)]
    assert bad[0]["qid"] == "200_2" and bad[0]["error"].startswith("video: VideoError")


# ---------------------------------------------------------------------------- answer parsing
@pytest.mark.parametrize("pred,letter", [
    ("The best answer is B.", "B"), ("(C) three", "C"), ("I think it is D", "D"),
    ("A dog is running", "A"),  # lmms-eval takes the first capital A-D, article or not
    ("none of them", None), ("E", None), ("", None)])
def test_videomme_letter_follows_lmms_eval(pred, letter):
    assert vc.videomme_letter(pred) == letter


@pytest.mark.parametrize("pred,letter", [
    ("B. sat down", "B"), ("(b)", "B"), ("The answer is C", "C"), ("a cat", "A"),
    ("no idea", None), ("E", "E"), ("F", None)])
def test_mvbench_letter_follows_lmms_eval(pred, letter):
    assert vc.mvbench_letter(pred) == letter


OPTS = ("run", "jump", "sit", "stand", "walk")


@pytest.mark.parametrize("pred,letter", [
    ("(B) jump", "B"), ("C", "C"), ("D.", "D"), ("A B", "B"),  # several: the last one
    ("the person is going to sit on the chair now", "C"),  # > 5 words: option text
    ("Sit.", None), ("nothing", None)])  # lmms-eval would pick a random letter here
def test_nextqa_letter_follows_lmms_eval(pred, letter):
    assert vc.nextqa_letter(pred, OPTS) == letter


def test_group_accuracy_uses_the_parser_and_option_choices():
    recs = [{"qid": "1", "pred": "A dog", "answer": "A", "options": ["x"] * 4,
             "meta": {"category": "short"}},
            {"qid": "2", "pred": "zzz", "answer": "B", "options": ["x"] * 4, "choice": "B",
             "meta": {"category": "long"}},
            {"qid": "3", "pred": "nothing", "answer": "C", "options": ["x"] * 4,
             "meta": {"category": "long"}}]
    m = vc.group_accuracy(recs, {"long": ("long",)}, parse=vc.videomme_letter)
    assert m["score"] == pytest.approx(200 / 3) and m["unparsed"] == 1
    assert m["by_category"] == {"long": 50.0, "short": 100.0} and m["long"] == 50.0
    # the generic parser reads "A dog" as an article: no letter
    assert vc.group_accuracy(recs)["score"] == pytest.approx(100 / 3)
