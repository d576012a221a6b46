"""The benchmark registry, OCRVQA, InfoVQA, MME's two columns, and parquet (lmms-eval) files."""
from __future__ import annotations

import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from covipal_jax.eval import benchmarks as bm
from covipal_jax.eval import harness as hs
from covipal_jax.eval import metrics as mt


def _png(path=None, color=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (5, 4), color).save(buf, format="PNG")
    if path is not None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(buf.getvalue())
    return buf.getvalue()


class TablePredictor:
    def __init__(self, table, batch_size):
        self.table, self.batch_size = table, batch_size

    def predict(self, batch, max_new_tokens):
        assert len(batch) == self.batch_size
        return [self.table.get(p, "?") for _, p in batch]


# ---------------------------------------------------------------------------- registry
def test_registry_names_aliases_and_image_benchmarks():
    image = {"gqa", "mme", "pope", "textvqa", "scienceqa", "mmbench", "seed", "ai2d", "mmstar",
             "ocrvqa", "infovqa"}
    assert image | {"videomme", "mvbench", "nextqa"} == set(bm.REGISTRY)
    assert {n for n, b in bm.REGISTRY.items() if b.kind == "image"} == image
    assert bm.get("InfographicVQA").name == "infovqa" and bm.get("OCR-VQA").name == "ocrvqa"
    assert bm.get("sqa_img").name == "scienceqa" and bm.canonical_name("Video-MME") == "videomme"
    assert bm.MULTIPLE_CHOICE == {"scienceqa", "mmbench", "seed", "ai2d", "mmstar", "videomme",
                                  "mvbench", "nextqa"}
    for b in bm.REGISTRY.values():  # every table column names its protocol
        assert b.protocols() and all(p.strip() for p in b.protocols().values())
    with pytest.raises(ValueError, match="already registered"):
        bm.register(bm.Benchmark(name="gqa", read=bm.read_gqa, score=mt.mc_metrics,
                                 protocol="x"))
    with pytest.raises(KeyError, match="unknown benchmark"):
        bm.get("vqav9")


def test_a_benchmark_defined_outside_the_package(tmp_path):
    """One module's worth of code (reader + metric + register) is all a benchmark needs."""
    def read(path, *, limit=None, check_images=True):
        report = bm.ReadReport("colours", path)
        rows = bm.read_table(path, report)

        def convert(row):
            if row["answer"] not in ("red", "green"):
                raise bm.Malformed("answer is not a colour")
            return bm.Example(qid=str(row["id"]), image=bm.ImageRef(data=_png()),
                              question="colour?", prompt="colour?", answer=row["answer"],
                              answers=(row["answer"],))
        return bm.collect("colours", rows, convert, report, limit=limit)

    def score(records):
        return mt.mean_metric(records, lambda r: r["pred"] == r["answer"])

    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"id": 1, "answer": "red"}, {"id": 2, "answer": "green"}, {"id": 3, "answer": "blue"},
        {"id": 4, "answer": "red"}]))
    bm.register(bm.Benchmark(name="colours", read=read, score=score, protocol="colour acc"))
    try:
        data = bm.load_benchmark("colours", str(path))
        assert data.report.read == 3 and data.report.malformed == 1
        m = hs.run_benchmark(TablePredictor({"colour?": "red"}, 2), data,
                             str(tmp_path / "o.jsonl"), batch_size=2, progress=False)
        assert m["score"] == pytest.approx(200 / 3)
        assert mt.compute_metrics("colours", hs.load_records(str(tmp_path / "o.jsonl")))[
            "n"] == 3
    finally:
        bm.REGISTRY.pop("colours")


def test_collect_counts_skips_malformed_duplicates_and_limit():
    report = bm.ReadReport("t", "mem")

    def convert(row):
        if row == "skip":
            raise bm.Skip("on purpose")
        return bm.Example(qid=row["q"], image=bm.ImageRef(data=b""), question="", prompt="",
                          answer=None)

    rows = [{"q": "a"}, "skip", {"x": 1}, {"q": "a"}, {"q": "b"}, {"q": "c"}]
    data = bm.collect("t", rows, convert, report, limit=3)
    assert [e.qid for e in data] == ["a", "b"]  # 3 converted rows: a, a (dup), b; c not read
    assert report.filtered["on purpose"] == 1 and report.read == 2
    assert report.malformed == 2 and "missing field" in report.errors[0]
    assert report.errors[1] == "a: duplicate qid"


# ---------------------------------------------------------------------------- OCRVQA
def test_ocrvqa_official_json_split_and_metric(tmp_path):
    _png(str(tmp_path / "images" / "b1.jpg"))
    _png(str(tmp_path / "images" / "b2.jpg"))
    data = {
        "b1": {"questions": ["Who wrote this book?", "Is this a comic book?"],
               "answers": ["Jane Austen", "No"], "title": "Emma", "genre": "Literature",
               "split": 3},
        "b2": {"questions": ["What is the title of this book?"], "answers": ["Dune"],
               "split": 1},
        "b3": {"questions": ["Who wrote this book?"], "answers": ["X"], "split": 3},  # no image
        "b4": {"questions": ["a?", "b?"], "answers": ["only one"], "split": 3},
    }
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(data))
    d = bm.load_benchmark("ocrvqa", str(path))
    assert [e.qid for e in d] == ["b1/0", "b1/1"]
    assert d.report.filtered["split 1"] == 1 and d.report.malformed == 2
    assert d.examples[0].prompt == "Who wrote this book?\n" + bm.SHORT_ANSWER_SUFFIX
    assert d.examples[0].meta == {"genre": "Literature", "title": "Emma"}
    assert [e.qid for e in bm.read_ocrvqa(str(path), split="train")] == ["b2/0"]
    preds = {d.examples[0].prompt: "jane austen.", d.examples[1].prompt: "Yes"}
    m = hs.run_benchmark(TablePredictor(preds, 2), d, str(tmp_path / "o.jsonl"), batch_size=2,
                         progress=False)
    assert m["score"] == 50.0 and m["n"] == 2


@pytest.mark.parametrize("pred, answers, want", [
    ("Jane Austen", ["Jane Austen"], 1.0), ("jane austen.", ["Jane Austen"], 1.0),
    ("Austen", ["Jane Austen"], 0.0), ("Jane  Austen ", ["Jane Austen"], 1.0),
    ("No", ["no"], 1.0), ("Dune", ["Dune Messiah", "Dune"], 1.0),
])
def test_ocrvqa_match(pred, answers, want):
    from covipal_jax.eval.benchmarks import ocrvqa
    assert ocrvqa.ocrvqa_match(pred, answers) == want


def test_ocrvqa_tsv_with_list_answers(tmp_path):
    import base64
    import csv
    img = base64.b64encode(_png()).decode()
    path = tmp_path / "OCRVQA_TEST.tsv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["index", "image", "question", "answer"])
        w.writerow([0, img, "Who is the author?", "['Jane Austen']"])
        w.writerow([1, img, "Is this a travel book?", "No"])
    d = bm.read_ocrvqa(str(path))
    assert [(e.qid, e.answers) for e in d] == [("0", ("Jane Austen",)), ("1", ("No",))]


# ---------------------------------------------------------------------------- InfoVQA / ANLS
@pytest.mark.parametrize("pred, answers, want", [
    ("hello", ["hello"], 1.0),
    ("Hello ", ["hello"], 1.0),        # case and outer whitespace ignored
    ("hallo", ["hello"], 0.8),         # 1 edit / 5
    ("hallo", ["x", "hello"], 0.8),    # best reference
    ("ab", ["ax"], 0.5),               # NL = 0.5: similarity 0.5 is kept (not < 0.5)
    ("abc", ["axy"], 0.0),             # similarity 1/3 < 0.5 -> 0
    ("", ["abc"], 0.0),
    ("", [""], 1.0),
])
def test_anls(pred, answers, want):
    assert mt.anls(pred, answers) == pytest.approx(want)


def test_infovqa_official_json_and_metric(tmp_path):
    _png(str(tmp_path / "infographicsvqa_images" / "10.jpeg"))
    data = {"dataset_name": "infographicVQA", "data": [
        {"questionId": 1, "question": "What percent?", "image_local_name": "10.jpeg",
         "answers": ["24%", "24 %"]},
        {"questionId": 2, "question": "Which year?", "image_local_name": "10.jpeg",
         "answers": ["2019"]},
        {"questionId": 3, "question": "Missing image?", "image_local_name": "11.jpeg",
         "answers": ["a"]},
        {"question": "no id", "image_local_name": "10.jpeg", "answers": ["a"]},
    ]}
    path = tmp_path / "infographicsVQA_val_v1.0_withQT.json"
    path.write_text(json.dumps(data))
    d = bm.load_benchmark("infovqa", str(path))
    assert [e.qid for e in d] == ["1", "2"] and d.report.malformed == 2
    assert d.examples[0].answers == ("24%", "24 %")
    preds = {d.examples[0].prompt: "24 %", d.examples[1].prompt: "2018"}
    m = hs.run_benchmark(TablePredictor(preds, 2), d, str(tmp_path / "o.jsonl"), batch_size=2,
                         progress=False)
    assert m["score"] == pytest.approx(100 * (1.0 + 0.75) / 2) and m["threshold"] == 0.5


def test_parquet_tables_with_hf_image_cells(tmp_path):
    """lmms-eval's datasets are parquet shards with HF image structs: InfoVQA and TextVQA."""
    img = {"bytes": _png(color=(0, 0, 255)), "path": "x.png"}
    folder = tmp_path / "infovqa"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist([
        {"questionId": "7", "question": "What?", "answers": ["a", "b"], "image": img},
    ]), folder / "validation-00000-of-00001.parquet")
    d = bm.read_infovqa(str(folder))
    assert d.examples[0].answers == ("a", "b")
    assert d.examples[0].image.load().getpixel((0, 0)) == (0, 0, 255)
    tv = tmp_path / "textvqa.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"question_id": 5, "question": "Sign?", "image_id": "i5", "answers": ["stop"] * 10,
         "image": img}]), tv)
    t = bm.read_textvqa(str(tv))
    assert t.examples[0].qid == "5" and t.examples[0].answer == "stop"
    assert t.examples[0].image.load().size == (5, 4)


# ---------------------------------------------------------------------------- MME columns
def test_mme_reports_perception_and_total():
    recs = [{"qid": f"{t}/1.jpg/{a}", "pred": p, "answer": a,
             "meta": {"category": t, "image_key": f"{t}/1.jpg"}}
            for t, a, p in [("OCR", "yes", "yes"), ("OCR", "no", "no"),
                            ("code_reasoning", "yes", "yes"), ("code_reasoning", "no", "yes")]]
    bench = bm.get("mme")
    m = bench.score(recs)
    assert bench.table_columns(m) == {"mme_p": 200.0, "mme": 250.0}
    protos = bench.protocols()
    assert "perception" in protos["mme_p"] and "2000" in protos["mme_p"]
    assert "perception + cognition" in protos["mme"] and "2800" in protos["mme"]


def test_harness_table_names_protocols_and_averages_one_mme_column(tmp_path, capsys):
    assert bm.column_protocol("mme_p").startswith("MME-P") and bm.column_protocol("x") is None
    res = tmp_path / "r.json"
    res.write_text(json.dumps({
        "none": {"64": {"gqa": 60.0, "mme_p": 1500.0, "mme": 1800.0}},
        "ppm": {"16": {"gqa": 54.0, "mme_p": 1200.0, "mme": 1700.0}}}))
    assert hs.main(["table", "--unpruned", "none", "--mme_score", "perception", str(res)]) == 0
    out = capsys.readouterr().out
    assert "| 16 | ppm | 54.00 | 1200.0 | 1700.0 | 85.00% |" in out  # (0.9 + 0.8) / 2
    assert "Avg: mean over gqa, mme_p of score / unpruned score" in out
    assert "- mme: MME: total = perception + cognition" in out
    assert hs.main(["table", "--unpruned", "none", str(res)]) == 0
    assert f"| 16 | ppm | 54.00 | 1200.0 | 1700.0 | {100 * (0.9 + 17 / 18) / 2:.2f}% |" in \
        capsys.readouterr().out
