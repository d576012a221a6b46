"""Per-step time of `Generator.decode` on llava15_7b:layers=2, f32, batch 8, 64 kept vision
tokens (a synthetic 111-token prompt cache, 127 slots; 16 new tokens = 15 decode steps per call),
3 timed calls after a compile call, median reported. Uses whatever covipal_jax is on
PYTHONPATH, so before/after are two processes started together (same machine load):

  (cd /work/main && PYTHONPATH=$PWD python /work/wt/decode/docs/decode_timing.py main) &
  (cd /work/wt/decode && PYTHONPATH=$PWD python docs/decode_timing.py branch) &
"""
import statistics, sys, time
import jax, jax.numpy as jnp, flax.linen as nn
from covipal_jax.tools.bench import load_config
from covipal_jax.inference.prefill import Segment
from covipal_jax.models.decoder import init_cache
from covipal_jax.models.llava import Llava, init_params
from covipal_jax.inference import decoding as new
from covipal_jax.pruning.simple import PoolMethod, RandomMethod

import covipal_jax
LABEL = sys.argv[1] if len(sys.argv) > 1 else "this checkout"
print(LABEL, "code from", covipal_jax.__file__, flush=True)
cfg, _ = load_config("configs/llava15_7b.py:dtype=float32", layers=2)
model = Llava(cfg)
params = jax.jit(lambda r: nn.unbox(init_params(cfg, r)))(jax.random.key(0))
M, REPS, B, PROMPT = 16, 3, 8, 48 - 1 + 64   # 64 kept vision tokens + 47 text tokens
method = RandomMethod(keep=64)
gens = {LABEL: new.Generator(model, method, max_new_tokens=M, eos_id=-1)}
# The state prefill would leave (random KV values: the step time does not depend on them).
t = cfg.text
kv = jax.random.normal(jax.random.key(1), (2, t.num_layers, B, PROMPT + M, t.num_kv_heads,
                                           t.head_dim), jnp.float32)
seg = lambda cache: Segment(cache, jnp.arange(PROMPT + M)[None].repeat(B, 0) < PROMPT,
                            0, t.num_layers, PROMPT)
tok0 = jnp.zeros((B, M), jnp.int32).at[:, 0].set(jnp.arange(B) + 100)
mk = lambda cache: new.DecodeState(tok0, jnp.zeros(B, bool), jnp.ones((), jnp.int32),
                                   jnp.full((B,), PROMPT, jnp.int32), (seg(cache),),
                                   jax.random.key(0))
heads_major = init_cache(cfg, 1, 1)["k"].shape[2] == t.num_kv_heads
states = {LABEL: mk({"k": kv[0].swapaxes(2, 3), "v": kv[1].swapaxes(2, 3)}
                   if heads_major else {"k": kv[0], "v": kv[1]})}
times, toks = {k: [] for k in gens}, {}
for name, g in gens.items():
    print(name, "cache", states[name].segments[0].cache["k"].shape, flush=True)
    jax.block_until_ready(g.decode(params, jax.tree.map(jnp.copy, states[name])))  # compile
for r in range(REPS):
    for name, g in gens.items():
        s = jax.block_until_ready(jax.tree.map(jnp.copy, states[name]))
        t0 = time.perf_counter(); out = jax.block_until_ready(g.decode(params, s))
        times[name].append(time.perf_counter() - t0); toks[name] = out.tokens
        print(name, r, f"{times[name][-1]:.3f}s", flush=True)
print("tokens[0]", toks[LABEL][0].tolist())
for name in gens:
    med = statistics.median(times[name])
    print(f"{name}: median decode call {med:.3f} s, {1000 * med / (M - 1):.0f} ms/step "
          f"(calls: {[round(t, 3) for t in times[name]]})")
