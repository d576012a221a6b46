"""The jitted programs the benchmark (`bench.py`) times and counts: vision, PPM, LLM prefill and
end-to-end `prefill`, their compiled FLOPs (unrolled layers), the random inputs they run on, and
the configs they are built from (`load_config`)."""
from __future__ import annotations

import importlib.util
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from covipal_jax import configs as configs_lib
from covipal_jax.inference.prefill import prefill
from covipal_jax.models.config import LlavaConfig
from covipal_jax.models.decoder import init_cache
from covipal_jax.models.llava import Llava
from covipal_jax.models.multimodal import image_positions, splice
from covipal_jax.pruning import ppm as ppm_lib
from covipal_jax.pruning.base import PruneContext, PruningMethod
from covipal_jax.tools.costs import compiled_flops


# ----------------------------------------------------------------------------- configs


def load_config(spec: str, layers: int | None = None, vocab: int | None = None
                ) -> tuple[LlavaConfig, Any]:
    """`path.py[:args]` or a packaged config name[:args] -> (LlavaConfig, the config's `ppm`
    section). `layers` sets the decoder depth; `vocab` shrinks the vocabulary (the image /
    video placeholders move to its last ids: vocab - 2 / vocab - 1)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        path, _, arg = configs_lib.path(spec).partition(":")
    mod_spec = importlib.util.spec_from_file_location("bench_config", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    config = mod.get_config(arg or None)
    model = config.model.to_dict()
    if layers is not None:
        model["text"]["num_layers"] = layers
    if vocab:
        if vocab < 64:
            raise ValueError(f"vocab must be >= 64, got {vocab}")
        model["text"]["vocab_size"] = vocab
        model["image_token_id"] = vocab - 2
        if model.get("video_token_id", -1) >= 0:
            model["video_token_id"] = vocab - 1
    return LlavaConfig.from_config(model), config.ppm


# ----------------------------------------------------------------------------- our programs


class Programs:
    """Jitted pieces of our prefill for one model: vision, PPM, LLM, end to end."""

    def __init__(self, cfg: LlavaConfig, text_len: int, extra: int):
        self.cfg, self.model, self.extra = cfg, Llava(cfg), extra
        self.text_len = text_len
        self._cache: dict = {}

    def _jit(self, key, make):
        if key not in self._cache:
            self._cache[key] = jax.jit(make())
        return self._cache[key]

    def vision(self):
        """(params, pixels f32[B, H, W, 3]) -> projected tokens f32[B, n_v, D]."""
        m = self.model
        return self._jit("vision", lambda: lambda p, px: m.apply(p, px,
                                                                 method=Llava.encode_image)[1])

    def ppm(self, pcfg: ppm_lib.PPMConfig, k: int):
        """(params, ppm_vars, tokens f32[B, n_v, D], ids, mask) -> (kept f32[B, k, D], i32[B, k])."""
        m, cfg, module = self.model, self.cfg, ppm_lib.PPM(pcfg)

        def fn(p, pv, tokens, ids, mask):
            text = m.apply(p, ids, method=Llava.embed_text)
            ctx = PruneContext(vision_tokens=tokens, text_embeds=text,
                               text_mask=mask & (ids != cfg.image_token_id))
            res = ppm_lib.ppm(ctx, k, module=module, variables=pv)
            return res.tokens, res.indices
        return self._jit(("ppm", pcfg, k), lambda: fn)

    def llm(self, n_v: int):
        """(params, tokens f32[B, k, D], idx i32[B, k], ids, mask) -> (logits f32[B, V], cache):
        splice at the placeholder, run every decoder layer into a fresh KV cache, last logits."""
        m, cfg, extra = self.model, self.cfg, self.extra

        def fn(p, tokens, idx, ids, mask):
            text = m.apply(p, ids, method=Llava.embed_text)
            pos = image_positions(ids, cfg.image_token_id)
            seq, seq_mask, positions, _ = splice(text, mask, pos, tokens, idx,
                                                 "contiguous", n_v)
            b, length = seq_mask.shape
            key_valid = jnp.concatenate([seq_mask, jnp.zeros((b, extra), bool)], axis=1)
            cache = init_cache(cfg, b, length + extra)
            h, cache = m.apply(p, seq, method=Llava.run, positions=positions,
                               key_valid=key_valid, cache=cache, cache_index=0)
            return m.apply(p, h[:, -1:], method=Llava.logits)[:, 0], cache
        return self._jit(("llm", n_v), lambda: fn)

    def e2e(self, method: PruningMethod, pcfg: ppm_lib.PPMConfig | None = None):
        """(params, variables, pixels, ids, mask) -> PrefillOutput (`prefill.prefill`)."""
        m, extra = self.model, self.extra
        del pcfg  # part of the method value

        def fn(p, pv, px, ids, mask):
            return prefill(m, p, px, ids, mask, method, extra=extra, variables=pv)
        return self._jit(("e2e", method), lambda: fn)


def ppm_block_flops(pcfg: ppm_lib.PPMConfig, batch: int, text_len: int,
                    compile: bool = True) -> float:
    """Compiled FLOPs of ONE `PPMBlock` (to correct the PPM's scanned blocks)."""
    block = ppm_lib.PPMBlock(pcfg.with_attention("xla"))
    v = jax.ShapeDtypeStruct((batch, pcfg.n_v, pcfg.width), jnp.float32)
    t = jax.ShapeDtypeStruct((batch, text_len, pcfg.width), jnp.float32)
    kv = jax.ShapeDtypeStruct((batch, text_len + pcfg.n_v), jnp.bool_)
    bp = jax.eval_shape(lambda: nn.unbox(block.init(jax.random.key(0), jnp.zeros(v.shape),
                                                    jnp.zeros(t.shape),
                                                    jnp.ones(kv.shape, bool))))
    return compiled_flops(lambda p, a, b, c: block.apply(p, a, b, c)[0], bp, v, t, kv,
                          compile=compile)


class FlopCounter:
    """Compiled FLOPs of the bench programs, on an unrolled-layer copy of the model (B = 1)."""

    def __init__(self, cfg: LlavaConfig, text_len: int, extra: int, compile: bool = True):
        self.progs = Programs(cfg.replace(scan_layers=False), text_len, extra)
        self.cfg, self.compile = cfg, compile
        self._block: dict = {}

    def _ppm_fix(self, pcfg, text_len):
        key = (pcfg, text_len)
        if key not in self._block:
            self._block[key] = (pcfg.num_layers - 1) * ppm_block_flops(pcfg, 1, text_len,
                                                                       self.compile)
        return self._block[key]

    def vision(self, params, pixels):
        return compiled_flops(self.progs.vision(), params, pixels, compile=self.compile)

    def ppm(self, pcfg, k, params, pv, tokens, ids, mask):
        # dense attention: cost analysis sees every block
        raw = compiled_flops(self.progs.ppm(pcfg.with_attention("xla"), k), params, pv, tokens,
                             ids, mask, compile=self.compile)
        return raw + self._ppm_fix(pcfg, ids.shape[1])

    def llm(self, n_v, params, tokens, idx, ids, mask):
        return compiled_flops(self.progs.llm(n_v), params, tokens, idx, ids, mask,
                              compile=self.compile)

    def e2e(self, spec, pcfg, params, pv, px, ids, mask):
        raw = compiled_flops(self.progs.e2e(spec.dense(), pcfg), params, pv, px, ids, mask,
                             compile=self.compile)
        return raw + (0.0 if pcfg is None else self._ppm_fix(pcfg, ids.shape[1]))


# ----------------------------------------------------------------------------- inputs


def make_inputs(cfg: LlavaConfig, batch: int, text_len: int, image_pos: int, seed: int):
    """Random prompts (no padding) with the placeholder at column image_pos, random pixels."""
    rng = np.random.default_rng(seed)
    lo, hi = 5, min(cfg.text.vocab_size, 32000)
    ids = rng.integers(lo, hi, size=(batch, text_len)).astype(np.int32)
    ids = np.where(ids == cfg.image_token_id, lo, ids)
    ids[:, image_pos] = cfg.image_token_id
    mask = np.ones((batch, text_len), bool)
    v = cfg.vision
    pixels = rng.standard_normal((batch, v.image_size, v.image_size, 3)).astype(np.float32)
    return pixels, ids, mask


def kv_bytes(cfg: LlavaConfig, batch: int, seq_len: int, layers: int | None = None,
             itemsize: int | None = None) -> int:
    """Bytes of the prompt's KV cache: 2 x layers x B x L x K x H x itemsize."""
    t = cfg.text
    layers = t.num_layers if layers is None else layers
    itemsize = jnp.dtype(cfg.compute_dtype).itemsize if itemsize is None else itemsize
    return 2 * layers * batch * seq_len * t.num_kv_heads * t.head_dim * itemsize
