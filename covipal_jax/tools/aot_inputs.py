"""Inputs of `tools/aot.py`'s prefill beyond the plain image: abstract packed visual inputs
(`--visual anyres:VIEWS | video:FRAMES`: `inference.visual_inputs.AnyResImage` / `Video` of
`ShapeDtypeStruct`s, batch-sharded), their packed length, and which attention backend the
decoder prefill and the vision tower resolve to on the target platform; the sharded abstract
decode state.
"""
from __future__ import annotations


def _batch_sds(shape, dtype, mesh):
    from covipal_jax import sharding as sh
    import jax
    return jax.ShapeDtypeStruct(shape, dtype, sharding=None if mesh is None
                                else sh.batch_sharding(mesh, len(shape)))


def _sds(x, sharding=None, dtype=None):
    from covipal_jax.train import state as state_lib
    return state_lib.sds(x, sharding, dtype)


def parse_visual(spec: str) -> tuple[str, int]:
    """"" -> ("image", 1); "anyres:VIEWS" -> ("anyres", VIEWS); "video:FRAMES" -> ("video", F)."""
    if not spec:
        return "image", 1
    kind, _, num = spec.partition(":")
    if kind not in ("anyres", "video") or not num.isdigit() or int(num) < 1:
        raise ValueError(f"--visual must be anyres:VIEWS or video:FRAMES (VIEWS, FRAMES >= 1),"
                         f" got {spec!r}")
    return kind, int(num)


def visual_sds(spec: str, cfg, batch: int, mesh):
    """The abstract visual input of a prefill: pixels f32[B, H, W, 3], or a packed
    `AnyResImage` (pixels f32[B, C, H, W, 3], plan i32[B, 8], the bucket's static capacity) /
    `Video` (frames f32[B, F, H, W, 3]) with batch-sharded leaves."""
    import jax.numpy as jnp

    kind, num = parse_visual(spec)
    side = cfg.vision.image_size
    if kind == "image":
        return _batch_sds((batch, side, side, 3), jnp.float32, mesh)
    from covipal_jax.inference import visual_inputs as vi
    from covipal_jax.models import anyres

    if not cfg.image_newline:
        raise ValueError(f"--visual {spec}: the model has no image_newline (use a LLaVA-NeXT / "
                         "OneVision config)")
    if kind == "anyres":
        if not cfg.image_grid_pinpoints:
            raise ValueError(f"--visual {spec}: the config has no AnyRes pinpoints "
                             "(e.g. llava_ov_7b.py:anyres=1)")
        return vi.AnyResImage(_batch_sds((batch, num, side, side, 3), jnp.float32, mesh),
                              _batch_sds((batch, 8), jnp.int32, mesh),
                              anyres.bucket_capacity(cfg, num))
    if cfg.video_token_id is None or cfg.video_token_id < 0:
        raise ValueError(f"--visual {spec}: the config has no video_token_id (not a video model)")
    return vi.Video(_batch_sds((batch, num, side, side, 3), jnp.float32, mesh))


def num_visual_tokens(spec: str, cfg) -> int:
    """Packed length N of `spec`'s visual input (the base view's tokens for a plain image)."""
    if not spec:
        return cfg.num_vision_tokens
    return visual_sds(spec, cfg, 1, None).num_slots(cfg)


def attention_paths(req, cfg, k: int, plat: str = "tpu", ppm=None) -> dict:
    """Which attention backend the decoder's prefill, the vision tower and (`ppm`: the
    `config.ppm` section of a step with a PPM) the PPM over all N candidate tokens resolve to
    (`models.attention.resolve_impl` at their shapes on `plat`; the PPM follows
    `cfg.attention` too)."""
    import jax
    import jax.numpy as jnp

    from covipal_jax.models.attention import Mask, resolve_impl

    def one(t, s, heads, kv, dim, causal):
        q = jax.ShapeDtypeStruct((req.batch, t, heads, dim), jnp.bfloat16)
        kk = jax.ShapeDtypeStruct((req.batch, s, kv, dim), jnp.bfloat16)
        mask = Mask(jnp.zeros((t,), jnp.int32), None, 0) if causal else None
        name, why = resolve_impl(cfg.attention, q, kk, mask=mask, plat=plat)
        return dict(impl=name, why=why, queries=t, keys=s)

    tx, vs = cfg.text, cfg.vision
    t = req.text_len + k
    n_v = vs.grid[0] * vs.grid[1]
    paths = dict(config=cfg.attention,
                 decoder_prefill=one(t, t + req.max_new_tokens, tx.num_heads,
                                     tx.num_kv_heads, tx.head_dim, True),
                 vision_tower=one(n_v, n_v, vs.num_heads, vs.num_heads,
                                  vs.head_dim, False))
    if ppm is not None:
        n, heads = num_visual_tokens(req.visual, cfg), ppm.num_heads
        paths["ppm"] = one(n, n + req.text_len, heads, heads, ppm.width // heads, False)
    return paths


def decode_state_abstract(state, batch: int, mesh, rules):
    """Shardings for a DecodeState: KV caches by their logical names, per-row leaves over the
    batch axes, the rest replicated."""
    import flax.linen as nn
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from covipal_jax import sharding as sh
    from covipal_jax.models.decoder import CACHE_AXES

    if mesh is None:
        return jax.tree.map(lambda x: _sds(x), state)
    cache_sh = nn.logical_to_mesh_sharding(P(*CACHE_AXES), mesh, sh.rules_tuple(rules))

    def pick(path, x):
        names = [str(getattr(k, "key", getattr(k, "name", ""))) for k in path]
        if "cache" in names and x.ndim == 5:
            return _sds(x, cache_sh)
        if x.ndim >= 1 and x.shape[0] == batch:
            return _sds(x, sh.batch_sharding(mesh, x.ndim))
        return _sds(x, NamedSharding(mesh, P()))
    return jax.tree_util.tree_map_with_path(pick, state)
