"""TPU attention through the Pallas splash (sparse flash) kernel.

Letters: B batch, T queries, S keys, N query heads, K kv heads, H head dim; Tp, Sp, Hp padded.

`jax.experimental.pallas.ops.tpu.splash_attention` works on one example ([N, T, H] queries,
[K, S, H] keys: grouped heads natively) with a STATIC mask (here causal with the static offset
of the first query, or full) and per-token segment ids (a query sees a key only when their
ids are equal). The decoder's dynamic key-validity mask maps onto segment ids:
kv id = key_valid[s]; q id = key_valid[q_offset + t] (a real query: 1, sees the real keys; a
padded / pruned query: 0, sees the padded keys before it). Real rows equal the reference
(`attention.causal_mask`); padded rows differ (they are ignored downstream) but stay finite.

Shapes are padded to the kernel's tiles: T, S to multiples of 128 (padded keys get id 0, so
real queries never see them), H to a multiple of 128 with zeros (q.k and the kept output
columns are unchanged). Queries are pre-scaled by 1/sqrt(H) (the kernel does not scale).

A per-key additive bias f32[B, S] (PPM stage-2 soft pruning: `log p` on vision keys) has no
slot in the kernel (segment ids, sinks and a logit soft cap, no bias), so it rides in extra
head-dim columns: q' = [q / sqrt(H), 1, 1], k' = [k, hi, lo] with hi = bias in q's dtype and
lo = bias - hi (the rounding error, so bf16 keeps about 16 bits of the bias; f32 needs only
hi), hence q'.k' = q.k / sqrt(H) + bias. The kernel accepts a value head dim different from
the query/key one, so only q and k grow (H + 2 padded to a multiple of 128: 128 -> 256 for
the q.k product; the p.v product and the output keep Hp). Under a mesh with more than one device the kernel runs inside `jax.shard_map` over the
batch (`act_batch`) and head (`act_heads`) axes of the logical rules: a Pallas call cannot be
partitioned by the compiler.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

Array = jax.Array
LANES = 128


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _block(n: int, largest: int = 512) -> int:
    """The largest of 512 / 256 / 128 dividing n (n is a multiple of 128)."""
    for blk in (largest, 256, 128):
        if n % blk == 0:
            return blk
    return LANES


@functools.lru_cache(maxsize=64)
def _kernel(n: int, tp: int, sp: int, causal: bool, offset: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    if causal:
        one = sa.CausalMask(shape=(tp, sp), offset=offset)
    else:
        one = sa.FullMask(_shape=(tp, sp))
    bq, bkv = _block(tp), _block(sp)
    sizes = sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                          block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                          block_q_dq=bq, block_kv_dq=bkv)
    return sa.make_splash_mha(mask=sa.MultiHeadMask([one] * n), block_sizes=sizes,
                              head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash_local(q: Array, k: Array, v: Array, q_seg: Array, kv_seg: Array, *,
                  causal: bool, offset: int, interpret: bool) -> Array:
    """q [B, N, Tp, Hp]; k, v [B, K, Sp, Hp]; q_seg i32[B, Tp]; kv_seg i32[B, Sp] -> [B, N, Tp, Hp]."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    kernel = _kernel(q.shape[1], q.shape[2], k.shape[2], causal, offset, interpret)
    seg = sa.SegmentIds(q=q_seg, kv=kv_seg)
    return jax.vmap(kernel)(q, k, v, segment_ids=seg)


def _mesh_specs(q: Array, k: Array):
    """shard_map specs from the logical rules, or None when no multi-device mesh is set."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return None, None
    batch, heads = nn.logical_to_mesh_axes(("act_batch", "act_heads"))

    def fits(axes, *dims):
        if axes is None:
            return None
        names = axes if isinstance(axes, tuple) else (axes,)
        size = int(np.prod([mesh.shape[a] for a in names]))
        return axes if all(d % size == 0 for d in dims) else None

    batch = fits(batch, q.shape[0])
    heads = fits(heads, q.shape[1], k.shape[1])
    return mesh, (P(batch, heads, None, None), P(batch, heads, None, None),
                  P(batch, heads, None, None), P(batch, None), P(batch, None))


def bias_columns(q: Array, k: Array, bias: Array) -> tuple[Array, Array]:
    """(q' [B, T, N, H + c], k' [B, S, K, H + c]) with q'.k' = q.k + bias[b, s].

    q, k: in the kernel's dtype (q already scaled); bias: f32[B, S]. c = 1 column (f32) or 2
    (hi + lo split for 16-bit dtypes). Biases are clipped to a quarter of the dtype's range
    (finite logits: the kernel's running max must stay finite)."""
    dt = q.dtype
    big = float(jnp.finfo(dt).max) / 4
    bias = jnp.clip(bias.astype(jnp.float32), -big, big)
    hi = bias.astype(dt)
    cols = [hi] if dt == jnp.float32 else [hi, (bias - hi.astype(jnp.float32)).astype(dt)]
    kb = jnp.stack(cols, axis=-1)[:, :, None, :]                          # [B, S, 1, c]
    kb = jnp.broadcast_to(kb, k.shape[:3] + (len(cols),))
    qb = jnp.ones(q.shape[:3] + (len(cols),), dt)
    return jnp.concatenate([q, qb], axis=-1), jnp.concatenate([k.astype(dt), kb], axis=-1)


def splash_attention(q: Array, k: Array, v: Array, *, q_offset: int | None,
                     key_valid: Array | None, causal: bool, bias: Array | None = None,
                     interpret: bool = False) -> Array:
    """q: [B, T, N, H]; k, v: [B, S, K, H]; key_valid: bool[B, S] or None; causal: queries at
    key indices q_offset + arange(T) (a Python int); bias: f32[B, S] additive per-key bias or
    None. Returns [B, T, N, H] in q's dtype.
    `interpret`: run the kernel in the Pallas interpreter (any platform: tests on CPU)."""
    b, t, n, h = q.shape
    s = k.shape[1]
    if causal and q_offset is None:
        raise ValueError("splash attention needs a static causal offset (Python int)")
    offset = int(q_offset or 0)
    tp, sp = _round_up(t, LANES), _round_up(s, LANES)
    valid = jnp.ones((b, s), bool) if key_valid is None else key_valid
    kv_seg = jnp.pad(valid.astype(jnp.int32), ((0, 0), (0, sp - s)))
    if causal:
        if offset + t > s:
            raise ValueError(f"queries at [{offset}, {offset + t}) beyond {s} keys")
        q_seg = jax.lax.dynamic_slice_in_dim(valid, offset, t, axis=1).astype(jnp.int32)
    else:
        q_seg = jnp.ones((b, t), jnp.int32)
    q_seg = jnp.pad(q_seg, ((0, 0), (0, tp - t)))

    def heads_first(x, length, pad_len):
        x = jnp.swapaxes(x, 1, 2)  # [B, heads, len, H(+c)]
        width = _round_up(x.shape[-1], LANES)
        return jnp.pad(x, ((0, 0), (0, 0), (0, pad_len - length), (0, width - x.shape[-1])))

    scale = jnp.asarray(1.0 / np.sqrt(h), q.dtype)
    qs, ks = q * scale, k.astype(q.dtype)
    if bias is not None:
        qs, ks = bias_columns(qs, ks, bias)
    qh = heads_first(qs, t, tp)
    kh_, vh = heads_first(ks, s, sp), heads_first(v.astype(q.dtype), s, sp)
    fn = functools.partial(_splash_local, causal=causal, offset=offset, interpret=interpret)
    mesh, specs = _mesh_specs(qh, kh_)
    if mesh is not None:
        fn = jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=specs[0],
                           check_vma=False)
    out = fn(qh, kh_, vh, q_seg, kv_seg)  # [B, N, Tp, Hp]
    return jnp.swapaxes(out[:, :, :t, :h], 1, 2).astype(q.dtype)
