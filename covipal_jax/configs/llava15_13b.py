"""LLaVA-1.5-13B (llava-hf/llava-1.5-13b-hf): CLIP ViT-L/14-336 + Vicuna-13B, 576 vision tokens.

Args as in llava15_7b.py.
"""
from covipal_jax.configs import common


def get_config(arg=None):
    return common.llava15_config("13b", arg)
