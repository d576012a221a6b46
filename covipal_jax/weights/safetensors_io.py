"""Safetensors files and checkpoint directories, local or remote, validated before any read.

Format (https://github.com/huggingface/safetensors): `u64 little-endian N`, an N-byte JSON header
`{key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`, then the
data section; offsets are relative to its start.

- `SafetensorsFile(path)`: opens the file through `etils.epath` (local or `gs://`), reads only
  the header, and checks it against the file size: every malformed file (too short, header
  length past the end or above `MAX_HEADER_BYTES`, non-JSON header, unknown dtype, bad shape,
  negative / reversed offsets, a byte range that does not match shape x dtype size, a tensor
  outside the data section, overlapping tensors) raises `SafetensorsError` naming the file and
  the problem. `get(key)` then seeks to the tensor's byte range and reads just that range, so a
  remote file is read once, one tensor at a time (host memory: one tensor).
- `Checkpoint(dir)`: `model.safetensors`, or a sharded `model.safetensors.index.json` whose
  shard names must be plain file names inside the directory (no `..`, no absolute paths), all
  present; every key of the index must be in its shard. All headers are validated on open.
- `save_safetensors(path, tensors)`: streams a file `safetensors.numpy.load_file` reads
  (bfloat16 included); local files are written under a temporary name and renamed.

We parse the header ourselves because `safetensors`' numpy reader cannot return bfloat16 and
cannot read through a file object.
"""
from __future__ import annotations

import json
import math
import posixpath
import struct
import uuid
from typing import Any, BinaryIO, Iterable, Mapping

import ml_dtypes
import numpy as np

from covipal_jax import paths

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own cap (MAX_HEADER_SIZE)
MAX_LISTED = 20  # keys shown in an error message

ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
             "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
             "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
ST_NAMES = {np.dtype(v): k for k, v in ST_DTYPES.items()}


class SafetensorsError(ValueError):
    """A malformed safetensors file or checkpoint directory (the message names the file)."""


def listing(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - MAX_LISTED} more" if len(keys) > MAX_LISTED else ""
    return ", ".join(keys[:MAX_LISTED]) + more


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_header(raw: bytes, file_size: int, where: str
                 ) -> tuple[dict[str, dict], dict[str, str], int]:
    """Validate a whole safetensors header against the file size.

    raw: at least the file's first 8 bytes (the header length), plus the header itself when it
    fits. Returns ({key: {"dtype": np.dtype, "shape": tuple, "begin": int, "end": int}},
    metadata, data_start) or raises SafetensorsError("{where}: ...").
    """
    def bad(msg: str) -> SafetensorsError:
        return SafetensorsError(f"{where}: {msg}")

    if file_size < 8:
        raise bad(f"not a safetensors file: {file_size} bytes, shorter than the 8-byte header "
                  f"length (empty or truncated file)")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > MAX_HEADER_BYTES:
        raise bad(f"header length {n} bytes exceeds the {MAX_HEADER_BYTES}-byte cap (not a "
                  f"safetensors file, or corrupted)")
    if 8 + n > file_size:
        raise bad(f"header length {n} bytes runs past the end of the file ({file_size} bytes): "
                  f"truncated, or not a safetensors file")
    try:
        header = json.loads(raw[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad(f"header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise bad("__metadata__ is not a JSON object")
    data_start = 8 + n
    data_size = file_size - data_start
    out: dict[str, dict] = {}
    for key, h in header.items():
        if not isinstance(h, dict) or not {"dtype", "shape", "data_offsets"} <= set(h):
            raise bad(f"tensor {key!r}: entry needs dtype, shape and data_offsets, got {h!r}")
        name = h["dtype"]
        if name not in ST_DTYPES:
            raise bad(f"tensor {key!r}: unknown dtype {name!r} (known: {sorted(ST_DTYPES)})")
        shape, offs = h["shape"], h["data_offsets"]
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise bad(f"tensor {key!r}: shape {shape!r} is not a list of non-negative ints")
        if (not isinstance(offs, list) or len(offs) != 2 or not all(map(_is_int, offs))):
            raise bad(f"tensor {key!r}: data_offsets {offs!r} is not [begin, end]")
        begin, end = offs
        if begin < 0 or end < 0:
            raise bad(f"tensor {key!r}: negative data_offsets {offs}")
        if end < begin:
            raise bad(f"tensor {key!r}: data_offsets {offs} end before they begin")
        dt = np.dtype(ST_DTYPES[name])
        want = math.prod(shape) * dt.itemsize
        if end - begin != want:
            raise bad(f"tensor {key!r}: data_offsets {offs} span {end - begin} bytes, but shape "
                      f"{shape} of {name} needs {want}")
        if end > data_size:
            raise bad(f"tensor {key!r}: bytes [{begin}, {end}) lie outside the data section "
                      f"({data_size} bytes): the file is truncated or the header is corrupted")
        out[key] = dict(dtype=dt, shape=tuple(shape), begin=begin, end=end)
    spans = sorted((v["begin"], v["end"], k) for k, v in out.items() if v["end"] > v["begin"])
    for (b0, e0, k0), (b1, e1, k1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise bad(f"tensors {k0!r} [{b0}, {e0}) and {k1!r} [{b1}, {e1}) overlap")
    return out, {str(k): v for k, v in metadata.items()}, data_start


class SafetensorsFile:
    """One .safetensors file: its validated header, and tensors read on demand by byte range."""

    def __init__(self, path: paths.PathLike):
        self.path = paths.as_path(path)
        with paths.user_path_errors(self.path, "checkpoint file"):
            if not self.path.exists():
                raise FileNotFoundError(f"{self.path}: no such file")
            self._f: BinaryIO | None = self.path.open("rb")
            try:
                size = self._f.seek(0, 2)
                size = self._f.tell() if size is None else size
                self._f.seek(0)
                raw = self._f.read(8)
                if len(raw) == 8:
                    (n,) = struct.unpack("<Q", raw)
                    if 8 + n <= size and n <= MAX_HEADER_BYTES:
                        raw += self._f.read(n)
                self.tensors, self.metadata, self.data_start = parse_header(
                    raw, size, str(self.path))
            except BaseException:
                self.close()
                raise
        self.file_size = size

    @property
    def header(self) -> dict[str, dict]:
        return self.tensors

    def keys(self):
        return self.tensors.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self.tensors[key]["shape"]

    def dtype(self, key: str) -> np.dtype:
        return self.tensors[key]["dtype"]

    def get(self, key: str) -> np.ndarray:
        """Tensor `key` (a read-only array holding just its bytes)."""
        t = self.tensors[key]
        n = t["end"] - t["begin"]
        if self._f is None:
            raise ValueError(f"{self.path}: file is closed")
        with paths.user_path_errors(self.path, "checkpoint file"):
            self._f.seek(self.data_start + t["begin"])
            buf = self._f.read(n)
        if len(buf) != n:  # the file shrank since its header was checked
            raise SafetensorsError(f"{self.path}: tensor {key!r}: read {len(buf)} of {n} bytes "
                                   f"(file truncated while reading)")
        return np.frombuffer(buf, t["dtype"]).reshape(t["shape"])

    def close(self):
        if self._f is not None:
            self._f.close()
            self._f = None


def _shard_name_problem(name: Any) -> str | None:
    if not isinstance(name, str) or not name:
        return "is not a file name"
    if "://" in name or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "is an absolute path"
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        return "leaves the checkpoint directory (..)"
    if posixpath.normpath(name) != name or "\\" in name:
        return "is not a plain relative file name"
    return None


class Checkpoint:
    """All tensors of a (possibly sharded) safetensors checkpoint directory, by key."""

    def __init__(self, path: paths.PathLike):
        self.path = path = paths.as_path(path)
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, SafetensorsFile] = {}
        index, single = path / INDEX_FILE, path / SINGLE_FILE
        try:
            with paths.user_path_errors(path, "checkpoint directory"):
                if index.exists():
                    self._open_sharded(index)
                elif single.exists():
                    f = SafetensorsFile(single)
                    self.files[SINGLE_FILE] = f
                    self.where = {k: f for k in f.keys()}
                else:
                    raise SafetensorsError(f"no {SINGLE_FILE} or {INDEX_FILE} in '{path}'")
        except BaseException:
            self.close()
            raise

    def _open_sharded(self, index) -> None:
        weight_map = paths.read_json(index)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise SafetensorsError(f"{index}: no weight_map")
        bad = {}
        for key, fname in weight_map.items():
            problem = _shard_name_problem(fname)
            if problem:
                bad.setdefault(str(fname), (problem, key))
        if bad:
            raise SafetensorsError(f"{index}: shard names must be plain files inside the "
                                   f"checkpoint directory: " + "; ".join(
                                       f"{f!r} (for {k!r}) {p}" for f, (p, k) in bad.items()))
        names = sorted(set(weight_map.values()))
        missing = [f for f in names if not (self.path / f).exists()]
        if missing:
            keys = [k for k, f in weight_map.items() if f in missing]
            raise SafetensorsError(
                f"incomplete checkpoint '{self.path}': shard files listed in {INDEX_FILE} are "
                f"missing: {missing} ({len(keys)} keys map to them: {listing(keys)})")
        for fname in names:
            self.files[fname] = SafetensorsFile(self.path / fname)
        absent = [f"{k!r} -> {f}" for k, f in weight_map.items()
                  if k not in self.files[f].tensors]
        if absent:
            raise SafetensorsError(f"{index} puts keys in shards that lack them: "
                                   + listing(absent))
        for key, fname in weight_map.items():
            self.where[key] = self.files[fname]
        for fname, f in self.files.items():  # keys a shard holds beyond the index
            for key in f.keys():
                other = self.where.setdefault(key, f)
                if other is not f and key not in weight_map:
                    raise SafetensorsError(f"'{self.path}': {key!r} is in both "
                                           f"{other.path.name} and {fname}, and the index "
                                           f"names neither")

    def keys(self) -> list[str]:
        return list(self.where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.where[key].shape(key)

    def dtype(self, key: str) -> np.dtype:
        return self.where[key].dtype(key)

    def get(self, key: str) -> np.ndarray:
        return self.where[key].get(key)

    def close(self):
        for f in self.files.values():
            f.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def safetensors_header(tensors: Mapping[str, tuple[np.dtype, tuple[int, ...]]],
                       metadata: Mapping[str, str] | None = None) -> bytes:
    """The 8-byte length + JSON header (padded to 8 bytes) for tensors written in order."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for key, (dtype, shape) in tensors.items():
        dt = np.dtype(dtype)
        if dt not in ST_NAMES:
            raise ValueError(f"{key}: dtype {dt} cannot be stored in safetensors")
        n = math.prod(shape) * dt.itemsize
        header[key] = {"dtype": ST_NAMES[dt], "shape": list(shape),
                       "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def save_safetensors(path: paths.PathLike, tensors: Mapping[str, np.ndarray],
                     metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` (numpy, any `ST_DTYPES` dtype) as one safetensors file, streamed.

    Local: a temporary file renamed into place (never a partial file under `path`); remote
    object stores make the object visible only once it is complete.
    """
    path = paths.as_path(path)
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    head = safetensors_header({k: (v.dtype, v.shape) for k, v in arrays.items()}, metadata)
    remote = paths.is_remote(path)
    target = path if remote else path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    with paths.user_path_errors(path, "output file"):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with target.open("wb") as f:
                f.write(head)
                for v in arrays.values():
                    f.write(v.reshape(-1).view(np.uint8).data if v.size else b"")
            if not remote:
                target.replace(path)
        except BaseException:
            if not remote:
                target.unlink(missing_ok=True)
            raise


__all__ = ["Checkpoint", "INDEX_FILE", "MAX_HEADER_BYTES", "SINGLE_FILE", "ST_DTYPES",
           "SafetensorsError", "SafetensorsFile", "parse_header", "save_safetensors",
           "safetensors_header"]
