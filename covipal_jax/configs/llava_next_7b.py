"""LLaVA-NeXT-7B / LLaVA-1.6 (llava-hf/llava-v1.6-vicuna-7b-hf): CLIP ViT-L/14-336 + Vicuna-7B.

AnyRes: the five LLaVA-1.6 pinpoints (336x672, 672x336, 672x672, 1008x336, 336x1008), a base
view plus up to 4 crops of 576 tokens, unpadded, `image_newline` per row (up to 2,928 tokens;
no anyres_max downsampling in NeXT). Args: `layers=N`, `dtype=...` as in llava15_7b.
"""
from covipal_jax.configs import common
from covipal_jax.data.anyres import NEXT_PINPOINTS


def get_config(arg=None):
    c = common.llava15_config("7b", arg)
    c.model.image_newline = True
    c.model.image_grid_pinpoints = NEXT_PINPOINTS
    c.model.anyres_max_crops = 0
    c.template = "llava15"  # vicuna_v1, as LLaVA-1.5
    return c
