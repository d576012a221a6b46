"""Visual-token pruning methods: values of `PruningMethod` subclasses, and their registry.

    from covipal_jax import pruning
    m = pruning.get("visionzip")(keep=64)              # a frozen, hashable value
    m = pruning.from_config(config.pruning)            # the same, from a config section
    m.where, m.needs, m.trainable, m.k(576)            # what prefill reads

A method defined elsewhere registers itself with `@pruning.register` and runs everywhere a
registered one does (prefill branches only on `method.where`; see `base.py`).
"""
from __future__ import annotations

from covipal_jax.pruning import (dart, divprune, fastv, pdrop, ppm, simple,  # noqa: F401
                                 sparsevlm, visionzip)                    # (registers)
from covipal_jax.pruning.base import (InLLMMethod, InLLMResult, LayerProbe, PreLLMMethod,
                                      PruneContext, PruneResult, PruningMethod, parse_keep,
                                      resolve_keep)
from covipal_jax.pruning.dart import DART
from covipal_jax.pruning.divprune import DivPrune
from covipal_jax.pruning.fastv import FastV
from covipal_jax.pruning.pdrop import PyramidDrop
from covipal_jax.pruning.ppm import PPMMethod
from covipal_jax.pruning.registry import from_config, get, names, register
from covipal_jax.pruning.simple import NoneMethod, PoolMethod, RandomMethod
from covipal_jax.pruning.sparsevlm import SparseVLM
from covipal_jax.pruning.visionzip import VisionZipMethod

__all__ = ["DART", "DivPrune", "FastV", "InLLMMethod", "InLLMResult", "LayerProbe", "NoneMethod",
           "PPMMethod", "PoolMethod", "PreLLMMethod", "PruneContext", "PruneResult",
           "PruningMethod", "PyramidDrop", "RandomMethod", "SparseVLM", "VisionZipMethod",
           "from_config", "get", "names", "parse_keep", "register", "resolve_keep"]
