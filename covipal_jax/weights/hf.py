"""Hugging Face LLaVA checkpoints: config.json <-> LlavaConfig, and safetensors <-> params.

- `config_from_hf(path_or_dict)`: a transformers `llava` / `llava_onevision` config (CLIP or
  SigLIP tower, LLaMA or Qwen2 decoder) -> `LlavaConfig`. Fields a config.json leaves out take
  transformers' defaults for that model type (`HF_DEFAULTS`). What we cannot run (several
  feature layers, RoPE scaling, projector without bias, the SigLIP pooling head, sliding
  windows, biased LLaMA attention/MLP) raises `ValueError`.
- `check_config(given, from_ckpt)`: `ValueError` listing every architecture field that differs.
- `load_llava(path, ...)`: reads `model.safetensors` or a sharded
  `model.safetensors.index.json` (any layout in `keymap.LAYOUTS`), one parameter leaf at a
  time, straight into (sharded) device arrays. Every checkpoint key must be used exactly once
  and every parameter filled.
- `export_llava(params, cfg, out_dir, layout="hub")`: `config.json` + safetensors that
  `transformers` loads (`LlavaForConditionalGeneration` / `LlavaOnevisionForConditionalGeneration`).

Tensors are read through a memory map of each safetensors file (we parse its JSON header:
`safetensors`' numpy reader cannot return bfloat16), so host memory holds at most one
parameter leaf (all layers of it, in the target dtype) besides the device arrays.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Any, Mapping

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
from flax import traverse_util

from covipal_jax.models.config import LlavaConfig, TextConfig, VisionConfig
from covipal_jax.weights import keymap

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_LISTED = 20  # keys shown in an error message

# ----------------------------------------------------------------------------- config

# transformers' defaults for the fields a config.json may omit (checked against the config
# classes in tests/test_weights.py). LLaVA's own sub-config defaults (a config with no
# vision_config / text_config at all) follow `LlavaConfig.sub_configs_defaults`.
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=None,
                  rms_norm_eps=1e-6, max_position_embeddings=2048, rope_theta=10000.0,
                  tie_word_embeddings=False, hidden_act="silu", attention_bias=False,
                  mlp_bias=False),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                  rms_norm_eps=1e-6, max_position_embeddings=32768, rope_theta=10000.0,
                  tie_word_embeddings=False, hidden_act="silu", use_sliding_window=False),
    "clip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, image_size=224, patch_size=32,
                              layer_norm_eps=1e-5, hidden_act="quick_gelu", num_channels=3),
    "siglip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                num_attention_heads=12, image_size=224, patch_size=16,
                                layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
                                num_channels=3, vision_use_head=True),
}

MODEL_TYPES = {
    # model_type: (architecture, default vision sub-config, default text model_type, defaults)
    "llava": ("LlavaForConditionalGeneration",
              dict(model_type="clip_vision_model", intermediate_size=4096, hidden_size=1024,
                   patch_size=14, image_size=336, num_hidden_layers=24, num_attention_heads=16),
              "llama",
              dict(image_token_index=32000, vision_feature_layer=-2,
                   vision_feature_select_strategy="default")),
    "llava_onevision": ("LlavaOnevisionForConditionalGeneration",
                        dict(model_type="siglip_vision_model", hidden_size=1152,
                             intermediate_size=4304, patch_size=14, image_size=384,
                             num_hidden_layers=26, num_attention_heads=16,
                             vision_use_head=False),
                        "qwen2",
                        dict(image_token_index=151646, vision_feature_layer=-1,
                             vision_feature_select_strategy="full")),
}
VISION_TYPES = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
TEXT_TYPES = {"llama": "llama", "qwen2": "qwen2"}
# HF activation name -> ours (and back, for export).
ACT_FROM_HF = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_new": "gelu_tanh"}
ACT_TO_HF = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh",
             "gelu_pytorch_tanh": "gelu_pytorch_tanh"}


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _with_defaults(d: Mapping[str, Any] | None, fallback: Mapping[str, Any]) -> dict[str, Any]:
    d = dict(fallback if d is None else d)
    mt = d.get("model_type")
    if mt not in HF_DEFAULTS:
        raise ValueError(f"unsupported sub-model type {mt!r}; supported: {sorted(HF_DEFAULTS)}")
    return {**HF_DEFAULTS[mt], **{k: v for k, v in d.items() if v is not None}}


def _act(name: str, where: str) -> str:
    try:
        return ACT_FROM_HF[name]
    except KeyError:
        raise ValueError(f"{where}: unsupported activation {name!r}; "
                         f"supported: {sorted(ACT_FROM_HF)}") from None


def _rope_theta(t: Mapping[str, Any]) -> float:
    """RoPE theta from `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling`."""
    params = t.get("rope_parameters")
    scaling = t.get("rope_scaling")
    if params is not None:
        if "rope_theta" not in params and any(isinstance(v, dict) for v in params.values()):
            raise ValueError(f"text_config: per-layer-type rope_parameters are not supported: "
                             f"{params}")
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            raise ValueError(f"text_config: RoPE type {kind!r} is not supported (only default)")
        return float(params.get("rope_theta", t["rope_theta"]))
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind != "default":
            raise ValueError(f"text_config: rope_scaling {kind!r} is not supported "
                             f"(only default)")
    return float(t["rope_theta"])


def config_from_hf(path_or_dict: str | os.PathLike | Mapping[str, Any], **overrides
                   ) -> LlavaConfig:
    """A transformers LLaVA / LLaVA-OneVision `config.json` (dir, file or dict) -> LlavaConfig.

    `overrides` are LlavaConfig fields that do not come from the checkpoint (dtype,
    param_dtype, scan_layers, remat_policy, attention_impl).
    """
    if isinstance(path_or_dict, Mapping):
        hf = dict(path_or_dict)
    else:
        p = os.fspath(path_or_dict)
        p = os.path.join(p, "config.json") if os.path.isdir(p) else p
        if not os.path.exists(p):
            raise ValueError(f"no config.json at {p!r}: not a Hugging Face checkpoint directory")
        hf = _read_json(p)
    mt = hf.get("model_type")
    if mt not in MODEL_TYPES:
        raise ValueError(f"unsupported model_type {mt!r}; supported: {sorted(MODEL_TYPES)}")
    _, vision_default, text_type, top_defaults = MODEL_TYPES[mt]
    top = {**top_defaults, **{k: v for k, v in hf.items() if v is not None}}

    layer = top["vision_feature_layer"]
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer={layer!r}: only a single feature layer is "
                         f"supported (not a list of layers)")
    strategy = top["vision_feature_select_strategy"]
    if strategy not in ("default", "full"):
        raise ValueError(f"vision_feature_select_strategy {strategy!r} not supported")
    if not top.get("multimodal_projector_bias", True):
        raise ValueError("multimodal_projector_bias=False is not supported")
    image_token = top.get("image_token_id", top.get("image_token_index"))

    v = _with_defaults(hf.get("vision_config"), vision_default)
    vkind = VISION_TYPES.get(v["model_type"])
    if vkind is None:
        raise ValueError(f"vision_config.model_type {v['model_type']!r} not supported; "
                         f"supported: {sorted(VISION_TYPES)}")
    if v.get("num_channels", 3) != 3:
        raise ValueError(f"vision_config.num_channels={v['num_channels']}: only 3 supported")
    if vkind == "siglip" and v.get("vision_use_head"):
        raise ValueError("vision_config.vision_use_head=True: the SigLIP pooling head is not "
                         "supported (LLaVA never uses it; OneVision checkpoints set it False)")
    vision = VisionConfig(
        kind=vkind, image_size=int(v["image_size"]), patch_size=int(v["patch_size"]),
        hidden_size=int(v["hidden_size"]), intermediate_size=int(v["intermediate_size"]),
        num_layers=int(v["num_hidden_layers"]), num_heads=int(v["num_attention_heads"]),
        layer_norm_eps=float(v["layer_norm_eps"]), act=_act(v["hidden_act"], "vision_config"),
        feature_layer=int(layer), select_strategy=strategy)

    t = _with_defaults(hf.get("text_config"), {"model_type": text_type})
    tkind = TEXT_TYPES.get(t["model_type"])
    if tkind is None:
        raise ValueError(f"text_config.model_type {t['model_type']!r} not supported; "
                         f"supported: {sorted(TEXT_TYPES)}")
    if t["hidden_act"] != "silu":
        raise ValueError(f"text_config.hidden_act={t['hidden_act']!r}: only silu supported")
    if t.get("attention_bias") or t.get("mlp_bias"):
        raise ValueError("text_config: LLaMA attention_bias / mlp_bias are not supported")
    if t.get("use_sliding_window"):
        raise ValueError("text_config.use_sliding_window=True is not supported")
    heads = int(t["num_attention_heads"])
    kv = t.get("num_key_value_heads")
    text = TextConfig(
        kind=tkind, vocab_size=int(t["vocab_size"]), hidden_size=int(t["hidden_size"]),
        intermediate_size=int(t["intermediate_size"]), num_layers=int(t["num_hidden_layers"]),
        num_heads=heads, num_kv_heads=int(heads if kv is None else kv),
        head_dim=int(t.get("head_dim") or int(t["hidden_size"]) // heads),
        rope_theta=_rope_theta(t), rms_norm_eps=float(t["rms_norm_eps"]),
        qkv_bias=tkind == "qwen2",
        tie_word_embeddings=bool(top.get("tie_word_embeddings") or t["tie_word_embeddings"]),
        max_position_embeddings=int(t["max_position_embeddings"]))
    return LlavaConfig(vision=vision, text=text, image_token_id=int(image_token),
                       projector_act=_act(top.get("projector_hidden_act", "gelu"), "projector"),
                       image_newline=mt == "llava_onevision", **overrides)


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def check_config(given: LlavaConfig, from_ckpt: LlavaConfig) -> None:
    """`ValueError` listing every architecture field where `given` and the checkpoint differ."""
    a, b = _flat(given.architecture_dict()), _flat(from_ckpt.architecture_dict())
    diffs = [f"  {k}: given {a.get(k)!r}, checkpoint {b.get(k)!r}"
             for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if diffs:
        raise ValueError("config does not match the checkpoint:\n" + "\n".join(diffs))


def hf_config_dict(cfg: LlavaConfig, dtype: Any = None) -> dict[str, Any]:
    """A transformers config.json dict for `cfg` (LlavaConfig or LlavaOnevisionConfig)."""
    v, t = cfg.vision, cfg.text
    dname = str(np.dtype(cfg.weight_dtype if dtype is None else dtype))
    if v.kind == "clip":
        vision = dict(model_type="clip_vision_model", hidden_act=ACT_TO_HF[v.act])
    else:
        vision = dict(model_type="siglip_vision_model", hidden_act=ACT_TO_HF[v.act],
                      vision_use_head=False)
    vision.update(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                  num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
                  image_size=v.image_size, patch_size=v.patch_size, num_channels=3,
                  layer_norm_eps=v.layer_norm_eps)
    text = dict(model_type=t.kind, vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers,
                num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
                head_dim=t.head_dim, hidden_act="silu", rms_norm_eps=t.rms_norm_eps,
                max_position_embeddings=t.max_position_embeddings,
                rope_theta=t.rope_theta,
                rope_parameters=dict(rope_type="default", rope_theta=t.rope_theta),
                tie_word_embeddings=t.tie_word_embeddings)
    if t.kind == "llama":
        text.update(attention_bias=False, mlp_bias=False)
    else:
        text.update(use_sliding_window=False)
    if cfg.image_newline:
        model_type, arch = "llava_onevision", MODEL_TYPES["llava_onevision"][0]
    else:
        model_type, arch = "llava", MODEL_TYPES["llava"][0]
    out = dict(architectures=[arch], model_type=model_type, image_token_index=cfg.image_token_id,
               projector_hidden_act=ACT_TO_HF[cfg.projector_act],
               vision_feature_layer=v.feature_layer,
               vision_feature_select_strategy=v.select_strategy, multimodal_projector_bias=True,
               tie_word_embeddings=t.tie_word_embeddings, dtype=dname, torch_dtype=dname,
               vision_config=vision, text_config=text)
    if model_type == "llava":
        out["image_seq_length"] = v.num_vision_tokens
    return out


# ----------------------------------------------------------------------------- safetensors IO

ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
             "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
             "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class SafetensorsFile:
    """Lazy reader of one .safetensors file: the JSON header, tensors as memory-map views."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError(f"{path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", raw)
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        self.header = header
        self.data_start = 8 + n
        self._mm = None

    def keys(self):
        return self.header.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.header[key]["shape"])

    def dtype(self, key: str) -> np.dtype:
        name = self.header[key]["dtype"]
        if name not in ST_DTYPES:
            raise ValueError(f"{self.path}: {key} has unsupported dtype {name}")
        return np.dtype(ST_DTYPES[name])

    def get(self, key: str) -> np.ndarray:
        """A read-only memory-mapped view of tensor `key`."""
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        h = self.header[key]
        begin, end = h["data_offsets"]
        dt, shape = self.dtype(key), self.shape(key)
        if end - begin != int(np.prod(shape, dtype=np.int64)) * dt.itemsize:
            raise ValueError(f"{self.path}: {key} byte size does not match shape {shape}")
        buf = self._mm[self.data_start + begin:self.data_start + end]
        return buf.view(dt).reshape(shape)

    def close(self):
        self._mm = None


class Checkpoint:
    """All tensors of a (possibly sharded) safetensors checkpoint directory, by key."""

    def __init__(self, path: str):
        path = os.fspath(path)
        single, index = os.path.join(path, SINGLE_FILE), os.path.join(path, INDEX_FILE)
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, SafetensorsFile] = {}
        if os.path.exists(index):
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: no weight_map")
            missing = sorted({f for f in weight_map.values()
                              if not os.path.exists(os.path.join(path, f))})
            if missing:
                raise ValueError(f"incomplete checkpoint {path!r}: shard files listed in "
                                 f"{INDEX_FILE} are missing: {missing}")
            for fname in sorted(set(weight_map.values())):
                self.files[fname] = SafetensorsFile(os.path.join(path, fname))
            for key, fname in weight_map.items():
                if key not in self.files[fname].header:
                    raise ValueError(f"{INDEX_FILE} puts {key!r} in {fname}, which lacks it")
                self.where[key] = self.files[fname]
            for fname, f in self.files.items():  # keys a shard holds beyond the index
                for key in f.keys():
                    self.where.setdefault(key, f)
        elif os.path.exists(single):
            f = SafetensorsFile(single)
            self.files[SINGLE_FILE] = f
            self.where = {k: f for k in f.keys()}
        else:
            raise ValueError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path!r}")

    def keys(self) -> list[str]:
        return list(self.where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.where[key].shape(key)

    def dtype(self, key: str) -> np.dtype:
        return self.where[key].dtype(key)

    def get(self, key: str) -> np.ndarray:
        return self.where[key].get(key)

    def close(self):
        for f in self.files.values():
            f.close()


def _listing(keys) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - MAX_LISTED} more" if len(keys) > MAX_LISTED else ""
    return ", ".join(keys[:MAX_LISTED]) + more


# ----------------------------------------------------------------------------- load


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


def load_llava(path: str | os.PathLike, *, cfg: LlavaConfig | None = None, mesh=None,
               rules=None, dtype: Any = None) -> tuple[LlavaConfig, dict]:
    """Load a Hugging Face LLaVA / LLaVA-OneVision checkpoint directory.

    cfg: the config to run with (its architecture must match the checkpoint's config.json;
    None: taken from config.json). mesh / rules: shard every leaf by its logical axis names
    (`covipal_jax.sharding.logical_shardings`); rules default to
    `covipal_jax.sharding.LOGICAL_AXIS_RULES`. No mesh: the first local device.
    dtype: parameter dtype (default `cfg.param_dtype`; with no cfg, float32 for both the
    parameter and the compute dtype unless given).
    Returns (cfg, params) with params `{"params": ...}` of plain arrays, ready for
    `Llava(cfg).apply`.
    """
    path = os.fspath(path)
    ckpt_cfg = config_from_hf(path)
    if cfg is None:
        cfg = ckpt_cfg if dtype is None else ckpt_cfg.replace(dtype=dtype, param_dtype=dtype)
    else:
        check_config(cfg, ckpt_cfg)
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


# ----------------------------------------------------------------------------- export


def _to_host(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def export_llava(params, cfg: LlavaConfig, out_dir: str | os.PathLike, layout: str = "hub",
                 *, dtype: Any = None, max_shard_bytes: int = 5 * 2**30) -> str:
    """Write `params` as a Hugging Face checkpoint directory (config.json + safetensors).

    params: `{"params": ...}` or the inner tree, boxed or not, possibly sharded. layout: a
    `keymap.LAYOUTS` name (`hub` is what transformers and the Hub use). dtype: tensor dtype
    (default: each leaf's). Beyond `max_shard_bytes` the tensors are split into
    `model-XXXXX-of-YYYYY.safetensors` + `model.safetensors.index.json`; host memory holds at
    most one shard plus one leaf. With several processes every process must call this (leaves
    are gathered collectively); process 0 writes. Returns out_dir.
    """
    from safetensors.numpy import save_file

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
    out_dir = os.fspath(out_dir)
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(out_dir, exist_ok=True)
        for name in os.listdir(out_dir):  # stale shards of an earlier export confuse loaders
            if name.endswith(".safetensors") or name == INDEX_FILE:
                os.remove(os.path.join(out_dir, name))

    shard: dict[str, np.ndarray] = {}
    written: list[tuple[str, list[str]]] = []  # (temporary file name, its keys)
    size = total = 0
    first_dtype = None

    def flush():
        nonlocal shard, size
        if shard:
            tmp = f"shard-{len(written):05d}.tmp.safetensors"
            save_file(shard, os.path.join(out_dir, tmp), metadata={"format": "pt"})
            written.append((tmp, list(shard)))
        shard, size = {}, 0

    for e in entries:
        host = _to_host(flat[e.path])  # collective under multi-process: every process calls
        if not writer:
            continue
        if dtype is not None:
            host = host.astype(dtype)
        if first_dtype is None:
            first_dtype = host.dtype
        tr = keymap.TRANSFORMS[e.transform]
        parts = ([(e.hf_key(lay, i), host[i]) for i in range(host.shape[0])] if e.stacked
                 else [(e.hf_key(lay), host)])
        for key, x in parts:
            y = np.ascontiguousarray(tr.to_hf(x))
            if size and size + y.nbytes > max_shard_bytes:
                flush()
            shard[key] = y
            size += y.nbytes
            total += y.nbytes
        del host, parts
    if not writer:
        return out_dir
    flush()

    if len(written) == 1:
        os.replace(os.path.join(out_dir, written[0][0]), os.path.join(out_dir, SINGLE_FILE))
    else:
        n = len(written)
        weight_map = {}
        for j, (tmp, keys) in enumerate(written):
            fname = f"model-{j + 1:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(out_dir, tmp), os.path.join(out_dir, fname))
            weight_map.update({k: fname for k in keys})
        with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config_dict(cfg, first_dtype if dtype is None else dtype), f, indent=2)
    return out_dir


__all__ = ["config_from_hf", "check_config", "hf_config_dict", "load_llava", "export_llava",
           "abstract_params", "Checkpoint", "SafetensorsFile", "HF_DEFAULTS"]
