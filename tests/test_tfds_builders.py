"""Tests for the TFDS builders: data/tfds_synthetic.py and data/tfds_llava.py (offline builds)."""
from __future__ import annotations

import io
import json
import logging

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from covipal_jax.data.synthetic import task as S
from covipal_jax.data import tfds_llava as L
from covipal_jax.data.synthetic import tfds_builder as T

# ------------------------------------------------------------------------- synthetic builder


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tfds_syn")
    b = T.builder(str(d), "tiny")
    b.download_and_prepare()
    return str(d)


def _records(src):
    return [T.decode_record(src[i]) for i in range(len(src))]


def test_synthetic_tiny_builds_as_array_record(tiny_dir):
    b = T.builder(tiny_dir, "tiny")
    assert b.info.file_format == tfds.core.file_adapters.FileFormat.ARRAY_RECORD
    cfg = b.builder_config
    assert {s: b.info.splits[s].num_examples for s in ("train", "validation", "test")} == \
        cfg.split_sizes()
    src = b.as_data_source("train")
    assert len(src) == cfg.n_train
    # the registry path works too
    test_src = tfds.data_source("covipal_synthetic_vqa/tiny", split="test", data_dir=tiny_dir,
                                download=False)
    assert len(test_src) == cfg.n_test
    rec = T.decode_record(test_src[0])
    assert rec["image"].dtype == np.uint8 and rec["image"].shape == (64, 64, 3)
    assert rec["id"] == "test-0-0"


def test_synthetic_records_match_generator(tiny_dir):
    cfg = T.builder(tiny_dir, "tiny").builder_config
    for split in ("train", "test"):
        src = T.load_synthetic(tiny_dir, "tiny", split)
        for i in (0, 1, len(src) - 1):
            rec = T.decode_record(src[i])
            ex = S.make_example(split, i, cfg.seed, cfg.task)
            assert np.array_equal(rec["image"], ex["image"])  # PNG is lossless
            assert (rec["question"], rec["answer"], rec["qtype"]) == \
                (ex["question"], ex["answer"], ex["qtype"])
            assert list(zip(rec["objects"]["shape"], rec["objects"]["color"],
                            rec["objects"]["x"], rec["objects"]["y"], rec["objects"]["size"])) \
                == ex["objects"]
            assert list(np.flatnonzero(rec["objects"]["queried"])) == ex["queried"]


def test_synthetic_build_is_deterministic(tiny_dir, tmp_path):
    small = T.SyntheticBuilderConfig(name="small", n_train=40, n_validation=4, n_test=20, seed=7)
    other = T.SyntheticBuilderConfig(name="small", n_train=40, n_validation=4, n_test=20, seed=8)
    outs = []
    for sub, cfg in (("a", small), ("b", small), ("c", other)):
        b = T.CovipalSyntheticVqa(config=cfg, data_dir=str(tmp_path / sub))
        b.download_and_prepare()
        outs.append(b.as_data_source("train"))
    a, b2, c = outs
    for i in range(len(a)):
        assert a[i]["image"].tobytes() == b2[i]["image"].tobytes()
        assert a[i]["question"] == b2[i]["question"] and a[i]["answer"] == b2[i]["answer"]
    assert any(a[i]["image"].tobytes() != c[i]["image"].tobytes() for i in range(len(a)))


def test_synthetic_heldout_and_answers(tiny_dir):
    held = {(s.encode(), c.encode()) for s, c in S.heldout_combos(S.SyntheticConfig())}
    answers = set(S.answer_set())
    by_type = {}
    for split in ("train", "validation", "test"):
        for rec in T.load_synthetic(tiny_dir, "tiny", split):
            o = rec["objects"]
            queried = {(o["shape"][j], o["color"][j]) for j in np.flatnonzero(o["queried"])}
            words = rec["question"].decode().split()
            if rec["qtype"] == b"exist":  # the combination asked about may be absent
                queried.add((words[4].encode(), words[3].encode()))
            if split == "test":
                assert held & queried, rec["question"]
            else:
                assert not held & queried, rec["question"]
            ans = rec["answer"].decode()
            assert len(ans.split()) == 1 and ans in answers
            if split == "train":
                by_type.setdefault(rec["qtype"].decode(), []).append(ans)
    assert set(by_type) == set(S.QTYPES)
    for q, a in by_type.items():  # no type collapses to a single answer
        assert len(set(a)) >= 2, (q, a)
    assert abs(np.mean([x == "yes" for x in by_type["exist"]]) - 0.5) < 0.25


def test_synthetic_tfrecord_option(tmp_path):
    cfg = T.SyntheticBuilderConfig(name="rec", n_train=8, n_validation=2, n_test=2)
    b = T.CovipalSyntheticVqa(config=cfg, data_dir=str(tmp_path), file_format="tfrecord")
    b.download_and_prepare()
    ds = b.as_dataset(split="train")
    first = next(iter(tfds.as_numpy(ds)))
    assert first["image"].shape == (64, 64, 3)
    with pytest.raises(NotImplementedError):
        b.as_data_source("train")
    # re-opening keeps the recorded format instead of the array_record default
    again = T.CovipalSyntheticVqa(config=cfg, data_dir=str(tmp_path))
    assert again.info.file_format == tfds.core.file_adapters.FileFormat.TFRECORD


# ----------------------------------------------------------------------------- llava builder


def _jpeg(rng, size=(20, 16)):
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    PIL.Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _png(arr, mode=None):
    buf = io.BytesIO()
    PIL.Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def _turns(*pairs):
    out = []
    for h, g in pairs:
        out += [{"from": "human", "value": h}, {"from": "gpt", "value": g}]
    return out


@pytest.fixture(scope="module")
def llava_fixture(tmp_path_factory):
    """A JSON with 5 good and 12 malformed records, and its image folder."""
    root = tmp_path_factory.mktemp("llava")
    img = root / "images"
    (img / "coco").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)
    rgba = rng.integers(0, 255, (8, 9, 4), dtype=np.uint8)
    gray = rng.integers(0, 255, (7, 5), dtype=np.uint8)
    jpeg = _jpeg(rng)
    (img / "coco" / "a.jpg").write_bytes(jpeg)
    (img / "b.png").write_bytes(_png(rgb))
    (img / "rgba.png").write_bytes(_png(rgba))
    (img / "gray.png").write_bytes(_png(gray))
    (img / "garbage.jpg").write_bytes(b"this is not an image")
    (img / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    good = [
        {"id": "g1", "image": "coco/a.jpg",
         "conversations": _turns(("<image>\nWhat is this?", "A test."))},
        {"id": "g2", "image": "b.png", "conversations": _turns(
            ("Describe it.\n<image>", "Noise."), ("And the colour?", "Many."),
            ("Sure?", "Yes."))},
        {"id": 3, "image": "rgba.png",
         "conversations": [{"from": "user", "value": "<image>\nQ"},
                           {"from": "assistant", "value": "A"}]},
        {"id": "g4", "image": ["gray.png"], "conversations": _turns(("<image>", "Grey."))},
        {"id": "g5", "image": "coco/a.jpg",
         "conversations": _turns(("<image>\nAgain?", "Again."))},
    ]
    bad = [
        ({"id": "b_text", "conversations": _turns(("Hi", "Hello"))}, "text_only"),
        ({"id": "b_missing", "image": "nope.jpg",
          "conversations": _turns(("<image>\nQ", "A"))}, "missing_image_file"),
        ({"id": "b_garbage", "image": "garbage.jpg",
          "conversations": _turns(("<image>\nQ", "A"))}, "unreadable_image"),
        ({"id": "b_trunc", "image": "truncated.jpg",
          "conversations": _turns(("<image>\nQ", "A"))}, "unreadable_image"),
        ({"id": "b_notoken", "image": "b.png",
          "conversations": _turns(("Q without token", "A"))}, "missing_placeholder"),
        ({"id": "b_empty", "image": "b.png",
          "conversations": _turns(("<image>\nQ", "A"), ("Q2", "  "))}, "empty_answer"),
        ({"id": "b_order", "image": "b.png",
          "conversations": [{"from": "gpt", "value": "A"},
                            {"from": "human", "value": "<image>\nQ"}]}, "bad_role_order"),
        ({"id": "b_odd", "image": "b.png",
          "conversations": [{"from": "human", "value": "<image>\nQ"}]}, "bad_role_order"),
        ({"id": "b_two", "image": "b.png",
          "conversations": _turns(("<image>\nQ", "A"), ("<image> again", "B"))},
         "extra_placeholder"),
        ({"id": "b_multi", "image": ["b.png", "coco/a.jpg"],
          "conversations": _turns(("<image>\nQ", "A"))}, "missing_placeholder"),
        ({"id": "b_many", "image": ["b.png"] * 5,
          "conversations": _turns(("<image>" * 5, "A"))}, "too_many_images"),
        ({"id": "b_struct", "image": "b.png"}, "malformed_record"),
    ]
    records = []
    for i, rec in enumerate(good):  # interleave good and bad records
        records.append(rec)
        records += [r for r, _ in bad[2 * i: 2 * i + 2]]
    records += [r for r, _ in bad[2 * len(good):]]
    json_path = root / "data.json"
    json_path.write_text(json.dumps(records))
    expected_skips: dict[str, int] = {}
    for _, reason in bad:
        expected_skips[reason] = expected_skips.get(reason, 0) + 1
    return {"root": root, "json": str(json_path), "images": str(img), "good": good,
            "expected_skips": expected_skips, "rgb": rgb, "rgba": rgba, "gray": gray,
            "jpeg": jpeg}


@pytest.fixture(scope="module")
def llava_built(llava_fixture, tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds_llava"))
    b = L.llava_builder(data_dir, "fixture", llava_fixture["json"], llava_fixture["images"],
                        num_workers=2, max_images=4)
    records: list = []
    handler = _ListHandler(records)
    absl_logger = logging.getLogger("absl")
    absl_logger.addHandler(handler)
    try:
        b.download_and_prepare()
    finally:
        absl_logger.removeHandler(handler)
    warnings = [r.getMessage() for r in records
                if r.levelno == logging.WARNING and "covipal_llava" in r.getMessage()]
    return {"builder": b, "data_dir": data_dir, "warnings": warnings}


class _ListHandler(logging.Handler):
    def __init__(self, out):
        super().__init__(logging.DEBUG)
        self.out = out

    def emit(self, record):
        self.out.append(record)


def test_llava_skips_counted_with_one_warning(llava_fixture, llava_built):
    b = llava_built["builder"]
    exp = llava_fixture["expected_skips"]
    assert b.skipped == {"train": exp}
    assert b.info.splits["train"].num_examples == len(llava_fixture["good"])
    assert len(llava_built["warnings"]) == 1
    msg = llava_built["warnings"][0]
    for reason in exp:
        assert reason in msg
    # counts are saved with the dataset
    reread = tfds.builder_from_directory(str(b.data_path))
    assert reread.info.metadata["skipped"] == {"train": exp}
    assert reread.info.metadata["kept"] == {"train": len(llava_fixture["good"])}
    assert "b_trunc" in reread.info.metadata["skipped_ids"]["train"]["unreadable_image"]
    # and in a json beside the dataset files
    saved = json.loads((b.data_path / L.SKIPPED_FILE).read_text())
    assert saved["skipped"] == {"train": exp} and saved["kept"] == {"train": 5}


def test_llava_round_trip(llava_fixture, llava_built):
    src = L.load_llava(llava_built["data_dir"], "fixture", "train")
    assert len(src) == len(llava_fixture["good"])
    recs = {r["id"]: r for r in (T.decode_record(src[i]) for i in range(len(src)))}
    assert set(recs) == {"g1", "g2", "3", "g4", "g5"}
    g2 = recs["g2"]
    assert g2["roles"] == ["human", "gpt"] * 3
    assert g2["values"] == [t["value"] for t in llava_fixture["good"][1]["conversations"]]
    assert (g2["question"], g2["answer"]) == ("Describe it.", "Noise.")
    assert len(g2["images"]) == 1 and len(g2["frames"]) == 0 and g2["video_path"] == ""
    assert np.array_equal(g2["images"][0], llava_fixture["rgb"])  # PNG bytes kept as they were
    assert g2["image_paths"] == ["b.png"]
    assert recs["3"]["roles"] == ["human", "gpt"] and recs["3"]["question"] == "Q"
    assert np.array_equal(recs["3"]["images"][0], llava_fixture["rgba"][..., :3])  # RGBA -> RGB
    assert np.array_equal(recs["g4"]["images"][0],
                          np.repeat(llava_fixture["gray"][..., None], 3, -1))
    assert recs["g4"]["question"] == ""
    ref = np.asarray(PIL.Image.open(io.BytesIO(llava_fixture["jpeg"])).convert("RGB"))
    assert np.array_equal(recs["g1"]["images"][0], ref)


def test_llava_check_conversation_reasons():
    ok = {"image": "x.jpg", "conversations": _turns(("<image>\nQ", "A"))}
    assert L.check_record(ok) == L.Checked(("x.jpg",), "", ("human", "gpt"), ("<image>\nQ", "A"))
    for rec, reason in [
        ("not a dict", "malformed_record"),
        ({"image": "x.jpg", "conversations": [{"from": "human"}]}, "malformed_record"),
        ({"image": "x.jpg", "conversations": []}, "bad_role_order"),
        ({"image": "x.jpg", "conversations": _turns(("<image>", ""))}, "empty_answer"),
        ({"image": "", "conversations": _turns(("<image>", "A"))}, "text_only"),
    ]:
        with pytest.raises(L.Skip) as e:
            L.check_record(rec)
        assert e.value.reason == reason


def test_llava_manual_dir_and_jsonl(llava_fixture, tmp_path):
    """Registered config: relative paths resolved in the manual dir; JSON-lines input."""
    manual = llava_fixture["root"]
    lines = [json.dumps(r) for r in llava_fixture["good"][:2]] + ["{not json"]
    (manual / "llava_v1_5_mix665k.json").write_text("\n".join(lines))
    # the registered config reads images from the manual dir itself: put them there
    for name in ("b.png",):
        (manual / name).write_bytes((manual / "images" / name).read_bytes())
    (manual / "coco").mkdir(exist_ok=True)
    (manual / "coco" / "a.jpg").write_bytes(llava_fixture["jpeg"])
    b = L.CovipalLlava(config="llava_v1_5_mix665k", data_dir=str(tmp_path))
    b.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    assert b.info.splits["train"].num_examples == 2
    assert b.skipped == {"train": {"malformed_record": 1}}
    src = tfds.data_source("covipal_llava", split="train", data_dir=str(tmp_path),
                           download=False)
    assert sorted(src[i]["id"] for i in range(len(src))) == [b"g1", b"g2"]
