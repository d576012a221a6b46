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

Code: `bench_programs.py` (the jitted programs, their FLOPs, the inputs), `bench_timing.py`
(clocked / interleaved repetitions, matmul peak), `bench_run.py` (`Options`, `Bench`: the suites
and decode), `bench_report.py` (derived ratios, targets, markdown, chart, JSON) and this module
(the CLI and `load_config`).
"""
from __future__ import annotations

from covipal_jax import configs as configs_lib
import sys
from typing import Any

from covipal_jax.models.config import LlavaConfig
from covipal_jax.pruning.base import parse_keep

# Re-exported: the benchmark's pieces (`bench_programs`, `bench_timing`, `bench_run`,
# `bench_report`) stay reachable as `bench.<name>`.
from covipal_jax.tools.bench_programs import (  # noqa: F401
    FlopCounter,
    Programs,
    kv_bytes,
    make_inputs,
    ppm_block_flops,
)
from covipal_jax.tools.bench_report import (  # noqa: F401
    _derive,
    chart,
    markdown,
    targets,
    write,
)
from covipal_jax.tools.bench_run import Bench, Options  # noqa: F401
from covipal_jax.tools.bench_timing import clocked, interleaved, matmul_peak  # noqa: F401
from covipal_jax.tools.costs import compiled_flops  # noqa: F401  (re-exported)

DEFAULT_CONFIG = configs_lib.path("llava15_7b:layers=2,dtype=float32")
QUICK_CONFIG = configs_lib.path("tiny")
FULL_DEPTH = {"llama": 32}  # decoder depth the reduced-depth numbers are extrapolated to


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
