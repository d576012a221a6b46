r"""Ahead-of-time compilation of the real sharded steps for a TPU topology, on a CPU host.

    python -m covipal_jax.tools.aot --config configs/llava15_7b.py --topology v5e:2x4 \
        --mode prefill --batch 8 --keep 0.25 --config.mesh.fsdp=-1 --config.mesh.data=1

Needs libtpu (`pip install "jax[tpu]==0.10.2"`); no TPU is touched: the compiler targets the
topology's devices (`jax.experimental.topologies`). The process must not have started a JAX
backend before `setup_host()` (it sets `JAX_PLATFORMS=cpu` and libtpu's environment), so run
this as its own process (tests call it through `subprocess`).

Modes (B batch, T text bucket, k kept vision tokens):
- `prefill`: `decoding.Generator`'s jitted prefill (tower, pruning, splice, decoder into a KV
  cache with room for `max_new_tokens`, first token), pruned when `--keep` < 1 (method
  `pruning.method`, or `ppm` when that is `none`).
- `decode`: one decode step over that KV cache (the body of the on-device `while_loop`),
  the state donated.
- `train_ppm`: `covipal_jax.train`'s PPM step (frozen LLaVA in `train.frozen_dtype`, PPM and
  AdamW state f32, state donated), stage `--stage` (stage 1: layers [0, l_g), attention rows
  at l_g, PPM, MSE; stage 2: soft-pruned forward through every layer + LM/KL/budget loss).
  Configs without a `train` section get `configs.common.train_config()` with the guide layer
  at the paper's depth fraction (16 of 28).

Parameters, optimizer state and batches are abstract `ShapeDtypeStruct`s carrying the
NamedShardings our logical rules give them on a mesh built from the topology's devices
(`config.mesh`, `--config.mesh.fsdp=...`). Reported per device: XLA's `memory_analysis()`
(arguments, outputs, temporaries, aliased/donated, generated code) against the chip's HBM.
Exit status 1 when it does not fit, 2 on a usage error.

FLOPs: XLA's cost analysis counts a `while` body once (a scanned layer stack would count one
layer), and its TPU `optimal_seconds` comes back negative for these programs, so the FLOPs
are those of the same step with unrolled layers (`scan_layers=False`), from the HLO cost
analysis of its CPU lowering (global, before partitioning; the PPM's 2-block `nn.scan` is
corrected by (blocks - 1) x one block's cost), divided by the device count. The estimated step
time is a roofline lower bound: max(FLOPs per device / peak bf16 FLOP/s, argument bytes per
device / HBM bandwidth) from the table below. It is not a measurement.
"""
from __future__ import annotations

from covipal_jax import configs as configs_lib
import dataclasses
import math
import sys
import time
from typing import Any

from covipal_jax.tools.aot_report import (_oom_report, format_report,  # noqa: F401
                                          long_table, table)
from covipal_jax.tools.aot_inputs import (_batch_sds, attention_paths,  # noqa: F401
                                          decode_state_abstract, num_visual_tokens,
                                          parse_visual, visual_sds)
from covipal_jax.tools.topology import (ALIASES, CHIPS, libtpu_available,  # noqa: F401
                                        resolve_topology, setup_host, topology_devices,
                                        topology_mesh)

MODES = ("prefill", "decode", "train_ppm")


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class Request:
    mode: str
    batch: int
    text_len: int
    keep: float | int
    method: str
    max_new_tokens: int
    stage: int = 1
    visual: str = ""    # "" (one base-resolution image), "anyres:VIEWS" or "video:FRAMES"


def _with_train(config):
    """`config` with a `train` (and `data`) section; common defaults when it has none."""
    from covipal_jax.configs import common

    if "train" in config:
        return config
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.train = common.train_config()
        n_layers = config.model.text["num_layers"]
        config.train.guide_layer = max(1, round(n_layers * 16 / 28))
        config.train.frozen_dtype = "bfloat16"
        if "data" not in config:
            config.data = common.data_config()
    return config


def model_config(config, scan: bool | None = None, vision_run: int | None = None,
                 text_layers: int | None = None):
    """LlavaConfig of `config.model`, optionally unrolled / at another depth (cost variants)."""
    from covipal_jax.models.config import LlavaConfig

    model = config.model.to_dict()
    cfg = LlavaConfig.from_config(model)
    if vision_run is not None:
        extra = cfg.vision.num_layers - cfg.vision.num_run_layers
        model["vision"]["num_layers"] = vision_run + extra
    if text_layers is not None:
        model["text"]["num_layers"] = text_layers
    cfg = LlavaConfig.from_config(model)
    return cfg if scan is None else cfg.replace(scan_layers=scan)


# ----------------------------------------------------------------------------- abstract trees


def abstract_params(init_fn, mesh, rules, dtype=None):
    """(abstract unboxed tree with NamedShardings, shardings) of a boxed init function."""
    from covipal_jax.train import state as state_lib
    return state_lib.abstract_params(init_fn, mesh, rules, dtype)


def _ppm_pieces(config, cfg, mesh, rules, n_v=None):
    from covipal_jax.weights import ppm_io
    from covipal_jax.pruning.ppm import PPM

    # the PPM's attention on the backend the LLaVA's is compiled with (dense for the FLOP count)
    pcfg = ppm_io.ppm_config(config, cfg).with_attention(cfg.attention)
    if n_v is not None and n_v != pcfg.n_v:
        pcfg = dataclasses.replace(pcfg, n_v=n_v)
    variables, _ = abstract_params(lambda r: ppm_io.init_ppm(pcfg, r), mesh, rules)
    return PPM(pcfg), pcfg, variables


# ----------------------------------------------------------------------------- steps


@dataclasses.dataclass
class Step:
    """A function, its abstract arguments and jit options."""

    fn: Any
    args: tuple
    jit_kw: dict
    ppm_cfg: Any = None       # PPMConfig when the step runs a PPM (for the FLOP correction)
    ppm_grad: bool = False    # the PPM is differentiated (train)
    ppm_text_len: int = 0


def build_step(req: Request, config, cfg, mesh, rules) -> Step:
    """The jitted function of `req.mode` with abstract (sharded when mesh) arguments."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from covipal_jax.models.llava import Llava, init_params

    model = Llava(cfg)
    params, _ = abstract_params(lambda r: init_params(cfg, r), mesh, rules)
    b, t = req.batch, req.text_len
    if req.mode in ("prefill", "decode"):
        import dataclasses as dc

        from covipal_jax import pruning
        from covipal_jax.inference.decoding import Generator

        spec = pruning.from_config(_pruning(config, req))
        ppm_vars, pcfg = None, None
        if spec.trainable:  # abstract PPM variables (the method value carries its config)
            # Over the packed length N (a layout PPM runs on any N; a table PPM's table
            # spans N, what a PPM trained for that bucket would be).
            _, pcfg, ppm_vars = _ppm_pieces(config, cfg, mesh, rules,
                                            n_v=num_visual_tokens(req.visual, cfg))
            spec = dc.replace(spec, ppm=pcfg)
        gen = Generator(model, spec, max_new_tokens=req.max_new_tokens, eos_id=2, pad_id=0)
        pixels = visual_sds(req.visual, cfg, b, mesh)
        ids = _batch_sds((b, t), jnp.int32, mesh)
        mask = _batch_sds((b, t), jnp.bool_, mesh)
        key = jax.eval_shape(lambda: jax.random.key(0))
        rng = jax.ShapeDtypeStruct((), key.dtype,
                                   sharding=None if mesh is None else NamedSharding(mesh, P()))
        if req.mode == "prefill":
            return Step(gen.prefill_fn, (params, ppm_vars, pixels, ids, mask, rng), {},
                        ppm_cfg=pcfg, ppm_text_len=t)
        state, _ = jax.eval_shape(gen.prefill_fn, params, ppm_vars, pixels, ids, mask, rng)
        state = decode_state_abstract(state, b, mesh, rules)
        return Step(gen.decode_step_fn, (params, state), dict(donate_argnums=(1,)))
    if req.mode == "train_ppm":
        if req.visual:
            raise ValueError("--visual is for prefill / decode (PPM training takes one image)")
        return _train_step(req, config, cfg, model, params, mesh, rules)
    raise ValueError(f"mode must be one of {MODES}, got {req.mode!r}")


def _pruning(config, req: Request):
    p = config.pruning.copy_and_resolve_references()
    with p.unlocked():
        p.keep = req.keep
        p.method = req.method
    return p


def _train_step(req: Request, config, cfg, model, params, mesh, rules) -> Step:
    """The trainer's own jitted PPM step on its own abstract state and batch
    (`covipal_jax.train.state`), as `train.loop.Trainer` jits it."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from covipal_jax.train import loop, objectives
    from covipal_jax.train import state as state_lib

    config = _with_train(config)
    t = config.train
    spec = objectives.ObjectiveSpec.from_config(t, cfg, req.stage)
    ppm_module, pcfg, ppm_vars = _ppm_pieces(config, cfg, mesh, rules)
    tx, _ = loop.make_optimizer(t, 1000, req.stage)
    frozen = state_lib.abstract_frozen(params, t.frozen_dtype)
    ppm_params = ppm_vars["params"]
    param_sh = None if mesh is None else jax.tree.map(lambda x: x.sharding, ppm_params)
    state, state_sh = state_lib.abstract_state(ppm_params, param_sh, tx, mesh)
    batch = state_lib.abstract_batch(req.batch, req.text_len, cfg.vision.image_size, mesh)
    step = loop.make_step(model, ppm_module, spec, tx, seed=0, deterministic=True)
    jit_kw: dict = dict(donate_argnums=(0,))
    if mesh is not None:
        jit_kw.update(in_shardings=(state_sh, jax.tree.map(lambda x: x.sharding, frozen),
                                    state_lib.batch_shardings(mesh)),
                      out_shardings=(state_sh, NamedSharding(mesh, P())))
    return Step(step, (state, frozen, batch), jit_kw, ppm_cfg=pcfg, ppm_grad=True,
                ppm_text_len=req.text_len)


# ----------------------------------------------------------------------------- costs


def _cost(lowered_or_compiled) -> dict:
    c = lowered_or_compiled.cost_analysis()
    if isinstance(c, (list, tuple)):
        c = c[0]
    return dict(c or {})


def ppm_block_cost(pcfg, batch: int, text_len: int, grad: bool) -> float:
    """HLO FLOPs of one PPMBlock (forward, or forward + backward when grad)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from covipal_jax.pruning.ppm import PPMBlock

    block = PPMBlock(pcfg.with_attention("xla"))
    v = jnp.zeros((batch, pcfg.n_v, pcfg.width))
    t = jnp.zeros((batch, text_len, pcfg.width))
    kv = jnp.ones((batch, text_len + pcfg.n_v), bool)
    params = jax.eval_shape(lambda: nn.unbox(block.init(jax.random.key(0), v, t, kv)))
    fwd = lambda p, a: block.apply(p, a, t, kv)[0]
    fn = (lambda p, a: jax.grad(lambda p, a: fwd(p, a).sum(), argnums=(0, 1))(p, a)) \
        if grad else fwd
    return float(_cost(jax.jit(fn).lower(params, jax.ShapeDtypeStruct(v.shape, v.dtype)))
                 .get("flops", 0.0))


def hlo_flops(req: Request, config) -> float:
    """Global FLOPs of the step with unrolled layers (CPU lowering, no mesh), PPM-corrected."""
    # Dense XLA attention on the CPU lowering (not "auto"'s chunked loop, which XLA's cost
    # analysis would count once): for splash, whose causal blocks skip the masked half of the
    # scores, this is an upper bound on the attention FLOPs.
    cfg = model_config(config, scan=False).replace(attention="xla")
    step = build_step(req, config, cfg, None, config.logical_axis_rules)
    import jax

    flops = float(_cost(jax.jit(step.fn).lower(*step.args)).get("flops", 0.0))
    if step.ppm_cfg is not None and step.ppm_cfg.num_layers > 1:
        flops += (step.ppm_cfg.num_layers - 1) * ppm_block_cost(
            step.ppm_cfg, req.batch, step.ppm_text_len, step.ppm_grad)
    return flops


# ----------------------------------------------------------------------------- the report


def fit_batch(req: Request, mesh, *, given: bool) -> tuple[Request, str | None]:
    """`req` with a batch that divides the mesh's data x fsdp axes, and a note saying so.

    A batch from the config (`given=False`) that does not divide becomes the smallest one
    that does; a batch given with `--batch` is an error that names the batches that fit."""
    from covipal_jax.train import state as state_lib

    dp = state_lib.data_parallelism(mesh)
    if req.batch % dp == 0:
        return req, None
    fit = state_lib.fitting_batch(req.batch, mesh)
    axes = f"data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']} = {dp}"
    if given:
        raise ValueError(
            f"batch {req.batch} is not divisible by {axes}: use --batch {fit} (or a multiple "
            f"of {dp}), or another mesh, e.g. --config.mesh.data=1 "
            f"--config.mesh.fsdp={math.gcd(req.batch, dp) or 1} --config.mesh.tensor=-1")
    return (dataclasses.replace(req, batch=fit),
            f"batch {req.batch} (from the config) does not divide {axes}: compiled batch {fit}, "
            f"the smallest that does (--batch to choose another)")


def compile_step(req: Request, config, topology: str, *, flops: bool = True,
                 hbm_gib: float | None = None, batch_given: bool = True) -> dict:
    """Compile `req` for `topology` (sharded by `config.mesh`); per-device memory and costs.

    batch_given=False: a batch that does not divide the mesh is raised to the smallest that
    does (reported in `batch_note`); True: it is an error that suggests one."""
    import jax

    from covipal_jax import sharding as sh
    mesh, gen = topology_mesh(config, topology)
    shape = tuple(mesh.shape[a] for a in sh.MESH_AXES)
    devices = list(mesh.devices.flat)
    rules = config.logical_axis_rules
    cfg = model_config(config)
    req, note = fit_batch(req, mesh, given=batch_given)
    t0 = time.perf_counter()
    # Abstract trees are built outside the mesh context: Flax's init runs eagerly on
    # constant dummy inputs, which cannot execute on compile-only devices.
    step = build_step(req, config, cfg, mesh, rules)
    header = _report_header(req, config, cfg, topology, gen, shape, len(devices))
    if note:
        header["batch_note"] = note
    chip_gib, peak_tflops, hbm_gbps = CHIPS[gen]
    hbm_gib = chip_gib if hbm_gib is None else hbm_gib
    with sh.use_mesh(mesh, rules):
        lowered = jax.jit(step.fn, **step.jit_kw).lower(*step.args)
        # Pallas kernels (splash attention) lower to Mosaic `tpu_custom_call`s.
        header["attention"]["tpu_custom_calls"] = lowered.as_text().count("tpu_custom_call")
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:
            # The TPU compiler refuses programs whose temporaries exceed the HBM.
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            return _oom_report(header, hbm_gib, str(e), time.perf_counter() - t0)
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    arg, out = mem.argument_size_in_bytes, mem.output_size_in_bytes
    tmp, alias = mem.temp_size_in_bytes, mem.alias_size_in_bytes
    code = mem.generated_code_size_in_bytes
    total = arg + out - alias + tmp + code
    hbm = int(hbm_gib * 2 ** 30)
    xla = _cost(compiled)
    n = len(devices)
    rep = dict(
        header,
        bytes=dict(argument=arg, output=out, temp=tmp, alias=alias, generated_code=code,
                   total=total),
        hbm_bytes=hbm, hbm_fraction=total / hbm, fits=total <= hbm,
        compile_s=compile_s, xla_optimal_seconds=xla.get("optimal_seconds"),
        xla_flops_scanned=xla.get("flops"))
    if flops:
        g = hlo_flops(req, config)
        per_dev = g / n
        t_compute = per_dev / (peak_tflops * 1e12)
        t_memory = (arg - (alias if req.mode != "train_ppm" else 0)) / (hbm_gbps * 1e9)
        rep.update(flops_global=g, flops_per_device=per_dev,
                   est_step_s=max(t_compute, t_memory), est_compute_s=t_compute,
                   est_memory_s=t_memory)
    return rep


def _report_header(req, config, cfg, topology, gen, shape, n) -> dict:
    """The fields of a report that describe the step (not its compiled sizes)."""
    from covipal_jax import pruning, sharding as sh

    k = _kept(req, config, cfg)
    with_ppm = req.mode == "train_ppm" or (pruning.get(_pruning(config, req).method).trainable
                                           and k < num_visual_tokens(req.visual, cfg))
    return dict(
        topology=resolve_topology(topology)[0], chip=gen, devices=n,
        mesh=dict(zip(sh.MESH_AXES, shape)), mode=req.mode,
        stage=req.stage if req.mode == "train_ppm" else None, batch=req.batch,
        text_len=req.text_len,
        method=_pruning(config, req).method if req.mode != "train_ppm" else "ppm",
        keep=req.keep, k=k, visual=req.visual or "image",
        num_vision_tokens=num_visual_tokens(req.visual, cfg),
        decoder_layers=cfg.text.num_layers, param_dtype=str(cfg.weight_dtype),
        remat_policy=cfg.remat_policy,
        attention=attention_paths(req, cfg, k, ppm=config.ppm if with_ppm else None))


def _kept(req, config, cfg) -> int:
    from covipal_jax.pruning.base import resolve_keep
    if req.mode == "train_ppm":
        return resolve_keep(_with_train(config).train.keep, cfg.num_vision_tokens)
    return resolve_keep(req.keep, num_visual_tokens(req.visual, cfg))


# ----------------------------------------------------------------------------- CLI


def main(argv) -> None:
    from absl import flags

    F = flags.FLAGS
    del argv
    from covipal_jax import paths

    if F.summarize:
        reports = []
        for p in sorted(paths.as_path(F.summarize).glob("*.json")):
            r = paths.read_json(p)
            r.setdefault("name", p.name[:-5])
            reports.append(r)
        if F.long_table:
            reports = [r for r in reports if r.get("attention")]
        print(long_table(reports) if F.long_table else table(reports))
        return
    if F.mode not in MODES:
        print(f"error: --mode must be one of {MODES}", file=sys.stderr)
        sys.exit(2)
    if not libtpu_available():
        print("error: libtpu is not installed (pip install \"jax[tpu]==0.10.2\")",
              file=sys.stderr)
        sys.exit(2)
    setup_host()
    config = _CONFIG.value
    if F.attention:
        from covipal_jax.models.attention import IMPLS
        if F.attention not in IMPLS:
            print(f"error: --attention must be one of {IMPLS}", file=sys.stderr)
            sys.exit(2)
        config = config.copy_and_resolve_references()
        with config.unlocked():
            config.model.attention = F.attention
    if F.mode == "train_ppm":
        config = _with_train(config)
    keep = F.keep if F.keep is not None else config.pruning.keep
    keep = int(keep) if float(keep) >= 1 and float(keep) != 1.0 else float(keep)
    method = F.method or config.pruning.method
    if F.mode != "train_ppm":
        from covipal_jax import pruning
        if keep != 1.0 and not pruning.get(method).budgeted:
            method = pruning.PPMMethod.name
        if keep == 1.0:
            method = pruning.NoneMethod.name
    if F.mode == "train_ppm":
        batch = F.batch or int(config.train.batch_size)
        text_len = F.text_len or int(config.data.max_len)
    else:
        batch = F.batch or int(config.batch_size)
        text_len = F.text_len or 64
    req = Request(F.mode, batch, text_len, keep, method,
                  F.max_new_tokens or int(config.max_new_tokens), F.stage, F.visual or "")
    try:
        parse_visual(req.visual)
        rep = compile_step(req, config, F.topology, flops=F.flops, hbm_gib=F.hbm_gib,
                           batch_given=F.batch is not None)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(format_report(rep))
    if F.json:
        paths.write_json(F.json, rep)
    sys.exit(0 if rep["fits"] else 1)


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    global _CONFIG
    _CONFIG = config_flags.DEFINE_config_file("config", configs_lib.path("llava15_7b"), "Config file.",
                                              lock_config=True)
    flags.DEFINE_string("topology", "v5e:2x4", "TPU topology (v5e:2x4, v4:2x2x1, v5p-8, ...).")
    flags.DEFINE_string("mode", "prefill", f"One of {MODES}.")
    flags.DEFINE_integer("batch", None, "Global batch (default: config.batch_size; "
                         "train_ppm: config.train.batch_size).")
    flags.DEFINE_integer("text_len", None, "Text bucket (default 64; train_ppm: data.max_len).")
    flags.DEFINE_float("keep", None, "Keep ratio (<= 1) or count (> 1) for prefill / decode "
                       "(default config.pruning.keep).")
    flags.DEFINE_string("method", None, "Pruning method (default config.pruning.method; "
                        "ppm when keep < 1 and that is none).")
    flags.DEFINE_integer("max_new_tokens", None, "KV cache room for decoding "
                         "(default config.max_new_tokens).")
    flags.DEFINE_integer("stage", 1, "train_ppm: stage 1 or 2.")
    flags.DEFINE_string("attention", None, "Attention backend (model.attention: auto, xla, "
                        "chunked, splash, cudnn; default: the config's, else auto).")
    flags.DEFINE_string("visual", None, "prefill / decode visual input: one base-resolution "
                        "image (default), anyres:VIEWS (a packed AnyRes image of the VIEWS "
                        "crop bucket: base view + crops) or video:FRAMES (a packed video).")
    flags.DEFINE_bool("flops", True, "Count FLOPs (lowers an unrolled copy on CPU).")
    flags.DEFINE_string("json", None, "Write the report as JSON here.")
    flags.DEFINE_string("summarize", None, "Print a markdown table of the JSON reports in "
                        "this directory and exit.")
    flags.DEFINE_bool("long_table", False, "--summarize: docs/aot_long.md's table (reports "
                      "that name their attention path) instead of the README's.")
    flags.DEFINE_float("hbm_gib", None, "Override the HBM per chip (GiB) the fit is checked "
                       "against (default: the chip's).")


_CONFIG = None

if __name__ == "__main__":
    from absl import app

    _define_flags()
    from covipal_jax import cli

    cli.run(main)
