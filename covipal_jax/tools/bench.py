"""Prefill / decode benchmark: pruned vs unpruned, against the FLOP bound and against PyTorch.

    python -m covipal_jax.tools.bench --out /tmp/bench            # LLaVA-1.5-7B widths, 2 layers
    python -m covipal_jax.tools.bench --out /tmp/bench --full     # + batch-8 prefill, NeXT tower,
                                                                  #   ov with the real 10-view tower
    python -m covipal_jax.tools.bench --out /tmp/bench --quick    # tiny widths (seconds; tests)
    python -m covipal_jax.tools.bench --out /tmp/ov --suites ov   # OneVision-7B widths alone

Suites (`--suites`, comma list): `llava15`, `next`, `decode` (the default run) and `ov`
(opt-in; `--full` and `--quick` run all four).

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
- Suite `ov` (`bench_ov.py`): LLaVA-OneVision-7B widths (SigLIP-384 + Qwen2-7B at the same
  reduced depth), one square AnyRes image of `--ov_views` views (10: base + 3 x 3 crops; its
  packed length, 7,371 tokens, is the default `--ov_tokens`), pruned with the PPM at
  `--ov_keeps`, vs transformers' `LlavaOnevisionForConditionalGeneration` on the same weights
  and kept tokens. The LLM is fed the projected packed tokens as in `next`; the tower is
  estimated as views x the measured single view unless `--ov_vision` (`--full`, `--quick`)
  runs the real packed path: `AnyResImage` through our `prefill` end to end against HF's
  `get_image_features` packing. Both vocabularies shrink to `--ov_vocab` (32,000) so that the
  two 7B-width copies fit in memory (prefill FLOPs change by < 0.02%). The LLaVA-1.5 weights
  are freed before it runs.
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
(the CLI); `bench_ov.py` (the `ov` suite), `bench_peer.py` (the PyTorch peer) and
`bench_torch.py` (the transformers model holding our weights, shared with `gpu_bench`).
"""
from __future__ import annotations

from covipal_jax import configs as configs_lib
import sys

from covipal_jax.pruning.base import parse_keep

# Re-exported: the benchmark's pieces (`bench_programs`, `bench_timing`, `bench_run`,
# `bench_report`) stay reachable as `bench.<name>`.
from covipal_jax.tools.bench_programs import (  # noqa: F401
    FlopCounter,
    Programs,
    kv_bytes,
    load_config,
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
from covipal_jax.tools.bench_run import SUITES, Bench, Options  # noqa: F401
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
    ap.add_argument("--layers", type=int, default=None,
                    help="decoder depth of every suite's model (default 2)")
    ap.add_argument("--quick", action="store_true", help="tiny widths, seconds (tests)")
    ap.add_argument("--full", action="store_true",
                    help="batch-8 prefill, every keep decoded at batch 8, NeXT tower on 5 crops")
    ap.add_argument("--keeps", help="comma list: float ratios / int counts (1.0 = unpruned)")
    ap.add_argument("--next_tokens", type=int, help="NeXT vision tokens (0 = skip the suite)")
    ap.add_argument("--next_keeps", help="keeps of the NeXT suite")
    ap.add_argument("--suites", help=f"comma list of {','.join(SUITES)} (default "
                    "llava15,next,decode; --full / --quick: all)")
    ap.add_argument("--ov_tokens", type=int,
                    help="ov: feed this many projected tokens, tower estimated per view "
                    "(default: the --ov_views image's packed length, 7371; 0 = skip)")
    ap.add_argument("--ov_keeps", help="keeps of the ov suite (default 1.0,0.25,64)")
    ap.add_argument("--ov_views", type=int, help="views of the ov image (default 10)")
    ap.add_argument("--ov_vision", action="store_true",
                    help="ov: run the real packed tower + prefill end to end (else estimated)")
    ap.add_argument("--ov_vocab", type=int, help="ov: vocabulary of both sides (0 = config's)")
    ap.add_argument("--ov_config", help="ov: config name[:args] (default llava_ov_7b)")
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
    if a.ov_keeps:
        opts.ov_keeps = _parse_keeps(a.ov_keeps)
    if a.suites:
        opts.suites = tuple(x.strip() for x in a.suites.split(",") if x.strip())
        unknown = sorted(set(opts.suites) - set(SUITES))
        if unknown:
            ap.error(f"unknown --suites {unknown}; known: {','.join(SUITES)}")
    if a.layers is not None:
        opts.ov_layers = a.layers
    if a.ov_tokens is not None and a.ov_tokens > 0:
        opts.ov_vision = False  # a feed of projected tokens: the tower is estimated per view
    if a.ov_vision:
        opts.ov_vision = True
    for name in ("next_tokens", "reps", "warmup", "decode_tokens", "text_len", "threads",
                 "ov_tokens", "ov_views", "ov_vocab", "ov_config"):
        if getattr(a, name) is not None:
            setattr(opts, name, getattr(a, name))
    if a.prefill_batches is not None:
        opts.prefill_batches = tuple(int(x) for x in a.prefill_batches.split(",") if x)
    if a.decode_batches is not None:
        opts.decode_batches = tuple(int(x) for x in a.decode_batches.split(",") if x)
    opts.peer = not a.no_peer
    opts.flops = not a.no_flops
    cfg, ppm = load_config(a.config or (QUICK_CONFIG if a.quick else DEFAULT_CONFIG), a.layers)
    result = Bench(cfg, opts, ppm).run()
    paths = write(result, a.out)
    print(markdown(result))
    print("wrote " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
