"""One FLOP helper: XLA's own cost analysis of a jitted function or a lowered / compiled program.

    flops = compiled_flops(fn, params, pixels, ids, mask)        # arrays or ShapeDtypeStructs
    flops = program_flops(jax.jit(fn).lower(*args).compile())    # an existing program

Used by `tools/bench.py` (and meant for `tools/aot.py`); the count is XLA's `cost_analysis()`
`flops` (2 x multiply-adds of the matmuls, plus elementwise work), per device program.
"""
from __future__ import annotations

from typing import Any

import jax


def abstract(tree: Any) -> Any:
    """Arrays -> `jax.ShapeDtypeStruct`s (already abstract leaves pass through)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def program_flops(program: Any) -> float:
    """`cost_analysis()['flops']` of a `Lowered` or `Compiled` program (0.0 when XLA reports
    none)."""
    cost = program.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax returned one dict per device
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def compiled_flops(fn, *args, compile: bool = True) -> float:
    """XLA's FLOPs of `fn` jitted for args (arrays or abstract); with compile=False, of the
    lowered (pre-optimization) HLO (on CPU the two agreed to the FLOP on the 7B-width prefill;
    bench --quick uses it to save compile time)."""
    lowered = jax.jit(fn).lower(*abstract(args))
    return program_flops(lowered.compile() if compile else lowered)
