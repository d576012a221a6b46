"""Visual-token pruning methods and their registry.

`get_method(name)` returns a `MethodInfo`: `stage` says where the method acts ("pre_llm":
`info.fn(ctx: PruneContext, k, **params) -> PruneResult` before LLM layer 0; "in_llm":
`info.fn` is the module's `select_in_llm(...) -> i32[B, k]`, called by the decoder at layer
`info.default_layer`), what it needs from the vision tower, and whether it has trainable params.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from covipal_jax.pruning import dart, fastv, ppm, simple, visionzip
from covipal_jax.pruning.base import PruneContext, PruneResult, resolve_keep

STAGES = ("pre_llm", "in_llm")


@dataclasses.dataclass(frozen=True)
class MethodInfo:
    """Registry entry.

    needs_cls: uses the tower's CLS token (CLS attention row + CLS feature) when the tower has
        one (VisionZip; SigLIP falls back to `mean_attention_received`).
    needs_vit_attention / needs_vit_keys: the feature layer's attention probabilities / keys
        must be materialized (PruneContext.cls_attention or mean_attention_received /
        vision_keys).
    needs_project: `fn` takes `project=` and runs the projector itself (merging before it).
    default_layer: for in-LLM methods, the layer K before which tokens are dropped.
    """

    name: str
    stage: str
    fn: Callable
    needs_cls: bool = False
    needs_vit_attention: bool = False
    needs_vit_keys: bool = False
    needs_project: bool = False
    trainable: bool = False
    default_layer: int | None = None
    description: str = ""

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage {self.stage!r} not in {STAGES}")


METHODS: dict[str, MethodInfo] = {
    m.name: m for m in (
        MethodInfo("ppm", "pre_llm", ppm.ppm, trainable=True,
                   description="CoViPAL PPM: learned text-conditioned scores, top-k"),
        MethodInfo("fastv", "in_llm", fastv.select_in_llm, default_layer=fastv.DEFAULT_LAYER,
                   description="FastV: top-k by last-token attention at layer K-1"),
        MethodInfo("visionzip", "pre_llm", visionzip.visionzip, needs_cls=True,
                   needs_vit_attention=True, needs_vit_keys=True, needs_project=True,
                   description="VisionZip: CLS-attention dominant + key-similarity merge"),
        MethodInfo("dart", "in_llm", dart.select_in_llm, default_layer=dart.DEFAULT_LAYER,
                   description="DART: least-duplicated tokens w.r.t. K-norm pivots"),
        MethodInfo("random", "pre_llm", simple.random,
                   description="uniform random k-subset (needs ctx.rng)"),
        MethodInfo("pool", "pre_llm", simple.pool,
                   description="uniform spatial sub-grid (mode stride | avg)"),
        MethodInfo("none", "pre_llm", simple.none, description="keep all n_v tokens"),
    )
}


def get_method(name: str) -> MethodInfo:
    """The registry entry for `name`; a ValueError lists the valid names otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown pruning method {name!r}; valid: {sorted(METHODS)}") from None


__all__ = ["METHODS", "MethodInfo", "PruneContext", "PruneResult", "get_method",
           "resolve_keep"]
