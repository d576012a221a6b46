"""The transformers model holding OUR weights: the one builder both PyTorch peers share
(`bench_peer` on CPU, `gpu_bench_peer` on the GPU machine).

`torch_model(params, cfg, device)` builds the transformers class our config exports
(`weights.hf.hf_config_dict`: `LlavaForConditionalGeneration`, `LlavaNextForConditionalGeneration`
or `LlavaOnevisionForConditionalGeneration`) with sdpa attention, in the config's dtype, and
copies our parameter tree into it through the declarative key map (`weights.keymap`, layout
`transformers5`: the in-memory `state_dict()` names of transformers 5.x), so both sides compute
with exactly the same (random) weights. Only public transformers APIs are used (it runs on
transformers 5.17 with torch 2.11 and on 5.24 with torch 2.13); every transformers parameter
must be filled from ours, else ValueError.
"""
from __future__ import annotations

import contextlib
from typing import Any

import flax.linen as nn
import numpy as np
import torch
from flax import traverse_util

from covipal_jax.models.config import LlavaConfig
from covipal_jax.weights import hf as hf_lib
from covipal_jax.weights import keymap

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def no_init():
    """transformers' `no_init_weights` context (its module moved between versions)."""
    for mod in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            return __import__(mod, fromlist=["no_init_weights"]).no_init_weights()
        except (ImportError, AttributeError):
            continue
    return contextlib.nullcontext()


def to_torch(x: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A host array (bf16 through ml_dtypes included) -> CPU tensor of `dtype`."""
    x = np.ascontiguousarray(x)
    if x.dtype.name == "bfloat16":
        return torch.from_numpy(x.view(np.uint16)).view(torch.bfloat16).to(dtype)
    return torch.from_numpy(np.require(x, requirements=["W"])).to(dtype)


def build(cfg: LlavaConfig, device: str, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """The empty transformers model of `cfg` (eval, cfg's dtype, on `device`, not initialized)."""
    import transformers

    dtype = TORCH_DTYPES[np.dtype(cfg.compute_dtype).name]
    hc = hf_lib.hf_config_dict(cfg)
    arch = hc.pop("architectures")[0]
    hc.pop("model_type", None)
    config_cls = getattr(transformers, arch.replace("ForConditionalGeneration", "Config"))
    config = config_cls(**hc)
    for c in (config, config.text_config, config.vision_config):
        c._attn_implementation = attn_implementation
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), no_init():
            model = getattr(transformers, arch)(config)
    finally:
        torch.set_default_dtype(prev)
    return model.to(dtype).eval()


@torch.no_grad()
def copy_params(model: torch.nn.Module, params: Any, cfg: LlavaConfig) -> torch.nn.Module:
    """Copy our parameter tree into `model` (in place, its dtype); returns `model`."""
    params = nn.unbox(params)
    if "params" in params and len(params) == 1:
        params = params["params"]
    flat = traverse_util.flatten_dict(params, sep="/")
    layout = keymap.LAYOUTS["transformers5"]
    state = model.state_dict()
    seen = set()
    for e in keymap.key_map(cfg):
        tr = keymap.TRANSFORMS[e.transform]
        leaf = flat[e.path]
        for i in range(leaf.shape[0] if e.stacked else 1):
            key = e.hf_key(layout, i) if e.stacked else e.hf_key(layout)
            if key not in state:
                raise KeyError(f"{key} (from {e.path}) is not in the transformers model")
            y = tr.to_hf(np.asarray(leaf[i] if e.stacked else leaf))
            if tuple(state[key].shape) != tuple(y.shape):
                raise ValueError(f"{key}: ours {y.shape} vs transformers "
                                 f"{tuple(state[key].shape)}")
            state[key].copy_(to_torch(y, state[key].dtype))
            seen.add(key)
    if cfg.text.tie_word_embeddings and "lm_head.weight" not in seen:
        # Tied (Qwen2-0.5B-style) heads: transformers may keep a separate tensor.
        model.get_output_embeddings().weight.copy_(model.get_input_embeddings().weight)
        seen.add("lm_head.weight")
    left = [k for k, _ in model.named_parameters() if k not in seen]
    if left:
        raise ValueError(f"transformers parameters not filled from ours: {left[:10]}")
    return model


def torch_model(params: Any, cfg: LlavaConfig, device: str = "cpu",
                attn_implementation: str = "sdpa") -> torch.nn.Module:
    """The transformers model (eval, cfg's dtype, on `device`) holding exactly `params`."""
    return copy_params(build(cfg, device, attn_implementation), params, cfg)
