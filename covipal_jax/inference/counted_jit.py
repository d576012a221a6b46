"""`CountedJit`: `jax.jit` that counts the programs it traced (the compile-count tests' measure).

A jitted function traces once per new input signature (shapes, dtypes, shardings, static
values) and compiles what it traced, so the trace count is the number of programs it built.
It is counted here instead of read from jit's C++ dispatch cache (`_cache_size()`): that cache
is a per-process structure shared by every jitted function and only holds the calls that can
take its fast path, so its size can stay 0 for a function that did compile (seen in a long
CI process of the slow test step), while a trace is never missed.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax


class CountedJit:
    """`jax.jit(fun, **jit_kwargs)` with `traces`, the number of programs built so far.

    Calls, `.lower(...)`, `.trace(...)` and `.eval_shape(...)` go to the jitted function
    (`.lower` / `.eval_shape` trace too, and count).
    """

    def __init__(self, fun: Callable, **jit_kwargs: Any):
        self.traces = 0

        @functools.wraps(fun)
        def counted(*args, **kwargs):
            self.traces += 1
            return fun(*args, **kwargs)

        self._jitted = jax.jit(counted, **jit_kwargs)

    def __call__(self, *args, **kwargs):
        return self._jitted(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._jitted, name)

    def _cache_size(self) -> int:
        """The `jax.jit` spelling of the count (for code written against jitted functions)."""
        return self.traces
