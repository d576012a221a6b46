"""A fake `gs://` for unit tests: epath's own gs:// code path, with the objects in a local dir.

`fake_gcs(monkeypatch, root)` makes every `epath.Path("gs://bucket/x")` go through epath's
fsspec backend (the one it uses for gs:// without TensorFlow) to an fsspec filesystem that
keeps `gs://bucket/x` at `root/bucket/x`. It counts the bytes read from each object, so a test
can check that a remote file is read once. `os.path` / `open` on a `gs://` string do NOT see
these files: code that bypasses epath fails here as it would on a real bucket.
(The end-to-end tests against a GCS emulator on 127.0.0.1 live elsewhere.)
"""
from __future__ import annotations

import collections
import os

from etils.epath import backend as backend_lib
from etils.epath import gpath
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem


def _strip(x):
    if isinstance(x, os.PathLike):
        x = os.fspath(x)
    if isinstance(x, str) and x.startswith("gs://"):
        return x[len("gs://"):]
    return x


class _CountingFile:
    def __init__(self, f, key, counter):
        self._f, self._key, self._counter = f, key, counter

    def read(self, *a):
        data = self._f.read(*a)
        self._counter[self._key] += len(data)
        return data

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


class FakeGCS:
    """fsspec-like proxy: gs://bucket/path -> <root>/bucket/path."""

    def __init__(self, root: str):
        self.root = os.fspath(root)
        self.fs = DirFileSystem(path=self.root, fs=LocalFileSystem(auto_mkdir=True))
        self.bytes_read: collections.Counter = collections.Counter()

    def local(self, uri: str) -> str:
        return os.path.join(self.root, _strip(uri))

    def open(self, path, mode="rb", **kw):
        f = self.fs.open(_strip(path), mode, **kw)
        return _CountingFile(f, _strip(path), self.bytes_read) if "r" in mode else f

    def __getattr__(self, name):
        attr = getattr(self.fs, name)
        if not callable(attr):
            return attr

        def call(*a, **kw):
            return attr(*[_strip(x) for x in a], **kw)
        return call


def fake_gcs(monkeypatch, root) -> FakeGCS:
    """Route epath's gs:// to a FakeGCS at `root` for the rest of the test."""
    fake = FakeGCS(root)
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # then fsspec for gs://
    monkeypatch.setattr(backend_lib.fsspec_backend, "fs", lambda path: fake)
    return fake
