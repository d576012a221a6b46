"""Step 2b of the demo: PDrop*, the tiny LLaVA of step 2 fine-tuned with PyramidDrop active.

A copy of the pretrained LLaVA (`DIR/llava`) trains again, projector + LLM (the vision tower
frozen, as the official recipe), on the same multi-turn training sequences, for
`pdrop_star.steps` steps, with PyramidDrop's stages on in every forward
(`train/finetune.py`). The schedule is the demo's PDrop one (`eval.staged_layers.pdrop`,
before decoder layers 1 and 2 of 3) with the official lambda = 0.5 (`pdrop_star.ratios`:
0.5 then 0.25 of the vision tokens kept). Exported as a Hugging Face checkpoint to
`DIR/pdrop_star/llava`; the sweep evaluates it with method pdrop at every ratio as the row
"pdrop_star" (shown as "pdrop*").

With a real checkpoint (no synthetic training set) the stage is skipped unless
`pdrop_star.checkpoint` names an already fine-tuned model (`python -m covipal_jax.train
--config configs/pdrop_star_llava15_7b.py` exports one to `<workdir>/llava`).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np

from covipal_jax.demo.common import Stages, fingerprint, section
from covipal_jax.demo.data_stage import load_split

STAR = "pdrop_star"   # the row / results key (a demo label, not a registered method)
LABEL = "pdrop*"      # its display name in the table and the plot


def train_set(config: Any, data_dir: str, tok) -> Any:
    """The multi-turn training sequences of step 2 (`pretrain.EncodedSet`), without the
    columns that are padding in every row (`EncodedSet.trim_padding`: same loss, shorter
    step)."""
    from covipal_jax.data.synthetic import scene_qa
    from covipal_jax.train import pretrain as pt

    train = load_split(data_dir, "train")
    max_len = int(section(config, "demo").train_max_len)
    rows = [scene_qa.encode_turns(tok, json.loads(str(t)), template=config.template,
                                  max_len=max_len) for t in train["turns"]]
    keep = np.array([r is not None for r in rows])
    if not keep.any():
        raise ValueError(f"no training sequence fits demo.train_max_len={max_len}")
    rows = [r for r in rows if r is not None]
    return pt.EncodedSet(train["images"][keep], np.stack([r["ids"] for r in rows]),
                         np.stack([r["mask"] for r in rows]),
                         np.stack([r["loss_mask"] for r in rows]),
                         np.ones(len(rows), np.float32)).trim_padding()


def star_method(config: Any):
    """The PyramidDrop schedule PDrop* trains with (`pdrop_star.layers` / `.ratios`)."""
    from covipal_jax.pruning.pdrop import PyramidDrop

    s = section(config, STAR)
    return PyramidDrop(layers=tuple(int(x) for x in s.layers),
                       ratios=tuple(float(x) for x in s.ratios))


def pdrop_star_stage(config: Any, workdir: str, data_dir: str | None, stages: Stages,
                     upstream: str, llava_dir: str | None) -> tuple[str | None, str]:
    """Fine-tunes (or reuses) PDrop*; returns (its HF checkpoint dir or None, fingerprint)."""
    s = section(config, STAR)
    given = s.get("checkpoint", "")
    if given:
        stages.log(f"[{STAR}] using the given fine-tuned LLaVA {given}")
        stages.seconds[STAR] = 0.0
        return given, fingerprint(STAR, given)
    if llava_dir is None or not bool(s.get("enabled", True)):
        return None, fingerprint(STAR, None)
    directory = os.path.join(workdir, STAR)
    out_dir = os.path.join(directory, "llava")
    fp = fingerprint(STAR, upstream, s, config.template, section(config, "demo").train_max_len)
    if stages.cached(STAR, directory, fp):
        return out_dir, fp
    t0 = time.perf_counter()
    stages.fresh(directory)
    import jax

    from covipal_jax import sharding
    from covipal_jax.demo.lib import checkpoint_config
    from covipal_jax.inference import loading
    from covipal_jax.train import finetune
    from covipal_jax.train import pretrain as pt
    from covipal_jax.weights import hf

    loaded = loading.load(checkpoint_config(config, llava_dir))
    method = star_method(config)
    stages.log(f"[{STAR}] fine-tuning a copy of {llava_dir} with PyramidDrop on: stages "
               f"{method.stages(loaded.cfg.num_vision_tokens, loaded.cfg.text.num_layers)} "
               f"(K, kept), projector + LLM trained, vision tower frozen")
    data = train_set(config, data_dir, loaded.tokenizer)
    pc = pt.PretrainConfig.from_config(dict(s.to_dict() if hasattr(s, "to_dict") else s,
                                            init="as_is"))
    with sharding.use_mesh(loaded.mesh, loaded.rules):
        res = finetune.finetune(loaded.model, loaded.params, data, pc, method=method,
                                processor=loaded.processor,
                                max_queries=int(s.get("max_queries", finetune.MAX_QUERIES)),
                                log=stages.log,
                                progress=bool(section(config, "demo").get("progress", True)))
    hf.export_llava(jax.device_get(res.params), loaded.cfg, out_dir)
    loaded.tokenizer.save(out_dir)
    stages.finish(STAR, directory, fp, time.perf_counter() - t0, steps=res.steps,
                  train_seconds=res.seconds,
                  loss_first=float(np.mean(res.losses[:10])) if res.losses else None,
                  loss_last=float(np.mean(res.losses[-10:])) if res.losses else None,
                  stages_kept=[list(x) for x in method.stages(
                      loaded.cfg.num_vision_tokens, loaded.cfg.text.num_layers)])
    return out_dir, fp
