"""CountedJit counts one program per input signature, through calls, lower and donation."""

import jax
import jax.numpy as jnp
import numpy as np

from covipal_jax.inference.counted_jit import CountedJit


def test_counts_one_trace_per_signature():
    f = CountedJit(lambda x, y: x * 2 + y)
    for _ in range(3):
        np.testing.assert_array_equal(np.asarray(f(jnp.ones(3), 1.0)), np.full(3, 3.0))
    assert f.traces == 1 and f._cache_size() == 1
    f(jnp.ones(4), 1.0)                      # new shape: a second program
    f(jnp.ones(3, jnp.int32), 1)             # new dtype: a third
    assert f.traces == 3


def test_static_args_donation_and_lower_pass_through():
    f = CountedJit(lambda x, n: x + n, static_argnums=(1,), donate_argnums=(0,))
    f(jnp.zeros(2), 1)
    f(jnp.zeros(2), 1)
    f(jnp.zeros(2), 2)                       # a new static value retraces
    assert f.traces == 2
    text = f.lower(jax.ShapeDtypeStruct((2,), jnp.float32), 3).as_text()
    assert "stablehlo" in text and f.traces == 3
