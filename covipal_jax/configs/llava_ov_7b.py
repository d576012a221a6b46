"""LLaVA-OneVision-7B (llava-hf/llava-onevision-qwen2-7b-ov-hf): SigLIP-so400m/14-384 + Qwen2-7B.

Single base-resolution crop: 729 vision tokens (27 x 27); the multi-crop "anyres" packing is
not used. Args: `layers=N`, `dtype=...` as in llava15_7b.
"""
from covipal_jax.configs import common


def get_config(arg=None):
    a = common.parse_arg(arg, layers=0, dtype="bfloat16")
    c = common.base_config()
    text = common.qwen2_7b()
    if a.layers:
        text["num_layers"] = a.layers
    c.model = dict(vision=common.siglip_so400m_384(), text=text, image_token_id=151646,
                   image_newline=True, dtype=a.dtype, param_dtype=a.dtype, scan_layers=True,
                   remat_policy="none")
    c.template = "qwen2"
    return c
