"""covipal_jax.weights.safetensors_io: every malformed file or sharded index is an error naming
the file and the problem before any tensor is read; local and (fake) gs:// reads.

Each bad file is built here byte by byte (`_raw`); the good ones by `safetensors.numpy`
(the reference implementation) and by our writer, each read back by the other.
"""
from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest
from etils.epath import backend as backend_lib
from safetensors.numpy import load_file, save_file

import fake_gcs
from covipal_jax import paths
from covipal_jax.weights import safetensors_io as st
from covipal_jax.weights.safetensors_io import Checkpoint, SafetensorsError, SafetensorsFile


def _raw(path, header, data: bytes = b"", n: int | None = None) -> str:
    """A file: u64 header length (`n` overrides it), the header (dict -> JSON, or bytes), data."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h) if n is None else n) + h + data)
    return os.fspath(path)


def _t(dtype="F32", shape=(2,), offs=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offs)}


def _good(path) -> str:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.arange(4, dtype=np.int64)
    save_file({"a": a, "b": b}, os.fspath(path))
    return os.fspath(path)


# ----------------------------------------------------------------------------- good files


def test_reads_reference_files_and_reference_reads_ours(tmp_path):
    tensors = {"w": np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32),
               "bf": np.arange(8, dtype=np.float32).astype(ml_dtypes.bfloat16).reshape(2, 4),
               "i": np.arange(3, dtype=np.int32), "flag": np.array([True, False]),
               "empty": np.zeros((0, 4), np.float16), "scalar": np.array(2.5, np.float64)}
    save_file(tensors, tmp_path / "ref.safetensors")
    f = SafetensorsFile(tmp_path / "ref.safetensors")
    assert set(f.keys()) == set(tensors)
    for k, v in tensors.items():
        assert f.dtype(k) == v.dtype and f.shape(k) == v.shape
        np.testing.assert_array_equal(f.get(k), v)
    f.close()
    st.save_safetensors(tmp_path / "ours.safetensors", tensors, metadata={"format": "pt"})
    back = load_file(tmp_path / "ours.safetensors")
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype, k
        np.testing.assert_array_equal(back[k], v)
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # temp file renamed away


# ----------------------------------------------------------------------------- bad files

BAD_FILES = {
    # name: (builder(path) -> None, message fragment)
    "empty": (lambda p: open(p, "wb").close(), "shorter than the 8-byte header length"),
    "five_bytes": (lambda p: open(p, "wb").write(b"\x05\x00\x00\x00\x00"), "5 bytes"),
    "header_past_end": (lambda p: _raw(p, {"a": _t()}, b"\0" * 8, n=10_000),
                        "runs past the end of the file"),
    "header_above_cap": (lambda p: _raw(p, b"{}", n=st.MAX_HEADER_BYTES + 1),
                         "exceeds the"),
    "non_json_header": (lambda p: _raw(p, b"{not json", b""), "not valid JSON"),
    "binary_header": (lambda p: _raw(p, b"\xff\xfe\x00", b""), "not valid JSON"),
    "header_not_object": (lambda p: _raw(p, [1, 2]), "not an object"),
    "entry_not_object": (lambda p: _raw(p, {"a": [1]}), "needs dtype, shape and data_offsets"),
    "unknown_dtype": (lambda p: _raw(p, {"a": _t(dtype="F8_E4M3X")}, b"\0" * 8),
                      "unknown dtype 'F8_E4M3X'"),
    "negative_offsets": (lambda p: _raw(p, {"a": _t(offs=(-8, 0))}, b"\0" * 8),
                         "negative data_offsets"),
    "reversed_offsets": (lambda p: _raw(p, {"a": _t(offs=(8, 0))}, b"\0" * 8),
                         "end before they begin"),
    "offsets_vs_shape": (lambda p: _raw(p, {"a": _t(shape=(3,), offs=(0, 8))}, b"\0" * 12),
                         "span 8 bytes, but shape [3] of F32 needs 12"),
    "negative_dim": (lambda p: _raw(p, {"a": _t(shape=(-2,), offs=(0, 8))}, b"\0" * 8),
                     "not a list of non-negative ints"),
    "bad_offsets_type": (lambda p: _raw(p, {"a": _t(offs=(0,))}, b"\0" * 8),
                         "is not [begin, end]"),
    "short_data": (lambda p: _raw(p, {"a": _t(shape=(4,), offs=(0, 16))}, b"\0" * 10),
                   "lie outside the data section (10 bytes): the file is truncated"),
    "outside_data": (lambda p: _raw(p, {"a": _t(offs=(0, 8)), "b": _t(offs=(64, 72))},
                                    b"\0" * 16), "'b': bytes [64, 72) lie outside"),
    "overlapping": (lambda p: _raw(p, {"a": _t(shape=(4,), offs=(0, 16)),
                                       "b": _t(shape=(2,), offs=(8, 16))}, b"\0" * 16),
                    "overlap"),
    "bad_metadata": (lambda p: _raw(p, {"__metadata__": [1], "a": _t()}, b"\0" * 8),
                     "__metadata__"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_malformed_file_is_named_error(name, tmp_path):
    build, fragment = BAD_FILES[name]
    path = tmp_path / f"{name}.safetensors"
    build(path)
    with pytest.raises(SafetensorsError) as e:
        SafetensorsFile(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: "), msg  # names the file first
    assert fragment in msg, msg


def test_truncated_real_file_fails_on_open_not_on_read(tmp_path):
    """A valid file cut short anywhere: an error at open, before any tensor is read."""
    good = _good(tmp_path / "good.safetensors")
    data = open(good, "rb").read()
    for cut in (3, 8, 20, len(data) - 40, len(data) - 1):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(SafetensorsError, match="truncated|shorter|runs past") as e:
            SafetensorsFile(bad)
        assert str(bad) in str(e.value)


def test_file_shrinking_after_open_is_an_error(tmp_path):
    good = os.fspath(tmp_path / "good.safetensors")
    save_file({"a": np.zeros(20_000, np.float32), "b": np.arange(4)}, good)  # > read buffer
    f = SafetensorsFile(good)
    data = open(good, "rb").read()
    open(good, "wb").write(data[:-8])
    last = max(f.keys(), key=lambda k: f.tensors[k]["end"])
    n = f.tensors[last]["end"] - f.tensors[last]["begin"]
    with pytest.raises(SafetensorsError, match=f"read {n - 8} of {n} bytes"):
        f.get(last)
    f.close()


# ----------------------------------------------------------------------------- checkpoint dirs


def _sharded(tmp_path, weight_map: dict, shards: dict[str, dict[str, np.ndarray]]) -> str:
    d = tmp_path / "ckpt"
    d.mkdir()
    for name, tensors in shards.items():
        save_file(tensors, d / name)
    (d / st.INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return os.fspath(d)


ONE = {"x": np.ones(2, np.float32)}


@pytest.mark.parametrize("shard_name, fragment", [
    ("../outside.safetensors", "leaves the checkpoint directory"),
    ("sub/../../outside.safetensors", "leaves the checkpoint directory"),
    ("/etc/passwd", "absolute path"),
    ("gs://other-bucket/x.safetensors", "absolute path"),
    ("C:\\x.safetensors", "absolute path"),
    ("./x.safetensors", "not a plain relative file name"),
    (7, "is not a file name"),
])
def test_index_with_escaping_shard_names(shard_name, fragment, tmp_path):
    (tmp_path / "outside.safetensors").write_bytes(b"")
    d = _sharded(tmp_path, {"x": shard_name}, {"a.safetensors": ONE})
    with pytest.raises(SafetensorsError, match="shard names must be plain files") as e:
        Checkpoint(d)
    assert fragment in str(e.value) and st.INDEX_FILE in str(e.value)


def test_index_missing_shard_and_keys_mapped_to_it(tmp_path):
    d = _sharded(tmp_path, {"x": "a.safetensors", "y": "b.safetensors", "z": "b.safetensors"},
                 {"a.safetensors": ONE})
    with pytest.raises(SafetensorsError) as e:
        Checkpoint(d)
    msg = str(e.value)
    assert "missing: ['b.safetensors']" in msg and "2 keys map to them: y, z" in msg
    assert d in msg


def test_index_key_in_a_shard_that_lacks_it(tmp_path):
    d = _sharded(tmp_path, {"x": "a.safetensors", "w": "a.safetensors"}, {"a.safetensors": ONE})
    with pytest.raises(SafetensorsError, match="shards that lack them: 'w' -> a.safetensors"):
        Checkpoint(d)


def test_index_without_weight_map_or_json(tmp_path):
    d = _sharded(tmp_path, {}, {"a.safetensors": ONE})
    with pytest.raises(SafetensorsError, match="no weight_map"):
        Checkpoint(d)
    (tmp_path / "ckpt" / st.INDEX_FILE).write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        Checkpoint(d)


def test_duplicate_unindexed_key_in_two_shards(tmp_path):
    d = _sharded(tmp_path, {"x": "a.safetensors"},
                 {"a.safetensors": {**ONE, "dup": ONE["x"]}, "b.safetensors": {"dup": ONE["x"]}})
    (tmp_path / "ckpt" / st.INDEX_FILE).write_text(json.dumps(
        {"weight_map": {"x": "a.safetensors", "y": "b.safetensors"}}))
    with pytest.raises(SafetensorsError):  # y is not in b: refused before the duplicate check
        Checkpoint(d)


def test_bad_shard_fails_before_any_read(tmp_path, monkeypatch):
    d = _sharded(tmp_path, {"x": "a.safetensors", "y": "b.safetensors"},
                 {"a.safetensors": ONE, "b.safetensors": {"y": np.ones(4, np.float32)}})
    data = open(os.path.join(d, "b.safetensors"), "rb").read()
    open(os.path.join(d, "b.safetensors"), "wb").write(data[:-4])
    reads = []
    monkeypatch.setattr(SafetensorsFile, "get", lambda self, k: reads.append(k))
    with pytest.raises(SafetensorsError, match="b.safetensors: tensor 'y'.*truncated"):
        Checkpoint(d)
    assert reads == []


def test_no_weights_in_dir(tmp_path):
    with pytest.raises(SafetensorsError, match="no model.safetensors or"):
        Checkpoint(tmp_path)


def test_permission_error_is_one_line_naming_the_file(tmp_path, monkeypatch):
    good = _good(tmp_path / "model.safetensors")
    real_open = backend_lib.os_backend.open

    def deny(path, mode, *a, **kw):
        if os.fspath(path) == good:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, mode, *a, **kw)
    monkeypatch.setattr(backend_lib.os_backend, "open", deny)
    with pytest.raises(paths.PathPermissionError) as e:
        Checkpoint(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and good in msg and "permission denied" in msg
    assert isinstance(e.value, ValueError)  # the command lines print it as `error: ...`


# ----------------------------------------------------------------------------- remote


def test_remote_checkpoint_reads_each_byte_once(tmp_path, monkeypatch):
    fake = fake_gcs.fake_gcs(monkeypatch, tmp_path / "bucket_root")
    tensors = {f"t{i}": np.random.default_rng(i).standard_normal((64, 33)).astype(np.float32)
               for i in range(4)}
    uri = "gs://bkt/ckpt"
    st.save_safetensors(f"{uri}/{st.SINGLE_FILE}", tensors)
    local = fake.local(f"{uri}/{st.SINGLE_FILE}")
    assert os.path.exists(local) and not os.path.exists(f"{uri}/{st.SINGLE_FILE}")
    np.testing.assert_array_equal(load_file(local)["t2"], tensors["t2"])
    with Checkpoint(uri) as ck:
        assert sorted(ck.keys()) == sorted(tensors)
        got = {k: np.array(ck.get(k)) for k in tensors}
    for k, v in tensors.items():
        np.testing.assert_array_equal(got[k], v)
    # header once + each tensor's byte range once: the whole object exactly once.
    assert sum(fake.bytes_read.values()) == os.path.getsize(local)
    # A truncated remote object: a named error at open.
    data = open(local, "rb").read()
    open(local, "wb").write(data[:-100])
    with pytest.raises(SafetensorsError, match=f"{uri}/model.safetensors: .*truncated"):
        Checkpoint(uri)
