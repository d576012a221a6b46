"""The declarative map between our parameter tree and Hugging Face LLaVA checkpoint keys.

One `Entry` per parameter leaf: our flat path (under `params/`, e.g.
`language_model/layers/stack/q/kernel`), the HF key template relative to a *section* prefix
(e.g. `layers.{i}.self_attn.q_proj.weight` in the `text` section), and the name of a small
per-key transform. `{i}` marks a stacked leaf: HF layer `i` is row `i` of our leading `layers`
axis.

Section prefixes differ between checkpoint layouts (`LAYOUTS`):
- `hub` (llava-hf on the Hub): `language_model.model.*`, `language_model.lm_head.weight`,
  `vision_tower.vision_model.*`, `multi_modal_projector.*`, `image_newline`.
- `transformers5` (a 5.x model's in-memory `state_dict()`): `model.language_model.*`,
  `lm_head.weight`, `model.vision_tower.*`, `model.multi_modal_projector.*`,
  `model.image_newline`.
- `transformers5_saved` (what 5.24's `save_pretrained` writes): as `hub`, but
  `vision_tower.*` without `vision_model.`. `transformers5_saved_next`: the same with
  `model.image_newline`, which 5.24 writes for a LLaVA-NeXT whose `LlavaNextConfig` was built
  with a stray `model_type="llava"` (the hub's llava-v1.6-*-hf files: `hub`, bare
  `image_newline`).
- `transformers4` (a 4.5x model's `state_dict()`): as `transformers5`, but
  `model.vision_tower.vision_model.*`.

Transforms (`TRANSFORMS`) map one HF tensor to one per-layer leaf of our shape and back; the
target shape fixes head counts, so the map itself carries no sizes:
`identity`, `linear` (HF `[out, in]` -> `[in, out]`), `heads_in` (`[N*H, D]` -> `[D, N, H]`),
`heads_bias` (`[N*H]` -> `[N, H]`), `heads_out` (`[D, N*H]` -> `[N, H, D]`), `conv`
(OIHW -> HWIO).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import numpy as np

from covipal_jax.models.config import LlavaConfig

# ----------------------------------------------------------------------------- transforms


@dataclasses.dataclass(frozen=True)
class Transform:
    """HF tensor <-> our per-layer leaf, given our per-layer shape `s`."""

    hf_shape: Callable[[tuple[int, ...]], tuple[int, ...]]
    to_ours: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _prod(xs) -> int:
    return int(np.prod(xs, dtype=np.int64))


TRANSFORMS: dict[str, Transform] = {
    "identity": Transform(
        hf_shape=lambda s: tuple(s),
        to_ours=lambda x, s: x,
        to_hf=lambda y: y),
    "linear": Transform(  # [out, in] <-> [in, out]
        hf_shape=lambda s: (s[1], s[0]),
        to_ours=lambda x, s: x.T,
        to_hf=lambda y: y.T),
    "heads_in": Transform(  # [N*H, D] <-> [D, N, H]
        hf_shape=lambda s: (s[1] * s[2], s[0]),
        to_ours=lambda x, s: x.T.reshape(s),
        to_hf=lambda y: y.reshape(y.shape[0], -1).T),
    "heads_bias": Transform(  # [N*H] <-> [N, H]
        hf_shape=lambda s: (_prod(s),),
        to_ours=lambda x, s: x.reshape(s),
        to_hf=lambda y: y.reshape(-1)),
    "heads_out": Transform(  # [D, N*H] <-> [N, H, D]
        hf_shape=lambda s: (s[2], s[0] * s[1]),
        to_ours=lambda x, s: x.T.reshape(s),
        to_hf=lambda y: y.reshape(-1, y.shape[-1]).T),
    "conv": Transform(  # OIHW <-> HWIO
        hf_shape=lambda s: (s[3], s[2], s[0], s[1]),
        to_ours=lambda x, s: x.transpose(2, 3, 1, 0),
        to_hf=lambda y: y.transpose(3, 2, 0, 1)),
}

# ----------------------------------------------------------------------------- layouts

SECTIONS = ("text", "lm_head", "vision", "projector", "newline")

LAYOUTS: dict[str, dict[str, str]] = {
    "hub": dict(text="language_model.model.", lm_head="language_model.",
                vision="vision_tower.vision_model.", projector="multi_modal_projector.",
                newline=""),
    "transformers5": dict(text="model.language_model.", lm_head="",
                          vision="model.vision_tower.", projector="model.multi_modal_projector.",
                          newline="model."),
    "transformers5_saved": dict(text="language_model.model.", lm_head="language_model.",
                                vision="vision_tower.", projector="multi_modal_projector.",
                                newline=""),
    "transformers5_saved_next": dict(text="language_model.model.", lm_head="language_model.",
                                     vision="vision_tower.", projector="multi_modal_projector.",
                                     newline="model."),
    "transformers4": dict(text="model.language_model.", lm_head="",
                          vision="model.vision_tower.vision_model.",
                          projector="model.multi_modal_projector.", newline="model."),
}

# Non-parameter buffers some older checkpoints carry; they are skipped, never required.
IGNORED_SUFFIXES = ("embeddings.position_ids", "rotary_emb.inv_freq")

# ----------------------------------------------------------------------------- the map


@dataclasses.dataclass(frozen=True)
class Entry:
    path: str        # ours, relative to `params/`, "/"-separated
    section: str     # one of SECTIONS
    key: str         # HF key relative to the section prefix; "{i}" for stacked leaves
    transform: str   # a TRANSFORMS name

    @property
    def stacked(self) -> bool:
        return "{i}" in self.key

    def hf_key(self, layout: dict[str, str], i: int | None = None) -> str:
        key = self.key.format(i=i) if self.stacked else self.key
        return layout[self.section] + key


def _vision_entries(cfg: LlavaConfig) -> Iterator[Entry]:
    v = cfg.vision
    E = lambda path, key, t: Entry("vision_tower/" + path, "vision", key, t)  # noqa: E731
    yield E("patch_embed/kernel", "embeddings.patch_embedding.weight", "conv")
    if v.kind == "siglip":
        yield E("patch_embed/bias", "embeddings.patch_embedding.bias", "identity")
    if v.has_cls:
        yield E("class_embedding", "embeddings.class_embedding", "identity")
        yield E("pre_layernorm/scale", "pre_layrnorm.weight", "identity")  # sic: HF's name
        yield E("pre_layernorm/bias", "pre_layrnorm.bias", "identity")
    yield E("pos_embedding", "embeddings.position_embedding.weight", "identity")
    lay = "encoder.layers.{i}."
    for ours, theirs in (("ln1", "layer_norm1"), ("ln2", "layer_norm2")):
        yield E(f"layers/stack/{ours}/scale", lay + theirs + ".weight", "identity")
        yield E(f"layers/stack/{ours}/bias", lay + theirs + ".bias", "identity")
    for p in "qkv":
        yield E(f"layers/stack/{p}/kernel", lay + f"self_attn.{p}_proj.weight", "heads_in")
        yield E(f"layers/stack/{p}/bias", lay + f"self_attn.{p}_proj.bias", "heads_bias")
    yield E("layers/stack/o/kernel", lay + "self_attn.out_proj.weight", "heads_out")
    yield E("layers/stack/o/bias", lay + "self_attn.out_proj.bias", "identity")
    for fc in ("fc1", "fc2"):
        yield E(f"layers/stack/{fc}/kernel", lay + f"mlp.{fc}.weight", "linear")
        yield E(f"layers/stack/{fc}/bias", lay + f"mlp.{fc}.bias", "identity")
    yield E("post_layernorm/scale", "post_layernorm.weight", "identity")
    yield E("post_layernorm/bias", "post_layernorm.bias", "identity")


def _projector_entries() -> Iterator[Entry]:
    for ours, theirs in (("fc1", "linear_1"), ("fc2", "linear_2")):
        yield Entry(f"projector/{ours}/kernel", "projector", f"{theirs}.weight", "linear")
        yield Entry(f"projector/{ours}/bias", "projector", f"{theirs}.bias", "identity")


def _text_entries(cfg: LlavaConfig) -> Iterator[Entry]:
    t = cfg.text
    E = lambda path, key, t_: Entry("language_model/" + path, "text", key, t_)  # noqa: E731
    yield E("embed/embedding", "embed_tokens.weight", "identity")
    lay = "layers.{i}."
    yield E("layers/stack/input_norm/scale", lay + "input_layernorm.weight", "identity")
    yield E("layers/stack/post_attn_norm/scale", lay + "post_attention_layernorm.weight",
            "identity")
    for p in "qkv":
        yield E(f"layers/stack/{p}/kernel", lay + f"self_attn.{p}_proj.weight", "heads_in")
        if t.qkv_bias:
            yield E(f"layers/stack/{p}/bias", lay + f"self_attn.{p}_proj.bias", "heads_bias")
    yield E("layers/stack/o/kernel", lay + "self_attn.o_proj.weight", "heads_out")
    for p in ("gate", "up", "down"):
        yield E(f"layers/stack/{p}/kernel", lay + f"mlp.{p}_proj.weight", "linear")
    yield E("final_norm/scale", "norm.weight", "identity")
    if not t.tie_word_embeddings:
        yield Entry("language_model/lm_head/kernel", "lm_head", "lm_head.weight", "linear")


def key_map(cfg: LlavaConfig) -> list[Entry]:
    """Every parameter leaf of `Llava(cfg)` with its HF key template and transform."""
    entries = [*_vision_entries(cfg), *_projector_entries(), *_text_entries(cfg)]
    if cfg.image_newline:
        entries.append(Entry("image_newline", "newline", "image_newline", "identity"))
    return entries


def num_layers(cfg: LlavaConfig, entry: Entry) -> int:
    """How many HF layers a stacked entry spans."""
    return cfg.vision.num_layers if entry.section == "vision" else cfg.text.num_layers


def expand(cfg: LlavaConfig, entries: list[Entry], layout: dict[str, str]) -> dict[str, Entry]:
    """Every concrete HF key of `entries` under `layout` -> its entry."""
    out = {}
    for e in entries:
        if e.stacked:
            for i in range(num_layers(cfg, e)):
                out[e.hf_key(layout, i)] = e
        else:
            out[e.hf_key(layout)] = e
    return out


def is_ignored(key: str) -> bool:
    return key.endswith(IGNORED_SUFFIXES)


def detect_layout(cfg: LlavaConfig, keys, entries: list[Entry] | None = None) -> str:
    """The name of the layout whose expected keys best match the checkpoint's `keys`.

    Best = most keys in common (ties go to the earlier layout in `LAYOUTS`); the caller then
    reports whatever is still missing or unused under that layout.
    """
    keys = set(keys)
    entries = key_map(cfg) if entries is None else entries
    best, best_hits = None, -1
    for name, layout in LAYOUTS.items():
        hits = len(keys & set(expand(cfg, entries, layout)))
        if hits > best_hits:
            best, best_hits = name, hits
    return best
