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
    common.ppm_7b_training(c, stages=a.stages, steps1=a.steps1, steps2=a.steps2, keep=0.25,
                           guide_fraction=16 / 28, data_name="llava_v1_5_mix665k_local",
                           max_len=128)
    c.train.lambda_kl = 1.0
    c.train.lambda_budget = 10.0
    return c
