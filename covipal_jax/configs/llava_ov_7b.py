"""LLaVA-OneVision-7B (llava-hf/llava-onevision-qwen2-7b-ov-hf): SigLIP-so400m/14-384 + Qwen2-7B.

AnyRes (`anyres=1`, default): the 36 OneVision pinpoints (1..6 x 1..6 tiles of 384), a base
view of 729 tokens plus crops, unpadded, downsampled to ~9 crops (`anyres_max_9`), newline per
row (models/anyres.py); `anyres=0`: the single base-resolution crop (729 tokens).
Video: `frames=N` (default 32) frames, each pooled to 14 x 14 = 196 tokens, one newline.
Args: `layers=N`, `dtype=...` as in llava15_7b, `anyres=0|1`, `frames=N`.
"""
from covipal_jax.configs import common
from covipal_jax.data.anyres import ONEVISION_PINPOINTS


def get_config(arg=None):
    a = common.parse_arg(arg, layers=0, dtype="bfloat16", anyres=True, frames=32)
    c = common.base_config()
    text = common.qwen2_7b()
    if a.layers:
        text["num_layers"] = a.layers
    c.model = dict(vision=common.siglip_so400m_384(), text=text, image_token_id=151646,
                   image_newline=True, video_token_id=151647,
                   image_grid_pinpoints=ONEVISION_PINPOINTS if a.anyres else (),
                   anyres_max_crops=9 if a.anyres else 0, dtype=a.dtype, param_dtype=a.dtype,
                   scan_layers=True, remat_policy="none",
                   attention="auto")
    c.template = "qwen2"
    c.video_frames = a.frames
    return c
