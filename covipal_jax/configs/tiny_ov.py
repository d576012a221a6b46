"""A tiny LLaVA-OneVision (SigLIP-style ViT without CLS + Qwen2) with AnyRes and video, for tests.

Crops of 28 px, patch 7: a 4 x 4 grid (16 tokens) per view. Args: `grid=3` (pinpoints 1..grid x
1..grid tiles), `max_crops=9` (`anyres_max_N`; small values force the downsampling),
`frames=4` (video frames, each pooled to 2 x 2 tokens).
"""
from covipal_jax.configs import common


def get_config(arg=None):
    a = common.parse_arg(arg, grid=3, max_crops=9, frames=4)
    c = common.base_config()
    s = 28
    vision = dict(kind="siglip", image_size=s, patch_size=7, hidden_size=32,
                  intermediate_size=64, num_layers=2, num_heads=4, layer_norm_eps=1e-6,
                  act="gelu_tanh", feature_layer=-1, select_strategy="full")
    text = dict(kind="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128,
                num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1e6,
                rms_norm_eps=1e-6, qkv_bias=True, tie_word_embeddings=True,
                max_position_embeddings=1024)
    pins = tuple((s * r, s * q) for r in range(1, a.grid + 1) for q in range(1, a.grid + 1))
    c.model = dict(vision=vision, text=text, image_token_id=4, video_token_id=5,
                   image_newline=True, image_grid_pinpoints=pins, anyres_max_crops=a.max_crops,
                   dtype="float32", param_dtype="float32", scan_layers=True, remat_policy="none",
                   attention="auto")
    c.tokenizer = "builtin"
    c.template = "plain"
    c.text_buckets = (16, 32, 64)
    c.max_new_tokens = 8
    c.video_frames = a.frames
    c.ppm.width = 32
    c.ppm.num_heads = 2
    return c
