"""The PyTorch peer of `covipal_jax.tools.bench`: Hugging Face transformers LLaVA on OUR weights.

Letters: B batch, T text length (one image placeholder per row), n_v vision tokens, k kept,
L = T - 1 + k, D width, V vocab.

`torch_llava(params, cfg)` builds `transformers.LlavaForConditionalGeneration` from our config
(`weights.hf.hf_config_dict`) and copies our parameter tree into it through the declarative key
map (`weights.keymap`, layout `transformers5`: the in-memory `state_dict()` names), so both
sides compute with the same random weights. `TorchPeer` times what transformers does:
`get_image_features` (tower + projector), a forward over `inputs_embeds` with a KV cache and
`logits_to_keep=1` (the prefill), and `generate` (greedy decode). Only LLaVA-1.5-style models
(CLIP + LLaMA) are supported: the bench runs those widths.
"""
from __future__ import annotations

import time
from typing import Any

import flax.linen as nn
import numpy as np
import torch
from flax import traverse_util

from covipal_jax.models.config import LlavaConfig
from covipal_jax.weights import hf as hf_lib
from covipal_jax.weights import keymap


def torch_llava(params: Any, cfg: LlavaConfig, attn_implementation: str = "sdpa"
                ) -> torch.nn.Module:
    """An HF `LlavaForConditionalGeneration` (f32, eval) holding exactly `params`."""
    import transformers

    if cfg.vision.kind != "clip" or cfg.text.kind != "llama" or cfg.image_newline:
        raise ValueError("the PyTorch peer supports LLaVA-1.5 (CLIP + LLaMA) configs only")
    hc = hf_lib.hf_config_dict(cfg, np.float32)
    hc.pop("architectures", None)
    hc.pop("model_type", None)
    config = transformers.LlavaConfig(**hc)
    config._attn_implementation = attn_implementation
    config.text_config._attn_implementation = attn_implementation
    config.vision_config._attn_implementation = attn_implementation
    from transformers.initialization import no_init_weights

    with torch.device("cpu"), no_init_weights():  # every parameter is overwritten below
        model = transformers.LlavaForConditionalGeneration(config)
    model = model.float().eval()

    params = nn.unbox(params)
    if "params" in params and len(params) == 1:
        params = params["params"]
    flat = traverse_util.flatten_dict(params, sep="/")
    layout = keymap.LAYOUTS["transformers5"]
    state = model.state_dict()
    seen = set()
    with torch.no_grad():
        for e in keymap.key_map(cfg):
            host = np.asarray(flat[e.path], np.float32)
            tr = keymap.TRANSFORMS[e.transform]
            parts = ([(e.hf_key(layout, i), host[i]) for i in range(host.shape[0])]
                     if e.stacked else [(e.hf_key(layout), host)])
            for key, x in parts:
                if key not in state:
                    raise KeyError(f"{key} (from {e.path}) is not in the transformers model")
                y = np.require(tr.to_hf(x), requirements=["C", "W"])
                if tuple(state[key].shape) != y.shape:
                    raise ValueError(f"{key}: ours {y.shape} vs transformers "
                                     f"{tuple(state[key].shape)}")
                state[key].copy_(torch.from_numpy(y))
                seen.add(key)
    params_left = [k for k, _ in model.named_parameters() if k not in seen]
    if params_left:
        raise ValueError(f"transformers parameters not filled from ours: {params_left[:10]}")
    return model


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
        """pixels f32[B, H, W, 3] -> projected vision tokens f32[B, n_v, D]."""
        px = torch.from_numpy(np.ascontiguousarray(np.asarray(pixels_nhwc).transpose(0, 3, 1, 2)))
        v = self.cfg.vision
        out = self.model.model.get_image_features(
            pixel_values=px, vision_feature_layer=v.feature_layer,
            vision_feature_select_strategy=v.select_strategy)
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        if isinstance(feats, (list, tuple)):
            feats = torch.stack(list(feats))
        return feats

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
