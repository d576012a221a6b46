"""The transformers + torch side of `gpu_bench`: the same prefill on OUR weights, on our device.

Letters: B batch, T text length, n_v vision tokens, k kept, L = T - 1 + k, D width.

`TorchPrefill(params, cfg)` builds `LlavaForConditionalGeneration` (LLaVA-1.5-style configs)
or `LlavaOnevisionForConditionalGeneration` (`image_newline` configs) from our config
(`weights.hf.hf_config_dict`), with sdpa attention, in the config's dtype, on CUDA when torch
sees a GPU (else CPU), and copies our parameter tree into it through the declarative key map
(`weights.keymap`, layout `transformers5`: the in-memory `state_dict()` names of transformers
5.x). Its `ttft` runs what a transformers user runs for the first token, using only module
calls that are stable across transformers 5.x: the vision tower's `hidden_states[feature_layer]`
(CLS dropped under "default"), the projector, the kept tokens gathered, spliced at the
placeholder, the language model over `inputs_embeds` with a KV cache, `lm_head` on the last
position, argmax.
"""
from __future__ import annotations

import contextlib
from typing import Any

import flax.linen as nn
import numpy as np
import torch
from flax import traverse_util

from covipal_jax.models.config import LlavaConfig
from covipal_jax.weights import hf as hf_lib
from covipal_jax.weights import keymap

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _no_init():
    """transformers' `no_init_weights` context (its module moved between versions)."""
    for mod in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            return __import__(mod, fromlist=["no_init_weights"]).no_init_weights()
        except (ImportError, AttributeError):
            continue
    return contextlib.nullcontext()


def _to_torch(x: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A host array (bf16 through ml_dtypes included) -> CPU tensor of `dtype`."""
    x = np.ascontiguousarray(x)
    if x.dtype.name == "bfloat16":
        return torch.from_numpy(x.view(np.uint16)).view(torch.bfloat16).to(dtype)
    return torch.from_numpy(np.require(x, requirements=["W"])).to(dtype)


def torch_model(params: Any, cfg: LlavaConfig, device: str) -> torch.nn.Module:
    """The transformers model (eval, cfg's dtype, on `device`) holding exactly `params`."""
    import transformers

    dtype = TORCH_DTYPES[np.dtype(cfg.compute_dtype).name]
    hc = hf_lib.hf_config_dict(cfg)
    arch = hc.pop("architectures")[0]
    hc.pop("model_type", None)
    config_cls = (transformers.LlavaOnevisionConfig if "Onevision" in arch
                  else transformers.LlavaConfig)
    config = config_cls(**hc)
    for c in (config, config.text_config, config.vision_config):
        c._attn_implementation = "sdpa"
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), _no_init():
            model = getattr(transformers, arch)(config)
    finally:
        torch.set_default_dtype(prev)
    model = model.to(dtype).eval()

    params = nn.unbox(params)
    if "params" in params and len(params) == 1:
        params = params["params"]
    flat = traverse_util.flatten_dict(params, sep="/")
    layout = keymap.LAYOUTS["transformers5"]
    state = model.state_dict()
    seen = set()
    with torch.no_grad():
        for e in keymap.key_map(cfg):
            tr = keymap.TRANSFORMS[e.transform]
            leaf = flat[e.path]
            count = leaf.shape[0] if e.stacked else 1
            for i in range(count):
                key = e.hf_key(layout, i) if e.stacked else e.hf_key(layout)
                if key not in state:
                    raise KeyError(f"{key} (from {e.path}) is not in the transformers model")
                host = np.asarray(leaf[i] if e.stacked else leaf)
                y = tr.to_hf(host)
                if tuple(state[key].shape) != tuple(y.shape):
                    raise ValueError(f"{key}: ours {y.shape} vs transformers "
                                     f"{tuple(state[key].shape)}")
                state[key].copy_(_to_torch(y, state[key].dtype))
                seen.add(key)
        if cfg.text.tie_word_embeddings and "lm_head.weight" not in seen:
            # Tied (Qwen2-0.5B-style) heads: transformers may keep a separate tensor.
            model.get_output_embeddings().weight.copy_(model.get_input_embeddings().weight)
            seen.add("lm_head.weight")
    left = [k for k, _ in model.named_parameters() if k not in seen]
    if left:
        raise ValueError(f"transformers parameters not filled from ours: {left[:10]}")
    return model


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
