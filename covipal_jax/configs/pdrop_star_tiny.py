"""PDrop* on the tiny LLaVA: full-model fine-tuning with PyramidDrop active, on the synthetic
set, seconds on CPU.

    python -m covipal_jax.train --config configs/pdrop_star_tiny.py --workdir /tmp/pdrop_star

Random LLaVA weights unless `--config.checkpoint` is set (e.g. the demo's exported LLaVA,
`<demo workdir>/llava`); the fine-tuned model is exported to `<workdir>/llava`. Trains the
projector + LLM, the vision tower frozen (`train/finetune.py`); PyramidDrop's official schedule
(layers 8/16/24 of 32 scaled to the 4 layers: 1/2/3, lambda 0.5). Args: `steps=N`, and
everything of configs/tiny.py (`kind=qwen2`, `image=32`, ...).
"""
from covipal_jax.configs import common, tiny


def get_config(arg=None):
    a = common.parse_arg(arg, steps=30, kind="llama", image=64)
    c = tiny.get_config(f"kind={a.kind},image={a.image}")
    c.train = common.train_config()
    c.data = common.data_config()
    t = c.train
    t.mode = "finetune"         # train/finetune_trainer.py (PDrop*), not the PPM trainer
    t.stages = (1,)
    t.steps = (a.steps,)
    t.batch_size = 8
    t.lr = 1e-3
    t.warmup_steps = 3
    t.weight_decay = 0.0        # official: 0
    t.end_lr_ratio = 0.0        # official: cosine to 0
    t.frozen_dtype = "float32"
    t.guide_layer = -1          # unused by PDrop* (the PPM objective's field)
    t.max_queries = 8           # answer spans whose preceding token ranks the vision tokens
    t.log_every = 5
    t.save_every = 10
    c.data.name = "tiny"
    c.data.max_len = 24
    c.pruning.method = "pdrop"  # keep=1.0: the official lambda = 0.5 schedule
    return c
