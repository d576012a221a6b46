"""The packaged configs: each `<name>.py` defines `get_config(arg=None) -> ConfigDict`.

Entry points take `--config PATH[:ARGS]`; `path("tiny")` is the absolute path of a packaged
config, so the defaults work from any directory (and from an installed wheel). From the
repository root, `configs/` is a link to this folder, so `--config configs/tiny.py` works too.
"""
from __future__ import annotations

import os

_HERE = os.path.dirname(os.path.abspath(__file__))


def path(name: str) -> str:
    """`path("llava15_7b:layers=2")` -> `/.../covipal_jax/configs/llava15_7b.py:layers=2`."""
    base, sep, arg = name.partition(":")
    if not base.endswith(".py"):
        base += ".py"
    full = os.path.join(_HERE, base)
    if not os.path.isfile(full):
        names = sorted(f[:-3] for f in os.listdir(_HERE) if f.endswith(".py")
                       and not f.startswith("_") and f != "common.py")
        raise ValueError(f"no packaged config {name!r}; available: {names}")
    return full + sep + arg
