"""PDrop* for LLaVA-1.5-7B: its instruction stage re-run with PyramidDrop active (the PDrop
paper's training-time use, `scripts/v1_5/pdrop_train/finetune.sh` of Cooperx521/PyramidDrop).

    python -m covipal_jax.train --config configs/pdrop_star_llava15_7b.py --workdir /ckpt/pdrop7b \
        --config.checkpoint=/models/llava-1.5-7b-hf \
        --config.data.json=/data/llava_v1_5_mix665k.json --config.data.images=/data/images

Official hyperparameters: projector + LLM trained, CLIP tower frozen, lr 2e-5, weight decay 0,
warmup 3% of the steps, cosine, global batch 128, 1 epoch of mix665k (5197 steps), layers
8/16/24 with lambda 0.5. Differences: the official starts from the stage-1 projector and
Vicuna (it trains LLaVA-1.5 with PDrop from scratch of stage 2); here from an HF LLaVA
checkpoint (`--config.checkpoint`: the released LLaVA-1.5, or a stage-1 export); f32 master
weights with the Adam moments sharded over `fsdp` (the official: DeepSpeed ZeRO-3, bf16).
Args (after a colon): `layers=N` truncates the decoder (smoke tests), `steps=N`.
"""
from covipal_jax.configs import common, llava15_7b


def get_config(arg=None):
    a = common.parse_arg(arg, layers=0, steps=5197)
    c = llava15_7b.get_config(f"layers={a.layers}" if a.layers else None)
    c.model.remat_policy = "full"
    c.train = common.train_config()
    c.data = common.data_config()
    t = c.train
    t.mode = "finetune"
    t.stages = (1,)
    t.steps = (a.steps,)
    t.batch_size = 128
    t.lr = 2e-5
    t.warmup_steps = max(1, round(0.03 * a.steps))
    t.weight_decay = 0.0
    t.end_lr_ratio = 0.0
    t.frozen_dtype = "bfloat16"
    t.guide_layer = -1          # unused by PDrop*
    t.max_queries = 8
    t.log_every = 10
    t.save_every = 500
    t.keep_checkpoints = 2
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.data.kind = "llava"
    c.data.name = "llava_v1_5_mix665k_local"
    c.data.max_len = 2048 - 576 + 1   # model_max_length 2048 with the 576 vision tokens
    c.pruning.method = "pdrop"
    return c
