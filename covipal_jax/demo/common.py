"""The demo's shared pieces: file names, config helpers (fingerprints, sections, quick
mode) and the stage bookkeeping (`Stages`); see `covipal_jax/demo/lib.py`."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from typing import Any

import numpy as np




STAGES = ("data", "pretrain", "ppm", "pdrop_star", "evaluate")
RESULTS = "results.json"


def _baseline() -> str:
    """The unpruned row's method name."""
    from covipal_jax import pruning

    return pruning.NoneMethod.name


def _highlight() -> str:
    """The method drawn bold in the plot: CoViPAL's PPM."""
    from covipal_jax import pruning

    return pruning.PPMMethod.name

DETAIL = "results_detail.json"
PLOT = "accuracy_vs_keep.png"


# ----------------------------------------------------------------------------- config helpers

def _plain(x: Any) -> Any:
    """ConfigDict / tuples -> JSON-able plain Python."""
    if hasattr(x, "to_dict"):
        x = x.to_dict()
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in sorted(x.items())}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    return x


def fingerprint(*parts: Any) -> str:
    blob = json.dumps([_plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def demo_defaults():
    """configs/demo.py: the defaults of sections a real-checkpoint config lacks."""
    from covipal_jax.configs import demo

    return demo.get_config()


def section(config: Any, name: str) -> Any:
    """`config.<name>`, or configs/demo.py's when the config has none (real checkpoints)."""
    if name in config:
        return config[name]
    return demo_defaults()[name]


def apply_quick(config: Any) -> Any:
    """A copy of `config` with `config.quick` merged in, section by section (configs/demo.py);
    sections the config lacks are skipped."""
    config = copy.deepcopy(config)
    overrides = config.get("quick") or demo_defaults().quick
    with config.unlocked():
        for name, values in overrides.items():
            if name in config:
                for key, value in values.items():
                    config[name][key] = value
    return config


def task_config(config: Any):
    from covipal_jax.data.synthetic import task as synthetic

    t = dict(_plain(section(config, "task")))
    for k, v in list(t.items()):
        if isinstance(v, list):
            t[k] = tuple(v)
    return synthetic.SyntheticConfig(**t)


# ----------------------------------------------------------------------------- stage bookkeeping

class Stages:
    """done.json markers: a stage is reused when its fingerprint matches (and not forced)."""

    def __init__(self, workdir: str, force: bool, log: Callable[[str], None]):
        self.workdir = workdir
        self.force = force
        self.log = log
        self.seconds: dict[str, float] = {}

    def marker(self, directory: str) -> str:
        return os.path.join(directory, "done.json")

    def cached(self, name: str, directory: str, fp: str) -> dict | None:
        path = self.marker(directory)
        if self.force or not os.path.exists(path):
            return None
        with open(path) as f:
            meta = json.load(f)
        if meta.get("fingerprint") != fp:
            self.log(f"[{name}] config changed since the last run: redoing it")
            return None
        self.log(f"[{name}] reusing {directory} (finished earlier; --force redoes it)")
        self.seconds[name] = 0.0
        return meta

    def fresh(self, directory: str) -> None:
        if os.path.isdir(directory):
            shutil.rmtree(directory)
        os.makedirs(directory, exist_ok=True)

    def finish(self, name: str, directory: str, fp: str, seconds: float, **info) -> dict:
        meta = dict(fingerprint=fp, seconds=seconds, **info)
        with open(self.marker(directory), "w") as f:
            json.dump(_plain(meta), f, indent=1)
        self.seconds[name] = seconds
        self.log(f"[{name}] done in {seconds:.0f} s")
        return meta
