"""GPU benchmark: full-depth LLaVA-1.5-7B and LLaVA-OneVision-7B in bf16, ours vs transformers.

    python -m covipal_jax.tools.gpu_bench --out docs/gpu                 # an NVIDIA GPU
    python -m covipal_jax.tools.gpu_bench --out /tmp/gb --quick          # tiny models, CPU

Letters: B batch, T text length, n_v vision tokens, k kept, L = T - 1 + k, M new tokens.

Random weights are generated in place (no network, no checkpoint). Per model, vision-token
count n_v, keep setting and batch B it measures:
- time to first token (TTFT): one jitted program from pixels and prompt ids to the first
  token: vision tower on ceil(n_v / per-crop) crops per example (a single-crop proxy of
  multi-crop AnyRes: the tokens are concatenated and cut to n_v), projector, PPM top-k
  (random PPM weights; keep 1.0 = unpruned, no PPM), splice, every decoder layer into a KV
  cache of L + M slots, last-token logits, argmax. Compile time is reported apart.
- decode tokens/s: `inference.decoding.Generator.decode` (the on-device while_loop) for
  M - 1 steps from that prefill's cache, B x (M - 1) / seconds.
- KV-cache bytes of the prompt (2 x layers x B x L x K x H x 2 bytes).
- the same prefill through transformers + torch (sdpa) on the same device with the same
  weights (copied from ours): tower + projector, the kept tokens OUR PPM chose, splice,
  language model with a cache, last logits, argmax. `logit_rel_diff` compares the two
  next-token logits (bf16: ~1e-2; f32 --quick: ~1e-5).
Combinations whose estimated memory does not fit the device are skipped with the estimate;
ones that fail with out-of-memory at run time are skipped with the error; once `--budget_min`
is spent the rest are skipped. Every skip is listed in the outputs.

Outputs under --out: gpu_bench.json (everything), gpu_bench.md (tables), gpu_bench.png (chart,
when matplotlib is installed). See docs/gpu_bench.md.
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the device

import argparse
import dataclasses
import math
import platform as platform_lib
import statistics
import sys
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from covipal_jax import configs as configs_lib
from covipal_jax.inference.decoding import DecodeState, Generator
from covipal_jax.inference.prefill import Segment
from covipal_jax.models import attention as attn_lib
from covipal_jax.models.config import LlavaConfig
from covipal_jax.models.decoder import attention_backend, init_cache
from covipal_jax.models.llava import Llava, init_params
from covipal_jax.models.multimodal import image_positions, splice
from covipal_jax.pruning import NoneMethod
from covipal_jax.pruning import ppm as ppm_lib
from covipal_jax.pruning.base import PruneContext, resolve_keep
from covipal_jax.tools.gpu_bench_report import markdown, write

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    config: str          # packaged config name[:args]
    per_crop: int        # vision tokens one crop gives


FULL_MODELS = (ModelSpec("llava15_7b", "llava15_7b:dtype=bfloat16", 576),
               ModelSpec("onevision_7b", "llava_ov_7b:dtype=bfloat16", 729))
QUICK_MODELS = (ModelSpec("tiny_llama", "tiny", 64),  # LlavaForConditionalGeneration
                ModelSpec("tiny_ov", "tiny_ov", 16))  # LlavaOnevisionForConditionalGeneration


@dataclasses.dataclass
class Options:
    out: str = "docs/gpu"
    quick: bool = False
    models: tuple = ()
    vision_tokens: tuple = (576, 2880, 7300)
    keeps: tuple = (1.0, 0.5, 0.25, 64)
    batches: tuple = (1, 8, 32)
    decode_keeps: tuple = (1.0, 64)
    text_len: int = 48
    image_pos: int = 5
    new_tokens: int = 32
    reps: int = 3
    torch: bool = True
    budget_min: float = 20.0
    mem_fraction: float = 0.9
    attention: str = ""  # "" = the config's (auto)

    def model_specs(self) -> tuple[ModelSpec, ...]:
        pool = QUICK_MODELS if self.quick else FULL_MODELS
        if not self.models:
            return pool
        by_name = {m.name: m for m in pool}
        unknown = [m for m in self.models if m not in by_name]
        if unknown:
            raise ValueError(f"unknown --models {unknown}; known: {sorted(by_name)}")
        return tuple(by_name[m] for m in self.models)


def quick_options(out: str) -> Options:
    return Options(out=out, quick=True, vision_tokens=(64, 160), keeps=(1.0, 16),
                   batches=(2,), decode_keeps=(1.0, 16), text_len=12, image_pos=2,
                   new_tokens=4, reps=2, budget_min=15.0)


# ----------------------------------------------------------------------------- helpers


def load_config(spec: str) -> tuple[LlavaConfig, Any]:
    import importlib.util

    path, _, arg = configs_lib.path(spec).partition(":")
    mod_spec = importlib.util.spec_from_file_location("gpu_bench_config", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    config = mod.get_config(arg or None)
    return LlavaConfig.from_config(config.model.to_dict()), config.ppm


def device_memory() -> int | None:
    """Usable bytes of device 0 (None when the backend does not say, e.g. CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def tree_bytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def kv_bytes(cfg: LlavaConfig, batch: int, length: int) -> int:
    t = cfg.text
    return 2 * t.num_layers * batch * length * t.num_kv_heads * t.head_dim * \
        jnp.dtype(cfg.compute_dtype).itemsize


def estimate_bytes(cfg: LlavaConfig, weights: int, batch: int, n_v: int, length: int,
                   extra: int, backend: str) -> int:
    """Weights + KV cache + the live activations of one layer (+ XLA's score matrix)."""
    t, v = cfg.text, cfg.vision
    item = jnp.dtype(cfg.compute_dtype).itemsize
    act = batch * length * (6 * t.hidden_size + 3 * t.intermediate_size) * item
    crops = batch * math.ceil(n_v / max(v.num_vision_tokens, 1))
    vis = crops * v.num_positions * (6 * v.hidden_size + 2 * v.intermediate_size) * item
    scores = batch * t.num_heads * length * (length + extra) * 4 if backend == "xla" else 0
    return weights + kv_bytes(cfg, batch, length + extra) + act + vis + scores


def is_oom(e: BaseException) -> bool:
    s = f"{type(e).__name__} {e}".lower()
    return "resource_exhausted" in s or "out of memory" in s or "outofmemory" in s


def timed(fn: Callable[[], Any], reps: int) -> dict:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return dict(median_s=statistics.median(times), times_s=times)


def label(keep, k: int, n_v: int) -> str:
    return "unpruned" if k == n_v else (f"{keep:g}" if isinstance(keep, float) else f"{k} tok")


# ----------------------------------------------------------------------------- our programs


def ttft_program(model: Llava, n_v: int, k: int, crops: int, extra: int,
                 pcfg: ppm_lib.PPMConfig | None):
    """jit((params, ppm_vars, pixels [B*crops, H, W, 3], ids, mask) -> (first token i32[B],
    cache, key_valid, next position, kept i32[B, k]))."""
    cfg = model.cfg
    module = None if pcfg is None else ppm_lib.PPM(pcfg)

    def fn(p, pv, pixels, ids, mask):
        b = ids.shape[0]
        _, vis = model.apply(p, pixels, method=Llava.encode_image)
        vis = vis.reshape(b, crops * vis.shape[1], vis.shape[2])[:, :n_v]
        text = model.apply(p, ids, method=Llava.embed_text)
        if module is None:
            tokens = vis
            idx = jnp.broadcast_to(jnp.arange(n_v, dtype=jnp.int32), (b, n_v))
        else:
            ctx = PruneContext(vision_tokens=vis, text_embeds=text,
                               text_mask=mask & (ids != cfg.image_token_id))
            res = ppm_lib.ppm(ctx, k, module=module, variables=pv)
            tokens, idx = res.tokens, res.indices
        pos = image_positions(ids, cfg.image_token_id)
        seq, seq_mask, positions, _ = splice(text, mask, pos, tokens, idx, "contiguous", n_v)
        length = seq.shape[1]
        key_valid = jnp.concatenate([seq_mask, jnp.zeros((b, extra), bool)], axis=1)
        cache = init_cache(cfg, b, length + extra)
        h, cache = model.apply(p, seq, method=Llava.run, positions=positions,
                               key_valid=key_valid, cache=cache, cache_index=0)
        logits = model.apply(p, h[:, -1:], method=Llava.logits)[:, 0]
        return (jnp.argmax(logits, -1).astype(jnp.int32), logits, cache, key_valid,
                positions[:, -1] + 1, idx)
    return jax.jit(fn)


def decode_state(out, new_tokens: int, num_layers: int) -> DecodeState:
    """The decode loop's state after our prefill (one KV segment over every layer)."""
    tok, _, cache, key_valid, next_pos, _ = out
    b = tok.shape[0]
    length = key_valid.shape[1] - new_tokens
    tokens = jnp.zeros((b, new_tokens), jnp.int32).at[:, 0].set(tok)
    seg = Segment(cache, key_valid, 0, num_layers, length)
    return DecodeState(tokens, jnp.zeros((b,), bool), jnp.ones((), jnp.int32),
                       next_pos.astype(jnp.int32), (seg,), jax.random.key(0))


def make_inputs(cfg: LlavaConfig, batch: int, crops: int, o: Options, seed: int):
    rng = np.random.default_rng(seed)
    hi = min(cfg.text.vocab_size, 32000)
    ids = rng.integers(5, hi, size=(batch, o.text_len)).astype(np.int32)
    ids = np.where(ids == cfg.image_token_id, 5, ids)
    ids[:, o.image_pos] = cfg.image_token_id
    mask = np.ones((batch, o.text_len), bool)
    v = cfg.vision
    pixels = rng.standard_normal((batch * crops, v.image_size, v.image_size, 3))
    return pixels.astype(np.float32), ids, mask


# ----------------------------------------------------------------------------- the run


class Run:
    def __init__(self, o: Options, log=print):
        self.o, self.log = o, log
        self.t0 = time.perf_counter()
        self.rows: list[dict] = []
        self.skipped: list[dict] = []
        self.mem = device_memory()

    def out_of_time(self) -> bool:
        return time.perf_counter() - self.t0 > 60 * self.o.budget_min

    def skip(self, **kw):
        self.skipped.append(kw)
        self.log(f"[gpu_bench] skip {kw}")

    def model(self, ms: ModelSpec) -> None:
        o = self.o
        cfg, ppm_section = load_config(ms.config)
        if o.attention:
            cfg = cfg.replace(attention=o.attention)
        if self.out_of_time():
            self.skip(model=ms.name, reason="time budget")
            return
        t0 = time.perf_counter()
        params = jax.jit(lambda r: nn.unbox(init_params(cfg, r)))(jax.random.key(0))
        params = jax.block_until_ready(params)
        weights = tree_bytes(params)
        self.log(f"[gpu_bench] {ms.name}: {weights / 2 ** 30:.1f} GiB of random weights "
                 f"({time.perf_counter() - t0:.0f} s)")
        model = Llava(cfg)
        peer = None
        if o.torch:
            try:
                from covipal_jax.tools.gpu_bench_peer import TorchPrefill
                peer = TorchPrefill(params, cfg)
            except Exception as e:  # noqa: BLE001 - the JAX side still runs; say why
                self.skip(model=ms.name, reason=f"torch peer unavailable: {e!r}"[:300])
        for n_v in o.vision_tokens:
            pcfg = ppm_lib.PPMConfig(n_v=n_v, d_model=cfg.text.hidden_size,
                                     width=ppm_section.width, num_layers=ppm_section.num_layers,
                                     num_heads=ppm_section.num_heads,
                                     mlp_ratio=ppm_section.mlp_ratio)
            pv = jax.jit(lambda r: nn.unbox(ppm_lib.PPM(pcfg).init(
                r, jnp.zeros((1, n_v, cfg.text.hidden_size)),
                jnp.zeros((1, 4, cfg.text.hidden_size)), jnp.ones((1, 4), bool))))(
                    jax.random.key(1))
            for batch in o.batches:
                for keep in o.keeps:
                    self.setting(ms, cfg, model, params, weights, peer, pcfg, pv, n_v,
                                 batch, keep)
        del params

    def setting(self, ms, cfg, model, params, weights, peer, pcfg, pv, n_v, batch, keep):
        o = self.o
        k = resolve_keep(keep, n_v)
        where = dict(model=ms.name, n_v=n_v, batch=batch, keep=keep, k=k)
        if self.out_of_time():
            return self.skip(**where, reason="time budget")
        crops = math.ceil(n_v / cfg.num_vision_tokens)
        length = o.text_len - 1 + k
        extra = o.new_tokens
        q = jax.ShapeDtypeStruct((batch, length, cfg.text.num_heads, cfg.text.head_dim),
                                 cfg.compute_dtype)
        kk = jax.ShapeDtypeStruct((batch, length + extra, cfg.text.num_kv_heads,
                                   cfg.text.head_dim), cfg.compute_dtype)
        backend, why = attn_lib.resolve_impl(
            attention_backend(cfg), q, kk,
            mask=attn_lib.Mask(jnp.zeros((length,), jnp.int32), None, 0),
            plat=jax.default_backend())
        need = estimate_bytes(cfg, weights, batch, n_v, length, extra, backend)
        if self.mem is not None and need > o.mem_fraction * self.mem:
            return self.skip(**where, reason=f"estimated {need / 2 ** 30:.0f} GiB > "
                                             f"{o.mem_fraction:.0%} of {self.mem / 2 ** 30:.0f}")
        pruned = k < n_v
        row = dict(where, label=label(keep, k, n_v), crops=crops, seq_len=length,
                   attention=backend, attention_why=why, kv_bytes=kv_bytes(cfg, batch, length),
                   est_bytes=need)
        px, ids, mask = make_inputs(cfg, batch, crops, o, seed=batch * 1000 + n_v)
        args = (params, pv if pruned else None, jnp.asarray(px), jnp.asarray(ids),
                jnp.asarray(mask))
        try:
            prog = ttft_program(model, n_v, k, crops, extra, pcfg if pruned else None)
            t0 = time.perf_counter()
            out = jax.block_until_ready(prog(*args))
            row["compile_and_first_s"] = time.perf_counter() - t0
            row["ttft"] = timed(lambda: prog(*args), o.reps)
            if keep in o.decode_keeps:
                # The method only shapes `gen.prefill` (unused: the state is ours).
                gen = Generator(model, NoneMethod(), max_new_tokens=o.new_tokens, eos_id=-1,
                                pad_id=0)
                state = decode_state(out, o.new_tokens, cfg.text.num_layers)
                jax.block_until_ready(gen.decode(params, jax.tree.map(jnp.copy, state)))
                t = timed(lambda: gen.decode(params, jax.tree.map(jnp.copy, state)), o.reps)
                row["decode"] = dict(t, steps=o.new_tokens - 1,
                                     tok_s=batch * (o.new_tokens - 1) / t["median_s"])
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            return self.skip(**where, reason=f"out of memory: {str(e)[:200]}")
        if peer is not None:
            try:
                kept = np.asarray(out[5]) if pruned else None
                tok, logits = peer.ttft(px, ids, o.image_pos, n_v, kept)  # warm-up
                row["torch_ttft"] = timed(  # ttft synchronizes the device itself
                    lambda: peer.ttft(px, ids, o.image_pos, n_v, kept) and None, o.reps)
                ours = np.asarray(out[1], np.float64)
                row["logit_rel_diff"] = float(np.abs(ours - logits).max() /
                                              max(np.abs(logits).max(), 1e-30))
                row["ours_over_torch"] = row["torch_ttft"]["median_s"] / row["ttft"]["median_s"]
            except Exception as e:  # noqa: BLE001
                if not peer.is_oom(e):
                    raise
                row["torch_ttft"] = dict(skipped=f"out of memory: {str(e)[:200]}")
            peer.free()
        self.rows.append(row)
        self.log(f"[gpu_bench] {ms.name} n_v={n_v} B={batch} {row['label']}: "
                 f"TTFT {row['ttft']['median_s'] * 1e3:.1f} ms"
                 + (f", torch {row['torch_ttft']['median_s'] * 1e3:.1f} ms"
                    if "median_s" in row.get("torch_ttft", {}) else "")
                 + (f", decode {row['decode']['tok_s']:.1f} tok/s" if "decode" in row else ""))

    def result(self, argv) -> dict:
        return dict(meta=meta(self.o, argv), rows=self.rows, skipped=self.skipped,
                    wall_s=time.perf_counter() - self.t0)


def meta(o: Options, argv) -> dict:
    versions = {"python": platform_lib.python_version(), "jax": jax.__version__}
    for mod in ("flax", "torch", "transformers"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = None
    dev = jax.devices()[0]
    return dict(command="python -m covipal_jax.tools.gpu_bench " + " ".join(argv or []),
                device=dict(platform=dev.platform, kind=dev.device_kind,
                            count=jax.device_count(), bytes_limit=device_memory()),
                versions=versions, options=dataclasses.asdict(o),
                date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))


def _keeps(s: str) -> tuple:
    return tuple(int(x) if x.strip().isdigit() else float(x) for x in s.split(","))


def _ints(s: str) -> tuple:
    return tuple(int(x) for x in s.split(","))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help="tiny models (CPU, seconds)")
    p.add_argument("--models", default="", help="comma list (default: both)")
    p.add_argument("--vision_tokens", type=_ints)
    p.add_argument("--keeps", type=_keeps, help="1.0 unpruned; ratio; or a token count")
    p.add_argument("--batches", type=_ints)
    p.add_argument("--decode_keeps", type=_keeps)
    p.add_argument("--new_tokens", type=int)
    p.add_argument("--reps", type=int)
    p.add_argument("--budget_min", type=float, help="skip what is left after this")
    p.add_argument("--attention", default="", choices=("",) + attn_lib.IMPLS)
    p.add_argument("--no_torch", action="store_true")
    a = p.parse_args(argv)
    o = quick_options(a.out) if a.quick else Options(out=a.out)
    for f in ("vision_tokens", "keeps", "batches", "decode_keeps", "new_tokens", "reps",
              "budget_min"):
        if getattr(a, f) is not None:
            setattr(o, f, getattr(a, f))
    o.models = tuple(m for m in a.models.split(",") if m)
    o.attention, o.torch = a.attention, not a.no_torch
    if o.new_tokens < 2:
        p.error("--new_tokens must be >= 2")
    if not o.quick and jax.default_backend() != "gpu":
        print("[gpu_bench] warning: no GPU backend; the full models will be slow",
              file=sys.stderr)
    run = Run(o, log=lambda s: print(s, flush=True))
    for ms in o.model_specs():
        run.model(ms)
    r = run.result(argv if argv is not None else sys.argv[1:])
    paths = write(r, o.out)
    print(markdown(r))
    print("wrote " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
