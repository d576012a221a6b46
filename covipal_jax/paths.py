"""User paths, local or remote (`gs://...`), through `etils.epath`, and a workdir lock.

Every path a user gives (checkpoint dir, workdir, PPM dir, data dir, eval output, metrics file)
goes through `as_path`; never `os.path` / `open` on a user path. `write_atomic` writes a small
file so that a reader never sees a partial one (local: temp file + rename; remote object stores
write an object whole anyway). `WorkdirLock` refuses a second concurrent run on one directory.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from typing import Any

from etils import epath

PathLike = str | os.PathLike | epath.Path


def as_path(p: PathLike) -> epath.Path:
    """`epath.Path` for a local path or a `gs://` / other remote URI."""
    if p is None or (isinstance(p, str) and not p.strip()):
        raise ValueError("empty path")
    return epath.Path(p)


def is_remote(p: PathLike) -> bool:
    return "://" in os.fspath(p) if not isinstance(p, epath.Path) else "://" in str(p)


def write_atomic(path: PathLike, data: str | bytes) -> None:
    """Write `data` to `path` so that readers see the old or the new file, never a partial one."""
    path = as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    if is_remote(path):
        with path.open(mode) as f:
            f.write(data)
        return
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    with tmp.open(mode) as f:
        f.write(data)
    os.replace(os.fspath(tmp), os.fspath(path))


def write_json(path: PathLike, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: PathLike) -> Any:
    path = as_path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


class PathPermissionError(PermissionError, ValueError):
    """No permission on a user path: a one-line message naming it (a ValueError too, so the
    command lines print it as `error: ...` instead of a traceback)."""


@contextlib.contextmanager
def user_path_errors(path: PathLike, what: str = "path"):
    """Re-raise a PermissionError met inside the block as `PathPermissionError` naming `path`."""
    try:
        yield
    except PathPermissionError:
        raise
    except PermissionError as e:
        where = getattr(e, "filename", None) or path
        raise PathPermissionError(f"permission denied on {what} '{where}' ({e.strerror or e}): "
                                  f"check its permissions (or the bucket's IAM "
                                  f"roles)") from None


class WorkdirLockedError(RuntimeError):
    pass


class WorkdirLock:
    """A lock file `<dir>/.lock` naming the owner (host, pid, start time).

    `with WorkdirLock(dir):` refuses (WorkdirLockedError, naming the owner and how to clear a
    stale lock) when another live process holds it. A lock left by a dead process on this host
    is taken over; a lock from another host must be removed by hand (`rm <dir>/.lock`).
    """

    def __init__(self, directory: PathLike, what: str = "run"):
        self.dir = as_path(directory)
        self.file = self.dir / ".lock"
        self.what = what
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time(),
                      "token": uuid.uuid4().hex}

    def _stale(self, info: dict) -> bool:
        if info.get("host") != self.owner["host"]:
            return False
        try:
            os.kill(int(info.get("pid", -1)), 0)
        except (ProcessLookupError, ValueError):
            return True
        except PermissionError:
            return False
        return False

    def acquire(self) -> "WorkdirLock":
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.file.exists():
            try:
                info = json.loads(self.file.read_text())
            except (json.JSONDecodeError, OSError):
                info = {}
            if info.get("token") != self.owner["token"] and not self._stale(info):
                raise WorkdirLockedError(
                    f"{self.dir} is in use by another {self.what} (host {info.get('host')}, "
                    f"pid {info.get('pid')}); wait for it to finish, or if it is dead remove "
                    f"{self.file}")
        write_json(self.file, self.owner)
        return self

    def release(self) -> None:
        try:
            info = json.loads(self.file.read_text())
            if info.get("token") == self.owner["token"]:
                self.file.unlink()
        except (FileNotFoundError, json.JSONDecodeError, OSError):
            pass

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
