"""The benchmarks: one module each (reader + metric), one registry.

    from covipal_jax.eval import benchmarks
    data = benchmarks.load_benchmark("pope", "/data/pope", image_dir="/data/coco/val2014")
    bench = benchmarks.get("pope")          # Benchmark(name, read, score, protocol, ...)
    metrics = bench.score(records)          # records: the harness's prediction lines

Adding a benchmark is one new module here that calls `register(Benchmark(...))`, plus its
import below. Image benchmarks: gqa, mme, pope, textvqa, scienceqa, mmbench, seed, ai2d,
mmstar, ocrvqa, infovqa. Video benchmarks (examples hold a `VideoRef`): videomme, mvbench,
nextqa. Layouts are in each module's docstring and in `covipal_jax/eval/README.md`.
"""
from __future__ import annotations

from typing import Any

from covipal_jax.eval.benchmarks.base import (LETTERS, MC_SUFFIX, REGISTRY, SHORT_ANSWER_SUFFIX,
                                              Benchmark, BenchmarkData, Example, ImageRef,
                                              Malformed, ReadReport, Skip, VideoRef,
                                              canonical_name, collect, column_protocol,
                                              get, register)
from covipal_jax.eval.benchmarks.common import mc_prompt, read_table, short_answer_prompt

# The registry is filled by importing the benchmark modules (order = listing order).
from covipal_jax.eval.benchmarks import gqa, mme, pope, textvqa  # noqa: E402,I001
from covipal_jax.eval.benchmarks import scienceqa, mmbench, seed, ai2d, mmstar  # noqa: E402
from covipal_jax.eval.benchmarks import ocrvqa, infovqa  # noqa: E402
from covipal_jax.eval.benchmarks import videomme, mvbench, nextqa  # noqa: E402

read_gqa, read_mme, read_pope = gqa.read_gqa, mme.read_mme, pope.read_pope
read_textvqa, read_scienceqa = textvqa.read_textvqa, scienceqa.read_scienceqa
read_mmbench, read_seed, read_ai2d = mmbench.read_mmbench, seed.read_seed, ai2d.read_ai2d
read_mmstar, read_ocrvqa, read_infovqa = mmstar.read_mmstar, ocrvqa.read_ocrvqa, \
    infovqa.read_infovqa
read_videomme, read_mvbench = videomme.read_videomme, mvbench.read_mvbench
read_nextqa = nextqa.read_nextqa
MME_PERCEPTION, MME_COGNITION = mme.MME_PERCEPTION, mme.MME_COGNITION
POPE_SPLITS = pope.POPE_SPLITS


def __getattr__(name: str) -> Any:
    if name == "MULTIPLE_CHOICE":  # the multiple-choice benchmarks, from the registry
        return frozenset(n for n, b in REGISTRY.items() if b.multiple_choice)
    raise AttributeError(name)


def load_benchmark(name: str, path: str, **kwargs: Any) -> BenchmarkData:
    """Reads benchmark `name` from `path` (see the benchmark's module for layouts)."""
    return get(name).read(path, **kwargs)


__all__ = [
    "LETTERS", "MC_SUFFIX", "REGISTRY", "SHORT_ANSWER_SUFFIX", "Benchmark", "BenchmarkData",
    "Example", "ImageRef", "Malformed", "ReadReport", "Skip", "VideoRef", "canonical_name",
    "collect", "column_protocol", "get", "load_benchmark", "mc_prompt", "read_table", "register",
    "short_answer_prompt",
]
