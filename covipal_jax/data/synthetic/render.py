"""Drawing of the synthetic VQA scenes: anti-aliased shapes on a noisy canvas, object patch masks."""
from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

import numpy as np

from covipal_jax.data.synthetic.config import COLOR_RGB, SyntheticConfig


@functools.lru_cache(maxsize=None)
def shape_mask(shape: str, size: int, supersample: int = 4) -> np.ndarray:
    """Anti-aliased coverage `f32[size, size, 1]` in [0, 1] of a shape filling a size box."""
    n = size * supersample
    c = (np.arange(n, dtype=np.float64) + 0.5) / n * 2.0 - 1.0  # sample centres in [-1, 1]
    v, u = np.meshgrid(c, c, indexing="ij")  # v: rows (down), u: columns (right)
    r2 = u * u + v * v
    if shape == "circle":
        m = r2 <= 1.0
    elif shape == "square":
        m = (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85)
    elif shape == "triangle":  # apex up
        m = np.abs(u) <= (v + 1.0) / 2.0
    elif shape == "cross":
        m = ((np.abs(u) <= 0.3) | (np.abs(v) <= 0.3)) & (np.abs(u) <= 1) & (np.abs(v) <= 1)
    elif shape == "ring":
        m = (r2 <= 1.0) & (r2 >= 0.3)
    elif shape == "diamond":
        m = np.abs(u) + np.abs(v) <= 1.0
    else:
        raise ValueError(shape)
    cov = m.reshape(size, supersample, size, supersample).mean(axis=(1, 3))
    cov.setflags(write=False)
    return cov.astype(np.float32)[..., None]


def render(
    objects: Sequence[tuple[str, str, int, int, int]],
    cfg: SyntheticConfig,
    rng: np.random.Generator,
) -> np.ndarray:
    """Draw `objects` on a noisy background: `uint8[H, W, 3]`."""
    s = cfg.image_size
    bg = rng.integers(cfg.background[0], cfg.background[1] + 1)
    img = np.full((s, s, 3), float(bg), np.float32)
    for shape, color, x, y, size in objects:
        rgb = np.asarray(COLOR_RGB[color], np.float32)
        if cfg.color_jitter:
            rgb = rgb + rng.uniform(-cfg.color_jitter / 2, cfg.color_jitter / 2, 3)
        a = shape_mask(shape, size)
        patch = img[y : y + size, x : x + size]
        img[y : y + size, x : x + size] = patch * (1.0 - a) + rgb.astype(np.float32) * a
    if cfg.noise_std > 0:
        img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(cfg.noise_std)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def object_patch_mask(
    objects: Sequence[tuple[str, str, int, int, int]],
    image_size: int,
    patch_size: int,
    indices: Iterable[int] | None = None,
) -> np.ndarray:
    """`bool[n_patches]` (row-major) marking patches overlapped by the selected objects' boxes.

    Use it to measure whether a pruning method kept the patches of the queried objects.
    """
    g = image_size // patch_size
    m = np.zeros((g, g), bool)
    idx = range(len(objects)) if indices is None else indices
    for i in idx:
        _, _, x, y, size = objects[i]
        m[y // patch_size : (y + size - 1) // patch_size + 1,
          x // patch_size : (x + size - 1) // patch_size + 1] = True
    return m.reshape(-1)
