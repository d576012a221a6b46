"""Train a PPM for the tiny LLaVA (configs/tiny.py) on the synthetic VQA set: seconds on CPU.

    python -m covipal_jax.train --config configs/ppm_tiny.py --workdir /tmp/ppm_tiny

Random LLaVA weights unless `--config.checkpoint` is set; the synthetic TFDS set is built
offline into `<workdir>/data` (or `--data_dir`). Args: `stages=1` | `stages=12` (stage 1 then
stage 2), `steps=N` per stage, plus everything of configs/tiny.py (`kind=qwen2`, ...).
"""
from configs import common, tiny


def get_config(arg=None):
    a = common.parse_arg(arg, stages="1", steps=150, kind="llama")
    c = tiny.get_config(f"kind={a.kind}")
    c.train = common.train_config()
    c.data = common.data_config()
    stages = tuple(int(s) for s in a.stages)
    t = c.train
    t.stages = stages
    t.steps = tuple(a.steps for _ in stages)
    t.batch_size = 16
    t.keep = 0.25
    t.lr = 3e-3
    t.warmup_steps = 10
    t.frozen_dtype = "float32"
    t.guide_layer = 2           # of 4 (the paper: 16 of 28)
    t.log_every = 10
    t.save_every = 50
    t.eval_every = 50
    t.eval_batches = 4
    c.data.name = "tiny"
    c.data.eval_split = "validation"
    c.data.max_len = 24
    c.pruning.method = "ppm"
    c.pruning.keep = t.keep
    return c
