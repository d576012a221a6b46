"""Hugging Face LLaVA checkpoints <-> our parameter tree: load and export.

- `load_llava(path, ...)`: a checkpoint directory (local or `gs://`) with `model.safetensors` or
  a sharded `model.safetensors.index.json` (any layout in `keymap.LAYOUTS`), read one parameter
  leaf at a time straight into (sharded) device arrays. The config comes from its config.json
  (`hf_config`); a given config must agree on every computation field. Every checkpoint key
  must be used exactly once and every parameter filled; every safetensors header is checked
  (`safetensors_io`) before any tensor is read.
- `export_llava(params, cfg, out_dir, layout="hub")`: `config.json` + safetensors that
  `transformers` loads (`LlavaForConditionalGeneration` / `LlavaOnevisionForConditionalGeneration`),
  local or `gs://`; config.json is written last, so a directory without it is incomplete.

Host memory holds at most one parameter leaf (all layers of it, in the target dtype) besides the
device arrays when loading, and one shard plus one leaf when exporting.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from covipal_jax import paths
from covipal_jax.models.config import LlavaConfig
from covipal_jax.weights import keymap
from covipal_jax.weights.hf_config import (  # noqa: F401  (re-exported)
    CONFIG_FILE,
    HF_DEFAULTS,
    MODEL_TYPES,
    check_config,
    config_from_hf,
    hf_config_dict,
    resolve_config,
)
from covipal_jax.weights.safetensors_io import (  # noqa: F401  (re-exported)
    INDEX_FILE,
    MAX_LISTED,
    SINGLE_FILE,
    Checkpoint,
    SafetensorsFile,
    listing as _listing,
    save_safetensors,
)


def abstract_params(cfg: LlavaConfig):
    """The boxed parameter tree of `Llava(cfg)` at zero memory (`jax.eval_shape`)."""
    from covipal_jax.models import llava  # local: keeps `weights` importable on its own
    return jax.eval_shape(lambda r: llava.init_params(cfg, r), jax.random.key(0))


def _flat_leaves(tree) -> dict[str, Any]:
    is_box = lambda p, x: isinstance(x, nn.LogicallyPartitioned)  # noqa: E731
    return traverse_util.flatten_dict(tree, sep="/", is_leaf=is_box)


def _plan(cfg: LlavaConfig, ckpt_keys) -> tuple[str, dict[str, keymap.Entry]]:
    """Match checkpoint keys against the map: (layout name, {hf key: entry}) or ValueError."""
    entries = keymap.key_map(cfg)
    name = keymap.detect_layout(cfg, ckpt_keys, entries)
    expected = keymap.expand(cfg, entries, keymap.LAYOUTS[name])
    ckpt = set(ckpt_keys)
    missing = set(expected) - ckpt
    unused = {k for k in ckpt - set(expected) if not keymap.is_ignored(k)}
    tied = tied_lm_head_key(cfg, name)
    if tied is not None:
        unused.discard(tied)  # a duplicate of the tied embedding: checked by the caller
    if missing or unused:
        msg = [f"checkpoint does not match the model (detected layout {name!r}):"]
        if missing:
            msg.append(f"  missing keys ({len(missing)}): {_listing(missing)}")
        if unused:
            msg.append(f"  unused keys ({len(unused)}): {_listing(unused)}")
        raise ValueError("\n".join(msg))
    return name, expected


def tied_lm_head_key(cfg: LlavaConfig, layout_name: str) -> str | None:
    """With tied embeddings, the lm_head key a checkpoint may still carry as a duplicate."""
    if not cfg.text.tie_word_embeddings:
        return None
    return keymap.LAYOUTS[layout_name]["lm_head"] + "lm_head.weight"


def _check_tied_duplicate(cfg: LlavaConfig, ckpt: "Checkpoint", layout_name: str) -> None:
    key = tied_lm_head_key(cfg, layout_name)
    if key is None or key not in ckpt.where:
        return
    embed = keymap.LAYOUTS[layout_name]["text"] + "embed_tokens.weight"
    a, b = ckpt.get(key), ckpt.get(embed)
    if a.shape != b.shape or not np.array_equal(a, b):
        raise ValueError(f"tie_word_embeddings is set, but the checkpoint's {key} differs from "
                         f"{embed}")


def load_llava(path: paths.PathLike, *, cfg: LlavaConfig | None = None, mesh=None,
               rules=None, dtype: Any = None) -> tuple[LlavaConfig, dict]:
    """Load a Hugging Face LLaVA / LLaVA-OneVision checkpoint directory.

    path: local directory or `gs://` URI. cfg: the config to run with (every field that changes
    the computation must match the checkpoint's config.json, `hf_config.resolve_config`; its
    runtime choices are kept; None: taken from config.json). mesh / rules: shard every leaf
    by its logical axis names (`covipal_jax.sharding.logical_shardings`); rules default to
    `covipal_jax.sharding.LOGICAL_AXIS_RULES`. No mesh: the first local device.
    dtype: parameter dtype (default `cfg.param_dtype`; with no cfg, float32 for both the
    parameter and the compute dtype unless given).
    Returns (cfg, params) with params `{"params": ...}` of plain arrays, ready for
    `Llava(cfg).apply`.
    """
    path = paths.as_path(path)
    ckpt_cfg = config_from_hf(path)
    if cfg is None:
        cfg = ckpt_cfg if dtype is None else ckpt_cfg.replace(dtype=dtype, param_dtype=dtype)
    else:
        cfg = resolve_config(cfg, ckpt_cfg)
        if dtype is not None:
            cfg = cfg.replace(param_dtype=dtype)
    target = np.dtype(cfg.weight_dtype)

    abstract = abstract_params(cfg)
    if mesh is not None:
        from covipal_jax import sharding as shard_lib
        if rules is None:
            from covipal_jax.sharding import LOGICAL_AXIS_RULES as rules  # noqa: N811
        shardings = _flat_leaves(shard_lib.logical_shardings(abstract, mesh, rules))
    else:
        shardings = None
    leaves = {k: v.unbox() if isinstance(v, nn.LogicallyPartitioned) else v
              for k, v in _flat_leaves(abstract).items()}
    default_sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    ckpt = Checkpoint(path)
    try:
        layout_name, _ = _plan(cfg, ckpt.keys())
        layout = keymap.LAYOUTS[layout_name]
        _check_tied_duplicate(cfg, ckpt, layout_name)
        entries = {f"params/{e.path}": e for e in keymap.key_map(cfg)}
        if set(entries) != set(leaves):  # the map and the model drifted apart: a bug here
            raise AssertionError(f"key map vs model params: only in map "
                                 f"{sorted(set(entries) - set(leaves))}, only in model "
                                 f"{sorted(set(leaves) - set(entries))}")
        _check_shapes(cfg, ckpt, entries, leaves, layout)
        out = {}
        for p, e in entries.items():
            leaf = leaves[p]
            buf = _read_leaf(cfg, ckpt, e, tuple(leaf.shape), target, layout)
            sh = default_sharding if shardings is None else shardings[p]
            out[p] = jax.make_array_from_callback(buf.shape, sh, lambda idx, b=buf: b[idx])
            del buf
    finally:
        ckpt.close()
    return cfg, traverse_util.unflatten_dict(out, sep="/")


def _layer_shape(e: keymap.Entry, shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape[1:] if e.stacked else shape


def _hf_keys(cfg: LlavaConfig, e: keymap.Entry, layout) -> list[str]:
    if e.stacked:
        return [e.hf_key(layout, i) for i in range(keymap.num_layers(cfg, e))]
    return [e.hf_key(layout)]


def _check_shapes(cfg, ckpt, entries, leaves, layout) -> None:
    bad = []
    for p, e in entries.items():
        want = keymap.TRANSFORMS[e.transform].hf_shape(_layer_shape(e, leaves[p].shape))
        for key in _hf_keys(cfg, e, layout):
            if ckpt.shape(key) != tuple(want):
                bad.append(f"  {key}: checkpoint {ckpt.shape(key)}, expected {tuple(want)} "
                           f"(for {p})")
    if bad:
        raise ValueError("checkpoint tensor shapes do not match the config:\n"
                         + "\n".join(bad[:MAX_LISTED]))


def _read_leaf(cfg, ckpt, e: keymap.Entry, shape, target: np.dtype, layout) -> np.ndarray:
    """One full leaf on the host in the target dtype, filled layer by layer."""
    tr = keymap.TRANSFORMS[e.transform]
    layer_shape = _layer_shape(e, shape)
    buf = np.empty(shape, target)
    for i, key in enumerate(_hf_keys(cfg, e, layout)):
        x = tr.to_ours(ckpt.get(key), layer_shape)
        if e.stacked:
            buf[i] = x  # numpy casts (ml_dtypes handles bfloat16)
        else:
            buf[...] = x
    return buf


def _to_host(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def _export_plan(flat, entries, lay, dtype, max_shard_bytes
                 ) -> list[dict[str, tuple[np.dtype, tuple[int, ...]]]]:
    """Shards as ordered {hf key: (dtype, shape)}, from shapes alone (nothing gathered yet)."""
    shards: list[dict] = [{}]
    size = 0
    for e in entries:
        leaf = flat[e.path]
        dt = np.dtype(leaf.dtype if dtype is None else dtype)
        tr = keymap.TRANSFORMS[e.transform]
        shape = tuple(leaf.shape)
        keys = ([(e.hf_key(lay, i), shape[1:]) for i in range(shape[0])] if e.stacked
                else [(e.hf_key(lay), shape)])
        for key, s in keys:
            hf_shape = tuple(tr.hf_shape(s))
            n = int(np.prod(hf_shape, dtype=np.int64)) * dt.itemsize
            if size and size + n > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][key] = (dt, hf_shape)
            size += n
    return shards


def export_llava(params, cfg: LlavaConfig, out_dir: paths.PathLike, layout: str = "hub",
                 *, dtype: Any = None, max_shard_bytes: int = 5 * 2**30) -> str:
    """Write `params` as a Hugging Face checkpoint directory (config.json + safetensors).

    params: `{"params": ...}` or the inner tree, boxed or not, possibly sharded. out_dir: local
    or `gs://`. layout: a `keymap.LAYOUTS` name (`hub` is what transformers and the Hub use).
    dtype: tensor dtype (default: each leaf's). Beyond `max_shard_bytes` the tensors are split
    into `model-XXXXX-of-YYYYY.safetensors` + `model.safetensors.index.json`; host memory holds
    at most one shard plus one leaf. Stale weights and config.json are removed first and
    config.json is written last: a directory without it is an incomplete export. With several
    processes every process must call this (leaves are gathered collectively); process 0
    writes. Returns out_dir (as given, a string).
    """
    if layout not in keymap.LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {sorted(keymap.LAYOUTS)}")
    lay = keymap.LAYOUTS[layout]
    params = nn.unbox(params)
    if "params" in params and len(params) == 1:
        params = params["params"]
    flat = traverse_util.flatten_dict(params, sep="/")
    entries = keymap.key_map(cfg)
    want = {e.path for e in entries}
    if set(flat) != want:
        raise ValueError(f"params do not match cfg: missing {sorted(want - set(flat))}, "
                         f"unexpected {sorted(set(flat) - want)}")
    out = paths.as_path(out_dir)
    writer = jax.process_index() == 0
    plan = _export_plan(flat, entries, lay, dtype, max_shard_bytes)
    n = len(plan)
    names = [SINGLE_FILE] if n == 1 else [f"model-{j + 1:05d}-of-{n:05d}.safetensors"
                                          for j in range(n)]
    shard_of = {k: j for j, shard in enumerate(plan) for k in shard}
    if writer:
        with paths.user_path_errors(out, "export directory"):
            out.mkdir(parents=True, exist_ok=True)
            (out / CONFIG_FILE).unlink(missing_ok=True)  # incomplete from here on
            stale = list(out.iterdir()) if out.is_dir() else []  # (an empty bucket prefix)
            for p in stale:  # stale shards of an earlier export confuse loaders
                if p.name.endswith(".safetensors") or p.name == INDEX_FILE:
                    p.unlink()

    pending: dict[str, np.ndarray] = {}
    done = 0

    def flush_ready():
        nonlocal done
        while done < n and set(plan[done]) <= set(pending):
            save_safetensors(out / names[done], {k: pending.pop(k) for k in plan[done]},
                             metadata={"format": "pt"})
            done += 1

    for e in entries:
        host = _to_host(flat[e.path])  # collective under multi-process: every process calls
        if not writer:
            continue
        if dtype is not None:
            host = host.astype(dtype)
        tr = keymap.TRANSFORMS[e.transform]
        parts = ([(e.hf_key(lay, i), host[i]) for i in range(host.shape[0])] if e.stacked
                 else [(e.hf_key(lay), host)])
        for key, x in parts:
            pending[key] = np.ascontiguousarray(tr.to_hf(x))
            assert pending[key].shape == plan[shard_of[key]][key][1], key
        del host, parts
        flush_ready()
    if not writer:
        return str(out_dir)
    flush_ready()
    assert done == n and not pending, (done, n, sorted(pending)[:5])
    if n > 1:
        total = sum(int(np.prod(s, dtype=np.int64)) * dt.itemsize
                    for shard in plan for dt, s in shard.values())
        weight_map = {k: names[j] for k, j in shard_of.items()}
        paths.write_json(out / INDEX_FILE, {"metadata": {"total_size": total},
                                            "weight_map": weight_map})
    first_dtype = next(iter(plan[0].values()))[0] if plan[0] else np.dtype(cfg.weight_dtype)
    paths.write_json(out / CONFIG_FILE, hf_config_dict(cfg, first_dtype if dtype is None
                                                       else dtype))
    return str(out_dir)


__all__ = ["config_from_hf", "check_config", "resolve_config", "hf_config_dict", "load_llava",
           "export_llava", "abstract_params", "Checkpoint", "SafetensorsFile", "HF_DEFAULTS"]
