"""Building blocks shared by the vision tower and the decoder.

Einsum / shape letters: B batch, T query length, S key length, D width, N heads,
K kv heads, H head dim, F MLP width, L layers.

`LayerStack` owns a stack of identical layers as ONE parameter tree with a leading `layers`
axis and can run any contiguous range of them, scanned (`lax.scan`) or unrolled, optionally
rematerialized. Running a range is what in-LLM pruning (FastV/DART at layer K) and the PPM's
stage-1 target (stop at the guide layer) need; the on-disk layout never changes.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

# ----------------------------------------------------------------------------- initializers

def kernel_init(names: Sequence[str], stddev: float = 0.02):
    return nn.with_logical_partitioning(nn.initializers.normal(stddev), tuple(names))


def zeros_init(names: Sequence[str]):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), tuple(names))


def ones_init(names: Sequence[str]):
    return nn.with_logical_partitioning(nn.initializers.ones_init(), tuple(names))


class Dense(nn.Module):
    """y = x @ kernel (+ bias), contracting x's last `n_in` axes; kernel [*in, *out].

    Like `nn.DenseGeneral`, but the kernel is created in its real shape, so its logical axis
    names (`names`: input axes then output axes) are valid from the start.
    `out_first`: the kernel is stored [*out, *in] (torch's `Linear` layout), the layout of
    the CPU decode twin (`inference.decoding`): XLA:CPU runs a thin dot (few rows, e.g. batch-8
    decode) faster when the contracted axes are the kernel's minor ones; it is run as one
    2-D dot (a 3-D kernel given as is gets transposed by XLA at every call).
    """

    features: tuple[int, ...]
    names: tuple[str | None, ...]
    n_in: int = 1
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    out_first: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        in_shape = tuple(x.shape[x.ndim - self.n_in:])
        n_out = len(self.features)
        if self.out_first:
            names = self.names[self.n_in:] + self.names[:self.n_in]
            shape, k_axes = tuple(self.features) + in_shape, range(n_out, n_out + self.n_in)
        else:
            names, shape, k_axes = self.names, in_shape + tuple(self.features), range(self.n_in)
        kernel = self.param("kernel", kernel_init(names), shape, self.param_dtype)
        if self.out_first:
            # One 2-D dot [.., in] x [out, in]: a kernel with 2+ out or in axes (q/k/v/o) given
            # as is is canonicalized by XLA's dot decomposer to [in, out], a full transposed copy
            # of the kernel at every call (every decode step; docs/decode_dots.md).
            lead = x.shape[:x.ndim - self.n_in]
            x2 = x.reshape(lead + (math.prod(in_shape),)).astype(self.dtype)
            k2 = kernel.reshape(math.prod(self.features), math.prod(in_shape))
            y = jax.lax.dot_general(x2, k2.astype(self.dtype), (((x2.ndim - 1,), (1,)), ((), ())))
            y = y.reshape(lead + tuple(self.features))
        else:
            contract = (tuple(range(x.ndim - self.n_in, x.ndim)), tuple(k_axes))
            y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                                    (contract, ((), ())))
        if self.use_bias:
            out_names = self.names[len(self.names) - len(self.features):]
            bias = self.param("bias", zeros_init(out_names), tuple(self.features),
                              self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def dense(features, names, *, axis=-1, use_bias=True, dtype=jnp.float32,
          param_dtype=jnp.float32, name=None, out_first=False) -> Dense:
    """A `Dense` with logical names; `axis=(-2, -1)` contracts two input axes (heads, dim)."""
    out = tuple(features) if isinstance(features, tuple) else (features,)
    n_in = len(axis) if isinstance(axis, tuple) else 1
    return Dense(out, tuple(names), n_in=n_in, use_bias=use_bias, dtype=dtype,
                 param_dtype=param_dtype, name=name, out_first=out_first)


def kernel_out_first(kernel: Array, n_in: int, lead: int = 0) -> Array:
    """A `Dense` kernel [*lead, *in, *out] -> [*lead, *out, *in] (`Dense.out_first`)."""
    axes = tuple(range(kernel.ndim))
    return jnp.transpose(kernel, axes[:lead] + axes[lead + n_in:] + axes[lead:lead + n_in])


# ----------------------------------------------------------------------------- norms, acts

class RMSNorm(nn.Module):
    """LLaMA / Qwen2 RMSNorm: computed in f32, weight applied after casting back (as HF)."""

    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", ones_init((self.axis_name,)), (x.shape[-1],),
                           self.param_dtype)
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * xf.astype(self.dtype)


def layer_norm(eps: float, axis_name: str, dtype, param_dtype, name=None) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype,
                        scale_init=ones_init((axis_name,)), bias_init=zeros_init((axis_name,)),
                        name=name)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
}


def activation(name: str) -> Callable[[Array], Array]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


# ----------------------------------------------------------------------------- RoPE

def rope(x: Array, positions: Array, theta: float) -> Array:
    """Rotary embedding in HF's rotate_half form.

    x: f32[B, T, N, H]; positions: i32[B, T]. Frequencies in f32, as HF.
    """
    h = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, H]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * cos + rotated * sin).astype(x.dtype)


# ----------------------------------------------------------------------------- layer stack

def _add_layer_axis(tree):
    """Prefix every LogicallyPartitioned box in `tree` with the `layers` axis name."""
    def fix(x):
        if isinstance(x, nn.LogicallyPartitioned):
            return x.replace(names=("layers",) + tuple(x.names))
        return x
    return jax.tree.map(fix, tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def remat_policy(name: str):
    if name in ("none", "", None):
        return None
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    try:
        return getattr(jax.checkpoint_policies, name)
    except AttributeError:
        raise ValueError(f"unknown remat_policy {name!r}") from None


class LayerStack(nn.Module):
    """`num_layers` copies of `layer`, params stacked on a leading `layers` axis.

    `make_layer()` builds an unbound Linen module whose `__call__(x, carry_in, **kwargs)`
    returns `(x, carry_out)`; `carry_in` is a per-layer pytree sliced along axis 0 (e.g. a KV
    cache, or None). `init_args()` returns dummy `(args, kwargs)` for initialization.
    """

    make_layer: Callable[[], nn.Module]
    num_layers: int
    init_args: Callable[[], tuple]
    scan: bool = True
    remat: str = "none"

    @nn.compact
    def __call__(self, x: Array, per_layer: Any = None, *, start: int = 0,
                 stop: int | None = None, **kwargs) -> tuple[Array, Any]:
        stop = self.num_layers if stop is None else stop
        if not 0 <= start <= stop <= self.num_layers:
            raise ValueError(f"layer range [{start}, {stop}) outside [0, {self.num_layers})")

        def init_fn(rng):
            rngs = jax.random.split(rng, self.num_layers)
            args, kwargs = self.init_args()
            one = lambda r: self.make_layer().init(r, *args, **kwargs)["params"]
            return _add_layer_axis(jax.vmap(one)(rngs))

        stacked = self.param("stack", init_fn)
        if start == stop:
            return x, per_layer
        params = jax.tree.map(lambda a: a[start:stop], stacked)

        layer = self.make_layer()

        def body(h, xs):
            p, c = xs
            h, c = layer.apply({"params": p}, h, c, **kwargs)
            return h, c

        policy = remat_policy(self.remat)
        if self.remat not in ("none", "", None):
            body = jax.checkpoint(body, policy=policy, prevent_cse=not self.scan)
        n = stop - start
        if self.scan:
            return jax.lax.scan(body, x, (params, per_layer))
        outs = []
        for i in range(n):
            sl = jax.tree.map(lambda a: a[i], (params, per_layer))
            x, c = body(x, sl)
            outs.append(c)
        stacked_out = None if per_layer is None else jax.tree.map(
            lambda *a: jnp.stack(a), *outs)
        return x, stacked_out

    def layer_params(self, index: int):
        """The params of one layer (for recomputing attention rows at that layer)."""
        return jax.tree.map(lambda a: a[index], self.get_variable("params", "stack"))
