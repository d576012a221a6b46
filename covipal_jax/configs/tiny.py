"""A tiny LLaVA (CLIP-style ViT with CLS + LLaMA decoder) for tests, demos and CPU runs.

With no `checkpoint` it runs on random weights with the built-in tokenizer. Args:
`kind=llama|qwen2`, `image=64`, `patch=8`.
"""
from covipal_jax.configs import common


def get_config(arg=None):
    a = common.parse_arg(arg, kind="llama", image=64, patch=8, vision="clip")
    c = common.base_config()
    vision = dict(kind=a.vision, image_size=a.image, patch_size=a.patch, hidden_size=64,
                  intermediate_size=128, num_layers=3, num_heads=4, layer_norm_eps=1e-5,
                  act="quick_gelu" if a.vision == "clip" else "gelu_tanh",
                  feature_layer=-2 if a.vision == "clip" else -1,
                  select_strategy="default" if a.vision == "clip" else "full")
    text = dict(kind=a.kind, vocab_size=512, hidden_size=64, intermediate_size=128,
                num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
                rms_norm_eps=1e-6, qkv_bias=a.kind == "qwen2", tie_word_embeddings=False,
                max_position_embeddings=512)
    c.model = dict(vision=vision, text=text, image_token_id=4, dtype="float32",
                   param_dtype="float32", scan_layers=True, remat_policy="none",
                   attention="auto")
    c.tokenizer = "builtin"
    c.template = "plain"
    c.text_buckets = (16, 32, 64)
    c.max_new_tokens = 8
    c.ppm.width = 32
    c.ppm.num_heads = 2
    return c
