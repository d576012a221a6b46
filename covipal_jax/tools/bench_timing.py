"""Timing primitives of the benchmark (`bench.py`): clocked thunks, interleaved repetitions
(median of the reps), and the f32 matmul peak the achieved FLOP/s are compared with."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp


# ----------------------------------------------------------------------------- timing


def _ready(x):
    return jax.block_until_ready(x)


def clocked(fn: Callable[[], Any], sync: Callable[[Any], Any] = _ready) -> Callable[[], float]:
    """A thunk that runs fn() to completion and returns its wall time in seconds."""
    def run() -> float:
        t0 = time.perf_counter()
        sync(fn())
        return time.perf_counter() - t0
    return run


def interleaved(thunks: dict[str, Callable[[], float]], reps: int, warmup: int
                ) -> dict[str, dict]:
    """Run each thunk (returning seconds) warmup + reps times, in turn; medians of the reps."""
    times: dict[str, list[float]] = {k: [] for k in thunks}
    for i in range(warmup + reps):
        for name, thunk in thunks.items():
            s = thunk()
            if i >= warmup:
                times[name].append(s)
    return {k: dict(median_s=statistics.median(v), times_s=v) for k, v in times.items()}


def matmul_peak(n: int, reps: int = 3, threads: int = 2, with_torch: bool = True) -> dict:
    """GFLOP/s of an n x n x n f32 matmul: jax (XLA CPU) and, if available, torch."""
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32)
    f = jax.jit(jnp.matmul)
    thunks = {"jax": clocked(lambda: f(a, b))}
    if with_torch:
        import torch
        torch.set_num_threads(threads)
        ta, tb = torch.randn(n, n), torch.randn(n, n)
        thunks["torch"] = clocked(lambda: torch.mm(ta, tb), sync=lambda x: x)
    res = interleaved(thunks, reps, 1)
    flops = 2.0 * n ** 3
    return {k: flops / v["median_s"] / 1e9 for k, v in res.items()} | {"n": n}
