"""Tiny random LLaVA fixtures shared by the model, prefill and decoding tests."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import numpy as np

from covipal_jax.configs import tiny as tiny_config
from covipal_jax.models.config import LlavaConfig
from covipal_jax.models.llava import Llava, init_params

IMAGE_TOKEN = 4


def config(arg: str | None = None):
    return tiny_config.get_config(arg)


@functools.lru_cache(maxsize=None)
def model_and_params(arg: str | None = None, seed: int = 0):
    cfg = LlavaConfig.from_config(config(arg).model)
    params = nn.unbox(init_params(cfg, jax.random.key(seed)))
    return Llava(cfg), params


def batch(lengths=(10, 7), bucket: int = 12, image_at=(2, 1), seed: int = 0, image_size=64):
    """Left-padded prompts of the given real lengths with the placeholder at `image_at`
    (index within the real tokens). Returns (pixels, ids, mask) as NumPy arrays."""
    rng = np.random.default_rng(seed)
    b = len(lengths)
    ids = np.zeros((b, bucket), np.int32)
    mask = np.zeros((b, bucket), bool)
    for i, (n, p) in enumerate(zip(lengths, image_at)):
        row = rng.integers(5, 300, size=n)
        row[p] = IMAGE_TOKEN
        ids[i, bucket - n:] = row
        mask[i, bucket - n:] = True
    pixels = rng.normal(size=(b, image_size, image_size, 3)).astype(np.float32)
    return pixels, ids, mask
