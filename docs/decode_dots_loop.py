"""A decode-like loop with LLaMA-7B layer shapes (2 layers' seven matmuls + the LM head, no
attention, batch B, STEPS steps in a `while_loop`, f32): dot formulations and XLA:CPU compile
options compared in ONE process, interleaved, median ms/step (docs/decode_dots.md).

  B=8 REPS=3 V=in_out,out_in3d,out_in2d python docs/decode_dots_loop.py

Forms: `in_out` kernel [*in, *out] (the checkpoint layout); `out_in3d` kernel [*out, *in]
given to one dot_general as is (commit ae3ce8f); `out_in2d` the same kernel as one 2-D dot
(`layers.Dense.out_first`). Options ride on `.compile(compiler_options)`.
"""
import os, sys, time, statistics
import jax, jax.numpy as jnp
from jax import lax
B, STEPS = int(os.environ.get("B", 8)), int(os.environ.get("STEPS", 15))
D, H, HD, F, V, L = 4096, 32, 128, 11008, 32064, 2
REPS = int(os.environ.get("REPS", 4))
def mk(shape, k): return jax.random.normal(jax.random.key(k), shape, jnp.float32) * 0.01
def layer(i):   # checkpoint layout [*in, *out]
    return dict(q=mk((D, H, HD), 10*i), k=mk((D, H, HD), 10*i+1), v=mk((D, H, HD), 10*i+2),
                o=mk((H, HD, D), 10*i+3), g=mk((D, F), 10*i+4), u=mk((D, F), 10*i+5), d=mk((F, D), 10*i+6))
W_io = ([layer(i) for i in range(L)], mk((D, V), 99))
def to_oi(W):
    ls, h = W
    t = lambda a, n_in: jnp.transpose(a, tuple(range(n_in, a.ndim)) + tuple(range(n_in)))
    return ([{n: t(a, 2 if n == "o" else 1) for n, a in l.items()} for l in ls], h.T)
W_oi = jax.block_until_ready(jax.jit(to_oi)(W_io))

def dense(x, k, n_in, form, kw):
    """x [B, *in] -> [B, *out]."""
    if form == "in_out":
        return lax.dot_general(x, k, ((tuple(range(1, 1 + n_in)), tuple(range(n_in))), ((), ())), **kw)
    n_out = k.ndim - n_in
    if form == "out_in3d":   # ae3ce8f: the [*out, *in] kernel given to dot_general as is
        return lax.dot_general(x, k, ((tuple(range(1, 1 + n_in)), tuple(range(n_out, k.ndim))), ((), ())), **kw)
    # out_in2d: one 2-D dot
    out = k.shape[:n_out]
    k2 = k.reshape(-1, x[0].size)
    y = lax.dot_general(x.reshape(x.shape[0], -1), k2, (((1,), (1,)), ((), ())), **kw)
    return y.reshape((x.shape[0],) + out)

def step(x, W, form, kw, chunks):
    ls, h = W
    def dn(x, k, n_in=1):
        if chunks > 1:
            return jnp.concatenate([dense(c, k, n_in, form, kw) for c in jnp.split(x, chunks)])
        return dense(x, k, n_in, form, kw)
    for w in ls:
        a = dn(x, w["q"]) + dn(x, w["k"]) + dn(x, w["v"])           # [B, H, HD]
        x = x + dn(a * 1e-3, w["o"], 2)
        x = x + dn(jax.nn.silu(dn(x, w["g"])) * dn(x, w["u"]), w["d"])
        x = x / (1 + jnp.abs(x).mean(-1, keepdims=True))
    return x + dn(x, h)[:, :D] * 1e-3

def make(form, kw={}, chunks=1):
    def loop(x, W):
        body = lambda c: (c[0] + 1, step(c[1], W, form, kw, chunks))
        return lax.while_loop(lambda c: c[0] < STEPS, body, (0, x))[1]
    return jax.jit(loop)

HI = dict(precision=lax.Precision.HIGHEST)
PET = dict(preferred_element_type=jnp.float32)
specs = {  # name: (form, dot kwargs, row chunks, compiler options)
    "in_out": ("in_out", {}, 1, None),
    "out_in3d": ("out_in3d", {}, 1, None),
    "out_in2d": ("out_in2d", {}, 1, None),
    "in_out+HIGHEST": ("in_out", HI, 1, None),
    "in_out+pet_f32": ("in_out", PET, 1, None),
    "in_out+2chunks": ("in_out", {}, 2, None),
    "out_in2d+2chunks": ("out_in2d", {}, 2, None),
    "in_out+no_multi_thread_eigen": ("in_out", {}, 1, {"xla_cpu_multi_thread_eigen": False}),
    "in_out+no_ynn": ("in_out", {}, 1, {"xla_cpu_experimental_ynn_fusion_type": ""}),
    "out_in2d+no_ynn": ("out_in2d", {}, 1, {"xla_cpu_experimental_ynn_fusion_type": ""}),
    # Not accepted by jaxlib 0.10.2 (kept to show it): "No such compile option".
    "in_out+no_thunks": ("in_out", {}, 1, {"xla_cpu_use_thunk_runtime": False}),
}
sel = os.environ.get("V", ",".join(specs)).split(",")
x0 = mk((B, D), 5)
fns = {}
for n in sel:
    form, kw, ch, opts = specs[n]
    W = W_io if form == "in_out" else W_oi
    try:
        c = make(form, kw, ch).lower(x0, W).compile(opts)
        hlo = c.as_text()
        info = f"transposes={hlo.count(' transpose(')} ynn={hlo.count('__ynn_fusion')} xnn={hlo.count('__xnn_fusion')} custom-call={hlo.count('custom-call(')}"
        y = jax.block_until_ready(c(x0, W))
        fns[n] = (c, W, y)
        print(f"{n}: compiled; {info}", flush=True)
    except Exception as e:
        print(f"{n}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
ref = fns[next(iter(fns))][2]
t = {n: [] for n in fns}
for r in range(REPS):
    for n, (c, W, _) in fns.items():
        t0 = time.perf_counter(); jax.block_until_ready(c(x0, W)); t[n].append(time.perf_counter() - t0)
        print(f"rep {r} {n} {1000 * t[n][-1] / STEPS:.0f} ms/step", flush=True)
print("B", B, "load", os.getloadavg())
for n in fns:
    err = float(jnp.abs(fns[n][2] - ref).max())
    print(f"{n:32s} {1000*statistics.median(t[n])/STEPS:7.1f} ms/step  {[round(1000*v/STEPS) for v in t[n]]}  max|dy|={err:.1e}")
