"""covipal_llava TFDS builder on LLaVA-OneVision-style records: several images per record, videos
(a file written with PyAV, a frame folder) sampled at build time, and malformed media counted
and skipped by reason."""
from __future__ import annotations

import json

import av
import numpy as np
import PIL.Image
import pytest

from covipal_jax.data import llava_records as R
from covipal_jax.data import pipeline as pl
from covipal_jax.data import tfds_llava as L
from covipal_jax.data import video as video_lib

H, W, TOTAL, FRAMES = 24, 32, 10, 4


def _frame(i: int) -> np.ndarray:
    """A frame whose brightness encodes its index (survives lossy coding)."""
    x = np.full((H, W, 3), 10 + 20 * i, np.uint8)
    x[:, : W // 4] = 250 - 20 * i
    return x


def _index_of(frame: np.ndarray) -> int:
    return int(round((float(np.asarray(frame)[:, W // 2:].mean()) - 10) / 20))


def _write_video(path, n=TOTAL):
    with av.open(str(path), "w") as out:
        s = out.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.bit_rate = 4_000_000
        for i in range(n):
            for pkt in s.encode(av.VideoFrame.from_ndarray(_frame(i), format="rgb24")):
                out.mux(pkt)
        for pkt in s.encode():
            out.mux(pkt)


def _turns(*pairs):
    out = []
    for h, g in pairs:
        out += [{"from": "human", "value": h}, {"from": "gpt", "value": g}]
    return out


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("ov")
    img, vid = root / "images", root / "videos"
    img.mkdir()
    (vid / "folder").mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {n: rng.integers(0, 255, (8 + i, 10 + 2 * i, 3), dtype=np.uint8)
              for i, n in enumerate("abc")}
    for n, a in arrays.items():
        PIL.Image.fromarray(a).save(img / f"{n}.png")
    (img / "bad.png").write_bytes(b"not a png")
    _write_video(vid / "clip.mp4")
    _write_video(vid / "short.mp4", n=2)
    (vid / "garbage.mp4").write_bytes(b"\x00" * 300)
    for i in range(6):
        PIL.Image.fromarray(_frame(i)).save(vid / "folder" / f"f{i}.png")
    (vid / "few").mkdir()
    for i in range(2):
        PIL.Image.fromarray(_frame(i)).save(vid / "few" / f"f{i}.png")
    ask = lambda q: _turns((q, "An answer."))
    good = [
        {"id": "single", "image": "a.png", "conversations": ask("<image>\nWhat?")},
        {"id": "multi", "image": ["a.png", "b.png", "c.png"],
         "conversations": _turns(("<image> <image> Compare.", "Same."),
                                 ("And this one? <image>", "Other."))},
        {"id": "video", "video": "clip.mp4", "conversations": ask("<image>\nWhat happens?")},
        {"id": "video_tok", "video": "clip.mp4", "conversations": ask("Describe <video>.")},
        {"id": "frames", "video": "folder", "conversations": ask("<video>\nAnd here?")},
    ]
    bad = [
        ({"id": "v_missing", "video": "nope.mp4", "conversations": ask("<image>")},
         "missing_video_file"),
        ({"id": "v_garbage", "video": "garbage.mp4", "conversations": ask("<image>")},
         "unreadable_video"),
        ({"id": "v_short", "video": "short.mp4", "conversations": ask("<image>")},
         "too_few_frames"),
        ({"id": "v_few", "video": "few", "conversations": ask("<image>")}, "too_few_frames"),
        ({"id": "v_two", "video": "clip.mp4", "conversations": ask("<image> <video>")},
         "extra_placeholder"),
        ({"id": "v_none", "video": "clip.mp4", "conversations": ask("no token")},
         "missing_placeholder"),
        ({"id": "both", "image": "a.png", "video": "clip.mp4", "conversations": ask("<image>")},
         "malformed_record"),
        ({"id": "m_fewer_tokens", "image": ["a.png", "b.png"], "conversations": ask("<image>")},
         "missing_placeholder"),
        ({"id": "m_more_tokens", "image": ["a.png", "b.png"],
          "conversations": ask("<image><image><image>")}, "extra_placeholder"),
        ({"id": "m_video_tok", "image": ["a.png"], "conversations": ask("<image><video>")},
         "extra_placeholder"),
        ({"id": "m_bad", "image": ["a.png", "bad.png"], "conversations": ask("<image><image>")},
         "unreadable_image"),
        ({"id": "m_missing", "image": ["a.png", "zz.png"], "conversations": ask("<image><image>")},
         "missing_image_file"),
        ({"id": "m_many", "image": ["a.png"] * 4, "conversations": ask("<image>" * 4)},
         "too_many_images"),
    ]
    records = []
    for i, (rec, _) in enumerate(bad):  # interleave
        records.append(rec)
        if i < len(good):
            records.append(good[i])
    path = root / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    expected: dict[str, int] = {}
    for _, reason in bad:
        expected[reason] = expected.get(reason, 0) + 1
    return dict(root=root, json=str(path), images=str(img), videos=str(vid), arrays=arrays,
                good=good, expected=expected)


@pytest.fixture(scope="module")
def built(media, tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    b = L.llava_builder(data_dir, "ov", media["json"], media["images"], video_dir=media["videos"],
                        max_images=3, num_frames=FRAMES, frame_format="png", num_workers=2)
    b.download_and_prepare()
    src = L.load_llava(data_dir, "ov", "train")
    recs = {r["id"].decode(): r for r in (src[i] for i in range(len(src)))}
    return dict(builder=b, recs=recs, data_dir=data_dir)


def test_skips_counted_by_reason(media, built):
    b = built["builder"]
    assert b.skipped == {"train": media["expected"]}
    assert b.info.metadata["kept"] == {"train": len(media["good"])}
    saved = json.loads((b.data_path / L.SKIPPED_FILE).read_text())
    assert saved["skipped"] == {"train": media["expected"]}
    assert saved["skipped_ids"]["train"]["too_few_frames"] == ["v_short", "v_few"]
    assert set(built["recs"]) == {r["id"] for r in media["good"]}


def test_multi_image_record(media, built):
    r = built["recs"]["multi"]
    assert len(r["images"]) == 3 and len(r["frames"]) == 0 and r["video_path"] == b""
    assert [p.decode() for p in r["image_paths"]] == ["a.png", "b.png", "c.png"]
    for got, n in zip(r["images"], "abc"):
        np.testing.assert_array_equal(got, media["arrays"][n])  # PNG: lossless, in order
    assert [v.decode() for v in r["values"]] == [t["value"] for t in media["good"][1]
                                                 ["conversations"]]
    assert r["question"] == b"Compare."
    single = built["recs"]["single"]
    assert len(single["images"]) == 1 and len(single["frames"]) == 0


@pytest.mark.parametrize("rid", ["video", "video_tok"])
def test_video_frames_sampled_at_build_time(built, rid):
    r = built["recs"][rid]
    assert len(r["images"]) == 0 and r["video_path"] == b"clip.mp4"
    frames = np.stack(r["frames"])
    assert frames.shape == (FRAMES, H, W, 3) and frames.dtype == np.uint8
    want = video_lib.sample_indices(TOTAL, FRAMES, "hf").tolist()
    assert [_index_of(f) for f in frames] == want == [0, 2, 5, 7]
    values = [v.decode() for v in r["values"]]
    assert sum(v.count("<video>") for v in values) == 1
    assert not any("<image>" in v for v in values)  # OneVision's <image> for a video -> <video>
    assert r["question"] in (b"What happens?", b"Describe .")


def test_video_png_frames_equal_decoder(media, built):
    frames = np.stack(built["recs"]["video"]["frames"])
    ref = video_lib.load_video(f"{media['videos']}/clip.mp4", FRAMES)
    np.testing.assert_array_equal(frames, ref)
    folder = np.stack(built["recs"]["frames"]["frames"])
    assert [_index_of(f) for f in folder] == video_lib.sample_indices(6, FRAMES).tolist()
    np.testing.assert_array_equal(folder[0], _frame(0))


def test_jpeg_frames_and_linspace(media, tmp_path):
    rec = {"id": "v", "video": "clip.mp4",
           "conversations": _turns(("<image>\nQ", "A"))}
    path = tmp_path / "one.json"
    path.write_text(json.dumps([rec]))
    b = L.llava_builder(str(tmp_path / "tfds"), "jpeg", str(path), media["videos"],
                        num_frames=3, frame_sampling="linspace", num_workers=1)
    b.download_and_prepare()
    r = b.as_data_source("train")[0]
    frames = np.stack(r["frames"])
    ref = video_lib.load_video(f"{media['videos']}/clip.mp4", 3, sampling="linspace")
    assert frames.shape == ref.shape
    assert np.abs(frames.astype(int) - ref).mean() < 3.0  # JPEG q95
    assert [_index_of(f) for f in frames] == [0, 4, 9]


def test_videos_disabled_and_bad_options(media, tmp_path):
    with pytest.raises(R.Skip) as e:
        R.check_record(media["good"][2], num_frames=0)
    assert e.value.reason == "video_not_enabled"
    b = L.llava_builder(str(tmp_path), "bad", media["json"], media["images"],
                        frame_format="gif")
    with pytest.raises(ValueError, match="frame_format"):
        b.download_and_prepare()


def test_single_image_pipeline_skips_multi_and_video(media, tmp_path):
    """The trainer's source keeps one-image records only (others are counted, not fatal)."""
    from covipal_jax.configs import ppm_tiny

    c = ppm_tiny.get_config()
    c.data.kind, c.data.name = "llava", "ov_single"
    c.data.json, c.data.images = media["json"], media["images"]
    src, skipped = pl.build_source(c, str(tmp_path / "tfds"))
    assert len(src) == 1 and src[0]["id"] == b"single"
    assert skipped["video_not_enabled"] == 9  # every video record, missing files included
    assert skipped["too_many_images"] == 6
    image, q, a = pl.qa_from_record(src[0])
    np.testing.assert_array_equal(image, media["arrays"]["a"])
    assert (q, a) == ("What?", "An answer.")
    multi = {"id": b"m", "images": [image, image], "frames": [], "question": b"", "answer": b""}
    with pytest.raises(ValueError, match="one image"):
        pl.qa_from_record(multi)
