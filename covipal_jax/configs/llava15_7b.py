"""LLaVA-1.5-7B (llava-hf/llava-1.5-7b-hf): CLIP ViT-L/14-336 + Vicuna-7B, 576 vision tokens.

Args (after a colon): `layers=N` truncates the decoder (benchmarks on small hosts),
`dtype=bfloat16|float32` sets compute and parameter dtype.
"""
from covipal_jax.configs import common


def get_config(arg=None):
    return common.llava15_config("7b", arg)
