"""One benchmark run (`bench.py`): its options, the prefill suites (`llava15`, `next`; `ov` in
`bench_ov.py`) and decode, timed interleaved against the PyTorch peer; returns the result dict
the report renders."""
from __future__ import annotations

import dataclasses
import gc
import os
import platform
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from covipal_jax.inference.decoding import Generator
from covipal_jax.models.config import LlavaConfig
from covipal_jax.models.llava import init_params
from covipal_jax.pruning import NoneMethod, PPMMethod
from covipal_jax.pruning import ppm as ppm_lib
from covipal_jax.pruning import select
from covipal_jax.pruning.base import resolve_keep
from covipal_jax.tools.bench_programs import FlopCounter, Programs, make_inputs
from covipal_jax.tools.bench_report import _derive, _jsonable, _versions, label, targets
from covipal_jax.tools.bench_rows import LlmRows, finish_rows
from covipal_jax.tools.bench_timing import clocked, interleaved, matmul_peak
from covipal_jax.weights.ppm_io import init_ppm


# ----------------------------------------------------------------------------- options


SUITES = ("llava15", "next", "ov", "decode")
OV_CONFIG = "llava_ov_7b:dtype=float32"   # packaged config name[:args] of the `ov` suite


@dataclasses.dataclass
class Options:
    suites: tuple = ("llava15", "next", "decode")  # of SUITES; `ov` is opt-in (minutes, ~9 GB)
    keeps: tuple = (1.0, 0.5, 0.25, 64)   # float ratio or int count; 1.0 = unpruned
    next_tokens: int = 2880               # 0 disables the NeXT suite
    next_keeps: tuple = (1.0, 0.25, 64)
    prefill_batches: tuple = (1,)
    decode_batches: tuple = (1, 8)
    decode_keeps: str = "ends"            # "all" keeps | "ends" (unpruned and the smallest
                                          # k at B=1, the smallest k at B>1) | "smallest"
    next_vision: bool = False             # run the tower on 5 crops (else 5 x single crop)
    ov_config: str = OV_CONFIG            # the `ov` suite's model
    ov_layers: int = 0                    # its decoder depth (0: the bench config's, i.e. 2)
    ov_views: int = 10                    # views of its AnyRes image (10: base + 3 x 3 crops)
    ov_tokens: int = -1                   # -1: the image's packed length (7,371); 0: skip
    ov_keeps: tuple = (1.0, 0.25, 64)
    ov_vision: bool = False               # the real packed path (tower on every view, e2e
                                          # `prefill`); else views x single-view tower
    ov_vocab: int = 32000                 # shrink both sides' vocabulary (0: the config's)
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
        return cls(suites=SUITES, keeps=(1.0, 0.25), next_tokens=320, next_keeps=(1.0, 0.25),
                   reps=1, warmup=1, decode_tokens=4, text_len=16, image_pos=3,
                   matmul_n=512, decode_batches=(2,), decode_keeps="smallest",
                   full_depth=8, flops_compiled=False, ov_config="tiny_ov",
                   ov_keeps=(1.0, 0.25), ov_vision=True, ov_vocab=0, ov_layers=2)

    @classmethod
    def full(cls) -> "Options":
        return cls(suites=SUITES, prefill_batches=(1, 8), decode_keeps="all", next_vision=True,
                   ov_vision=True)


def _keep_count(keep, n_v: int) -> int:
    return resolve_keep(keep, n_v)


_label = label


# ----------------------------------------------------------------------------- the run


class Bench:
    """One benchmark run (see the module docstring)."""

    def __init__(self, cfg: LlavaConfig, opts: Options, ppm: Any = None, log=None):
        """cfg: the LLaVA-1.5 model of `llava15` / `next` / decode; ppm: a `config.ppm` section
        (PPM width/depth; default common's). Weights are built when a suite needs them."""
        t_start = time.perf_counter()
        if log is None:
            def log(msg):
                print(f"{time.perf_counter() - t_start:7.1f}s {msg}", flush=True)
        unknown = sorted(set(opts.suites) - set(SUITES))
        if unknown:
            raise ValueError(f"unknown suites {unknown}; known: {', '.join(SUITES)}")
        self.cfg, self.opts, self.log = cfg, opts, log
        if ppm is None:
            from covipal_jax.configs import common
            ppm = common.ppm_config()
        self.ppm_section = ppm
        self.n_v = cfg.num_vision_tokens
        self.params = self.peer = None

    def _load(self) -> None:
        """Random weights (ours, the PPMs', the peer's) of the LLaVA-1.5 model."""
        if self.params is not None:
            return
        cfg, opts = self.cfg, self.opts
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
        if opts.peer and cfg.vision.kind == "clip" and cfg.text.kind == "llama":
            from covipal_jax.tools.bench_peer import TorchPeer, torch_llava
            t0 = time.perf_counter()
            self.peer = TorchPeer(torch_llava(self.params, cfg), cfg, threads=opts.threads)
            self.log(f"[bench] torch peer ready ({time.perf_counter() - t0:.1f} s)")

    def _unload(self) -> None:
        """Free the LLaVA-1.5 weights (ours and the peer's) before the `ov` suite."""
        self.params = self.peer = self.ppm_vars = self.progs = self.counter = None
        gc.collect()

    def suite_ov(self, batch: int) -> dict:
        """The `ov` suite (`bench_ov.py`) on its own model, built and freed here."""
        from covipal_jax.tools.bench_ov import OvSuite
        from covipal_jax.tools.bench_programs import load_config

        o = self.opts
        layers = o.ov_layers or self.cfg.text.num_layers
        cfg, ppm = load_config(o.ov_config, layers, vocab=o.ov_vocab or None)
        full_depth = load_config(o.ov_config)[0].text.num_layers
        peer = o.peer and cfg.vision.kind == "siglip" and cfg.text.kind == "qwen2"
        suite = OvSuite(cfg, ppm, full_depth, o, self.log, peer)
        try:
            return suite.run(batch)
        finally:
            suite.close()

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
        rows = LlmRows(cfg, self.progs, self.counter, self.peer, P, pv, pcfg, n_v, o.text_len,
                       o.image_pos, tokens, ids, ids_j, mask_j, o.full_depth, vis_flops,
                       self._torch_sync)
        settings = []
        for i, keep in enumerate(o.keeps):
            self.log(f"[bench] llava15 B={batch}: prepare keep={keep} "
                     f"(k={_keep_count(keep, n_v)})")
            row, _, pruned = rows.prepare_row(i, keep, thunks)
            # end to end: the jitted prefill on pixels (tower + PPM + splice + LLM)
            spec = PPMMethod(keep=row["k"], ppm=pcfg) if pruned else NoneMethod()
            e2e = self.progs.e2e(spec, pcfg if pruned else None)
            pv_arg = pv if pruned else None
            out = e2e(P, pv_arg, px_j, ids_j, mask_j)
            thunks[f"{i}/ours_e2e"] = clocked(
                lambda e2e=e2e, pv_arg=pv_arg: e2e(P, pv_arg, px_j, ids_j, mask_j))
            if self.peer:
                kept_arg = np.asarray(out.kept) if pruned else None
                thunks[f"{i}/peer_e2e"] = clocked(
                    lambda a=kept_arg: self.peer.e2e(px, ids, o.image_pos, a), self._torch_sync)
                row["parity_rel"] = self._parity(
                    out.last_logits, self.peer.e2e(px, ids, o.image_pos, kept_arg))
            if self.counter:
                one = (P, pv_arg, px_j[:1], ids_j[:1], mask_j[:1])
                row["flops"]["e2e"] = self.counter.e2e(spec, pcfg if pruned else None,
                                                       *one) * batch
            settings.append(row)
        self.log(f"[bench] llava15 B={batch}: timing {len(thunks)} programs, interleaved")
        t = self._run(thunks)
        finish_rows(settings, t, {side: t[f"vision/{side}"]["median_s"]
                                  for side in ("ours", "peer") if f"vision/{side}" in t},
                    bool(self.peer))
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
        rows = LlmRows(cfg, self.progs, self.counter, self.peer, P, pv, pcfg, n_v, o.text_len,
                       o.image_pos, tokens, ids, ids_j, mask_j, o.full_depth, vis_flops,
                       self._torch_sync)
        settings, thunks = [], {}
        for i, keep in enumerate(o.next_keeps):
            self.log(f"[bench] next B={batch}: prepare keep={keep} "
                     f"(k={_keep_count(keep, n_v)})")
            settings.append(rows.prepare_row(i, keep, thunks)[0])
        self.log(f"[bench] next B={batch}: timing {len(thunks)} programs, interleaved")
        finish_rows(settings, self._run(thunks), vis, bool(self.peer))
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
        peak = matmul_peak(o.matmul_n, reps=3, threads=o.threads, with_torch=o.peer)
        suites = []
        if {"llava15", "next", "decode"} & set(o.suites):
            self._load()
        if "llava15" in o.suites:
            for b in o.prefill_batches:
                suites.append(self.suite_llava15(b))
        if "next" in o.suites and o.next_tokens:
            single = suites[0] if suites else None
            suites.append(self.suite_next(1, single))
        ks = sorted({_keep_count(x, self.n_v) for x in o.keeps})
        pick = lambda k: next(x for x in o.keeps if _keep_count(x, self.n_v) == k)  # noqa
        pairs = []
        for b in (o.decode_batches if "decode" in o.suites else ()):
            if o.decode_keeps == "all":
                keeps = o.keeps
            elif o.decode_keeps == "ends" and b == 1:
                keeps = tuple(dict.fromkeys((pick(ks[-1]), pick(ks[0]))))
            else:
                keeps = (pick(ks[0]),)
            pairs += [(b, keep) for keep in keeps]
        decode = self.decode(pairs) if pairs else []
        if "ov" in o.suites and o.ov_tokens:
            self._unload()
            suites.append(self.suite_ov(1))
        peak_end = matmul_peak(o.matmul_n, reps=3, threads=o.threads, with_torch=o.peer)
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
