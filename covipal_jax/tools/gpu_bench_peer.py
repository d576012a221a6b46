"""The transformers + torch side of `gpu_bench`: the same prefill on OUR weights, on our device.

Letters: B batch, T text length, n_v vision tokens, k kept, L = T - 1 + k, D width.

`TorchPrefill(params, cfg)` builds the transformers model of our config holding our weights
(`bench_torch.torch_model`, shared with the CPU bench's peer: `LlavaForConditionalGeneration`
or `LlavaOnevisionForConditionalGeneration`, sdpa, the config's dtype) on CUDA when torch sees
a GPU (else CPU). Its `ttft` runs what a transformers user runs for the first token, using
only module calls that are stable across transformers 5.x: the vision tower's `hidden_states[feature_layer]`
(CLS dropped under "default"), the projector, the kept tokens gathered, spliced at the
placeholder, the language model over `inputs_embeds` with a KV cache, `lm_head` on the last
position, argmax.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from covipal_jax.models.config import LlavaConfig
from covipal_jax.tools.bench_torch import TORCH_DTYPES, torch_model  # noqa: F401


class TorchPrefill:
    """Timed transformers prefill (TTFT) on our weights."""

    def __init__(self, params: Any, cfg: LlavaConfig, device: str | None = None):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.cfg = cfg
        self.model = torch_model(params, cfg, self.device)
        self.dtype = next(self.model.parameters()).dtype

    def _sync(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    @staticmethod
    def is_oom(e: BaseException) -> bool:
        return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()

    def free(self):
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    @torch.no_grad()
    def ttft(self, pixels_nhwc: np.ndarray, ids: np.ndarray, image_pos: int, n_v: int,
             kept: np.ndarray | None) -> tuple[torch.Tensor, np.ndarray]:
        """pixels f32[B * crops, H, W, 3]; ids i32[B, T] (placeholder at column image_pos);
        kept i32[B, k] or None (all n_v). Returns (first tokens [B], last logits f32[B, V])."""
        inner = self.model.model
        v = self.cfg.vision
        b = ids.shape[0]
        px = torch.from_numpy(np.ascontiguousarray(pixels_nhwc.transpose(0, 3, 1, 2)))
        px = px.to(self.device, self.dtype)
        hidden = inner.vision_tower(px, output_hidden_states=True).hidden_states[v.feature_layer]
        if v.has_cls and v.select_strategy == "default":
            hidden = hidden[:, 1:]
        tokens = inner.multi_modal_projector(hidden)
        tokens = tokens.reshape(b, -1, tokens.shape[-1])[:, :n_v]
        if kept is not None:
            idx = torch.from_numpy(np.asarray(kept, np.int64)).to(self.device)
            tokens = torch.gather(tokens, 1, idx[..., None].expand(-1, -1, tokens.shape[-1]))
        ids_t = torch.from_numpy(np.asarray(ids, np.int64)).to(self.device)
        ids_t = torch.where(ids_t == self.cfg.image_token_id, torch.zeros_like(ids_t), ids_t)
        emb = self.model.get_input_embeddings()(ids_t)
        emb = torch.cat([emb[:, :image_pos], tokens.to(emb.dtype), emb[:, image_pos + 1:]], 1)
        mask = torch.ones(emb.shape[:2], dtype=torch.long, device=self.device)
        out = inner.language_model(inputs_embeds=emb, attention_mask=mask, use_cache=True)
        logits = self.model.lm_head(out.last_hidden_state[:, -1:])[:, 0]
        tok = logits.argmax(-1)
        self._sync()
        return tok, logits.float().cpu().numpy()
