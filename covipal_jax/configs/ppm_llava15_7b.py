"""Train CoViPAL's PPM for LLaVA-1.5-7B on LLaVA-format instruction data.

    python -m covipal_jax.train --config configs/ppm_llava15_7b.py --workdir /ckpt/ppm7b \
        --config.checkpoint=/models/llava-1.5-7b-hf \
        --config.data.json=/data/llava_v1_5_mix665k.json --config.data.images=/data/images

The frozen LLaVA is cast to bf16; the PPM (d=512, 2 layers) and AdamW state are f32. Guide
layer 18 of 32 (the paper found 16 of 28 strong for LLaVA-OneVision-7B: the same depth
fraction). Stage 1 then stage 2 by default. Mesh: FSDP over all devices (`mesh.fsdp=-1`).
Args (after a colon): `layers=N` truncates the decoder (smoke tests), `stages=1|2|12`.
"""
from covipal_jax.configs import common, llava15_7b


def get_config(arg=None):
    a = common.parse_arg(arg, layers=0, stages="12", steps1=5000, steps2=2000)
    c = llava15_7b.get_config(f"layers={a.layers}" if a.layers else None)
    c.model.remat_policy = "full"   # stage 2 backpropagates through every decoder layer
    c.train = common.train_config()
    c.data = common.data_config()
    stages = tuple(int(s) for s in a.stages)
    t = c.train
    t.stages = stages
    t.steps = tuple(a.steps1 if s == 1 else a.steps2 for s in stages)
    t.batch_size = 32
    t.keep = 0.25
    t.lr = 5e-4
    t.lr_stage2 = 1e-4
    t.warmup_steps = 200
    t.frozen_dtype = "bfloat16"
    n_layers = c.model.text["num_layers"]
    t.guide_layer = max(1, round(n_layers * 16 / 28))
    t.lambda_kl = 1.0
    t.lambda_budget = 10.0
    t.log_every = 10
    t.save_every = 500
    t.keep_checkpoints = 3
    c.ppm.width = 512
    c.ppm.num_heads = 8
    c.ppm.num_layers = 2
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.data.kind = "llava"
    c.data.name = "llava_v1_5_mix665k_local"
    c.data.max_len = 128
    c.pruning.method = "ppm"
    c.pruning.keep = t.keep
    return c
