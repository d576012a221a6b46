r"""The main job: synthetic VQA -> tiny LLaVA from scratch -> PPM (and PDrop*, the LLaVA
fine-tuned with PyramidDrop active) -> pruning sweep, on CPU.

    python -m covipal_jax.demo --workdir /tmp/covipal_demo           # see README (2 CPU cores)
    python -m covipal_jax.demo --workdir /tmp/covipal_quick --quick  # reduced, < 2 min

Writes `DIR/results.json` (`{"unpruned": acc, "methods": {method: {ratio: acc}}}`),
`DIR/results_detail.json`, `DIR/results.md` and `DIR/accuracy_vs_keep.png`, and prints the table.
A rerun reuses the finished stages in DIR (`--force` redoes them). Stages and the held-out
design: `covipal_jax/demo/lib.py`; sizes: `configs/demo.py`.

On a real checkpoint (steps 3-4 only: train the PPM on local LLaVA-format data, then the sweep on
the synthetic held-out split):

    python -m covipal_jax.demo --workdir DIR --config configs/ppm_llava15_7b.py \
        --config.checkpoint=/models/llava-1.5-7b-hf --data_dir DATA \
        --config.data.json=DATA/llava_v1_5_mix665k.json --config.data.images=DATA/images

(`--config.pruning.ppm_checkpoint=PPM_DIR` skips the training and evaluates that PPM;
`--config.pdrop_star.checkpoint=DIR` adds the PDrop* rows for a LLaVA fine-tuned with
`python -m covipal_jax.train --config configs/pdrop_star_llava15_7b.py`, exported to DIR.)
"""
from __future__ import annotations

from covipal_jax import configs as configs_lib
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", configs_lib.path("demo"), "Config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (stages, results).",
                               required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", None,
                                "TFDS data dir of a real checkpoint's PPM training data.")
_FORCE = flags.DEFINE_bool("force", False, "Redo every stage, even those finished in workdir.")
_QUICK = flags.DEFINE_bool("quick", False, "Reduced run (config.quick overrides), for tests.")
_STOP_AFTER = flags.DEFINE_enum("stop_after", None, ["data", "pretrain", "ppm", "pdrop_star", "evaluate"],
                                "Stop after this stage (the later ones are left as they are).")


# The demo compiles ~60 small programs (pretraining step, PPM stages, PDrop* step, the sweep's
# 46 prefill programs): without XLA:CPU's fusion emitters they compile ~2x faster and run as
# fast (measured on the pretraining step, both compiled in one process and timed interleaved:
# 1.90 vs 1.89 s/step on the loaded 2-core machine; compile 28 vs 70 s).
# `--xla_backend_optimization_level=0` compiles faster still but makes the pretraining steps 2x
# slower. A caller's XLA_FLAGS win.
DEMO_XLA_FLAGS = "--xla_cpu_use_fusion_emitters=false"
QUICK_XLA_FLAGS = DEMO_XLA_FLAGS  # the name earlier callers import


def _backend_started() -> bool:
    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def main(argv):
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if not _backend_started():
        os.environ.setdefault("XLA_FLAGS", DEMO_XLA_FLAGS)
    from covipal_jax.demo import lib as demo_lib

    try:
        demo_lib.run(_CONFIG.value, _WORKDIR.value, force=_FORCE.value, quick=_QUICK.value,
                     data_dir=_DATA_DIR.value, stop_after=_STOP_AFTER.value)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    from covipal_jax import cli

    cli.run(main)
