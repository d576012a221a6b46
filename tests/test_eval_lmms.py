"""lmms-eval: our metrics against lmms-eval's own metric functions, and the model adapter.

lmms-eval (0.7.3) is not in requirements-dev.txt: it pulls ~50 packages, among them a second
(CUDA) torch. Its metric functions were run on the CASES below and their outputs recorded in
`tests/data/lmms_eval_reference.json` (regenerate: `python tests/test_eval_lmms.py` in an
environment with lmms-eval). Our metrics must equal the recorded values; where lmms-eval is
importable, the recorded values must also equal a live run of its functions.
The adapter is tested directly against lmms-eval's model API (requests with `.args`).
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

from covipal_jax.eval import benchmarks as bm
from covipal_jax.eval import metrics as mt
from covipal_jax.eval.benchmarks import ocrvqa

REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                         "lmms_eval_reference.json")

CASES = {
    # (prediction, references): InfoVQA / DocVQA ANLS.
    "anls": [("24%", ["24%", "24 %"]), ("2018", ["2019"]), ("hallo", ["hello"]),
             ("ab", ["ax"]), ("abc", ["axy"]), ("United States", ["united states", "usa"]),
             ("New York City", ["new york"]), ("", ["a"])],
    # (prediction, answer): GQA / OCRVQA exact match (ignore_case, ignore_punctuation).
    "exact_match": [("Yes", "yes"), ("left.", "left"), ("Jane Austen", "jane austen"),
                    ("t-shirt", "tshirt"), ("the cat", "cat"), ("No", "yes"),
                    ("Harry Potter!", "harry potter")],
    # (prediction, 10 answers): TextVQA VQA accuracy.
    "textvqa": [("Two.", ["two", "2", "2", "two dogs", "3", "3", "3", "3", "3", "3"]),
                ("stop", ["stop"] * 7 + ["stop sign"] * 3),
                ("stop sign", ["stop"] * 7 + ["stop sign"] * 3),
                ("the cat", ["cat", "the cat"] + ["dog"] * 8), ("nope", ["yes"] * 10)],
    # (category, image, answer, prediction): MME perception / cognition.
    "mme": [("existence", "1.jpg", "Yes", "Yes"), ("existence", "1.jpg", "No", "No"),
            ("existence", "2.jpg", "Yes", "no"), ("existence", "2.jpg", "No", "No"),
            ("OCR", "3.jpg", "Yes", "Yes, it is."), ("OCR", "3.jpg", "No", "Yes"),
            ("code_reasoning", "4.png", "Yes", "yes"), ("code_reasoning", "4.png", "No", "no"),
            ("text_translation", "5.png", "Yes", "The answer is yes"),
            ("text_translation", "5.png", "No", "No")],
}


def lmms_eval_values() -> dict:
    """CASES through lmms-eval's own functions (needs lmms-eval)."""
    from lmms_eval.api.metrics import anls, exact_match_hf_evaluate
    from lmms_eval.tasks.mme import utils as mme_utils
    from lmms_eval.tasks.textvqa.utils import textvqa_process_results

    out = {"anls": [anls(refs, [p])["anls"] for p, refs in CASES["anls"]],
           "exact_match": [float(exact_match_hf_evaluate(
               predictions=[p], references=[a], ignore_case=True,
               ignore_punctuation=True)["exact_match"]) for p, a in CASES["exact_match"]],
           "textvqa": [float(textvqa_process_results(
               {"answers": list(a), "question_id": i}, [p])["exact_match"])
               for i, (p, a) in enumerate(CASES["textvqa"])]}
    per = {"mme_perception_score": [], "mme_cognition_score": []}
    for cat, img, ans, pred in CASES["mme"]:
        r = mme_utils.mme_process_results(
            {"answer": ans, "category": cat, "question_id": f"{cat}/{img}"}, [pred])
        for k, v in r.items():
            per[k].append(v)
    out["mme"] = {k: float(mme_utils.mme_aggregate_results(v)) for k, v in per.items()}
    import lmms_eval
    out["lmms_eval_version"] = getattr(lmms_eval, "__version__", None) or \
        __import__("importlib.metadata").metadata.version("lmms-eval")
    return out


def our_values() -> dict:
    from covipal_jax.eval.benchmarks import gqa as gqa_mod
    mme = bm.get("mme").score([
        {"qid": f"{c}/{img}/{a}", "pred": p, "answer": a.lower(),
         "meta": {"category": c, "image_key": f"{c}/{img}"}} for c, img, a, p in CASES["mme"]])
    return {
        "anls": [mt.anls(p, refs) for p, refs in CASES["anls"]],
        "exact_match": [gqa_mod.gqa_metrics([{"qid": "q", "pred": p, "answer": a}])["score"]
                        / 100 for p, a in CASES["exact_match"]],
        "exact_match_ocrvqa": [ocrvqa.ocrvqa_match(p, [a]) for p, a in CASES["exact_match"]],
        "textvqa": [mt.vqa_accuracy(p, a) for p, a in CASES["textvqa"]],
        "mme": {"mme_perception_score": mme["perception"],
                "mme_cognition_score": mme["cognition"]},
    }


def test_our_metrics_equal_lmms_eval():
    with open(REFERENCE) as f:
        ref = json.load(f)
    ours = our_values()
    assert ours["anls"] == pytest.approx(ref["anls"])
    assert ours["exact_match"] == pytest.approx(ref["exact_match"])
    assert ours["exact_match_ocrvqa"] == pytest.approx(ref["exact_match"])
    assert ours["textvqa"] == pytest.approx(ref["textvqa"])
    assert ours["mme"] == pytest.approx(ref["mme"])
    assert ref["lmms_eval_version"] == "0.7.3"
    if importlib.util.find_spec("lmms_eval") is not None:  # live check where installed
        live = lmms_eval_values()
        for key in ("anls", "exact_match", "textvqa", "mme"):
            assert live[key] == pytest.approx(ref[key]), key


# ---------------------------------------------------------------------------- adapter
class Request:
    """What lmms-eval hands a model: `.args` = (context, gen_kwargs, doc_to_visual, doc_id,
    task, split)."""

    def __init__(self, *args):
        self.args = args


class EchoPredictor:
    def __init__(self, batch_size):
        self.batch_size, self.calls = batch_size, []

    def predict(self, batch, max_new_tokens):
        assert len(batch) <= self.batch_size
        assert all(isinstance(im, Image.Image) and im.mode == "RGB" for im, _ in batch)
        self.calls.append((len(batch), max_new_tokens))
        return [f"{p} ### tail" for _, p in batch]


def _task_dict():
    img = Image.fromarray(np.zeros((8, 8, 3), np.uint8)).convert("L")
    docs = [{"image": img, "q": f"q{i}"} for i in range(3)] + [{"image": None, "q": "none"}]
    return {"t": {"test": docs}}


def test_adapter_generate_until_batches_and_cuts_at_until():
    from covipal_jax.eval.lmms_eval_model import CovipalJax

    model = CovipalJax(predictor=EchoPredictor(2), batch_size=2, max_new_tokens=7)
    model.task_dict = _task_dict()
    visual = lambda doc: [doc["image"]]  # noqa: E731
    reqs = [Request("a", {"until": ["###"], "max_new_tokens": 4}, visual, 0, "t", "test"),
            Request("b", {"until": "###"}, visual, 1, "t", "test"),
            Request("c", {"until": ["###"], "max_new_tokens": 4}, visual, 2, "t", "test"),
            Request("d", {}, visual, 0, "t", "test")]
    out = model.generate_until(reqs)
    assert out == ["a ", "b ", "c ", "d ### tail"]
    assert sorted(model.predictor.calls) == [(1, 7), (1, 7), (2, 4)]
    with pytest.raises(NotImplementedError, match="exactly one image"):
        model.generate_until([Request("x", {}, visual, 3, "t", "test")])
    with pytest.raises(NotImplementedError, match="loglikelihood"):
        model.loglikelihood(reqs)
    assert model.rank == 0 and model.world_size == 1


class FramesEcho(EchoPredictor):
    num_frames = 3

    def predict_frames(self, batch, max_new_tokens):
        assert len(batch) <= self.batch_size
        self.calls.append(("video", [f.shape for f, _ in batch], max_new_tokens))
        return [f"{p} red={int(f[0, 0, 0, 0])} ### tail" for f, p in batch]


def test_adapter_batches_image_and_video_requests_apart(tmp_path):
    """Video tasks pass a path (file or frame folder) as the visual: decoded, `num_frames`
    sampled, answered by predict_frames; image requests still go through predict."""
    from covipal_jax.eval.lmms_eval_model import CovipalJax

    for v, red in (("v1", 10), ("v2", 200)):
        (tmp_path / v).mkdir()
        for i in range(5):
            Image.new("RGB", (10, 6), (red, i, 0)).save(tmp_path / v / f"{i}.png")
    model = CovipalJax(predictor=FramesEcho(2), batch_size=2, max_new_tokens=5)
    model.task_dict = {"vid": {"test": [{"v": str(tmp_path / "v1")}, {"v": tmp_path / "v2"},
                                        {"v": str(tmp_path / "missing")}]},
                       **_task_dict()}
    video = lambda doc: [doc["v"]]  # noqa: E731
    reqs = [Request("v-a", {"until": ["###"]}, video, 0, "vid", "test"),
            Request("img", {"until": ["###"]}, lambda d: [d["image"]], 0, "t", "test"),
            Request("v-b", {"until": ["###"]}, video, 1, "vid", "test")]
    assert model.generate_until(reqs) == ["v-a red=10 ", "img ", "v-b red=200 "]
    assert ("video", [(3, 6, 10, 3), (3, 6, 10, 3)], 5) in model.predictor.calls
    assert (1, 5) in model.predictor.calls  # the image request, alone in its group
    with pytest.raises(ValueError, match="no such video file"):
        model.generate_until([Request("x", {}, video, 2, "vid", "test")])
    plain = CovipalJax(predictor=EchoPredictor(1), batch_size=1)
    plain.task_dict = model.task_dict
    with pytest.raises(NotImplementedError, match="no predict_frames"):
        plain.generate_until([Request("x", {}, video, 0, "vid", "test")])


def test_adapter_from_arg_string_on_the_tiny_model():
    """lmms-eval builds the model from `--model_args` and its `--batch_size`."""
    from covipal_jax.eval.lmms_eval_model import CovipalJax, load_config

    model = CovipalJax.create_from_arg_string(
        "config=tiny,method=pool,keep=0.25,max_new_tokens=2", {"batch_size": 2})
    assert model.spec["method"] == "pool" and model.spec["k"] == 16
    assert model.batch_size_per_gpu == 2 and model.max_new_tokens == 2
    model.task_dict = {"t": {"s": [{"i": Image.new("RGB", (30, 20), (200, 10, 10))}] * 3}}
    reqs = [Request("what color is the square ?", {"max_new_tokens": 2}, lambda d: [d["i"]],
                    i, "t", "s") for i in range(3)]
    texts = model.generate_until(reqs)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert texts[0] == texts[1] == texts[2]  # same image and prompt, greedy
    with pytest.raises(ValueError, match="unknown covipal_jax model_args key"):
        load_config("tiny", pruning="x")


def test_lmms_eval_manifest_when_installed_else_api_standin():
    from covipal_jax.eval import lmms_eval_model as lem
    if importlib.util.find_spec("lmms_eval") is not None:
        from lmms_eval.api.model import lmms
        from lmms_eval.models.registry_v2 import ModelRegistryV2
        assert issubclass(lem.CovipalJax, lmms)
        reg = ModelRegistryV2()
        reg.register_manifest(lem.manifest())
        assert reg.get_model_class("covipal_jax") is lem.CovipalJax
    else:  # the stand-in base keeps lmms-eval's constructor path
        m = lem.CovipalJax.create_from_arg_string("method=none", {
            "batch_size": 3, "predictor": EchoPredictor(3), "device": None})
        assert m.batch_size_per_gpu == 3 and m.task_dict == {}


if __name__ == "__main__":  # regenerate the reference values (needs lmms-eval)
    values = lmms_eval_values()
    os.makedirs(os.path.dirname(REFERENCE), exist_ok=True)
    with open(REFERENCE, "w") as f:
        json.dump(dict(values, cases=CASES), f, indent=1)
    print(json.dumps(values, indent=1))
    sys.exit(0)
