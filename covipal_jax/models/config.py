"""Model configuration: frozen dataclasses for the vision tower, the decoder and LLaVA.

They are built from an ml-collections `config.model` (see `configs/`) with `from_config`, or
from a Hugging Face checkpoint's `config.json` with `from_hf` (see `covipal_jax.weights.hf`).
Everything that decides a shape lives here, so `jax.jit` signatures follow from the config.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

VISION_KINDS = ("clip", "siglip")
TEXT_KINDS = ("llama", "qwen2")


def _dtype(name: str | Any) -> Any:
    return jnp.dtype(name) if isinstance(name, str) else name


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """A CLIP or SigLIP ViT, as used by LLaVA-1.5 and LLaVA-OneVision."""

    kind: str = "clip"  # "clip": CLS token, pre-LN, quick_gelu; "siglip": no CLS, gelu-tanh
    image_size: int = 336
    patch_size: int = 14
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    layer_norm_eps: float = 1e-5
    act: str = "quick_gelu"  # "quick_gelu" | "gelu_tanh" | "gelu"
    # LLaVA's `vision_feature_layer` as an index into HF's `hidden_states` tuple
    # (0 = embeddings, i = output of layer i, negative from the end).
    feature_layer: int = -2
    # LLaVA's `vision_feature_select_strategy`: "default" drops the CLS token, "full" keeps all.
    select_strategy: str = "default"

    def __post_init__(self):
        if self.kind not in VISION_KINDS:
            raise ValueError(f"vision.kind must be one of {VISION_KINDS}, got {self.kind!r}")
        if self.image_size < self.patch_size:
            raise ValueError("vision.image_size must be at least vision.patch_size")
        if self.hidden_size % self.num_heads:
            raise ValueError("vision.hidden_size must be a multiple of vision.num_heads")
        if not 0 < self.num_run_layers <= self.num_layers:
            raise ValueError(f"vision.feature_layer={self.feature_layer} out of range")

    @property
    def has_cls(self) -> bool:
        return self.kind == "clip"

    @property
    def grid(self) -> tuple[int, int]:
        g = self.image_size // self.patch_size  # VALID conv: SigLIP-384/14 gives 27 x 27
        return (g, g)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_positions(self) -> int:
        return self.num_patches + int(self.has_cls)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_run_layers(self) -> int:
        """How many encoder layers run to produce the selected hidden state."""
        f = self.feature_layer
        return f if f >= 0 else self.num_layers + 1 + f

    @property
    def num_vision_tokens(self) -> int:
        """n_v: tokens per image handed to the LLM (before pruning)."""
        drop_cls = self.has_cls and self.select_strategy == "default"
        return self.num_positions - int(drop_cls)


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """A LLaMA (Vicuna) or Qwen2 decoder."""

    kind: str = "llama"
    vocab_size: int = 32064
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    qkv_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096

    def __post_init__(self):
        if self.kind not in TEXT_KINDS:
            raise ValueError(f"text.kind must be one of {TEXT_KINDS}, got {self.kind!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("text.num_heads must be a multiple of text.num_kv_heads")


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    """The composite: vision tower + 2-layer GELU projector + decoder."""

    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    image_token_id: int = 32000
    projector_act: str = "gelu"
    # LLaVA-OneVision's learned `image_newline` (used by its multi-crop "anyres" packing; the
    # single base-resolution crop used here does not apply it, but checkpoints carry it).
    image_newline: bool = False
    # AnyRes (LLaVA-NeXT, LLaVA-OneVision; see models/anyres.py, data/anyres.py): the candidate
    # resolutions (height, width), multiples of vision.image_size; () = one base crop only.
    image_grid_pinpoints: tuple[tuple[int, int], ...] = ()
    # OneVision's `anyres_max_N`: N (downsample the unpadded crop map beyond ~N crops); 0: none.
    anyres_max_crops: int = 0
    video_token_id: int = -1  # OneVision's `<video>` placeholder (-1: no video)
    dtype: Any = "float32"  # activation / compute dtype
    param_dtype: Any = "float32"
    scan_layers: bool = True  # lax.scan over the stacked layers (else an unrolled loop)
    remat_policy: str = "none"  # "none" | a `jax.checkpoint_policies` name | "full"
    attention_impl: str = "xla"  # passed to jax.nn.dot_product_attention ("xla"|"cudnn"|None)
    # Attention backend: "auto" (by platform, shape and dtype: see models/attention.py) |
    # "xla" | "chunked" | "splash" | "cudnn". A non-default `attention_impl` ("cudnn" / None)
    # still applies while this is "auto".
    attention: str = "auto"
    # Decoder kernel layout: "in_out" ([*in, *out], checkpoints and training) | "out_in" (the
    # same parameters transposed, [*out, *in]: the CPU decode twin, `inference.decoding`).
    decoder_kernels: str = "in_out"

    def __post_init__(self):
        from covipal_jax.models.attention import IMPLS
        if self.attention not in IMPLS:
            raise ValueError(f"model.attention must be one of {IMPLS}, got {self.attention!r}")
        if self.decoder_kernels not in ("in_out", "out_in"):
            raise ValueError(f'model.decoder_kernels must be "in_out" | "out_in", got '
                             f'{self.decoder_kernels!r}')
        pins = tuple((int(h), int(w)) for h, w in self.image_grid_pinpoints)
        object.__setattr__(self, "image_grid_pinpoints", pins)  # hashable under jit
        s = self.vision.image_size
        if any(h % s or w % s for h, w in pins):
            raise ValueError(f"image_grid_pinpoints must be multiples of vision.image_size={s}")

    @property
    def compute_dtype(self):
        return _dtype(self.dtype)

    @property
    def weight_dtype(self):
        return _dtype(self.param_dtype)

    @property
    def num_vision_tokens(self) -> int:
        return self.vision.num_vision_tokens

    def replace(self, **kw) -> "LlavaConfig":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_config(cls, model: Mapping[str, Any]) -> "LlavaConfig":
        """From an ml-collections `config.model` (or any nested mapping)."""
        model = dict(model.to_dict() if hasattr(model, "to_dict") else model)
        vision = VisionConfig(**dict(model.pop("vision", {})))
        text = TextConfig(**dict(model.pop("text", {})))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(model) - known
        if unknown:
            raise ValueError(f"unknown config.model keys: {sorted(unknown)}")
        return cls(vision=vision, text=text, **model)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["dtype"] = str(jnp.dtype(self.dtype))
        d["param_dtype"] = str(jnp.dtype(self.param_dtype))
        return d

    def architecture_dict(self) -> dict[str, Any]:
        """The fields that decide parameter shapes (used to validate checkpoints)."""
        d = self.to_dict()
        for k in ("dtype", "param_dtype", "scan_layers", "remat_policy", "attention_impl",
                  "image_grid_pinpoints", "anyres_max_crops", "video_token_id",  # no params
                  "attention", "decoder_kernels"):   # (a layout of the same parameters)
            d.pop(k)
        d["vision"].pop("layer_norm_eps")
        d["text"].pop("rms_norm_eps")
        return d
