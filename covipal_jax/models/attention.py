"""Attention: one entry point over several backends, the recomputed-rows path, masks, a key bias.

Letters: B batch, T queries, S keys, N query heads, K kv heads, G = N / K, H head dim.

- `attention(q, k, v, mask=Mask(...), bias=..., impl="auto")`: softmax(q k^T / sqrt(H) + bias)
  v with grouped kv heads, through one of the backends in `IMPLS` (`resolve_impl` says which
  one a call actually uses and why):
  - "xla": `jax.nn.dot_product_attention`'s XLA path; builds the [B, N, T, S] scores.
  - "chunked": blockwise online softmax in plain JAX (`attention_chunked`); never builds the
    full score matrix. "auto" uses it on CPU for long sequences (T * S >= `CPU_CHUNKED_MIN`).
  - "splash": the Pallas TPU splash (flash) kernel (`attention_splash`); "auto" uses it on TPU
    for T >= `TPU_SPLASH_MIN_T`. A per-key bias rides in extra q/k head-dim columns.
  - "cudnn": cuDNN flash attention through `jax.nn.dot_product_attention(implementation=
    "cudnn")` on GPU for bf16/f16 prefill; anything it cannot take uses "xla".
  Decode (T = 1 against a cache) uses "xla" on every platform unless "chunked" is forced:
  one query row is memory-bound, no kernel helps. The decoder calls `decode_attention` for
  it, which reads the heads-major [B, K, S, H] cache without transposing it.
- `Mask`: which keys each query may see, kept as `q_index` + `key_valid` so backends that
  block the computation never build bool[B, T, S]; `Mask.dense()` builds it for "xla".
- `attention_rows`: the probabilities of a FEW query rows, recomputed from q and k. FastV's
  selection and the PPM's stage-1 target need them at one layer only; it is its own exact f32
  computation, independent of the backend.
- `key_bias`: an additive bias per key (e.g. `log p` of the PPM's keep probability on vision
  keys in stage-2 training), broadcast over heads and queries.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array
NEG_INF = -1e30


def causal_mask(query_index: Array, key_valid: Array) -> Array:
    """bool[B, T, S]: query t (at cache index `query_index[t]`) may see key s.

    query_index: i32[T] absolute indices of the queries in the key axis.
    key_valid: bool[B, S] keys that hold a real token.
    A query always sees itself, so padded query rows stay finite (their output is ignored).
    """
    s = jnp.arange(key_valid.shape[-1])
    causal = s[None, :] <= query_index[:, None]  # [T, S]
    diag = s[None, :] == query_index[:, None]
    return (causal[None] & key_valid[:, None, :]) | diag[None]


def bidirectional_mask(key_valid: Array, t: int) -> Array:
    """bool[B, T, S] for encoders: every query sees every valid key."""
    return jnp.broadcast_to(key_valid[:, None, :], key_valid.shape[:1] + (t,) + key_valid.shape[1:])


IMPLS = ("auto", "xla", "chunked", "splash", "cudnn")
# "auto" thresholds. CPU: measured on the 2-core dev CPU with LLaVA-7B head shapes (see
# docs/gpu_bench.md "Attention backends"); TPU: not measured (no TPU), splash pads the
# sequence to 128-multiples so short sequences stay on XLA.
CPU_CHUNKED_MIN = 1024 * 1024  # T * S at and above which "auto" picks "chunked" on CPU
TPU_SPLASH_MIN_T = 1024


@flax.struct.dataclass
class Mask:
    """Which keys each query may see, without materializing bool[B, T, S].

    q_index: i32[T] key-axis index of each query (causal: query t sees keys s <= q_index[t],
      and always itself), or None (bidirectional);
    key_valid: bool[B, S] keys holding a real token, or None (all);
    q_offset: q_index[0] when it is a Python int (q_index = q_offset + arange(T)); backends
      with a static mask (splash) need it, others ignore it.
    """

    q_index: Array | None = None
    key_valid: Array | None = None
    q_offset: int | None = flax.struct.field(pytree_node=False, default=None)

    @classmethod
    def causal(cls, cache_index: Array | int, t: int, key_valid: Array) -> "Mask":
        """Queries at cache indices `cache_index + arange(t)` over `key_valid` bool[B, S]."""
        q_index = jnp.asarray(cache_index, jnp.int32) + jnp.arange(t, dtype=jnp.int32)
        offset = cache_index if isinstance(cache_index, int) else None
        return cls(q_index, key_valid, offset)

    def dense(self, b: int, t: int, s: int) -> Array | None:
        """bool[B, T, S] (None when everything is visible)."""
        if self.q_index is not None:
            valid = jnp.ones((b, s), bool) if self.key_valid is None else self.key_valid
            return causal_mask(self.q_index, valid)
        if self.key_valid is None:
            return None
        return bidirectional_mask(self.key_valid, t)


def platform() -> str:
    """The platform being traced for: the current mesh's devices (AOT compiles for TPU on a
    CPU host set a TPU mesh), else JAX's default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    dev = getattr(mesh, "abstract_device", None)
    if dev is not None and not mesh.empty:
        return dev.platform
    return jax.default_backend()


def cudnn_supported(q: Array, k: Array) -> str | None:
    """None if cuDNN flash attention can take these shapes/dtypes, else the reason."""
    h = q.shape[-1]
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"dtype {q.dtype} (cuDNN flash attention needs bf16/f16)"
    if h % 8 or h > 256:
        return f"head dim {h} (needs a multiple of 8, at most 256)"
    if q.shape[1] == 1:
        return "one query row (decode): XLA"
    return None


def resolve_impl(impl: str, q: Array, k: Array, *, mask: Mask | None = None,
                 bias: Array | None = None, plat: str | None = None) -> tuple[str, str]:
    """(backend a call uses, why): `impl` resolved for this platform, shape, dtype, bias."""
    if impl not in IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; known: {IMPLS}")
    plat = platform() if plat is None else plat
    t, s = q.shape[1], k.shape[1]
    if impl == "auto":
        if plat == "cpu":
            if t > 1 and t * s >= CPU_CHUNKED_MIN:
                return "chunked", f"cpu, T*S={t * s} >= {CPU_CHUNKED_MIN}"
            return "xla", f"cpu, T*S={t * s} < {CPU_CHUNKED_MIN} or decode"
        if plat == "tpu":
            if t < TPU_SPLASH_MIN_T:
                return "xla", f"tpu, T={t} < {TPU_SPLASH_MIN_T}"
            impl = "splash"
        elif plat == "gpu":
            impl = "cudnn"
        else:
            return "xla", f"platform {plat}"
    if impl == "splash":
        if plat != "tpu":
            return "xla", f"splash needs a TPU (platform {plat})"
        if t == 1:
            return "xla", "one query row (decode)"
        if mask is not None and mask.q_index is not None and mask.q_offset is None:
            return "xla", "causal offset not static (traced cache index)"
        return "splash", "tpu"
    if impl == "cudnn":
        if plat != "gpu":
            return "xla", f"cudnn needs a GPU (platform {plat})"
        why = cudnn_supported(q, k)
        return ("xla", why) if why else ("cudnn", "gpu")
    return impl, "forced"


def attention(q: Array, k: Array, v: Array, *, mask: Mask | None = None,
              bias: Array | None = None, impl: str = "auto") -> Array:
    """Scaled dot-product attention with grouped kv heads on the backend `impl` resolves to.

    q: [B, T, N, H]; k, v: [B, S, K, H] (K divides N); mask: `Mask` or None (all visible);
    bias: f32[B, S] additive per-key bias or None. Returns [B, T, N, H] in q's dtype.
    """
    name, _ = resolve_impl(impl, q, k, mask=mask, bias=bias)
    mask = Mask() if mask is None else mask
    if name == "chunked":
        from covipal_jax.models.attention_chunked import chunked_attention
        return chunked_attention(q, k, v, q_index=mask.q_index, key_valid=mask.key_valid,
                                 bias=bias)
    if name == "splash":
        from covipal_jax.models.attention_splash import splash_attention
        return splash_attention(q, k, v, q_offset=mask.q_offset, key_valid=mask.key_valid,
                                causal=mask.q_index is not None, bias=bias)
    b, t, _, _ = q.shape
    dense = mask.dense(b, t, k.shape[1])
    m = None if dense is None else dense[:, None, :, :]  # [B, 1, T, S]
    bb = None if bias is None else bias[:, None, None, :].astype(q.dtype)
    if name == "cudnn":
        return _cudnn(q, k, v, m, bb)
    return jax.nn.dot_product_attention(q, k, v, bias=bb, mask=m, implementation="xla")


def decode_attention(q: Array, k: Array, v: Array, *, mask: Mask | None = None,
                     bias: Array | None = None) -> Array:
    """One query row against a heads-major KV cache (the decode step on "xla").

    q: [B, 1, N, H]; k, v: [B, K, S, H] (K divides N); mask, bias: as `attention`. Returns
    [B, 1, N, H]. Both dots have batch dims (B, K) leading on the cache, so XLA:CPU runs them
    without transposing the cache (the [B, S, K, H] layout transposed all of it every step).
    """
    b, t, n, h = q.shape
    kh, s = k.shape[1], k.shape[2]
    qg = q.reshape(b, kh, n // kh, h)                                             # [B, K, G, H]
    logits = jnp.einsum("bkgh,bksh->bkgs", qg, k, preferred_element_type=jnp.float32)
    logits = logits * jnp.float32(1.0 / (h ** 0.5))  # as jax.nn.dot_product_attention
    if bias is not None:
        logits = logits + bias[:, None, None, :].astype(jnp.float32)
    mask = Mask() if mask is None else mask
    dense = mask.dense(b, t, s)  # [B, 1, S]
    if dense is not None:
        logits = jnp.where(dense[:, None, :, :], logits, NEG_INF)
    p = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgs,bksh->bkgh", p, v)
    return out.reshape(b, 1, n, h).astype(q.dtype)


def _cudnn(q: Array, k: Array, v: Array, m: Array | None, bb: Array | None) -> Array:
    """cuDNN flash attention; the mask and key bias go in as one dense additive bias."""
    b, t, _, _ = q.shape
    s = k.shape[1]
    bias = None
    if m is not None or bb is not None:
        bias = jnp.zeros((b, 1, t, s), q.dtype) if bb is None else jnp.broadcast_to(
            bb, (b, 1, t, s))
        if m is not None:
            bias = jnp.where(m, bias, jnp.asarray(-0.7 * jnp.finfo(q.dtype).max, q.dtype))
    try:
        return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation="cudnn")
    except (ValueError, NotImplementedError, RuntimeError):
        # Shapes / cuDNN versions jax refuses at trace time: the XLA path computes the same.
        return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation="xla")

def attention_rows(q_rows: Array, k: Array, mask_rows: Array | None,
                   bias: Array | None = None) -> Array:
    """Softmax attention probabilities of a few query rows, f32[B, N, R, S].

    q_rows: [B, R, N, H] (already RoPE'd); k: [B, S, K, H]; mask_rows: bool[B, R, S];
    bias: f32[B, S]. Computed in f32.
    """
    b, r, n, h = q_rows.shape
    kh = k.shape[2]
    q = q_rows.astype(jnp.float32).reshape(b, r, kh, n // kh, h)
    logits = jnp.einsum("brkgh,bskh->bkgrs", q, k.astype(jnp.float32)) / jnp.sqrt(h)
    logits = logits.reshape(b, n, r, k.shape[1])
    if bias is not None:
        logits = logits + bias[:, None, None, :].astype(jnp.float32)
    if mask_rows is not None:
        logits = jnp.where(mask_rows[:, None], logits, NEG_INF)
    return jax.nn.softmax(logits, axis=-1)
