"""AnyRes image preprocessing (LLaVA-NeXT, LLaVA-OneVision) with static shapes, in NumPy + PIL.

Reproduces transformers 5.24's `LlavaNextImageProcessorPil` / `LlavaOnevisionImageProcessorPil`:

1. best resolution: `select_best_resolution(original (h, w), grid_pinpoints)`: the pinpoint that
   keeps the most of the image's pixels (`min(int(w*s) * int(h*s), w*h)`, s the fit scale), ties
   broken by the least wasted area;
2. resize for patching: aspect kept, the long side to the pinpoint, the other `ceil`ed and
   clipped (`get_patch_output_size`), PIL `resample` on uint8;
3. pad for patching: centred on the pinpoint with zeros (black, uint8 0; extra pixel after);
4. crops: the padded image cut into `rows x cols` tiles of `crop_size`, row-major;
5. base view: the whole image resized to `base_size` (no aspect kept), placed FIRST;
6. every view then goes through the plain per-crop pipeline (`covipal_jax.data.image`:
   resize to `size` [identity for crops], center crop, rescale, normalize).

OneVision with several images in one sample (HF `batch_num_images > 1`) does not tile: each
image is padded to a square with the mean colour and resized (one view). Use `patch=False`,
or `preprocess_multi` for rows of several images (`MultiImageInputs`, HF's rule per row).

Static shapes. Every image of a batch gets the same number of views `C` (a *crop bucket*, the
smallest of `AnyResConfig.crop_buckets` that fits the batch; by default the distinct view counts
`1 + rows*cols` of the pinpoints), so a jitted model compiles once per bucket:

    pixels     f32[B, C, H, W, 3]  view 0 the base view, views 1..rows*cols the crops, then zeros
    crop_valid bool[B, C]
    layout     i32[B, 4]           (rows, cols, height, width): the crop grid and the original
                                   image size; rows = cols = 0 for an untiled (multi-image) view

`covipal_jax.models.anyres` turns `layout` into the packing plan (unpadding, anyres_max_N).
Parity (tests/test_anyres_data.py): bit-identical to the HF PIL processors (max abs diff 0.0).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image

from covipal_jax.data import image as im

# LLaVA-OneVision (SigLIP-384): 1..6 x 1..6 tiles of 384 (transformers' default pinpoints).
ONEVISION_PINPOINTS: tuple[tuple[int, int], ...] = tuple(
    (384 * r, 384 * c) for r in range(1, 7) for c in range(1, 7))
# LLaVA-NeXT / LLaVA-1.6 (CLIP-336).
NEXT_PINPOINTS: tuple[tuple[int, int], ...] = ((336, 672), (672, 336), (672, 672), (1008, 336),
                                               (336, 1008))


@dataclasses.dataclass(frozen=True)
class AnyResConfig:
    """How to cut an image into a base view plus crops.

    pinpoints: candidate resolutions (height, width), each a multiple of `crop_size`.
    crop: the per-view pipeline (resize, center crop, rescale, normalize) of `data.image`.
    crop_size: side of one tile (HF: `crop_size["height"]`, else `size`).
    base_size: (height, width) the base view is resized to before the per-view pipeline.
    crop_buckets: allowed view counts C (None: every distinct `1 + rows*cols`).
    """

    pinpoints: tuple[tuple[int, int], ...]
    crop: im.ImageProcessorConfig
    crop_size: int
    base_size: tuple[int, int]
    crop_buckets: tuple[int, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "pinpoints",
                           tuple((int(h), int(w)) for h, w in self.pinpoints))
        if not self.pinpoints:
            raise ValueError("AnyResConfig.pinpoints is empty")
        for h, w in self.pinpoints:
            if h <= 0 or w <= 0 or h % self.crop_size or w % self.crop_size:
                raise ValueError(f"pinpoint {(h, w)} is not a positive multiple of "
                                 f"crop_size={self.crop_size}")
        if self.crop.output_size != self.crop_size:
            raise ValueError(f"the per-view pipeline outputs {self.crop.output_size}px, "
                             f"crop_size is {self.crop_size}")
        if self.crop_buckets is not None:
            b = tuple(sorted({int(x) for x in self.crop_buckets}))
            if b[-1] < self.max_views:
                raise ValueError(f"crop_buckets {b} cannot hold {self.max_views} views "
                                 f"(largest pinpoint grid + base view)")
            object.__setattr__(self, "crop_buckets", b)

    # ---- static facts ---------------------------------------------------------------------
    @property
    def grids(self) -> tuple[tuple[int, int], ...]:
        """The distinct crop layouts (rows, cols) of the pinpoints."""
        s = self.crop_size
        return tuple(sorted({(h // s, w // s) for h, w in self.pinpoints}))

    @property
    def max_views(self) -> int:
        return 1 + max(r * c for r, c in self.grids)

    @property
    def buckets(self) -> tuple[int, ...]:
        """The view counts C a batch may be padded to (one compilation each)."""
        if self.crop_buckets is not None:
            return self.crop_buckets
        return tuple(sorted({1 + r * c for r, c in self.grids}))

    def bucket_for(self, num_views: int) -> int:
        for b in self.buckets:
            if b >= num_views:
                return b
        raise ValueError(f"{num_views} views exceed the largest crop bucket {self.buckets[-1]}")

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of the crop grid chosen for an image of (height, width)."""
        h, w = select_best_resolution((height, width), self.pinpoints)
        return h // self.crop_size, w // self.crop_size

    # ---- presets --------------------------------------------------------------------------
    @classmethod
    def onevision(cls, image_size: int = 384, pinpoints: Sequence[Sequence[int]] | None = None,
                  **kw) -> AnyResConfig:
        """LlavaOnevisionImageProcessor: square resize, OpenAI-CLIP mean/std, bicubic."""
        if pinpoints is None:
            pinpoints = tuple((image_size * r, image_size * c)
                              for r in range(1, 7) for c in range(1, 7))
        crop = im.ImageProcessorConfig(kind="siglip", image_size=image_size,
                                       crop_size=image_size, mean=im.OPENAI_CLIP_MEAN,
                                       std=im.OPENAI_CLIP_STD, do_center_crop=False)
        return cls(tuple(map(tuple, pinpoints)), crop, image_size, (image_size, image_size), **kw)

    @classmethod
    def next(cls, image_size: int = 336, pinpoints: Sequence[Sequence[int]] | None = None,
             **kw) -> AnyResConfig:
        """LlavaNextImageProcessor: shortest-edge resize + center crop, CLIP mean/std."""
        if pinpoints is None:
            pinpoints = tuple((image_size * a // 336, image_size * b // 336)
                              for a, b in NEXT_PINPOINTS)
        crop = im.ImageProcessorConfig.clip(image_size)
        return cls(tuple(map(tuple, pinpoints)), crop, image_size, (image_size, image_size), **kw)

    @classmethod
    def for_model(cls, cfg, **kw) -> AnyResConfig:
        """The processor of a `LlavaConfig` with `image_grid_pinpoints`: OneVision's for a
        SigLIP tower, NeXT's for a CLIP tower (defaults of the released checkpoints)."""
        if not cfg.image_grid_pinpoints:
            raise ValueError("the model config has no image_grid_pinpoints (not AnyRes)")
        preset = cls.onevision if cfg.vision.kind == "siglip" else cls.next
        return preset(cfg.vision.image_size, cfg.image_grid_pinpoints, **kw)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **kw) -> AnyResConfig:
        """From a LlavaNext / LlavaOnevision `preprocessor_config.json` dict."""
        ptype = str(d.get("image_processor_type", ""))
        for suffix in ("Fast", "Pil"):
            if ptype.endswith(suffix):
                ptype = ptype[: -len(suffix)]
        if ptype not in ("LlavaNextImageProcessor", "LlavaOnevisionImageProcessor"):
            raise ValueError(f"not an AnyRes image processor: {ptype!r}")
        size = d.get("size") or ({"height": 384, "width": 384}
                                 if ptype == "LlavaOnevisionImageProcessor"
                                 else {"shortest_edge": 224})
        fixed = {k: list(d[k]) for k in ("image_mean", "image_std")
                 if isinstance(d.get(k), tuple)}
        crop = im.ImageProcessorConfig.from_hf_dict({**d, **fixed, "image_processor_type": ptype,
                                                     "size": size})
        if "height" in size and "width" in size:
            base = (int(size["height"]), int(size["width"]))
        else:
            base = (int(size["shortest_edge"]),) * 2
        crop_d = d.get("crop_size") if crop.kind == "clip" else None
        crop_size = int(crop_d["height"]) if crop_d else int(size.get("height")
                                                              or size["shortest_edge"])
        pins = d.get("image_grid_pinpoints") or (
            ONEVISION_PINPOINTS if ptype == "LlavaOnevisionImageProcessor" else NEXT_PINPOINTS)
        return cls(tuple(tuple(p) for p in pins), crop, crop_size, base, **kw)

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike, **kw) -> AnyResConfig:
        f = os.path.join(os.fspath(path), "preprocessor_config.json")
        if not os.path.isfile(f):
            raise FileNotFoundError(f"no preprocessor_config.json in {os.fspath(path)!r}")
        with open(f) as fh:
            return cls.from_hf_dict(json.load(fh), **kw)


@dataclasses.dataclass
class AnyResInputs:
    """A batch of AnyRes images (see the module docstring for the shapes)."""

    pixels: np.ndarray      # f32[B, C, H, W, 3]
    crop_valid: np.ndarray  # bool[B, C]
    layout: np.ndarray      # i32[B, 4] (rows, cols, height, width)

    @property
    def num_views(self) -> np.ndarray:
        """i32[B]: valid views per image (1 + rows*cols, or 1 untiled)."""
        return self.crop_valid.sum(-1).astype(np.int32)


# ---- HF's geometry ----------------------------------------------------------------------------
def select_best_resolution(original_size: tuple[int, int],
                           possible: Sequence[Sequence[int]]) -> tuple[int, int]:
    """transformers' `select_best_resolution`: (height, width) of the best pinpoint."""
    oh, ow = original_size
    best, best_eff, best_waste = None, 0, float("inf")
    for h, w in possible:
        scale = min(w / ow, h / oh)
        eff = min(int(ow * scale) * int(oh * scale), ow * oh)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (int(h), int(w)), eff, waste
    if best is None:
        raise ValueError(f"no pinpoint fits an image of size {original_size}")
    return best


def patch_output_size(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    """transformers' `get_patch_output_size`: aspect-kept size inside `target` (h, w)."""
    th, tw = target
    scale_w, scale_h = tw / width, th / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), th), tw
    return th, min(math.ceil(width * scale_h), tw)


def tile(img: PIL.Image.Image, cfg: AnyResConfig) -> tuple[list[PIL.Image.Image], tuple[int, int]]:
    """One RGB image -> ([base view, crop_1 .. crop_{rows*cols}] uint8 PIL, (rows, cols))."""
    resample = im._RESAMPLE[cfg.crop.resample]
    th, tw = select_best_resolution((img.height, img.width), cfg.pinpoints)
    nh, nw = patch_output_size(img.height, img.width, (th, tw))
    resized = np.asarray(img.resize((nw, nh), resample=resample))
    top, left = (th - nh) // 2, (tw - nw) // 2
    padded = np.zeros((th, tw, 3), np.uint8)
    padded[top:top + nh, left:left + nw] = resized
    s = cfg.crop_size
    crops = [PIL.Image.fromarray(np.ascontiguousarray(padded[i:i + s, j:j + s]))
             for i in range(0, th, s) for j in range(0, tw, s)]
    bh, bw = cfg.base_size
    base = img.resize((bw, bh), resample=resample)
    return [base] + crops, (th // s, tw // s)


def preprocess_views(image: im.ImageLike, cfg: AnyResConfig, *,
                     patch: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One image -> (views f32[n, H, W, 3], layout i32[4] (rows, cols, height, width)).

    patch=False: OneVision's multi-image view (pad to square with the mean colour, resize).
    """
    img = im.to_rgb(image)
    if patch:
        views, (rows, cols) = tile(img, cfg)
        px = np.stack([im.preprocess_one(v, cfg.crop) for v in views])
    else:
        rows = cols = 0
        sq = dataclasses.replace(cfg.crop, pad_to_square=True)
        px = im.preprocess_one(img, sq)[None]
    return px, np.asarray([rows, cols, img.height, img.width], np.int32)


def preprocess(images: im.ImageLike | Sequence[im.ImageLike], cfg: AnyResConfig, *,
               patch: bool = True, num_views: int | None = None) -> AnyResInputs:
    """Images -> `AnyResInputs` padded to a crop bucket.

    num_views: force C (must be one of `cfg.buckets` and fit every image); None: the smallest
    bucket that fits the batch (with patch=False: 1).
    """
    if isinstance(images, (PIL.Image.Image, np.ndarray)):
        images = [images]
    images = list(images)
    if not images:
        raise ValueError("anyres.preprocess: no images")
    per = [preprocess_views(x, cfg, patch=patch) for x in images]
    need = max(p.shape[0] for p, _ in per)
    if num_views is None:
        c = cfg.bucket_for(need) if patch else 1
    else:
        if patch and num_views not in cfg.buckets:
            raise ValueError(f"num_views={num_views} is not a crop bucket {cfg.buckets}")
        if num_views < need:
            raise ValueError(f"num_views={num_views} < {need} views needed by this batch")
        c = num_views
    s = cfg.crop_size
    pixels = np.zeros((len(per), c, s, s, 3), np.float32)
    valid = np.zeros((len(per), c), bool)
    for b, (px, _) in enumerate(per):
        pixels[b, :px.shape[0]] = px
        valid[b, :px.shape[0]] = True
    layout = np.stack([lay for _, lay in per]).astype(np.int32)
    return AnyResInputs(pixels, valid, layout)


@dataclasses.dataclass
class MultiImageInputs:
    """Several images per prompt (OneVision multi-image), padded to P images and C views.

    pixels      f32[B, P, C, H, W, 3]  image p of row b at [b, p] (absent images zero)
    crop_valid  bool[B, P, C]
    layout      i32[B, P, 4]           (rows, cols, height, width); rows = cols = 0 untiled
    image_valid bool[B, P]             the row's real images (a prefix)
    """

    pixels: np.ndarray
    crop_valid: np.ndarray
    layout: np.ndarray
    image_valid: np.ndarray

    @property
    def num_images(self) -> np.ndarray:
        """i32[B]: images per row."""
        return self.image_valid.sum(-1).astype(np.int32)


def preprocess_multi(images: Sequence[Sequence[im.ImageLike]], cfg: AnyResConfig, *,
                     max_images: int | None = None, num_views: int | None = None,
                     patch_single: bool = True) -> MultiImageInputs:
    """Rows of images (one list per prompt) -> `MultiImageInputs`, HF OneVision semantics:
    a row with ONE image is tiled (AnyRes, base view + crops; `patch_single=False`: base view
    only), a row with several images gives each image one untiled view (pad to square with the
    mean colour, resize: `patch=False`), as `LlavaOnevisionImageProcessor` with
    `batch_num_images`.

    max_images: the static image count P (None: the most images of a row); num_views: the
    static view count C (None: the smallest crop bucket that fits, 1 when nothing is tiled).
    """
    rows = [list(r) if isinstance(r, (list, tuple)) else [r] for r in images]
    if not rows:
        raise ValueError("anyres.preprocess_multi: no rows")
    counts = [len(r) for r in rows]
    if min(counts) < 1:
        raise ValueError("anyres.preprocess_multi: every row needs at least one image")
    p = max(counts) if max_images is None else int(max_images)
    if p < max(counts):
        raise ValueError(f"max_images={p} < {max(counts)} images in a row")
    per = [[preprocess_views(x, cfg, patch=patch_single and len(r) == 1) for x in r]
           for r in rows]
    need = max(v.shape[0] for r in per for v, _ in r)
    if num_views is None:
        c = cfg.bucket_for(need) if need > 1 else 1
    else:
        if num_views < need:
            raise ValueError(f"num_views={num_views} < {need} views needed by this batch")
        c = int(num_views)
    s = cfg.crop_size
    pixels = np.zeros((len(rows), p, c, s, s, 3), np.float32)
    crop_valid = np.zeros((len(rows), p, c), bool)
    layout = np.zeros((len(rows), p, 4), np.int32)
    layout[..., 2:] = 1  # absent images: a 1x1 untiled placeholder layout
    image_valid = np.zeros((len(rows), p), bool)
    for b, r in enumerate(per):
        for j, (px, lay) in enumerate(r):
            pixels[b, j, :px.shape[0]] = px
            crop_valid[b, j, :px.shape[0]] = True
            layout[b, j] = lay
            image_valid[b, j] = True
    return MultiImageInputs(pixels, crop_valid, layout, image_valid)
