"""A tiny LLaVA-NeXT (CLIP-style ViT with CLS + LLaMA) with AnyRes, for tests.

Crops of 32 px, patch 8: a 4 x 4 grid (16 tokens, CLS dropped) per view; the five LLaVA-1.6
pinpoint shapes scaled to 32 px tiles (1x2, 2x1, 2x2, 3x1, 1x3); no anyres_max downsampling.
"""
from covipal_jax.configs import common


def get_config(arg=None):
    del arg
    c = common.base_config()
    s = 32
    vision = dict(kind="clip", image_size=s, patch_size=8, hidden_size=48, intermediate_size=96,
                  num_layers=3, num_heads=4, layer_norm_eps=1e-5, act="quick_gelu",
                  feature_layer=-2, select_strategy="default")
    text = dict(kind="llama", vocab_size=512, hidden_size=64, intermediate_size=160,
                num_layers=3, num_heads=4, num_kv_heads=4, head_dim=16, rope_theta=10000.0,
                rms_norm_eps=1e-5, qkv_bias=False, tie_word_embeddings=False,
                max_position_embeddings=1024)
    pins = tuple((s * h // 336, s * w // 336) for h, w in
                 ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)))
    c.model = dict(vision=vision, text=text, image_token_id=4, image_newline=True,
                   image_grid_pinpoints=pins, anyres_max_crops=0, dtype="float32",
                   param_dtype="float32", scan_layers=True, remat_policy="none",
                   attention="auto")
    c.tokenizer = "builtin"
    c.template = "plain"
    c.text_buckets = (16, 32, 64)
    c.max_new_tokens = 8
    c.ppm.width = 32
    c.ppm.num_heads = 2
    return c
