"""covipal_jax/data/pipeline.py: fixed shapes, drop_remainder, per-host split, resumption by
position, malformed LLaVA records counted (not fatal), too-long examples weighted out."""
from __future__ import annotations

import json
import os

import numpy as np
import PIL.Image
import pytest

from covipal_jax.configs import ppm_tiny
from covipal_jax.inference import loading
from covipal_jax.data import image as image_lib
from covipal_jax.data import pipeline as pl

MAX_LEN = 24


@pytest.fixture(scope="module")
def synthetic_source(tmp_path_factory):
    c = ppm_tiny.get_config()
    src, skipped = pl.build_source(c, str(tmp_path_factory.mktemp("tfds")))
    assert skipped == {}
    return src


def _pipe(source, **kw):
    kw.setdefault("global_batch", 16)
    return pl.Pipeline(source, tokenizer=loading.builtin_tokenizer(),
                       processor=image_lib.clip(64), template="plain", max_len=MAX_LEN, **kw)


def test_fixed_shapes_and_contents(synthetic_source):
    p = _pipe(synthetic_source)
    assert p.num_examples == 256 and p.batches_per_epoch == 16
    for pos in (0, 7, 16, 40):                      # across epochs
        b = p.batch(pos)
        assert b["pixels"].shape == (16, 64, 64, 3) and b["pixels"].dtype == np.float32
        for k in ("ids", "mask", "loss_mask"):
            assert b[k].shape == (16, MAX_LEN)
        assert b["ids"].dtype == np.int32 and b["mask"].dtype == bool
        assert b["weight"].shape == (16,) and np.all(b["weight"] == 1)
        # One image placeholder per row, answers inside the real tokens, left padding.
        assert np.all((b["ids"] == 4).sum(1) == 1)
        assert np.all(b["mask"] | ~b["loss_mask"]) and np.all(b["loss_mask"].sum(1) >= 2)
        assert np.all(b["mask"][:, -1]) and np.all(np.diff(b["mask"].astype(int), axis=1) >= 0)


def test_drop_remainder(synthetic_source):
    drop = _pipe(synthetic_source, global_batch=48, drop_remainder=True)
    keep = _pipe(synthetic_source, global_batch=48, drop_remainder=False)
    assert drop.batches_per_epoch == 5 and keep.batches_per_epoch == 6
    seen = np.concatenate([drop.global_indices(i) for i in range(5)])
    assert len(np.unique(seen)) == 240 and seen.min() >= 0
    seen = np.concatenate([keep.global_indices(i) for i in range(6)])
    assert sorted(seen[seen >= 0].tolist()) == list(range(256))
    last = keep.batch(5)
    assert last["weight"].tolist() == [1.0] * 16 + [0.0] * 32
    assert np.all(last["index"][16:] == -1)
    # Padding rows keep the shapes and hold a well-formed (weight-0) prompt.
    assert last["ids"].shape == (48, MAX_LEN) and np.all((last["ids"][16:] == 4).sum(1) == 1)
    # The next epoch is a new permutation, and drop_remainder leaves out 16 of each.
    assert not np.array_equal(drop.global_indices(0), drop.global_indices(5))
    with pytest.raises(ValueError):
        _pipe(list(range(8)), global_batch=16)      # fewer examples than one batch


def test_per_host_split_disjoint_and_covering(synthetic_source):
    hosts = [_pipe(synthetic_source, global_batch=16, process_index=h, process_count=4)
             for h in range(4)]
    for pos in (0, 3, 17):
        parts = [h.local_indices(pos) for h in hosts]
        assert all(len(x) == 4 for x in parts)
        joined = np.concatenate(parts)
        assert len(set(joined.tolist())) == 16
        np.testing.assert_array_equal(joined, hosts[0].global_indices(pos))
        b = hosts[2].batch(pos)
        assert b["ids"].shape == (4, MAX_LEN)
        np.testing.assert_array_equal(b["index"], parts[2])
    with pytest.raises(ValueError):
        _pipe(synthetic_source, global_batch=10, process_count=4)


def test_resume_position_gives_same_batches(synthetic_source):
    p = _pipe(synthetic_source, seed=3)
    first = [b for _, b in zip(range(6), p.iterate(0, prefetch=2))]
    q = _pipe(synthetic_source, seed=3)
    resumed = [b for _, b in zip(range(3), q.iterate(3, prefetch=0))]
    for (pos, a), (pos2, b) in zip(first[3:], resumed):
        assert pos == pos2
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    other = _pipe(synthetic_source, seed=4)
    assert not np.array_equal(other.global_indices(0), p.global_indices(0))
    noshuffle = _pipe(synthetic_source, shuffle=False)
    np.testing.assert_array_equal(noshuffle.global_indices(1), np.arange(16, 32))


def _png(path, color):
    PIL.Image.new("RGB", (40, 30), color).save(path)


def test_llava_malformed_records_counted_not_fatal(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(5):
        _png(images / f"{i}.png", (40 * i, 10, 200))
    (images / "broken.png").write_bytes(b"not a png")
    conv = lambda q, a: [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]
    records = [{"id": f"ok{i}", "image": f"{i}.png",
                "conversations": conv("what color is the circle ?", "red")} for i in range(5)]
    long_q = " ".join(["circle"] * 40) + " ?"
    records[4]["conversations"] = conv(long_q, "red")   # does not fit max_len: weight 0
    records += [
        {"id": "text", "conversations": conv("hi", "there")},                 # text_only
        {"id": "noconv", "image": "0.png"},                                    # malformed
        {"id": "missing", "image": "nope.png", "conversations": conv("q", "a")},
        {"id": "broken", "image": "broken.png", "conversations": conv("q", "a")},
        {"id": "order", "image": "0.png", "conversations": list(reversed(conv("q", "a")))},
        "not even a dict",
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    c = ppm_tiny.get_config()
    c.data.kind, c.data.name = "llava", "unit_test"
    c.data.json, c.data.images = str(path), str(images)
    src, skipped = pl.build_source(c, str(tmp_path / "tfds"))
    assert len(src) == 5
    assert sum(skipped.values()) == 6
    assert skipped["text_only"] == 1 and skipped["missing_image_file"] == 1
    assert skipped["unreadable_image"] == 1 and skipped["malformed_record"] == 2
    p = pl.from_config(c, src, tokenizer=loading.builtin_tokenizer(),
                       processor=image_lib.clip(64), global_batch=5, skipped=skipped)
    assert p.stats.skipped_at_build == skipped
    b = p.batch(0)
    assert b["pixels"].shape == (5, 64, 64, 3) and b["ids"].shape == (5, c.data.max_len)
    assert sorted(b["weight"].tolist()) == [0.0, 1.0, 1.0, 1.0, 1.0]
    assert p.stats.too_long == 1 and p.stats.examples == 5
    # The kept records' first turn is what the model sees.
    row = int(np.argmax(b["weight"]))
    text = loading.builtin_tokenizer().decode(b["ids"][row][b["mask"][row]])
    assert text == "what color is the circle? ANSWER: red"


def test_data_dir_resolution(tmp_path):
    c = ppm_tiny.get_config()
    assert pl.data_dir(c, str(tmp_path)) == os.path.join(str(tmp_path), "data")
    assert pl.data_dir(c, str(tmp_path), "/x/y") == "/x/y"
    c.data.dir = "/z"
    assert pl.data_dir(c, None) == "/z"
    c.data.kind = "nope"
    with pytest.raises(ValueError):
        pl.build_source(c, str(tmp_path))
