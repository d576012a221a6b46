"""From a config to a ready model: weights, tokenizer, image processor, mesh.

`load(config)` is what every entry point (generate, eval, bench, demo) calls:
- `config.checkpoint` set: a local Hugging Face LLaVA directory. The model config comes from
  its `config.json` (a given `config.model` must agree, else a clear error), weights load
  straight into their shardings, tokenizer and image processor from the same directory.
- no checkpoint: random weights from `config.model` (tests, benchmarks, the tiny demo), with
  the built-in word tokenizer and a processor matching the tower.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax

from covipal_jax import sharding
from covipal_jax.data import image as image_lib
from covipal_jax.data.synthetic import task as synthetic
from covipal_jax.data import text as text_lib
from covipal_jax.models.config import LlavaConfig
from covipal_jax.models.llava import Llava, init_params


@dataclasses.dataclass
class Loaded:
    cfg: LlavaConfig
    model: Llava
    params: Any
    tokenizer: Any
    processor: image_lib.ImageProcessorConfig
    mesh: Any
    rules: Any


def builtin_tokenizer() -> text_lib.BuiltinTokenizer:
    """The word tokenizer of the tiny model and the synthetic demo."""
    return text_lib.BuiltinTokenizer(synthetic.vocabulary())


def default_processor(cfg: LlavaConfig) -> image_lib.ImageProcessorConfig:
    v = cfg.vision
    if v.kind == "clip":
        return image_lib.ImageProcessorConfig.clip(v.image_size)
    return image_lib.ImageProcessorConfig.siglip(v.image_size)


def model_config(config: Any) -> LlavaConfig:
    """`config.model` -> LlavaConfig, checked against the checkpoint's config.json if any."""
    from covipal_jax.weights import hf  # local import: torch-free, but keeps startup light

    given = LlavaConfig.from_config(config.model) if len(config.model) else None
    if not config.checkpoint:
        if given is None:
            raise ValueError("config.model is empty and no config.checkpoint was given")
        return given
    path = config.checkpoint
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    from_ckpt = hf.config_from_hf(path)
    if given is None:
        return from_ckpt
    hf.check_config(given, from_ckpt)
    return from_ckpt.replace(dtype=given.dtype, param_dtype=given.param_dtype,
                             scan_layers=given.scan_layers, remat_policy=given.remat_policy,
                             attention_impl=given.attention_impl)


def load(config: Any, *, rng: jax.Array | None = None, mesh=None,
         with_params: bool = True) -> Loaded:
    """Model config, tokenizer, processor, and (unless `with_params=False`) the weights.

    Cheap parts come first, so configuration errors surface before any weights are read.
    """
    from covipal_jax.weights import hf

    cfg = model_config(config)
    mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
    rules = config.logical_axis_rules
    tok_dir = config.tokenizer or config.checkpoint
    if tok_dir == "builtin" or not tok_dir:
        tokenizer = builtin_tokenizer()
    else:
        tokenizer = text_lib.load_tokenizer(tok_dir)
    if config.checkpoint and os.path.exists(os.path.join(config.checkpoint,
                                                         "preprocessor_config.json")):
        processor = image_lib.ImageProcessorConfig.from_hf_dir(config.checkpoint)
    else:
        processor = default_processor(cfg)
    if tokenizer.image_token_id != cfg.image_token_id:
        raise ValueError(f"tokenizer image token id {tokenizer.image_token_id} != model "
                         f"image_token_id {cfg.image_token_id}")
    if tokenizer.vocab_size > cfg.text.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens, the model's embedding "
                         f"only {cfg.text.vocab_size}")
    params = None
    if with_params and config.checkpoint:
        cfg, params = hf.load_llava(config.checkpoint, cfg=cfg, mesh=mesh, rules=rules)
    elif with_params:
        rng = jax.random.key(0) if rng is None else rng
        params, _ = sharding.init_sharded(lambda r: init_params(cfg, r), rng, mesh, rules)
    return Loaded(cfg, Llava(cfg), params, tokenizer, processor, mesh, rules)


def load_params(config: Any, loaded: Loaded, *, rng: jax.Array | None = None) -> Loaded:
    """Fill in the weights of a `load(..., with_params=False)` result."""
    return load(config, rng=rng, mesh=loaded.mesh, with_params=True)


