"""covipal_jax: CoViPAL visual-token pruning for LLaVA-style VLMs, in JAX.

The public face (imported lazily, so `import covipal_jax` stays cheap):

    import covipal_jax as cj
    sampler = cj.Sampler.from_checkpoint("/models/llava-1.5-7b-hf")  # load once
    out = sampler.generate([image], ["What is shown?"], method=cj.pruning.get("fastv")(keep=0.25))

- inference: `Sampler` (the facade), `SampleOutput`
- pruning:   `pruning` (the registry: `pruning.get`, `pruning.register`, the method classes),
             `PruningMethod`, `PreLLMMethod`, `InLLMMethod`
"""
from __future__ import annotations

import importlib

_LAZY = {
    "Sampler": ("covipal_jax.inference.sampler", "Sampler"),
    "SampleOutput": ("covipal_jax.inference.sampler", "SampleOutput"),
    "PruningMethod": ("covipal_jax.pruning.base", "PruningMethod"),
    "PreLLMMethod": ("covipal_jax.pruning.base", "PreLLMMethod"),
    "InLLMMethod": ("covipal_jax.pruning.base", "InLLMMethod"),
}
_SUBMODULES = ("pruning", "inference", "models")

__all__ = sorted([*_LAZY, *_SUBMODULES])


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    if name in _SUBMODULES:
        return importlib.import_module(f"covipal_jax.{name}")
    raise AttributeError(f"module 'covipal_jax' has no attribute {name!r}")
