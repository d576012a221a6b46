"""The PPM's config, initialization, and its exported params on disk.

A trained PPM is saved as a directory: `params/` (Orbax StandardCheckpointer) and
`ppm.json` (the PPMConfig plus the base model's architecture, checked on load). Only the PPM
is saved: the frozen LLaVA always comes from its own Hugging Face directory.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from covipal_jax.models.config import LlavaConfig
from covipal_jax.pruning.ppm import PPM, PPMConfig


def ppm_config(config: Any, llava_cfg: LlavaConfig) -> PPMConfig:
    """PPMConfig from `config.ppm` for a given LLaVA (n_v and width come from the model)."""
    p = config.ppm
    return PPMConfig(n_v=llava_cfg.num_vision_tokens, d_model=llava_cfg.text.hidden_size,
                     width=p.width, num_layers=p.num_layers, num_heads=p.num_heads,
                     mlp_ratio=p.mlp_ratio, dropout=p.dropout)


def init_ppm(pcfg: PPMConfig, rng: jax.Array, batch: int = 1, text_len: int = 4):
    """Boxed PPM variables {"params": ...}."""
    v = jnp.zeros((batch, pcfg.n_v, pcfg.d_model), jnp.float32)
    t = jnp.zeros((batch, text_len, pcfg.d_model), jnp.float32)
    m = jnp.ones((batch, text_len), bool)
    return PPM(pcfg).init(rng, v, t, m)


def save_ppm(path: str, variables: Any, pcfg: PPMConfig, llava_cfg: LlavaConfig,
             extra: dict | None = None) -> None:
    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.join(path, "params"), nn.unbox(variables), force=True)
    ckpt.wait_until_finished()
    meta = dict(ppm=dataclasses.asdict(pcfg), base_model=llava_cfg.architecture_dict(),
                **(extra or {}))
    with open(os.path.join(path, "ppm.json"), "w") as f:
        json.dump(meta, f, indent=1)


def load_ppm(path: str, llava_cfg: LlavaConfig) -> tuple[PPM, Any, dict]:
    """(module, variables, metadata) of an exported PPM; checks it fits `llava_cfg`."""
    path = os.path.abspath(path)
    meta_path = os.path.join(path, "ppm.json")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{path!r} is not an exported PPM (no ppm.json)")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta["base_model"] != json.loads(json.dumps(llava_cfg.architecture_dict())):
        raise ValueError(f"PPM at {path!r} was trained for a different base model")
    pcfg = PPMConfig(**meta["ppm"])
    abstract = jax.eval_shape(lambda: nn.unbox(init_ppm(pcfg, jax.random.key(0))))
    variables = ocp.StandardCheckpointer().restore(os.path.join(path, "params"), abstract)
    return PPM(pcfg), variables, meta


def load_for_inference(config: Any, llava_cfg: LlavaConfig) -> tuple[PPM, Any]:
    path = config.pruning.ppm_checkpoint
    if not path:
        raise ValueError("pruning.method='ppm' needs --config.pruning.ppm_checkpoint=DIR "
                         "(a PPM exported by `python -m covipal_jax.train`)")
    module, variables, _ = load_ppm(path, llava_cfg)
    return module, variables
