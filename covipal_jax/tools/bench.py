"""Prefill / decode benchmark: pruned vs unpruned, against the FLOP bound and against PyTorch.

    python -m covipal_jax.tools.bench --out /tmp/bench            # LLaVA-1.5-7B widths, 2 layers
    python -m covipal_jax.tools.bench --out /tmp/bench --full     # + batch-8 prefill, NeXT tower
    python -m covipal_jax.tools.bench --out /tmp/bench --quick    # tiny widths (seconds; tests)

Letters: B batch, T text length, n_v vision tokens per image, k kept, L = T - 1 + k.

What one run measures (all on the same random weights and inputs):
- Suite `llava15` (n_v = 576, the config's CLIP tower): per keep setting the latency of the
  vision tower + projector, of the PPM (score + top-k + gather), of the LLM prefill (splice +
  decoder into a KV cache + last-token logits) and of the whole jitted `prefill.prefill`
  (end to end); unpruned = method `none`, pruned = method `ppm` (random PPM weights: latency
  does not depend on which tokens are kept).
- Suite `next` (LLaVA-NeXT token counts): n_v = `--next_tokens` (2880 = 5 crops x 576)
  projected tokens are fed straight to the PPM and the LLM. The tower on 5 crops is 5 times
  the single-crop tower in FLOPs; by default its time is estimated as 5 x the measured
  single-crop time (`vision_source: "estimated"`); `--full` runs the tower on 5 crops.
- Decode: tokens/s of `decoding.Generator`'s on-device `while_loop` (M - 1 steps after the
  prefill, no early stop) vs transformers `generate` (greedy, timed from the first to the last
  logits-processor call, i.e. the same M - 1 steps).
- FLOPs: XLA's `cost_analysis()['flops']` of each compiled program, built with unrolled layers
  (`scan_layers=False`): XLA's cost analysis counts a `while` body once, so a scanned stack
  would be under-counted. The PPM's own 2-block `nn.scan` is corrected by adding
  (blocks - 1) x the compiled cost of one `PPMBlock`. FLOPs are exactly linear in B, so they
  are counted at B = 1 and scaled.
- The FLOP-ratio bound of a pruned setting is flops(unpruned) / flops(pruned); the achieved
  fraction is (measured speed-up) / (FLOP ratio). Achieved FLOP/s is compared with the peak of
  a large f32 matmul measured by this run (jax; torch's peak is reported too).
- The PyTorch peer (`bench_peer`): transformers' `LlavaForConditionalGeneration` holding our
  weights, sdpa attention, `torch.set_num_threads(--threads)`; its pruned prefill is given the
  tokens OUR PPM kept (it has no PPM: its pruned time excludes the PPM's cost).
Timings interleave ours and the peer's repetitions (warmup + N reps, median), so background
load on a shared machine hits both alike; the load average is recorded.

Outputs: `DIR/bench.json` (everything), `DIR/bench.md` (tables), `DIR/bench.png` (chart).
"""
from __future__ import annotations

from covipal_jax import configs as configs_lib
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from covipal_jax.inference.decoding import Generator
from covipal_jax.models.config import LlavaConfig
from covipal_jax.models.decoder import init_cache
from covipal_jax.models.llava import Llava, init_params
from covipal_jax.models.multimodal import image_positions, splice
from covipal_jax.weights.ppm_io import init_ppm
from covipal_jax.inference.prefill import prefill
from covipal_jax.pruning import NoneMethod, PPMMethod
from covipal_jax.pruning import ppm as ppm_lib
from covipal_jax.pruning import select
from covipal_jax.pruning.base import PruneContext, PruningMethod, parse_keep, resolve_keep
from covipal_jax.tools.costs import compiled_flops  # noqa: F401  (re-exported)

Array = jax.Array
DEFAULT_CONFIG = configs_lib.path("llava15_7b:layers=2,dtype=float32")
QUICK_CONFIG = configs_lib.path("tiny")
FULL_DEPTH = {"llama": 32}  # decoder depth the reduced-depth numbers are extrapolated to


# ----------------------------------------------------------------------------- options


@dataclasses.dataclass
class Options:
    keeps: tuple = (1.0, 0.5, 0.25, 64)   # float ratio or int count; 1.0 = unpruned
    next_tokens: int = 2880               # 0 disables the NeXT suite
    next_keeps: tuple = (1.0, 0.25, 64)
    prefill_batches: tuple = (1,)
    decode_batches: tuple = (1, 8)
    decode_keeps: str = "ends"            # "all" keeps | "ends" (unpruned and the smallest
                                          # k at B=1, the smallest k at B>1) | "smallest"
    next_vision: bool = False             # run the tower on 5 crops (else 5 x single crop)
    text_len: int = 48
    image_pos: int = 5
    reps: int = 3
    warmup: int = 1
    decode_tokens: int = 16
    peer: bool = True
    threads: int = 2
    flops: bool = True
    flops_compiled: bool = True           # False: cost of the lowered HLO (no compile)
    matmul_n: int = 4096
    full_depth: int = 32
    seed: int = 0

    @classmethod
    def quick(cls) -> "Options":
        return cls(keeps=(1.0, 0.25), next_tokens=320, next_keeps=(1.0, 0.25),
                   reps=1, warmup=1, decode_tokens=4, text_len=16, image_pos=3,
                   matmul_n=512, decode_batches=(2,), decode_keeps="smallest",
                   full_depth=8, flops_compiled=False)

    @classmethod
    def full(cls) -> "Options":
        return cls(prefill_batches=(1, 8), decode_keeps="all", next_vision=True)


# ----------------------------------------------------------------------------- timing


def _ready(x):
    return jax.block_until_ready(x)


def clocked(fn: Callable[[], Any], sync: Callable[[Any], Any] = _ready) -> Callable[[], float]:
    """A thunk that runs fn() to completion and returns its wall time in seconds."""
    def run() -> float:
        t0 = time.perf_counter()
        sync(fn())
        return time.perf_counter() - t0
    return run


def interleaved(thunks: dict[str, Callable[[], float]], reps: int, warmup: int
                ) -> dict[str, dict]:
    """Run each thunk (returning seconds) warmup + reps times, in turn; medians of the reps."""
    times: dict[str, list[float]] = {k: [] for k in thunks}
    for i in range(warmup + reps):
        for name, thunk in thunks.items():
            s = thunk()
            if i >= warmup:
                times[name].append(s)
    return {k: dict(median_s=statistics.median(v), times_s=v) for k, v in times.items()}


def matmul_peak(n: int, reps: int = 3, threads: int = 2, with_torch: bool = True) -> dict:
    """GFLOP/s of an n x n x n f32 matmul: jax (XLA CPU) and, if available, torch."""
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32)
    f = jax.jit(jnp.matmul)
    thunks = {"jax": clocked(lambda: f(a, b))}
    if with_torch:
        import torch
        torch.set_num_threads(threads)
        ta, tb = torch.randn(n, n), torch.randn(n, n)
        thunks["torch"] = clocked(lambda: torch.mm(ta, tb), sync=lambda x: x)
    res = interleaved(thunks, reps, 1)
    flops = 2.0 * n ** 3
    return {k: flops / v["median_s"] / 1e9 for k, v in res.items()} | {"n": n}


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
    block = ppm_lib.PPMBlock(pcfg)
    v = jax.ShapeDtypeStruct((batch, pcfg.n_v, pcfg.width), jnp.float32)
    t = jax.ShapeDtypeStruct((batch, text_len, pcfg.width), jnp.float32)
    kb = jax.ShapeDtypeStruct((batch, 1, 1, text_len + pcfg.n_v), jnp.float32)
    bp = jax.eval_shape(lambda: nn.unbox(block.init(jax.random.key(0), jnp.zeros(v.shape),
                                                    jnp.zeros(t.shape),
                                                    jnp.zeros(kb.shape))))
    return compiled_flops(lambda p, a, b, c: block.apply(p, a, b, c)[0], bp, v, t, kb,
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
        raw = compiled_flops(self.progs.ppm(pcfg, k), params, pv, tokens, ids, mask,
                             compile=self.compile)
        return raw + self._ppm_fix(pcfg, ids.shape[1])

    def llm(self, n_v, params, tokens, idx, ids, mask):
        return compiled_flops(self.progs.llm(n_v), params, tokens, idx, ids, mask,
                              compile=self.compile)

    def e2e(self, spec, pcfg, params, pv, px, ids, mask):
        raw = compiled_flops(self.progs.e2e(spec, pcfg), params, pv, px, ids, mask,
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


def _keep_count(keep, n_v: int) -> int:
    return resolve_keep(keep, n_v)


def _label(keep, k: int, n_v: int) -> str:
    return "unpruned" if k == n_v else (f"{keep:g}" if isinstance(keep, float) else f"{k} tok")


# ----------------------------------------------------------------------------- the run


class Bench:
    """One benchmark run (see the module docstring)."""

    def __init__(self, cfg: LlavaConfig, opts: Options, ppm: Any = None, log=None):
        """cfg: the model; ppm: a `config.ppm` section (PPM width/depth; default common's)."""
        t_start = time.perf_counter()
        if log is None:
            def log(msg):
                print(f"{time.perf_counter() - t_start:7.1f}s {msg}", flush=True)
        self.cfg, self.opts, self.log = cfg, opts, log
        if ppm is None:
            from covipal_jax.configs import common
            ppm = common.ppm_config()
        self.ppm_section = ppm
        self.n_v = cfg.num_vision_tokens
        self.progs = Programs(cfg, opts.text_len, opts.decode_tokens)
        self.counter = (FlopCounter(cfg, opts.text_len, opts.decode_tokens,
                                    compile=opts.flops_compiled) if opts.flops else None)
        t0 = time.perf_counter()
        self.params = jax.jit(lambda r: nn.unbox(init_params(cfg, r)))(jax.random.key(opts.seed))
        self.ppm_cfgs = {self.n_v: self._pcfg(self.n_v)}
        if opts.next_tokens:
            self.ppm_cfgs[opts.next_tokens] = self._pcfg(opts.next_tokens)
        self.ppm_vars = {n: jax.jit(lambda r, c=c: nn.unbox(init_ppm(c, r)))(jax.random.key(7))
                         for n, c in self.ppm_cfgs.items()}
        self.log(f"[bench] params ready ({time.perf_counter() - t0:.1f} s)")
        self.peer = None
        if opts.peer:
            from covipal_jax.tools.bench_peer import TorchPeer, torch_llava
            t0 = time.perf_counter()
            self.peer = TorchPeer(torch_llava(self.params, cfg), cfg, threads=opts.threads)
            self.log(f"[bench] torch peer ready ({time.perf_counter() - t0:.1f} s)")

    def _pcfg(self, n_v: int) -> ppm_lib.PPMConfig:
        p = self.ppm_section
        return ppm_lib.PPMConfig(n_v=n_v, d_model=self.cfg.text.hidden_size, width=p.width,
                                 num_layers=p.num_layers, num_heads=p.num_heads,
                                 mlp_ratio=p.mlp_ratio)

    # -- helpers --------------------------------------------------------------------------

    def _run(self, thunks):
        o = self.opts
        return interleaved(thunks, o.reps, o.warmup)

    @staticmethod
    def _torch_sync(x):
        return x

    def _parity(self, ours, theirs) -> float:
        a, b = np.asarray(ours, np.float64), np.asarray(theirs.numpy(), np.float64)
        return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))

    # -- suite: llava15 (tower + PPM + LLM, end to end) ------------------------------------

    def suite_llava15(self, batch: int) -> dict:
        cfg, o, P = self.cfg, self.opts, self.params
        n_v, pcfg = self.n_v, self.ppm_cfgs[self.n_v]
        pv = self.ppm_vars[n_v]
        px, ids, mask = make_inputs(cfg, batch, o.text_len, o.image_pos, o.seed + batch)
        px_j, ids_j, mask_j = jnp.asarray(px), jnp.asarray(ids), jnp.asarray(mask)
        vision = self.progs.vision()
        tokens = vision(P, px_j)
        thunks = {"vision/ours": clocked(lambda: vision(P, px_j))}
        if self.peer:
            thunks["vision/peer"] = clocked(lambda: self.peer.vision(px), self._torch_sync)
        vis_flops = self.counter.vision(P, px_j[:1]) * batch if self.counter else None
        settings = []
        for i, keep in enumerate(o.keeps):
            k = _keep_count(keep, n_v)
            pruned = k < n_v
            self.log(f"[bench] llava15 B={batch}: prepare keep={keep} (k={k})")
            spec = PPMMethod(keep=k, ppm=pcfg) if pruned else NoneMethod()
            e2e = self.progs.e2e(spec, pcfg if pruned else None)
            pv_arg = pv if pruned else None
            out = e2e(P, pv_arg, px_j, ids_j, mask_j)
            kept = np.asarray(out.kept)
            if pruned:
                ppm_fn = self.progs.ppm(pcfg, k)
                kept_tokens, idx = ppm_fn(P, pv, tokens, ids_j, mask_j)
            else:
                ppm_fn, kept_tokens = None, tokens
                idx = jnp.broadcast_to(jnp.arange(n_v, dtype=jnp.int32), (batch, n_v))
            llm = self.progs.llm(n_v)
            thunks[f"{i}/ours_e2e"] = clocked(
                lambda e2e=e2e, pv_arg=pv_arg: e2e(P, pv_arg, px_j, ids_j, mask_j))
            thunks[f"{i}/ours_llm"] = clocked(
                lambda t_=kept_tokens, i_=idx: llm(P, t_, i_, ids_j, mask_j))
            if pruned:
                thunks[f"{i}/ours_ppm"] = clocked(
                    lambda f=ppm_fn: f(P, pv, tokens, ids_j, mask_j))
            row: dict[str, Any] = dict(keep=keep, k=k, label=_label(keep, k, n_v),
                                       method=spec.name, seq_len=o.text_len - 1 + k)
            if self.peer:
                import torch
                emb = self.peer.embeds(ids, o.image_pos,
                                       torch.from_numpy(np.array(kept_tokens)))
                kept_arg = kept if pruned else None
                thunks[f"{i}/peer_e2e"] = clocked(
                    lambda a=kept_arg: self.peer.e2e(px, ids, o.image_pos, a), self._torch_sync)
                thunks[f"{i}/peer_llm"] = clocked(lambda e=emb: self.peer.prefill(e),
                                                  self._torch_sync)
                row["parity_rel"] = self._parity(
                    out.last_logits, self.peer.e2e(px, ids, o.image_pos, kept_arg))
            row["kv_bytes"] = kv_bytes(cfg, batch, row["seq_len"])
            row["kv_bytes_full_depth"] = kv_bytes(cfg, batch, row["seq_len"], o.full_depth)
            if self.counter:
                c = self.counter
                one = (P, pv_arg, px_j[:1], ids_j[:1], mask_j[:1])
                fl = dict(e2e=c.e2e(spec, pcfg if pruned else None, *one) * batch,
                          llm=c.llm(n_v, P, kept_tokens[:1], idx[:1], ids_j[:1],
                                    mask_j[:1]) * batch,
                          vision=vis_flops)
                fl["ppm"] = (c.ppm(pcfg, k, P, pv, tokens[:1], ids_j[:1], mask_j[:1]) * batch
                             if pruned else 0.0)
                fl["ppm_analytic"] = (ppm_lib.ppm_flops(pcfg, n_v, o.text_len) * batch
                                      if pruned else 0.0)
                row["flops"] = fl
            settings.append(row)
        self.log(f"[bench] llava15 B={batch}: timing {len(thunks)} programs, interleaved")
        t = self._run(thunks)
        med = lambda key: t[key]["median_s"] if key in t else None  # noqa: E731
        for i, row in enumerate(settings):
            row["ours"] = dict(vision_s=med("vision/ours"), ppm_s=med(f"{i}/ours_ppm") or 0.0,
                               llm_s=med(f"{i}/ours_llm"), e2e_s=med(f"{i}/ours_e2e"))
            if self.peer:
                row["peer"] = dict(vision_s=med("vision/peer"), llm_s=med(f"{i}/peer_llm"),
                                   e2e_s=med(f"{i}/peer_e2e"))
            row["times_s"] = {k_.split("/", 1)[1]: v["times_s"] for k_, v in t.items()
                              if k_.startswith(f"{i}/")}
        vis_t = {k_.split("/", 1)[1]: v for k_, v in t.items() if k_.startswith("vision/")}
        suite = dict(name="llava15", batch=batch, n_v=n_v, vision_source="measured",
                     vision_times_s={k_: v["times_s"] for k_, v in vis_t.items()},
                     settings=settings)
        return _derive(suite, self.cfg, o)

    # -- suite: NeXT token counts (PPM + LLM on n_v projected tokens) -----------------------

    def suite_next(self, batch: int, single_crop: dict | None) -> dict:
        cfg, o, P = self.cfg, self.opts, self.params
        n_v = o.next_tokens
        pcfg, pv = self.ppm_cfgs[n_v], self.ppm_vars[n_v]
        crops = max(1, round(n_v / self.n_v))
        _, ids, mask = make_inputs(cfg, batch, o.text_len, o.image_pos, o.seed + 100 + batch)
        ids_j, mask_j = jnp.asarray(ids), jnp.asarray(mask)
        tokens = jax.random.normal(jax.random.key(3), (batch, n_v, cfg.text.hidden_size),
                                   jnp.float32)
        vis: dict[str, Any] = {}
        if o.next_vision:
            self.log(f"[bench] next B={batch}: vision on {crops} crops")
            px, _, _ = make_inputs(cfg, batch * crops, o.text_len, o.image_pos, o.seed)
            px_j = jnp.asarray(px)
            vision = self.progs.vision()
            thunks = {"ours": clocked(lambda: vision(P, px_j))}
            if self.peer:
                thunks["peer"] = clocked(lambda: self.peer.vision(px), self._torch_sync)
            vt = self._run(thunks)
            vis = {k_: v["median_s"] for k_, v in vt.items()}
            source = "measured"
        else:
            source = "estimated"
            if single_crop is not None:
                row0 = single_crop["settings"][0]
                scale = crops * batch / single_crop["batch"]
                vis["ours"] = row0["ours"]["vision_s"] * scale
                if self.peer and "peer" in row0:
                    vis["peer"] = row0["peer"]["vision_s"] * scale
        vis_flops = None
        if self.counter and single_crop is not None:
            vis_flops = single_crop["settings"][0]["flops"]["vision"] / single_crop["batch"] \
                * crops * batch
        settings = []
        thunks = {}
        for i, keep in enumerate(o.next_keeps):
            k = _keep_count(keep, n_v)
            pruned = k < n_v
            self.log(f"[bench] next B={batch}: prepare keep={keep} (k={k})")
            llm = self.progs.llm(n_v)
            if pruned:
                ppm_fn = self.progs.ppm(pcfg, k)
                kept_tokens, idx = ppm_fn(P, pv, tokens, ids_j, mask_j)
                thunks[f"{i}/ours_ppm"] = clocked(
                    lambda f=ppm_fn: f(P, pv, tokens, ids_j, mask_j))
            else:
                kept_tokens = tokens
                idx = jnp.broadcast_to(jnp.arange(n_v, dtype=jnp.int32), (batch, n_v))
            thunks[f"{i}/ours_llm"] = clocked(
                lambda t_=kept_tokens, i_=idx: llm(P, t_, i_, ids_j, mask_j))
            row: dict[str, Any] = dict(keep=keep, k=k, label=_label(keep, k, n_v),
                                       method="ppm" if pruned else "none",
                                       seq_len=o.text_len - 1 + k)
            if self.peer:
                import torch
                emb = self.peer.embeds(ids, o.image_pos,
                                       torch.from_numpy(np.array(kept_tokens)))
                thunks[f"{i}/peer_llm"] = clocked(lambda e=emb: self.peer.prefill(e),
                                                  self._torch_sync)
            row["kv_bytes"] = kv_bytes(cfg, batch, row["seq_len"])
            row["kv_bytes_full_depth"] = kv_bytes(cfg, batch, row["seq_len"], o.full_depth)
            if self.counter:
                c = self.counter
                fl = dict(llm=c.llm(n_v, P, kept_tokens[:1], idx[:1], ids_j[:1],
                                    mask_j[:1]) * batch, vision=vis_flops)
                fl["ppm"] = (c.ppm(pcfg, k, P, pv, tokens[:1], ids_j[:1], mask_j[:1]) * batch
                             if pruned else 0.0)
                fl["ppm_analytic"] = (ppm_lib.ppm_flops(pcfg, n_v, o.text_len) * batch
                                      if pruned else 0.0)
                fl["e2e"] = None if vis_flops is None else vis_flops + fl["ppm"] + fl["llm"]
                row["flops"] = fl
            settings.append(row)
        self.log(f"[bench] next B={batch}: timing {len(thunks)} programs, interleaved")
        t = self._run(thunks)
        med = lambda key: t[key]["median_s"] if key in t else None  # noqa: E731
        for i, row in enumerate(settings):
            ours = dict(vision_s=vis.get("ours"), ppm_s=med(f"{i}/ours_ppm") or 0.0,
                        llm_s=med(f"{i}/ours_llm"))
            ours["e2e_s"] = (None if ours["vision_s"] is None
                             else ours["vision_s"] + ours["ppm_s"] + ours["llm_s"])
            row["ours"] = ours
            if self.peer:
                peer = dict(vision_s=vis.get("peer"), llm_s=med(f"{i}/peer_llm"))
                peer["e2e_s"] = (None if peer["vision_s"] is None
                                 else peer["vision_s"] + peer["llm_s"])
                row["peer"] = peer
            row["times_s"] = {k_.split("/", 1)[1]: v["times_s"] for k_, v in t.items()
                              if k_.startswith(f"{i}/")}
        suite = dict(name="next", batch=batch, n_v=n_v, crops=crops, vision_source=source,
                     settings=settings)
        return _derive(suite, self.cfg, o)

    # -- decode ----------------------------------------------------------------------------

    def _decode_prepare(self, batch: int, keep) -> tuple[dict, Callable[[dict], dict]]:
        """Prefill once, return (thunks timing the M - 1 decode steps, row builder)."""
        cfg, o, P = self.cfg, self.opts, self.params
        n_v, pcfg = self.n_v, self.ppm_cfgs[self.n_v]
        k = _keep_count(keep, n_v)
        pruned = k < n_v
        self.log(f"[bench] decode B={batch}: prepare keep={keep} (k={k})")
        spec = PPMMethod(keep=k, ppm=pcfg) if pruned else NoneMethod()
        gen = Generator(self.progs.model, spec, max_new_tokens=o.decode_tokens, eos_id=-1,
                        pad_id=0)
        px, ids, mask = make_inputs(cfg, batch, o.text_len, o.image_pos, o.seed + 200 + batch)
        pv = self.ppm_vars[n_v] if pruned else None
        state, kept = gen.prefill(P, pv, jnp.asarray(px), jnp.asarray(ids), jnp.asarray(mask),
                                  jax.random.key(0))
        state = jax.block_until_ready(state)
        steps = o.decode_tokens - 1
        got: dict[str, np.ndarray] = {}

        def ours() -> float:
            s = jax.block_until_ready(jax.tree.map(jnp.copy, state))
            t0 = time.perf_counter()
            out = jax.block_until_ready(gen.decode(P, s))
            dt = time.perf_counter() - t0
            got["ours"] = np.asarray(out.tokens)
            return dt
        thunks = {"ours": ours}
        if self.peer:
            import torch
            tokens = self.progs.vision()(P, jnp.asarray(px))
            if pruned:
                tokens = select.gather_tokens(tokens, kept)
            emb = self.peer.embeds(ids, o.image_pos, torch.from_numpy(np.array(tokens)))

            def peer() -> float:
                dt, got["peer"] = self.peer.generate(emb, o.decode_tokens)
                return dt
            thunks["peer"] = peer

        def finish(t: dict) -> dict:
            row = dict(batch=batch, keep=keep, k=k, label=_label(keep, k, n_v),
                       seq_len=o.text_len - 1 + k, new_tokens=o.decode_tokens, steps=steps,
                       ours_tok_s=batch * steps / t["ours"]["median_s"],
                       times_s={k_: v["times_s"] for k_, v in t.items()})
            if self.peer:
                row["peer_tok_s"] = batch * steps / t["peer"]["median_s"]
                row["ours_over_peer"] = row["ours_tok_s"] / row["peer_tok_s"]
                row["token_agreement"] = float(np.mean(got["ours"] == got["peer"]))
            return row
        return thunks, finish

    def decode(self, pairs: list[tuple[int, Any]]) -> list[dict]:
        """Decode throughput for (batch, keep) pairs, all timed in one interleaved loop."""
        o = self.opts
        thunks, finishers = {}, []
        for i, (batch, keep) in enumerate(pairs):
            th, fin = self._decode_prepare(batch, keep)
            thunks.update({f"{i}/{k}": v for k, v in th.items()})
            finishers.append(fin)
        self.log(f"[bench] decode: timing {len(thunks)} programs, interleaved")
        # transformers' generate needs two calls to reach its steady speed.
        t = interleaved(thunks, o.reps, max(o.warmup, 2 if self.peer else o.warmup))
        return [fin({k.split("/", 1)[1]: v for k, v in t.items() if k.startswith(f"{i}/")})
                for i, fin in enumerate(finishers)]

    # -- everything -------------------------------------------------------------------------

    def run(self) -> dict:
        o = self.opts
        t_start = time.perf_counter()
        load0 = os.getloadavg()
        self.log("[bench] matmul peak")
        peak = matmul_peak(o.matmul_n, reps=3, threads=o.threads, with_torch=self.peer is not None)
        suites = []
        for b in o.prefill_batches:
            suites.append(self.suite_llava15(b))
        if o.next_tokens:
            single = suites[0] if suites else None
            suites.append(self.suite_next(1, single))
        ks = sorted({_keep_count(x, self.n_v) for x in o.keeps})
        pick = lambda k: next(x for x in o.keeps if _keep_count(x, self.n_v) == k)  # noqa
        pairs = []
        for b in o.decode_batches:
            if o.decode_keeps == "all":
                keeps = o.keeps
            elif o.decode_keeps == "ends" and b == 1:
                keeps = tuple(dict.fromkeys((pick(ks[-1]), pick(ks[0]))))
            else:
                keeps = (pick(ks[0]),)
            pairs += [(b, keep) for keep in keeps]
        decode = self.decode(pairs) if pairs else []
        peak_end = matmul_peak(o.matmul_n, reps=3, threads=o.threads,
                               with_torch=self.peer is not None)
        result = dict(
            meta=dict(
                config=self.cfg.to_dict(), options=_jsonable(dataclasses.asdict(o)),
                versions=_versions(), machine=dict(
                    cpu_count=os.cpu_count(), platform=platform.platform(),
                    loadavg_start=load0, loadavg_end=os.getloadavg(),
                    jax_devices=[str(d) for d in jax.devices()]),
                matmul_peak_gflops=peak, matmul_peak_gflops_end=peak_end,
                wall_s=time.perf_counter() - t_start),
            suites=suites, decode=decode)
        result["targets"] = targets(result)
        return result


# ----------------------------------------------------------------------------- derived


def _derive(suite: dict, cfg: LlavaConfig, o: Options) -> dict:
    """Speed-ups, FLOP ratios, achieved fractions, PPM shares (relative to the unpruned row)."""
    rows = suite["settings"]
    base = next((r for r in rows if r["k"] == suite["n_v"]), None)
    layers = cfg.text.num_layers
    for r in rows:
        d: dict[str, Any] = {}
        fl = r.get("flops")
        for part in ("e2e", "llm"):
            if base is None:
                break
            tb, tr = base["ours"].get(f"{part}_s"), r["ours"].get(f"{part}_s")
            if part == "llm" and r["k"] < suite["n_v"]:
                tr = tr + r["ours"]["ppm_s"]  # the pruned LLM path includes scoring
            if tb is None or tr is None:
                continue
            d[f"speedup_{part}"] = tb / tr
            if fl and base.get("flops"):
                fb, fr = base["flops"].get(part), fl.get(part)
                if part == "llm" and fr is not None:
                    fr = fr + fl["ppm"]
                if fb and fr:
                    d[f"flop_ratio_{part}"] = fb / fr
                    d[f"bound_fraction_{part}"] = d[f"speedup_{part}"] / d[f"flop_ratio_{part}"]
        if fl:
            e2e_f = fl.get("e2e")
            e2e_t = r["ours"].get("e2e_s")
            if e2e_f and e2e_t:
                d["gflops_e2e"] = e2e_f / e2e_t / 1e9
            d["gflops_llm"] = fl["llm"] / r["ours"]["llm_s"] / 1e9
            if fl.get("vision") and r["ours"].get("vision_s") and suite["vision_source"] == \
                    "measured":
                d["gflops_vision"] = fl["vision"] / r["ours"]["vision_s"] / 1e9
            if fl["ppm"] and e2e_f:
                d["ppm_share"] = fl["ppm"] / e2e_f
                full = (fl.get("vision") or 0.0) + fl["ppm"] + fl["llm"] * o.full_depth / layers
                d["ppm_share_full_depth"] = fl["ppm"] / full
        if "peer" in r:
            for part in ("e2e", "llm", "vision"):
                a, b = r["ours"].get(f"{part}_s"), r["peer"].get(f"{part}_s")
                if a and b:
                    d[f"peer_over_ours_{part}"] = b / a
        r["derived"] = d
    return suite


def targets(result: dict) -> dict:
    """The four performance targets, each with its worst case and a pass flag."""
    out = {}
    fr, vs, share = [], [], []
    for s in result["suites"]:
        for r in s["settings"]:
            d = r["derived"]
            tag = f"{s['name']} B={s['batch']} {r['label']}"
            if r["k"] < s["n_v"] and "bound_fraction_e2e" in d:
                fr.append((d["bound_fraction_e2e"], tag))
            if "peer_over_ours_e2e" in d:
                vs.append((d["peer_over_ours_e2e"], tag))
            elif "peer_over_ours_llm" in d:
                vs.append((d["peer_over_ours_llm"], tag + " (LLM)"))
            if "ppm_share" in d:
                share.append((d["ppm_share"], tag))
    if fr:
        w = min(fr)
        out["pruned_speedup_vs_flop_bound"] = dict(goal=">= 0.95", worst=w[0], where=w[1],
                                                   passed=w[0] >= 0.95)
    if vs:
        w = min(vs)
        out["prefill_vs_pytorch"] = dict(goal="peer/ours >= 1", worst=w[0], where=w[1],
                                         passed=w[0] >= 1.0)
    dec = [(r["ours_over_peer"], f"B={r['batch']} {r['label']}") for r in result["decode"]
           if r["batch"] >= 8 and "ours_over_peer" in r]
    if dec:
        w = min(dec)
        out["decode_b8_vs_generate"] = dict(goal="ours/peer >= 2", worst=w[0], where=w[1],
                                            passed=w[0] >= 2.0)
    if share:
        w = max(share)
        out["ppm_share_of_pruned_prefill"] = dict(goal="< 0.03", worst=w[0], where=w[1],
                                                  passed=w[0] < 0.03)
    return out


def _versions() -> dict:
    import flax
    out = dict(python=sys.version.split()[0], jax=jax.__version__, flax=flax.__version__,
               numpy=np.__version__)
    try:
        import torch
        import transformers
        out.update(torch=torch.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    return out


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x


# ----------------------------------------------------------------------------- reports


def _f(x, fmt="{:.3f}", none="–"):
    return none if x is None else fmt.format(x)


def markdown(result: dict) -> str:
    m = result["meta"]
    c = m["config"]
    t = c["text"]
    peak = m["matmul_peak_gflops"]
    lines = [
        "# covipal_jax benchmark",
        "",
        f"Model: vision {c['vision']['kind']} {c['vision']['image_size']}px "
        f"(n_v={result['suites'][0]['n_v'] if result['suites'] else '?'}), decoder "
        f"{t['kind']} D={t['hidden_size']} F={t['intermediate_size']} heads={t['num_heads']} "
        f"layers={t['num_layers']} (reduced depth), dtype {c['dtype']}, text "
        f"{m['options']['text_len']} tokens, {m['options']['reps']} reps (median) after "
        f"{m['options']['warmup']} warmup.",
        f"Machine: {m['machine']['cpu_count']} CPU cores, load average "
        f"{m['machine']['loadavg_start'][0]:.1f} -> {m['machine']['loadavg_end'][0]:.1f}; "
        f"f32 matmul peak (n={peak['n']}): jax {peak['jax']:.0f} GFLOP/s"
        + (f", torch {peak['torch']:.0f} GFLOP/s" if "torch" in peak else "")
        + f" (end of run: jax {m['matmul_peak_gflops_end']['jax']:.0f}). "
        f"Wall time {m['wall_s']:.0f} s.",
        "",
    ]
    for s in result["suites"]:
        title = (f"## Prefill `{s['name']}`, batch {s['batch']}, n_v = {s['n_v']}"
                 + (f" ({s['crops']} crops; vision {s['vision_source']})"
                    if s["name"] == "next" else ""))
        lines += [title, "",
                  "| keep | k | L | vision s | PPM s | LLM s | e2e s | peer LLM s | peer e2e s "
                  "| peer/ours e2e | speed-up | FLOP ratio | % of bound | GFLOP/s (% peak) "
                  "| PPM share | KV MiB (32 L) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in s["settings"]:
            d, ours, peer = r["derived"], r["ours"], r.get("peer", {})
            vs = d.get("peer_over_ours_e2e", d.get("peer_over_ours_llm"))
            gf = d.get("gflops_e2e", d.get("gflops_llm"))
            pk = peak["jax"]
            lines.append(
                f"| {r['label']} | {r['k']} | {r['seq_len']} | {_f(ours.get('vision_s'))} "
                f"| {_f(ours['ppm_s'])} | {_f(ours['llm_s'])} | {_f(ours.get('e2e_s'))} "
                f"| {_f(peer.get('llm_s'))} | {_f(peer.get('e2e_s'))} "
                f"| {_f(vs, '{:.2f}x')} | {_f(d.get('speedup_e2e', d.get('speedup_llm')), '{:.2f}x')} "
                f"| {_f(d.get('flop_ratio_e2e', d.get('flop_ratio_llm')), '{:.2f}x')} "
                f"| {_f(d.get('bound_fraction_e2e', d.get('bound_fraction_llm')), '{:.0%}')} "
                f"| {_f(gf, '{:.0f}')} ({_f(None if gf is None else gf / pk, '{:.0%}')}) "
                f"| {_f(d.get('ppm_share'), '{:.2%}')} "
                f"| {r['kv_bytes_full_depth'] / 2**20:.0f} |")
        lines.append("")
    if result["decode"]:
        lines += ["## Decode (tokens/s over the steps after the prefill)", "",
                  "| batch | keep | L | new tokens | ours tok/s | peer `generate` tok/s | ours/peer "
                  "| same tokens |", "|---|---|---|---|---|---|---|---|"]
        for r in result["decode"]:
            lines.append(f"| {r['batch']} | {r['label']} | {r['seq_len']} | {r['new_tokens']} "
                         f"| {r['ours_tok_s']:.1f} | {_f(r.get('peer_tok_s'), '{:.1f}')} "
                         f"| {_f(r.get('ours_over_peer'), '{:.2f}x')} "
                         f"| {_f(r.get('token_agreement'), '{:.0%}')} |")
        lines.append("")
    if result["targets"]:
        lines += ["## Targets", "", "| target | goal | worst | where | pass |", "|---|---|---|---|---|"]
        for name, tg in result["targets"].items():
            lines.append(f"| {name} | {tg['goal']} | {tg['worst']:.3f} | {tg['where']} "
                         f"| {'yes' if tg['passed'] else 'NO'} |")
        lines.append("")
    lines += ["Columns: speed-up = unpruned / pruned latency (end to end where measured, else "
              "PPM + LLM); FLOP ratio = XLA-counted FLOPs unpruned / pruned; % of bound = "
              "speed-up / FLOP ratio; peer = transformers LLaVA (PyTorch CPU, sdpa) on the same "
              "weights and inputs, given our kept tokens; KV MiB extrapolated to 32 decoder "
              "layers at this dtype.", ""]
    return "\n".join(lines)


def chart(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suites = result["suites"]
    n = len(suites) + (1 if result["decode"] else 0)
    fig, axes = plt.subplots(1, max(n, 1), figsize=(5.2 * max(n, 1), 4.2), squeeze=False)
    for ax, s in zip(axes[0], suites):
        rows = s["settings"]
        x = np.arange(len(rows))
        part = "e2e_s" if rows[0]["ours"].get("e2e_s") is not None else "llm_s"
        ours = [r["ours"][part] or 0 for r in rows]
        ax.bar(x - 0.2, ours, 0.4, label="ours (JAX)")
        if all("peer" in r and r["peer"].get(part) for r in rows):
            ax.bar(x + 0.2, [r["peer"][part] for r in rows], 0.4, label="transformers")
        base = rows[0]
        if base["k"] == s["n_v"] and all("flop_ratio_" + part[:-2] in r["derived"] or r is base
                                         for r in rows):
            bound = [base["ours"][part] / r["derived"].get("flop_ratio_" + part[:-2], 1.0)
                     for r in rows]
            ax.plot(x, bound, "k--", marker="o", label="FLOP-ratio bound")
        ax.set_xticks(x, [f"{r['label']}\nk={r['k']}" for r in rows], fontsize=8)
        ax.set_ylabel("seconds")
        ax.set_title(f"{s['name']} prefill ({part[:-2]}), B={s['batch']}, n_v={s['n_v']}",
                     fontsize=9)
        ax.legend(fontsize=8)
    if result["decode"]:
        ax = axes[0][len(suites)]
        rows = result["decode"]
        x = np.arange(len(rows))
        ax.bar(x - 0.2, [r["ours_tok_s"] for r in rows], 0.4, label="ours (while_loop)")
        if all("peer_tok_s" in r for r in rows):
            ax.bar(x + 0.2, [r["peer_tok_s"] for r in rows], 0.4, label="transformers generate")
        ax.set_xticks(x, [f"B={r['batch']}\n{r['label']}" for r in rows], fontsize=8)
        ax.set_ylabel("tokens / s")
        ax.set_title("decode throughput", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict, out_dir: str) -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {n: os.path.join(out_dir, f"bench.{n}") for n in ("json", "md", "png")}
    with open(paths["json"], "w") as f:
        json.dump(_jsonable(result), f, indent=1)
    with open(paths["md"], "w") as f:
        f.write(markdown(result))
    chart(result, paths["png"])
    return paths


# ----------------------------------------------------------------------------- CLI


def _parse_keeps(s: str) -> tuple:
    return tuple(parse_keep(item) for item in s.split(",") if item.strip())


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m covipal_jax.tools.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--config", default=None,
                    help=f"config file[:args] (default {DEFAULT_CONFIG}; --quick: {QUICK_CONFIG})")
    ap.add_argument("--layers", type=int, default=None, help="decoder depth (default 2)")
    ap.add_argument("--quick", action="store_true", help="tiny widths, seconds (tests)")
    ap.add_argument("--full", action="store_true",
                    help="batch-8 prefill, every keep decoded at batch 8, NeXT tower on 5 crops")
    ap.add_argument("--keeps", help="comma list: float ratios / int counts (1.0 = unpruned)")
    ap.add_argument("--next_tokens", type=int, help="NeXT vision tokens (0 = skip the suite)")
    ap.add_argument("--next_keeps", help="keeps of the NeXT suite")
    ap.add_argument("--prefill_batches", help="comma list, e.g. 1,8")
    ap.add_argument("--decode_batches", help="comma list, e.g. 1,8 (empty = no decode)")
    ap.add_argument("--reps", type=int)
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--decode_tokens", type=int)
    ap.add_argument("--text_len", type=int)
    ap.add_argument("--threads", type=int, help="torch threads (XLA uses every core)")
    ap.add_argument("--no_peer", action="store_true", help="skip the PyTorch peer")
    ap.add_argument("--no_flops", action="store_true", help="skip XLA FLOP counting")
    a = ap.parse_args(argv)

    opts = Options.quick() if a.quick else (Options.full() if a.full else Options())
    if a.keeps:
        opts.keeps = _parse_keeps(a.keeps)
    if a.next_keeps:
        opts.next_keeps = _parse_keeps(a.next_keeps)
    for name in ("next_tokens", "reps", "warmup", "decode_tokens", "text_len", "threads"):
        if getattr(a, name) is not None:
            setattr(opts, name, getattr(a, name))
    if a.prefill_batches is not None:
        opts.prefill_batches = tuple(int(x) for x in a.prefill_batches.split(",") if x)
    if a.decode_batches is not None:
        opts.decode_batches = tuple(int(x) for x in a.decode_batches.split(",") if x)
    opts.peer = not a.no_peer
    opts.flops = not a.no_flops
    cfg, ppm = load_config(a.config or (QUICK_CONFIG if a.quick else DEFAULT_CONFIG), a.layers)
    if cfg.vision.kind != "clip" or cfg.text.kind != "llama":
        opts.peer = False  # the transformers peer covers LLaVA-1.5 configs
    result = Bench(cfg, opts, ppm).run()
    paths = write(result, a.out)
    print(markdown(result))
    print("wrote " + ", ".join(paths.values()))
    return 0


def load_config(spec: str, layers: int | None = None) -> tuple[LlavaConfig, Any]:
    """`path.py[:args]` -> (LlavaConfig, the config's `ppm` section); `layers` sets the
    decoder depth."""
    import importlib.util

    path, _, arg = spec.partition(":")
    mod_spec = importlib.util.spec_from_file_location("bench_config", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    config = mod.get_config(arg or None)
    model = config.model.to_dict()
    if layers is not None:
        model["text"]["num_layers"] = layers
    return LlavaConfig.from_config(model), config.ppm


if __name__ == "__main__":
    sys.exit(main())
