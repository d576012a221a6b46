"""Tests for covipal_jax.eval.benchmarks: one small fixture per on-disk format."""
from __future__ import annotations

import base64
import csv
import io
import json
import os

import pytest
from PIL import Image

from covipal_jax.eval import benchmarks as bm


def _png(path=None, color=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 3), color).save(buf, format="PNG")
    if path is not None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(buf.getvalue())
    return buf.getvalue()


def _b64(color=(0, 255, 0)) -> str:
    return base64.b64encode(_png(color=color)).decode()


def _tsv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def _jsonl(path, recs):
    with open(path, "w", encoding="utf-8") as f:
        for r in recs:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


# ---------------------------------------------------------------------------- images
def test_image_ref_loads_path_bytes_b64(tmp_path):
    p = str(tmp_path / "a.png")
    raw = _png(p)
    for ref in (bm.ImageRef(path=p), bm.ImageRef(data=raw), bm.ImageRef(b64=_b64())):
        im = ref.load()
        assert im.mode == "RGB" and im.size == (4, 3)
    with pytest.raises(ValueError):
        bm.ImageRef().load()


# ---------------------------------------------------------------------------- GQA
def test_gqa(tmp_path):
    _png(str(tmp_path / "images" / "n1.jpg"))
    qs = {
        "q1": {"imageId": "n1", "question": "Is it red?", "answer": "yes",
               "types": {"structural": "verify", "semantic": "attr"}},
        "q2": {"imageId": "n1", "answer": "no"},                        # no question
        "q3": {"imageId": "n404", "question": "What?", "answer": "x"},  # image missing
    }
    path = tmp_path / "testdev_balanced_questions.json"
    path.write_text(json.dumps(qs))
    data = bm.load_benchmark("gqa", str(path))
    assert len(data) == 1 and data.report.read == 1 and data.report.malformed == 2
    ex = data.examples[0]
    assert ex.qid == "q1" and ex.answer == "yes"
    assert ex.prompt == "Is it red?\n" + bm.SHORT_ANSWER_SUFFIX
    assert ex.meta["structural"] == "verify"
    assert ex.image.path.endswith("n1.jpg")


# ---------------------------------------------------------------------------- MME
def test_mme_official_and_eval_tool_layouts(tmp_path):
    root = tmp_path / "MME"
    # per-image txt next to the image
    _png(str(root / "existence" / "000.png"))
    (root / "existence" / "000.txt").write_text(
        "Is there a dog? Please answer yes or no.\tYes\n"
        "Is there a cat? Please answer yes or no.\tNo\n")
    (root / "existence" / "999.txt").write_text("q\tYes\n")  # no image with this stem
    # images/ + questions_answers_YN/
    _png(str(root / "artwork" / "images" / "10.jpg"))
    os.makedirs(root / "artwork" / "questions_answers_YN")
    (root / "artwork" / "questions_answers_YN" / "10.txt").write_text(
        "Is this by Monet?\tyes\nIs this by Dali?\tmaybe\nbroken line\n")
    # eval_tool layout: <task>/<task>.txt with image \t question \t answer
    _png(str(root / "count" / "5.jpg"))
    (root / "count" / "count.txt").write_text(
        "5.jpg\tAre there two dogs?\tYes\n5.jpg\tAre there three dogs?\tNo\n")
    data = bm.load_benchmark("mme", str(root))
    rep = data.report
    assert rep.read == 5
    assert rep.malformed == 3  # missing image stem, answer "maybe", one-field line
    cats = sorted({e.meta["category"] for e in data})
    assert cats == ["artwork", "count", "existence"]
    exist = [e for e in data if e.meta["category"] == "existence"]
    assert [e.answer for e in exist] == ["yes", "no"]
    assert len({e.meta["image_key"] for e in exist}) == 1
    assert len({e.qid for e in exist}) == 2
    assert exist[0].prompt.endswith("\n" + bm.SHORT_ANSWER_SUFFIX)


def test_mme_flat_tsv_with_image_references(tmp_path):
    path = _tsv(tmp_path / "MME.tsv", ["index", "category", "image", "question", "answer"], [
        [0, "OCR", _b64(), "Is the word 'hi'?", "Yes"],
        [1, "OCR", "0", "Is the word 'ho'?", "No"],
        [2, "OCR", "", "Is it?", "Yes"],  # no image
    ])
    data = bm.read_mme(path)
    assert data.report.read == 2 and data.report.malformed == 1
    a, b = data.examples
    assert a.meta["image_key"] == b.meta["image_key"] and a.qid != b.qid
    assert b.image.load().size == (4, 3)


# ---------------------------------------------------------------------------- POPE
def test_pope_split_files(tmp_path):
    _png(str(tmp_path / "coco" / "COCO_1.jpg"))
    rec = {"question_id": 1, "image": "COCO_1.jpg", "text": "Is there a dog in the image?",
           "label": "yes"}
    _jsonl(tmp_path / "coco_pope_adversarial.json", [rec, dict(rec, question_id=2, label="no"),
                                                     "{not json", dict(rec, question_id=3,
                                                                       label="maybe")])
    _jsonl(tmp_path / "coco_pope_random.json", [rec])
    data = bm.read_pope(str(tmp_path), image_dir=str(tmp_path / "coco"))
    assert sorted(e.qid for e in data) == ["adversarial/1", "adversarial/2", "random/1"]
    assert data.report.malformed == 2
    assert data.report.filtered["no file for split popular"] == 1
    assert data.examples[0].meta["category"] == "adversarial"
    assert data.examples[0].prompt == rec["text"] + "\n" + bm.SHORT_ANSWER_SUFFIX


def test_pope_single_file_with_category(tmp_path):
    _png(str(tmp_path / "images" / "a.jpg"))
    path = _jsonl(tmp_path / "pope.jsonl", [
        {"question_id": 1, "image": "a.jpg", "text": "q?", "label": "no", "category": "random"},
        {"question_id": 1, "image": "a.jpg", "text": "q?", "label": "yes",
         "category": "popular"},
        {"question_id": 2, "image": "a.jpg", "text": "q?", "label": "yes"},  # no split
    ])
    data = bm.read_pope(path)
    assert sorted(e.qid for e in data) == ["popular/1", "random/1"]
    assert data.report.malformed == 1


# ---------------------------------------------------------------------------- TextVQA
def test_textvqa_with_and_without_ocr(tmp_path):
    _png(str(tmp_path / "train_images" / "img1.jpg"))
    answers = ["stop"] * 7 + ["stop sign"] * 3
    data_json = {"dataset_name": "textvqa", "data": [
        {"question_id": 34602, "image_id": "img1", "question": "what does the sign say?",
         "answers": answers},
        {"image_id": "img1", "question": "no id"},
    ]}
    path = tmp_path / "TextVQA_0.5.1_val.json"
    path.write_text(json.dumps(data_json))
    plain = bm.read_textvqa(str(path))
    assert plain.report.read == 1 and plain.report.malformed == 1
    ex = plain.examples[0]
    assert ex.qid == "34602" and ex.answer == "stop" and len(ex.answers) == 10
    assert ex.prompt == "what does the sign say?\n" + bm.SHORT_ANSWER_SUFFIX
    ocr = tmp_path / "ocr.json"
    ocr.write_text(json.dumps({"data": [{"image_id": "img1", "ocr_tokens": ["STOP", "4"]}]}))
    with_ocr = bm.read_textvqa(str(path), ocr_json=str(ocr))
    assert with_ocr.examples[0].prompt == ("what does the sign say?\nReference OCR token: "
                                           "STOP, 4\n" + bm.SHORT_ANSWER_SUFFIX)


# ---------------------------------------------------------------------------- ScienceQA
def test_scienceqa_img_only(tmp_path):
    _png(str(tmp_path / "images" / "test" / "7" / "image.png"))
    problems = {
        "7": {"question": "Which is a mammal?", "choices": ["frog", "dog"], "answer": 1,
              "hint": "Look closely.", "image": "image.png", "split": "test",
              "subject": "natural science"},
        "8": {"question": "No image", "choices": ["a", "b"], "answer": 0, "hint": "",
              "image": None, "split": "test"},
        "9": {"question": "Bad", "choices": ["a", "b"], "answer": 5, "hint": "",
              "image": "image.png", "split": "test"},
        "10": {"question": "train", "choices": ["a", "b"], "answer": 0, "image": "image.png"},
    }
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["7", "8", "9"],
                                                          "train": ["10"]}))
    data = bm.load_benchmark("sqa", str(tmp_path))
    assert data.report.read == 1 and data.report.filtered["no image"] == 1
    assert data.report.malformed == 1
    ex = data.examples[0]
    assert ex.answer == "B" and ex.options == ("frog", "dog")
    assert ex.prompt == ("Context: Look closely.\nWhich is a mammal?\nA. frog\nB. dog\n"
                         + bm.MC_SUFFIX)
    assert ex.meta["subject"] == "natural science"


# ---------------------------------------------------------------------------- MMBench
MMB_HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category",
              "l2-category", "image"]


def test_mmbench_circular_expansion(tmp_path):
    img = _b64()
    path = _tsv(tmp_path / "mmbench_dev.tsv", MMB_HEADER, [
        [10, "What color?", "A hint.", "red", "green", "blue", "pink", "C", "color", "fp", img],
        [11, "Which?", "nan", "x", "y", "z", "", "A", "attr", "cp", "10"],  # 3 options, ref img
        [12, "Bad answer", "", "x", "y", "", "", "E", "attr", "cp", img],
    ])
    data = bm.read_mmbench(path)
    assert data.report.read == 7 and data.report.malformed == 1
    q10 = {e.meta["rotation"]: e for e in data if e.meta["base_index"] == 10}
    assert sorted(q10) == [0, 1, 2, 3]
    assert q10[0].options == ("red", "green", "blue", "pink") and q10[0].answer == "C"
    assert q10[1].options == ("green", "blue", "pink", "red") and q10[1].answer == "B"
    assert q10[3].options == ("pink", "red", "green", "blue") and q10[3].answer == "D"
    assert all(e.options[ord(e.answer) - 65] == "blue" for e in q10.values())
    assert q10[0].prompt == ("A hint.\nWhat color?\nA. red\nB. green\nC. blue\nD. pink\n"
                             + bm.MC_SUFFIX)
    q11 = [e for e in data if e.meta["base_index"] == 11]
    assert len(q11) == 3 and q11[0].prompt.startswith("Which?\nA. x")
    assert q11[0].image.load().size == (4, 3)
    plain = bm.read_mmbench(path, circular=False)
    assert plain.report.read == 2


def test_mmbench_precircular_tsv(tmp_path):
    img = _b64()
    path = _tsv(tmp_path / "mmb_circ.tsv", MMB_HEADER, [
        [5, "Q", "", "a", "b", "", "", "A", "c", "l", img],
        [1000005, "Q", "", "b", "a", "", "", "B", "c", "l", img],
    ])
    data = bm.read_mmbench(path)
    assert [(e.meta["base_index"], e.meta["rotation"]) for e in data] == [(5, 0), (5, 1)]


def test_mmbench_test_split_without_answers(tmp_path):
    path = _tsv(tmp_path / "t.tsv", MMB_HEADER, [[1, "Q", "", "a", "b", "", "", "", "c", "l",
                                                  _b64()]])
    data = bm.read_mmbench(path)
    assert data.report.read == 2 and all(e.answer is None for e in data)


# ---------------------------------------------------------------------------- SEED
def test_seed_image_only(tmp_path):
    _png(str(tmp_path / "SEED-Bench-image" / "123_456.jpg"))
    js = {"question_type": {"Scene Understanding": 1, "Action Recognition": 10},
          "questions": [
              {"question_id": "101", "data_id": "123_456.jpg", "data_type": "image",
               "question": "What is shown?", "choice_a": "a", "choice_b": "b", "choice_c": "c",
               "choice_d": "d", "answer": "D", "question_type_id": 1},
              {"question_id": "102", "data_id": "123_456", "data_type": "image",
               "question": "No ext", "choice_a": "a", "choice_b": "b", "choice_c": "c",
               "choice_d": "d", "answer": "A", "question_type_id": 1},
              {"question_id": "103", "data_id": "v.mp4", "data_type": "video",
               "question": "video", "choice_a": "a", "choice_b": "b", "choice_c": "c",
               "choice_d": "d", "answer": "A", "question_type_id": 10},
              {"question_id": "104", "data_id": "123_456.jpg", "data_type": "image",
               "question": "3 choices", "choice_a": "a", "choice_b": "b", "choice_c": "c",
               "answer": "A", "question_type_id": 1},
          ]}
    path = tmp_path / "SEED-Bench.json"
    path.write_text(json.dumps(js))
    data = bm.load_benchmark("seed-bench", str(path))
    assert [e.qid for e in data] == ["101", "102"]
    assert data.report.filtered["data_type video"] == 1 and data.report.malformed == 1
    ex = data.examples[0]
    assert ex.answer == "D" and ex.meta["category"] == "Scene Understanding"
    assert ex.prompt == "What is shown?\nA. a\nB. b\nC. c\nD. d\n" + bm.MC_SUFFIX


# ---------------------------------------------------------------------------- AI2D
def test_ai2d_jsonl_answer_forms(tmp_path):
    _png(str(tmp_path / "images" / "1.png"))
    base = {"image": "images/1.png", "question": "Which stage?", "options": ["egg", "larva",
                                                                            "pupa", "adult"]}
    path = _jsonl(tmp_path / "ai2d_test.jsonl", [
        dict(base, question_id="a", answer="2"),
        dict(base, question_id="b", answer="B"),
        dict(base, question_id="c", answer="adult"),
        dict(base, question_id="d", answer="7"),
        dict(base, question_id="e", answer="1", image="images/missing.png"),
    ])
    data = bm.read_ai2d(path)
    assert [(e.qid, e.answer) for e in data] == [("a", "C"), ("b", "B"), ("c", "D")]
    assert data.report.malformed == 2
    assert data.examples[0].prompt == ("Which stage?\nA. egg\nB. larva\nC. pupa\nD. adult\n"
                                       + bm.MC_SUFFIX)


def test_ai2d_tsv(tmp_path):
    path = _tsv(tmp_path / "AI2D_TEST.tsv", ["index", "question", "A", "B", "C", "D", "answer",
                                             "image"],
                [[0, "Q?", "w", "x", "y", "z", "D", _b64()]])
    data = bm.read_ai2d(path)
    assert data.examples[0].answer == "D" and data.examples[0].options == ("w", "x", "y", "z")


# ---------------------------------------------------------------------------- MMStar
def test_mmstar_inline_options(tmp_path):
    q = ("Which option describes the object relationship in the image correctly?\n"
         "Options: A: The suitcase is on the book., B: The suitcase is beneath the cat., "
         "C: The suitcase is beneath the bed., D: The suitcase is beneath the book.")
    path = _tsv(tmp_path / "MMStar.tsv", ["index", "question", "answer", "category",
                                          "l2_category", "image"], [
        [0, q, "A", "coarse perception", "image scene and topic", _b64()],
        [1, "no image", "B", "math", "geometry", ""],
    ])
    data = bm.read_mmstar(path)
    assert data.report.read == 1 and data.report.malformed == 1
    ex = data.examples[0]
    assert ex.options == ("The suitcase is on the book.", "The suitcase is beneath the cat.",
                          "The suitcase is beneath the bed.", "The suitcase is beneath the book.")
    assert ex.prompt == q + "\n" + bm.MC_SUFFIX
    assert ex.answer == "A" and ex.meta["category"] == "coarse perception"


def test_unknown_benchmark_name():
    with pytest.raises(KeyError):
        bm.load_benchmark("vqav9", "/nonexistent")
