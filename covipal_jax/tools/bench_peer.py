"""The PyTorch peer of `covipal_jax.tools.bench`: Hugging Face transformers LLaVA on OUR weights.

Letters: B batch, T text length (one image placeholder per row), n_v vision tokens, k kept,
L = T - 1 + k, D width, V vocab, C views of an AnyRes image.

`torch_llava(params, cfg)` is `bench_torch.torch_model` on the CPU (the builder the GPU bench's
peer shares): `LlavaForConditionalGeneration` (LLaVA-1.5 configs) or
`LlavaOnevisionForConditionalGeneration` (OneVision configs) holding exactly our weights, sdpa.
`TorchPeer` times what transformers does: `get_image_features` (tower + projector; for
OneVision also the AnyRes packing: `vision_anyres`), a forward over `inputs_embeds` with a KV
cache and `logits_to_keep=1` (the prefill), and `generate` (greedy decode).
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from covipal_jax.models.config import LlavaConfig
from covipal_jax.tools.bench_torch import torch_model
from covipal_jax.weights.hf_config import export_model_type


def torch_llava(params: Any, cfg: LlavaConfig, attn_implementation: str = "sdpa"
                ) -> torch.nn.Module:
    """The transformers model of `cfg` (eval, CPU, cfg's dtype) holding exactly `params`."""
    kind = export_model_type(cfg)
    if kind not in ("llava", "llava_onevision"):
        raise ValueError(f"the PyTorch peer supports LLaVA-1.5 and OneVision configs, not {kind}")
    return torch_model(params, cfg, "cpu", attn_implementation)


class _StepClock:
    """A logits processor that timestamps every generation step (no effect on the scores)."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


class TorchPeer:
    """Timed pieces of the transformers LLaVA: vision, prefill over embeddings, generate."""

    def __init__(self, model: torch.nn.Module, cfg: LlavaConfig, threads: int = 2):
        torch.set_num_threads(threads)
        self.model, self.cfg = model, cfg

    @torch.no_grad()
    def vision(self, pixels_nhwc: np.ndarray) -> torch.Tensor:
        """pixels f32[B, H, W, 3] (one view each) -> projected vision tokens f32[B, n_v, D]."""
        px = torch.from_numpy(np.ascontiguousarray(np.asarray(pixels_nhwc).transpose(0, 3, 1, 2)))
        v, inner = self.cfg.vision, self.model.model
        if self.cfg.image_newline:  # OneVision: get_image_features packs AnyRes; one view here
            hidden = inner.vision_tower(px, output_hidden_states=True).hidden_states
            feats = hidden[v.feature_layer]
            if v.has_cls and v.select_strategy == "default":
                feats = feats[:, 1:]
            return inner.multi_modal_projector(feats)
        out = inner.get_image_features(
            pixel_values=px, vision_feature_layer=v.feature_layer,
            vision_feature_select_strategy=v.select_strategy)
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        if isinstance(feats, (list, tuple)):
            feats = torch.stack(list(feats))
        return feats

    @torch.no_grad()
    def vision_anyres(self, pixels: np.ndarray, image_sizes: np.ndarray) -> torch.Tensor:
        """OneVision AnyRes: pixels f32[B, C, H, W, 3] (every view real), image_sizes i64[B, 2]
        (height, width) -> the packed tokens f32[B, N, D] of `get_image_features` (tower,
        projector, unpadding, anyres_max downsampling, newlines); every row the same N."""
        px = torch.from_numpy(np.ascontiguousarray(np.asarray(pixels).transpose(0, 1, 4, 2, 3)))
        out = self.model.model.get_image_features(
            pixel_values=px, image_sizes=torch.from_numpy(np.asarray(image_sizes, np.int64)))
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        return torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats

    @torch.no_grad()
    def embeds(self, ids: np.ndarray, image_pos: int, tokens: torch.Tensor) -> torch.Tensor:
        """ids i32[B, T] with the placeholder at column `image_pos` in every row; tokens
        f32[B, k, D] -> inputs_embeds f32[B, T - 1 + k, D] (tokens spliced at the placeholder)."""
        ids = torch.from_numpy(np.asarray(ids, np.int64))
        ids = torch.where(ids == self.cfg.image_token_id, torch.zeros_like(ids), ids)
        emb = self.model.get_input_embeddings()(ids)
        return torch.cat([emb[:, :image_pos], tokens.to(emb.dtype), emb[:, image_pos + 1:]], 1)

    @torch.no_grad()
    def prefill(self, embeds: torch.Tensor) -> torch.Tensor:
        """The LLM prefill over embeds f32[B, L, D] with a KV cache: next-token logits [B, V]."""
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)
        out = self.model(inputs_embeds=embeds, attention_mask=mask, use_cache=True,
                         logits_to_keep=1)
        return out.logits[:, -1]

    @torch.no_grad()
    def e2e(self, pixels_nhwc: np.ndarray, ids: np.ndarray, image_pos: int,
            kept: np.ndarray | None) -> torch.Tensor:
        """Tower + projector -> keep `kept` i32[B, k] (all when None) -> splice -> prefill."""
        tokens = self.vision(pixels_nhwc)
        if kept is not None:
            idx = torch.from_numpy(np.asarray(kept, np.int64))
            tokens = torch.gather(tokens, 1, idx[..., None].expand(-1, -1, tokens.shape[-1]))
        return self.prefill(self.embeds(ids, image_pos, tokens))

    @torch.no_grad()
    def generate(self, embeds: torch.Tensor, new_tokens: int) -> tuple[float, np.ndarray]:
        """Greedy `generate` of exactly `new_tokens` tokens after a prefill over embeds.

        Returns (seconds spent in the new_tokens - 1 decode steps after the prefill, tokens
        i64[B, new_tokens]). The clock starts when the prefill's logits reach the first
        logits processor and stops at the last step's.
        """
        clock = _StepClock()
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)
        out = self.model.generate(inputs_embeds=embeds, attention_mask=mask,
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  do_sample=False, num_beams=1, logits_processor=[clock],
                                  pad_token_id=0, eos_token_id=None)
        seconds = clock.times[-1] - clock.times[0]
        return seconds, out[:, -new_tokens:].numpy()
