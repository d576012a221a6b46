"""Hugging Face LLaVA `config.json` <-> `LlavaConfig`, and the one check that they agree.

- `config_from_hf(path_or_dict)`: a transformers `llava` / `llava_next` / `llava_onevision`
  config (CLIP or SigLIP tower, LLaMA or Qwen2 decoder) -> `LlavaConfig`. Fields a config.json
  leaves out take transformers' defaults for that model type (`HF_DEFAULTS`). What we cannot
  run (several feature layers, RoPE scaling, projector without bias, the SigLIP pooling head,
  sliding windows, biased LLaMA attention/MLP) raises `ValueError`. The path may be local or
  `gs://`.
- `computation_dict(cfg)`: every field that changes what the model computes (shapes, eps,
  RoPE theta, activations, feature layer, select strategy, biases, tying, image token...):
  everything but the runtime choices in `RUNTIME_FIELDS` and the input packing in
  `INPUT_FIELDS`.
- `check_config(given, from_ckpt)`: `ValueError` listing every such field that differs.
- `resolve_config(given, from_ckpt)`: THE rule every entry point uses (the HF loader and
  `inference.loading.model_config`): the checkpoint's config, with the given runtime choices.
- `hf_config_dict(cfg)`: the inverse, the config.json `export_llava` writes.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

from covipal_jax import paths
from covipal_jax.models.config import LlavaConfig, TextConfig, VisionConfig

CONFIG_FILE = "config.json"
# LlavaConfig fields that choose how (not what) the model computes: never checked.
RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat_policy", "attention_impl",
                  "attention", "decoder_kernels")
# How images and videos are packed into the sequence (AnyRes tiling, `anyres_max_N`, the video
# placeholder): read from config.json (`models.anyres.hf_fields`) when no config is given, else
# the given config's choice (e.g. `configs/llava_ov_7b.py:anyres=0`, one base crop). Not part
# of the base model: never checked, not in a PPM's base-model fingerprint.
INPUT_FIELDS = ("image_grid_pinpoints", "anyres_max_crops", "video_token_id")

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
    "llava_next": ("LlavaNextForConditionalGeneration",  # LLaVA-1.6: CLIP-L/14-336 + AnyRes
                   dict(model_type="clip_vision_model", intermediate_size=4096, hidden_size=1024,
                        patch_size=14, image_size=336, num_hidden_layers=24,
                        num_attention_heads=16),
                   "llama",
                   dict(image_token_index=32000, vision_feature_layer=-2,
                        vision_feature_select_strategy="default")),
}
VISION_TYPES = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
TEXT_TYPES = {"llama": "llama", "qwen2": "qwen2"}
# HF activation name -> ours (and back, for export).
ACT_FROM_HF = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_new": "gelu_tanh"}
ACT_TO_HF = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh",
             "gelu_pytorch_tanh": "gelu_pytorch_tanh"}


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


def read_hf_config(path: paths.PathLike) -> dict[str, Any]:
    """The config.json dict of a checkpoint directory (or the file itself), local or remote."""
    p = paths.as_path(path)
    with paths.user_path_errors(p, "checkpoint"):
        if not p.exists():
            raise FileNotFoundError(f"checkpoint directory '{p}' does not exist")
        if p.is_dir():
            p = p / CONFIG_FILE
            if not p.exists():
                raise ValueError(f"no {CONFIG_FILE} in '{p.parent}': not a Hugging Face "
                                 f"checkpoint directory")
        hf = paths.read_json(p)
    if not isinstance(hf, dict):
        raise ValueError(f"{p}: expected a JSON object, got {type(hf).__name__}")
    return hf


def config_from_hf(path_or_dict: paths.PathLike | Mapping[str, Any], **overrides
                   ) -> LlavaConfig:
    """A transformers LLaVA / LLaVA-OneVision `config.json` (dir, file or dict) -> LlavaConfig.

    `overrides` are LlavaConfig fields that do not come from the checkpoint (dtype,
    param_dtype, scan_layers, remat_policy, attention_impl).
    """
    hf = dict(path_or_dict) if isinstance(path_or_dict, Mapping) else read_hf_config(
        path_or_dict)
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
    from covipal_jax.models import anyres  # numpy / jax only

    fields = anyres.hf_fields(hf)  # image_newline (a weight) and the packing
    packing = {k: v for k, v in fields.items() if k in INPUT_FIELDS}
    return LlavaConfig(vision=vision, text=text, image_token_id=int(image_token), **packing,
                       projector_act=_act(top.get("projector_hidden_act", "gelu"), "projector"),
                       image_newline=bool(fields["image_newline"]), **overrides)


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def computation_dict(cfg: LlavaConfig) -> dict[str, Any]:
    """Every field of `cfg` that changes the model's computation (all but `RUNTIME_FIELDS`
    and `INPUT_FIELDS`), flat:
    {"vision.layer_norm_eps": 1e-05, "text.rope_theta": 10000.0, "image_token_id": 32000, ...}.
    """
    d = dataclasses.asdict(cfg)
    for k in RUNTIME_FIELDS + INPUT_FIELDS:
        d.pop(k, None)
    return _flat(d)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:  # 1e-5 written as 1e-05 or parsed through float32 is still 1e-5
            return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=0.0)
        except (TypeError, ValueError):
            return False
    return a == b


def config_diffs(a: LlavaConfig, b: LlavaConfig) -> list[tuple[str, Any, Any]]:
    """(field, a's value, b's value) for every computation field where they differ."""
    fa, fb = computation_dict(a), computation_dict(b)
    return [(k, fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb))
            if not _same(fa.get(k), fb.get(k))]


def check_config(given: LlavaConfig, from_ckpt: LlavaConfig, *,
                 what: str = "checkpoint") -> None:
    """`ValueError` listing every field that changes the computation where `given` and the
    checkpoint's config.json differ (shapes, eps, RoPE, activations, feature layer, ...)."""
    diffs = config_diffs(given, from_ckpt)
    if diffs:
        lines = [f"  {k}: given {a!r}, {what} {b!r}" for k, a, b in diffs]
        raise ValueError(f"config does not match the {what} ({len(diffs)} fields differ; drop "
                         f"them from config.model to use the {what}'s values):\n"
                         + "\n".join(lines))


def resolve_config(given: LlavaConfig | None, from_ckpt: LlavaConfig) -> LlavaConfig:
    """The config to run a checkpoint with: its config.json, checked against `given` (every
    computation field must agree), with `given`'s runtime choices and input packing
    (`RUNTIME_FIELDS`, `INPUT_FIELDS`)."""
    if given is None:
        return from_ckpt
    check_config(given, from_ckpt)
    return from_ckpt.replace(**{k: getattr(given, k) for k in RUNTIME_FIELDS + INPUT_FIELDS})


def export_model_type(cfg: LlavaConfig) -> str:
    """The transformers model_type a config exports as: "llava" without `image_newline`;
    "llava_next" for a CLIP tower with AnyRes tiling but no `anyres_max_N` downsampling and no
    video placeholder (LLaVA-1.6); else "llava_onevision"."""
    if not cfg.image_newline:
        return "llava"
    if cfg.vision.kind == "clip" and cfg.anyres_max_crops == 0 and cfg.video_token_id < 0:
        return "llava_next"
    return "llava_onevision"


def hf_config_dict(cfg: LlavaConfig, dtype: Any = None) -> dict[str, Any]:
    """A transformers config.json dict for `cfg` (LlavaConfig, LlavaNextConfig or
    LlavaOnevisionConfig: `export_model_type`)."""
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
    model_type = export_model_type(cfg)
    arch = MODEL_TYPES[model_type][0]
    out = dict(architectures=[arch], model_type=model_type, image_token_index=cfg.image_token_id,
               projector_hidden_act=ACT_TO_HF[cfg.projector_act],
               vision_feature_layer=v.feature_layer,
               vision_feature_select_strategy=v.select_strategy, multimodal_projector_bias=True,
               tie_word_embeddings=t.tie_word_embeddings, dtype=dname, torch_dtype=dname,
               vision_config=vision, text_config=text)
    if model_type in ("llava", "llava_next"):
        out["image_seq_length"] = v.num_vision_tokens
    if model_type == "llava_next":  # AnyRes tiling, no downsampling, no video
        if cfg.image_grid_pinpoints:
            out["image_grid_pinpoints"] = [list(p) for p in cfg.image_grid_pinpoints]
    elif model_type == "llava_onevision":  # AnyRes tiling, anyres_max_N, the video token
        if cfg.image_grid_pinpoints:
            out["image_grid_pinpoints"] = [list(p) for p in cfg.image_grid_pinpoints]
        out["vision_aspect_ratio"] = (f"anyres_max_{cfg.anyres_max_crops}"
                                      if cfg.anyres_max_crops else "anyres")
        if cfg.video_token_id >= 0:
            out["video_token_index"] = cfg.video_token_id
    return out


__all__ = ["HF_DEFAULTS", "INPUT_FIELDS", "MODEL_TYPES", "RUNTIME_FIELDS", "check_config",
           "computation_dict", "config_diffs", "config_from_hf", "export_model_type",
           "hf_config_dict", "read_hf_config", "resolve_config"]
