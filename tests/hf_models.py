"""Tiny random Hugging Face LLaVA models for tests, with matching covipal configs and inputs.

Two families, both small but non-trivial (several layers, several heads, patches, RoPE):
- `build_llava`: CLIP ViT (CLS, pre-LN, quick_gelu, feature layer -2, "default") + LLaMA,
  `LlavaForConditionalGeneration`, untied LM head.
- `build_onevision`: SigLIP (conv bias, no CLS, gelu-tanh, feature layer -1, "full") + Qwen2
  (q/k/v biases, GQA 4 heads / 2 kv heads, tied embeddings),
  `LlavaOnevisionForConditionalGeneration`.

Every parameter is re-drawn (`randomize_`) so that norm scales, biases and embeddings are far
from their trivial initial values and activations are O(1): parity then really tests them.
Models are saved with `save_pretrained` (transformers 5.x layout) to a directory; nothing is
ever downloaded. `make_batch` builds left-padded prompts of different lengths with one image
placeholder each, plus the expanded sequence HF is fed; `hf_*` run the HF reference.
"""
from __future__ import annotations

import atexit
import dataclasses
import functools
import math
import os
import shutil
import tempfile

import numpy as np
import torch

from covipal_jax.models.config import LlavaConfig, TextConfig, VisionConfig

PAD_ID = 0
LLAVA_IMAGE_TOKEN = 257
OV_IMAGE_TOKEN = 290
VOCAB = 300


@dataclasses.dataclass
class TinyHF:
    path: str                 # the save_pretrained directory
    model: torch.nn.Module    # the HF model (eval mode, float32)
    cfg: LlavaConfig          # the matching covipal config (written by hand, not converted)
    hf_config: dict           # the config dict the HF model was built from


# ----------------------------------------------------------------------------- configs


def llava_hf_config(tie: bool = False) -> dict:
    vision = dict(model_type="clip_vision_model", hidden_size=48, intermediate_size=96,
                  num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8,
                  layer_norm_eps=1e-5, hidden_act="quick_gelu", projection_dim=32)
    text = dict(model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=160,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=256,
                rope_parameters=dict(rope_type="default", rope_theta=10000.0),
                tie_word_embeddings=tie, pad_token_id=PAD_ID)
    return dict(model_type="llava", vision_config=vision, text_config=text,
                image_token_index=LLAVA_IMAGE_TOKEN, vision_feature_layer=-2,
                vision_feature_select_strategy="default", projector_hidden_act="gelu",
                image_seq_length=16, tie_word_embeddings=tie)


def llava_cfg(tie: bool = False) -> LlavaConfig:
    return LlavaConfig(
        vision=VisionConfig(kind="clip", image_size=32, patch_size=8, hidden_size=48,
                            intermediate_size=96, num_layers=3, num_heads=4,
                            layer_norm_eps=1e-5, act="quick_gelu", feature_layer=-2,
                            select_strategy="default"),
        text=TextConfig(kind="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=160,
                        num_layers=3, num_heads=4, num_kv_heads=4, head_dim=16,
                        rope_theta=10000.0, rms_norm_eps=1e-5, qkv_bias=False,
                        tie_word_embeddings=tie, max_position_embeddings=256),
        image_token_id=LLAVA_IMAGE_TOKEN, projector_act="gelu", image_newline=False)


def onevision_hf_config(tie: bool = True) -> dict:
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=7,
                  layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh", vision_use_head=False)
    text = dict(model_type="qwen2", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                rms_norm_eps=1e-6, max_position_embeddings=512,
                rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
                tie_word_embeddings=tie, use_sliding_window=False, pad_token_id=PAD_ID)
    return dict(model_type="llava_onevision", vision_config=vision, text_config=text,
                image_token_index=OV_IMAGE_TOKEN, video_token_index=291,
                vision_feature_layer=-1, vision_feature_select_strategy="full",
                projector_hidden_act="gelu", tie_word_embeddings=tie,
                image_grid_pinpoints=[[28, 28], [28, 56], [56, 28], [56, 56]])


def onevision_cfg(tie: bool = True) -> LlavaConfig:
    return LlavaConfig(
        vision=VisionConfig(kind="siglip", image_size=28, patch_size=7, hidden_size=32,
                            intermediate_size=64, num_layers=2, num_heads=4,
                            layer_norm_eps=1e-6, act="gelu_tanh", feature_layer=-1,
                            select_strategy="full"),
        text=TextConfig(kind="qwen2", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                        num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16,
                        rope_theta=1000000.0, rms_norm_eps=1e-6, qkv_bias=True,
                        tie_word_embeddings=tie, max_position_embeddings=512),
        image_token_id=OV_IMAGE_TOKEN, projector_act="gelu", image_newline=True)


# ----------------------------------------------------------------------------- builders


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Re-draw every parameter: matrices ~ N(0, 1/fan_in), norm scales 1 + N(0, 0.1^2),
    biases N(0, 0.1^2), embeddings / CLS / image_newline N(0, 0.5^2)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        lname = name.lower()
        if p.ndim == 1 and ("norm" in lname or "layrnorm" in lname):
            new = 1.0 + 0.1 * noise
        elif "embed_tokens" in lname or "position_embedding" in lname \
                or "class_embedding" in lname or "image_newline" in lname:
            new = 0.5 * noise
        elif p.ndim == 1:
            new = 0.1 * noise
        else:
            fan_in = math.prod(p.shape[1:])
            new = noise / math.sqrt(fan_in)
        p.copy_(new.to(p.dtype))


def _build(cls_name: str, hf_config: dict, out_dir: str, seed: int) -> torch.nn.Module:
    import transformers

    config_cls = {"LlavaForConditionalGeneration": transformers.LlavaConfig,
                  "LlavaOnevisionForConditionalGeneration": transformers.LlavaOnevisionConfig}
    cfg = config_cls[cls_name](**hf_config)
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(cfg).float().eval()
    randomize_(model, seed)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    return model


def build_llava(out_dir: str | os.PathLike, seed: int = 0, tie: bool = False) -> TinyHF:
    """CLIP + LLaMA `LlavaForConditionalGeneration`, saved to `out_dir`."""
    hc = llava_hf_config(tie)
    model = _build("LlavaForConditionalGeneration", hc, os.fspath(out_dir), seed)
    return TinyHF(os.fspath(out_dir), model, llava_cfg(tie), hc)


def build_onevision(out_dir: str | os.PathLike, seed: int = 1, tie: bool = True) -> TinyHF:
    """SigLIP + Qwen2 `LlavaOnevisionForConditionalGeneration`, saved to `out_dir`."""
    hc = onevision_hf_config(tie)
    model = _build("LlavaOnevisionForConditionalGeneration", hc, os.fspath(out_dir), seed)
    return TinyHF(os.fspath(out_dir), model, onevision_cfg(tie), hc)


_SHARED_ROOT: list[str] = []


def _shared_dir(name: str) -> str:
    if not _SHARED_ROOT:
        root = tempfile.mkdtemp(prefix="covipal_hf_models_")
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        _SHARED_ROOT.append(root)
    return os.path.join(_SHARED_ROOT[0], name)


@functools.lru_cache(maxsize=None)
def shared_llava() -> TinyHF:
    """`build_llava()` once per process (a temp dir removed at exit). Treat as read-only."""
    return build_llava(_shared_dir("llava"))


@functools.lru_cache(maxsize=None)
def shared_onevision() -> TinyHF:
    """`build_onevision()` once per process (a temp dir removed at exit). Treat as read-only."""
    return build_onevision(_shared_dir("onevision"))


def load_hf(path: str, attn_implementation: str = "eager") -> torch.nn.Module:
    """Reload a saved tiny model with transformers (class from its config.json)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    cls = getattr(transformers, config.architectures[0])
    return cls.from_pretrained(path, attn_implementation=attn_implementation,
                               dtype=torch.float32).eval()


# ----------------------------------------------------------------------------- inputs


@dataclasses.dataclass
class Batch:
    pixels: np.ndarray       # f32[B, H, W, 3] (ours, NHWC)
    ids: np.ndarray          # i32[B, T] left-padded, one placeholder per row
    mask: np.ndarray         # bool[B, T]
    hf_ids: np.ndarray       # i64[B, L] placeholder expanded to n_v image tokens
    hf_mask: np.ndarray      # i64[B, L]
    hf_positions: np.ndarray  # i64[B, L] (cumsum(mask) - 1).clamp(min=0)

    @property
    def pixels_nchw(self) -> np.ndarray:
        return np.ascontiguousarray(self.pixels.transpose(0, 3, 1, 2))


def make_batch(cfg: LlavaConfig, lengths=(9, 5), seed: int = 0, extra_pad: int = 1) -> Batch:
    """Prompts of the given real lengths (placeholder included), left-padded to
    `max(lengths) + extra_pad`; the placeholder sits at a different offset in each row."""
    rng = np.random.default_rng(seed)
    b, t, n_v = len(lengths), max(lengths) + extra_pad, cfg.num_vision_tokens
    img = cfg.image_token_id
    ids = np.full((b, t), PAD_ID, np.int32)
    mask = np.zeros((b, t), bool)
    for r, n in enumerate(lengths):
        toks = rng.integers(1, cfg.text.vocab_size, size=n)
        toks = np.where(toks == img, img - 1, toks)
        toks[min(1 + r, n - 1)] = img
        ids[r, t - n:] = toks
        mask[r, t - n:] = True
    hf_ids, hf_mask = [], []
    for r in range(b):
        row_ids, row_mask = [], []
        for tok, m in zip(ids[r], mask[r]):
            k = n_v if tok == img else 1
            row_ids += [int(tok)] * k
            row_mask += [int(m)] * k
        hf_ids.append(row_ids)
        hf_mask.append(row_mask)
    hf_ids, hf_mask = np.asarray(hf_ids, np.int64), np.asarray(hf_mask, np.int64)
    pos = np.maximum(np.cumsum(hf_mask, axis=-1) - 1, 0)
    v = cfg.vision
    pixels = rng.standard_normal((b, v.image_size, v.image_size, 3)).astype(np.float32)
    return Batch(pixels, ids, mask, hf_ids, hf_mask, pos)


# ----------------------------------------------------------------------------- HF reference


def _inner(model):
    return model.model  # LlavaModel / LlavaOnevisionModel in transformers 5


@torch.no_grad()
def hf_vision_features(model, pixels_nchw: np.ndarray, feature_layer: int,
                       strategy: str) -> np.ndarray:
    """HF `vision_tower(...).hidden_states[feature_layer]`, CLS dropped for "default"."""
    out = _inner(model).vision_tower(torch.from_numpy(pixels_nchw), output_hidden_states=True)
    h = out.hidden_states[feature_layer]
    if strategy == "default":
        h = h[:, 1:]
    return h.numpy()


@torch.no_grad()
def hf_project(model, features: np.ndarray) -> np.ndarray:
    return _inner(model).multi_modal_projector(torch.from_numpy(features)).numpy()


@torch.no_grad()
def hf_llava_logits(model, batch: Batch) -> np.ndarray:
    """The full HF LLaVA forward: f32[B, L, V]."""
    out = model(input_ids=torch.from_numpy(batch.hf_ids),
                pixel_values=torch.from_numpy(batch.pixels_nchw),
                attention_mask=torch.from_numpy(batch.hf_mask),
                position_ids=torch.from_numpy(batch.hf_positions))
    return out.logits.numpy()


@torch.no_grad()
def hf_spliced_logits(model, batch: Batch, cfg: LlavaConfig) -> np.ndarray:
    """HF's pieces with a single base-resolution crop: tower -> projector -> spliced into HF's
    text embeddings at the placeholder -> HF language model -> lm_head. f32[B, L, V].

    (LLaVA-OneVision's own forward packs multi-crop "anyres" features with image_newline; this
    is the single-crop path covipal runs, built only from HF modules.)
    """
    inner = _inner(model)
    feats = hf_vision_features(model, batch.pixels_nchw, cfg.vision.feature_layer,
                               cfg.vision.select_strategy)
    proj = inner.multi_modal_projector(torch.from_numpy(feats))
    ids = torch.from_numpy(batch.hf_ids)
    emb = model.get_input_embeddings()(ids)
    is_img = (ids == cfg.image_token_id)[..., None]
    emb = emb.masked_scatter(is_img, proj.reshape(-1, proj.shape[-1]).to(emb.dtype))
    h = inner.language_model(inputs_embeds=emb, attention_mask=torch.from_numpy(batch.hf_mask),
                             position_ids=torch.from_numpy(batch.hf_positions)).last_hidden_state
    return model.lm_head(h).numpy()
