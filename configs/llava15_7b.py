"""LLaVA-1.5-7B (llava-hf/llava-1.5-7b-hf): CLIP ViT-L/14-336 + Vicuna-7B, 576 vision tokens.

Args (after a colon): `layers=N` truncates the decoder (benchmarks on small hosts),
`dtype=bfloat16` sets compute and parameter dtype.
"""
from configs import common


def get_config(arg=None):
    a = common.parse_arg(arg, layers=0, dtype="bfloat16")
    c = common.base_config()
    text = common.vicuna("7b")
    if a.layers:
        text["num_layers"] = a.layers
    c.model = dict(vision=common.clip_vit_l_336(), text=text, image_token_id=32000,
                   dtype=a.dtype, param_dtype=a.dtype, scan_layers=True, remat_policy="none")
    c.template = "llava15"
    return c
