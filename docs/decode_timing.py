"""Per-step time of the CPU decode loop (`Generator._loop`, what `Generator.decode` runs) on
llava15_7b:layers=2, f32, 64 kept vision tokens (a synthetic 111-token prompt cache, 127 slots;
16 new tokens = 15 decode steps per call), several variants compiled in ONE process and timed
interleaved (A, B, A, B, ...), median per variant; the load average is printed.

  PYTHONPATH=$PWD python docs/decode_timing.py [--batch 8] [--reps 3] [--variants a,b,...]

Variants (docs/decode_dots.md): `in_out` the decode twin with the checkpoint kernel layout
[*in, *out]; `out_in` the twin's kernels stored [*out, *in] (the default, `Generator.TWIN_KERNELS`);
`<layout>+<flag>=<value>`: that layout compiled with an XLA:CPU debug option, e.g.
`out_in+xla_cpu_use_thunk_runtime=false` (per-compile `compiler_options`, same process).
"""
import argparse, os, statistics, time

import flax.linen as nn
import jax
import jax.numpy as jnp

import covipal_jax
from covipal_jax.inference import decoding
from covipal_jax.inference.prefill import Segment
from covipal_jax.models.decoder import init_cache
from covipal_jax.models.llava import Llava, init_params
from covipal_jax.pruning.simple import RandomMethod
from covipal_jax.tools.bench import load_config

ap = argparse.ArgumentParser()
ap.add_argument("--batch", type=int, default=8)
ap.add_argument("--reps", type=int, default=3)
ap.add_argument("--variants", default="in_out,out_in")
ap.add_argument("--config", default="configs/llava15_7b.py:dtype=float32")
ap.add_argument("--layers", type=int, default=2)
a = ap.parse_args()
print("code from", covipal_jax.__file__, "| load average", os.getloadavg(), flush=True)
cfg, _ = load_config(a.config, layers=a.layers)
model = Llava(cfg)
params = jax.jit(lambda r: nn.unbox(init_params(cfg, r)))(jax.random.key(0))
M, B, PROMPT = 16, a.batch, 48 - 1 + 64   # 64 kept vision tokens + 47 text tokens
t = cfg.text
kv = jax.random.normal(jax.random.key(1), (2, t.num_layers, B, PROMPT + M, t.num_kv_heads,
                                           t.head_dim), jnp.float32)
heads_major = init_cache(cfg, 1, 1)["k"].shape[2] == t.num_kv_heads
cache = ({"k": kv[0].swapaxes(2, 3), "v": kv[1].swapaxes(2, 3)} if heads_major
         else {"k": kv[0], "v": kv[1]})
seg = Segment(cache, jnp.arange(PROMPT + M)[None].repeat(B, 0) < PROMPT, 0, t.num_layers, PROMPT)
tok0 = jnp.zeros((B, M), jnp.int32).at[:, 0].set(jnp.arange(B) + 100)
state = decoding.DecodeState(tok0, jnp.zeros(B, bool), jnp.ones((), jnp.int32),
                             jnp.full((B,), PROMPT, jnp.int32), (seg,), jax.random.key(0))


def parse_option(kv: str):
    k, v = kv.split("=", 1)
    return k, {"true": True, "false": False}.get(v.lower(), int(v) if v.isdigit() else v)


variants = {}
for name in a.variants.split(","):
    layout, *opts = name.split("+")
    gen_cls = type(f"Gen_{layout}", (decoding.Generator,), {"TWIN_KERNELS": layout})
    g = gen_cls(model, RandomMethod(keep=64), max_new_tokens=M, eos_id=-1, unstack_layers=True)
    layers = g.layer_slices(params)
    t0 = time.perf_counter()
    fn = jax.jit(g._loop, donate_argnums=(1,)).lower(params, state, layers).compile(
        dict(parse_option(o) for o in opts) or None)
    jax.block_until_ready(fn(params, jax.tree.map(jnp.copy, state), layers))  # warm-up call
    print(f"{name}: compiled + warm-up {time.perf_counter() - t0:.1f} s", flush=True)
    variants[name] = (fn, layers)

times, toks = {n: [] for n in variants}, {}
for r in range(a.reps):
    for name, (fn, layers) in variants.items():
        s = jax.block_until_ready(jax.tree.map(jnp.copy, state))
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(params, s, layers))
        times[name].append(time.perf_counter() - t0)
        toks[name] = out.tokens
        print(f"rep {r} {name} {times[name][-1]:.3f} s  load {os.getloadavg()[0]:.2f}", flush=True)
first = next(iter(toks))
for name in variants:
    med = statistics.median(times[name])
    same = bool((toks[name] == toks[first]).all())
    print(f"{name}: batch {B}, median decode call {med:.3f} s, {1000 * med / (M - 1):.0f} ms/step "
          f"(calls: {[round(x, 3) for x in times[name]]}), tokens == {first}'s: {same}")
print("tokens[0]", toks[first][0].tolist(), "| load average", os.getloadavg())
