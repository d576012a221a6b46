r"""Evaluate (pruned) LLaVA on image and video benchmarks; one method or a sweep, with the papers' table.

One method (the config's `pruning`):

    python -m covipal_jax.eval --config configs/llava15_7b.py \
        --config.checkpoint=/ckpt/llava-1.5-7b-hf --benchmark pope --data_dir /data/pope \
        --image_dir /data/coco/val2014 --config.pruning.method=ppm --config.pruning.keep=0.25 \
        --config.pruning.ppm_checkpoint=/ckpt/ppm --config.batch_size=16 --out results/

A sweep over methods x keeps (token counts or ratios; the unpruned model is added as `none`):

    python -m covipal_jax.eval --config configs/llava15_7b.py --config.checkpoint=... \
        --benchmark pope,mme,gqa --data_dir pope=/data/pope,mme=/data/MME,gqa=/data/gqa.json \
        --sweep --methods ppm,visionzip,fastv,dart --keeps 192,128,64 --out results/

CoViPAL's Table 1 (GQA, MME, SEED, MMStar, AI2D, OCRVQA, TextVQA, InfoVQA for every method and
keep, plus the unpruned model; MME-P in the average, MME total shown beside it):

    python -m covipal_jax.eval --config configs/llava_ov_7b.py --config.checkpoint=... \
        --suite covipal_table1 --methods ppm,fastv,visionzip,dart --keeps 0.5,0.25 \
        --data_root /data/bench --out results/table1/

(`--data_root R` finds each benchmark at `R/<name>` or `R/<name>.<json|jsonl|tsv|parquet>`;
`--data_dir name=PATH` overrides it.) Rerunning the same command resumes.

Several benchmarks: `--benchmark a,b` with `--data_dir a=PATH,b=PATH` (or paths in the same
order); `--image_dir` likewise. Output layout under `--out`:

    <method>_k<k>/<benchmark>.jsonl         predictions (resumable: a rerun skips done qids)
    <method>_k<k>/<benchmark>.jsonl.metrics.json
    <method>_k<k>/<benchmark>.result.json   that cell's table columns and run facts
    results.json    {method: {k: {column: score}}}, rebuilt from all result files (the input
                    of `python -m covipal_jax.eval.harness table --unpruned none results.json`)
    runs.json       per (method, k, benchmark): metrics summary, examples, model seconds
    summary.md      the papers' table: absolute scores + Avg relative to unpruned (`none`),
                    and the protocol of every column (MME as mme_p = perception AND mme = total)
    summary.json    the same numbers: scores, ratios to unpruned, their average per row

The batch (`--config.batch_size` rows, static) is sharded over the local devices along the
mesh's (data, fsdp) axes. Multiple-choice benchmarks are answered by generation (LLaVA's
protocol) unless `--score_options` (likelihood of the option letters as the first token).
Video benchmarks (videomme, mvbench, nextqa; OneVision configs): each video is decoded with
PyAV (or read from a frame folder) and `--frames N` frames are sampled uniformly (the static
frame bucket: one compiled program per (frames, text bucket, k)); answers are parsed as
lmms-eval parses them; `<out>/video_breakdown.md` holds the per-duration (Video-MME), per-task
(MVBench) and per-question-type (NExT-QA) tables. Methods that cannot prune video input
(VisionZip) are skipped there.
Two evaluations on one `--out` are refused (a lock file `<out>/.lock`). Paths may be `gs://`.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from covipal_jax import configs as configs_lib
from covipal_jax.eval.suite import (SUITES, UNPRUNED, data_root_paths, parse_keep,  # noqa: F401
                                    parse_named, run, run_label, summarize, sweep_methods,
                                    write_tables)

_CONFIG = config_flags.DEFINE_config_file("config", configs_lib.path("tiny"), "Config file.",
                                          lock_config=True)
_SUITE = flags.DEFINE_enum("suite", None, sorted(SUITES), "A named benchmark suite: runs its "
                           "benchmarks for every --methods x --keeps plus the unpruned model.")
_BENCHMARK = flags.DEFINE_list("benchmark", None, "Benchmark name(s): gqa, mme, pope, textvqa, "
                               "scienceqa, mmbench, seed, ai2d, mmstar, ocrvqa, infovqa, "
                               "videomme, mvbench, nextqa.")
_DATA_DIR = flags.DEFINE_list("data_dir", [], "Benchmark path(s): one per --benchmark, in "
                              "order, or NAME=PATH items (see covipal_jax/eval/README.md).")
_DATA_ROOT = flags.DEFINE_string("data_root", None, "Folder holding each benchmark as <name> "
                                 "or <name>.<ext> (json, jsonl, tsv, csv, parquet).")
_IMAGE_DIR = flags.DEFINE_list("image_dir", [], "Image (video) folder(s), as --data_dir.")
_OUT = flags.DEFINE_string("out", None, "Output directory (local or gs://).")
_LIMIT = flags.DEFINE_integer("limit", None, "Use the first N examples of each benchmark.")
_SWEEP = flags.DEFINE_bool("sweep", False, "Sweep --methods x --keeps (+ unpruned).")
_METHODS = flags.DEFINE_list("methods", [], "Sweep methods (default: ppm if "
                             "pruning.ppm_checkpoint is set, visionzip, fastv, dart).")
_KEEPS = flags.DEFINE_list("keeps", ["192", "128", "64"], "Sweep budgets: token counts (64), "
                           "ratios (0.25) or fractions (1/9).")
_UNPRUNED = flags.DEFINE_bool("unpruned", True, "Sweep: also run the unpruned model (`none`).")
_LABEL = flags.DEFINE_string("label", None, "Method name in the tables (default: the method).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", None, "Default: config.max_new_tokens.")
_SCORE = flags.DEFINE_bool("score_options", False, "Multiple choice by option-letter "
                           "likelihood instead of generation.")
_PAD = flags.DEFINE_bool("pad_to_square", False, "Pad images to square with the mean colour "
                         "(the original LLaVA-1.5 evaluation); default: the checkpoint's "
                         "processor.")
_MME = flags.DEFINE_enum("mme_score", None, ["total", "perception"], "MME column in the Avg "
                         "(both are shown): default perception for a suite, else total.")
_WORKERS = flags.DEFINE_integer("num_workers", 4, "Image decoding threads.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Progress bars.")
_FRAMES = flags.DEFINE_integer("frames", None, "Video benchmarks: frames sampled uniformly per "
                               "video (the static frame bucket; default config.video_frames, "
                               "else 32).")
_BOUNDS = flags.DEFINE_bool("video_bounds", True, "MVBench: sample frames inside each "
                            "question's start/end bound (the official evaluation); "
                            "--novideo_bounds: the whole video (lmms-eval).")

log = logging.getLogger("covipal_jax.eval")


def main(argv):
    del argv
    from covipal_jax import paths
    from covipal_jax.eval import benchmarks as bm

    config = _CONFIG.value
    try:
        if not _OUT.value:
            raise ValueError("--out is required")
        suite = SUITES[_SUITE.value] if _SUITE.value else None
        if suite is not None and _BENCHMARK.value:
            raise ValueError("--suite and --benchmark exclude each other")
        names = list(suite.benchmarks) if suite else [bm.canonical_name(b)
                                                      for b in _BENCHMARK.value or []]
        if not names:
            raise ValueError("--benchmark or --suite is required")
        rooted = data_root_paths(_DATA_ROOT.value, names) if _DATA_ROOT.value else {}
        data_dirs = dict(rooted, **parse_named(_DATA_DIR.value, names, "data_dir"))
        if not data_dirs:
            raise ValueError("--data_dir (or --data_root) is required")
        image_dirs = parse_named(_IMAGE_DIR.value, names, "image_dir")
        methods = None
        if _SWEEP.value or suite is not None:
            methods = sweep_methods(_METHODS.value, _KEEPS.value,
                                    _UNPRUNED.value or suite is not None,
                                    bool(config.pruning.ppm_checkpoint))
        mme_score = _MME.value or ("perception" if suite else "total")
        summary = run(config, names, data_dirs, _OUT.value, methods=methods,
                      image_dirs=image_dirs, limit=_LIMIT.value, max_new_tokens=_MAX_NEW.value,
                      score_options=_SCORE.value, pad_to_square=_PAD.value, label=_LABEL.value,
                      mme_score=mme_score, num_workers=_WORKERS.value,
                      progress=_PROGRESS.value, title=suite.title if suite else "",
                      num_frames=_FRAMES.value, video_bounds=_BOUNDS.value)
    except (ValueError, FileNotFoundError, KeyError, paths.WorkdirLockedError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if summary["markdown"]:
        print()
        print(summary["markdown"], end="")
    else:
        print(f"(no unpruned `{UNPRUNED}` run in {_OUT.value} yet: no table; run "
              f"--config.pruning.method=none or --sweep)")
    if summary.get("breakdown"):
        print()
        print(summary["breakdown"], end="")
    print(f"wrote {_OUT.value}/results.json, summary.json" +
          (", summary.md" if summary["markdown"] else "") +
          (", video_breakdown.md" if summary.get("breakdown") else ""))


if __name__ == "__main__":
    from covipal_jax import cli

    cli.run(main)
