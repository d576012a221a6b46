"""Step 1 of the demo: the synthetic VQA splits (see `covipal_jax/demo/lib.py`)."""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any

import numpy as np


from covipal_jax.demo.common import Stages, fingerprint, section, task_config


# ----------------------------------------------------------------------------- step 1: data

def _progress(it, total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(it, total=total, desc=desc, disable=not enabled, file=sys.stderr,
                dynamic_ncols=True, leave=False)


HELDOUT_DESIGNS = ("location", "qtype")


def _left(o, task) -> bool:
    """The object's grid cell is in the left half of the image (the held-out region)."""
    return o[2] // task.cell_size < task.grid // 2


def _accept(ex: dict, held: set, task, design: str, role: str) -> bool:
    """Whether a generated example belongs to a split under the held-out design.

    location: training / validation images never show a held-out combination in the left half;
    test / dev examples ask about a held-out combination shown there (every queried held-out
    object lies in the left half). qtype: every example is kept (the generator's pools do it).
    """
    if design != "location":
        return True
    objs = ex["objects"]
    if role == "train":
        return not any((o[0], o[1]) in held and _left(o, task) for o in objs)
    queried = [objs[i] for i in ex["queried"] if (objs[i][0], objs[i][1]) in held]
    return all(_left(o, task) for o in queried)


def _generate(split: str, cfg, seed: int, n: int, accept, start: int, desc: str,
              enabled: bool) -> tuple[list[dict], int]:
    """`n` accepted examples of `split` in index order from `start`; returns (rows, next)."""
    from covipal_jax.data.synthetic import task as synthetic

    rows, j = [], start
    bar = _progress(None, n, desc, enabled)
    while len(rows) < n:
        ex = synthetic.make_example(split, j, seed, cfg)
        j += 1
        if accept(ex):
            rows.append(ex)
            bar.update(1)
    bar.close()
    return rows, j


def _split_configs(task, design: str):
    """(train-side config, test-side config) of the generator for a held-out design."""
    if design == "location":
        # Every combination may be asked about in training (only never shown on the left).
        return dataclasses.replace(task, n_heldout=0), task
    if design == "qtype":
        return task, task
    raise ValueError(f"demo.heldout must be one of {HELDOUT_DESIGNS}, got {design!r}")


def _as_arrays(rows: list[dict], task) -> dict[str, np.ndarray]:
    from covipal_jax.data.synthetic import task as synthetic

    queried = np.stack([synthetic.object_patch_mask(r["objects"], task.image_size,
                                                    task.cell_size, r["queried"])
                        for r in rows])
    return {"images": np.stack([r["image"] for r in rows]),
            "question": np.array([r["question"] for r in rows]),
            "answer": np.array([r["answer"] for r in rows]),
            "qtype": np.array([r["qtype"] for r in rows]),
            "queried_patches": queried}


def _train_split(n: int, seed: int, task, d, enabled: bool) -> dict[str, np.ndarray]:
    """Training images with 1 + `extra_turns` questions each (see the module docstring)."""
    from covipal_jax.data.synthetic import scene_qa, task as synthetic

    design = str(d.get("heldout", "location"))
    held = set(synthetic.heldout_combos(task))
    train_cfg, _ = _split_configs(task, design)
    if design == "qtype":
        attr = tuple(q for q in task.qtypes if q not in scene_qa.PROTECTED_TYPES)
        rel = tuple(q for q in task.qtypes if q in scene_qa.PROTECTED_TYPES)
        cfgs = [dataclasses.replace(task, qtypes=q, n_heldout=0 if q == attr else
                                    task.n_heldout, qtype_weights=None)
                for q in (attr, rel) if q]
        share = np.array([len(q) for q in (attr, rel) if q], float)
        pick = np.random.default_rng([seed, 7]).choice(len(cfgs), size=n,
                                                       p=share / share.sum())
        rows = [synthetic.make_example("train", i, seed, cfgs[int(pick[i])])
                for i in _progress(range(n), n, "data: train", enabled)]
        protected = held
    else:
        rows, _ = _generate("train", train_cfg, seed, n,
                            lambda ex: _accept(ex, held, task, design, "train"), 0,
                            "data: train", enabled)
        protected = ()
    turns = []
    for i, ex in enumerate(rows):
        rng = np.random.default_rng([seed, 11, i])
        turns.append(scene_qa.turns_for_example(
            ex, task, int(d.extra_turns), rng, protected=protected,
            with_caption=bool(d.get("caption", False)), grounded=bool(d.get("grounded", False)),
            extra_types=tuple(d.get("extra_types", ()))))
    return {"images": np.stack([r["image"] for r in rows]),
            "question": np.array([t[0][0] for t in turns]),
            "answer": np.array([t[0][1] for t in turns]),
            "turns": np.array([json.dumps(t) for t in turns])}


def load_split(data_dir: str, split: str) -> dict[str, np.ndarray]:
    with np.load(os.path.join(data_dir, f"{split}.npz"), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def data_stage(config: Any, workdir: str, stages: Stages, *, with_train: bool = True) -> str:
    from covipal_jax.data.synthetic import task as synthetic

    task = task_config(config)
    d = section(config, "demo")
    seed = int(config.get("seed", 0))
    directory = os.path.join(workdir, "data")
    fp = fingerprint("data", dataclasses.asdict(task), d, seed, with_train)
    if stages.cached("data", directory, fp):
        return directory
    t0 = time.perf_counter()
    stages.fresh(directory)
    on = bool(d.get("progress", True))
    design = str(d.get("heldout", "location"))
    held = set(synthetic.heldout_combos(task))
    train_cfg, test_cfg = _split_configs(task, design)
    test_ok = lambda ex: _accept(ex, held, task, design, "test")
    rows, nxt = _generate("test", test_cfg, seed, int(d.n_test), test_ok, 0, "data: test", on)
    np.savez(os.path.join(directory, "test.npz"), **_as_arrays(rows, task))
    if int(d.n_dev) > 0:  # the pretraining stop rule's held-out questions: after the test ones
        rows, _ = _generate("test", test_cfg, seed, int(d.n_dev), test_ok, nxt, "data: dev", on)
        np.savez(os.path.join(directory, "dev.npz"), **_as_arrays(rows, task))
    if int(d.n_validation) > 0:  # i.i.d. with training
        rows, _ = _generate("validation", train_cfg, seed, int(d.n_validation),
                            lambda ex: _accept(ex, held, task, design, "train"), 0,
                            "data: validation", on)
        np.savez(os.path.join(directory, "validation.npz"), **_as_arrays(rows, task))
    if with_train:
        np.savez(os.path.join(directory, "train.npz"),
                 **_train_split(int(d.n_train), seed, task, d, on))
    stages.finish("data", directory, fp, time.perf_counter() - t0,
                  heldout=[list(h) for h in synthetic.heldout_combos(task)],
                  chance=synthetic.chance_accuracy(task, "test"))
    return directory
