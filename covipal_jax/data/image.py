"""Image preprocessing for the vision towers (CLIP, SigLIP), matching Hugging Face, in NumPy + PIL.

Output layout is NHWC `f32[B, H, W, 3]` (what our Flax ViT consumes); HF returns NCHW.

Pipelines (per image, all in PIL/NumPy, no torch):
- `clip`:   [pad to square with the mean colour (LLaVA-1.5 `expand2square`)] -> resize the shortest
            edge to `image_size` (PIL, `resample`, long edge `int(size * long / short)` as HF)
            -> center crop `crop_size` (zero-padded when too small, as HF) -> rescale -> normalize.
- `siglip`: resize to `image_size x image_size` (PIL, `resample`) -> rescale -> normalize.
            LLaVA-OneVision dirs use this for the single base-resolution crop (no anyres tiles).

Parity (tests/test_image.py) against the transformers 5.24 PIL backends (`CLIPImageProcessorPil`,
`SiglipImageProcessorPil`, `LlavaImageProcessorPil(do_pad=True)`, `LlavaOnevisionImageProcessorPil`
base crop): max abs diff 0.0 (bit-identical): same PIL resize on uint8, same float64 rescale then
float32 cast, same float32 normalize. The torchvision ("fast") backends are not installed here
(no torchvision), so no number is reported against them; they resize in float with torch kernels
and are known to differ from PIL by up to a few 1e-2 after normalization.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Sequence
from typing import Any, Union

import numpy as np
import PIL.Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

_RESAMPLE = {
    "nearest": PIL.Image.Resampling.NEAREST,
    "lanczos": PIL.Image.Resampling.LANCZOS,
    "bilinear": PIL.Image.Resampling.BILINEAR,
    "bicubic": PIL.Image.Resampling.BICUBIC,
    "box": PIL.Image.Resampling.BOX,
    "hamming": PIL.Image.Resampling.HAMMING,
}
_RESAMPLE_BY_CODE = {int(v): k for k, v in _RESAMPLE.items()}

ImageLike = Union[PIL.Image.Image, np.ndarray]


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
    """How to turn an image into vision-tower pixels.

    kind: "clip" (shortest-edge resize + center crop) or "siglip" (square resize).
    image_size: clip: shortest-edge target; siglip: the square side.
    crop_size: clip: center-crop side (the output side); siglip: equals `image_size`.
    resample: PIL filter name ("bicubic", "bilinear", ...).
    pad_to_square: LLaVA-1.5 `expand2square` with `background_color` before resizing.
    """

    kind: str
    image_size: int
    crop_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale_factor: float = 1.0 / 255.0
    resample: str = "bicubic"
    pad_to_square: bool = False
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    def __post_init__(self):
        if self.kind not in ("clip", "siglip"):
            raise ValueError(
                f"ImageProcessorConfig.kind must be 'clip' or 'siglip', got {self.kind!r}")
        if self.resample not in _RESAMPLE:
            raise ValueError(f"unknown resample {self.resample!r}; one of {sorted(_RESAMPLE)}")
        if self.kind == "siglip" and self.crop_size != self.image_size:
            raise ValueError("siglip: crop_size must equal image_size (no center crop)")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std must have 3 entries (RGB)")

    @property
    def output_size(self) -> int:
        """Side of the square output image (H = W)."""
        if self.kind == "clip" and self.do_center_crop:
            return self.crop_size
        return self.image_size

    @property
    def background_color(self) -> tuple[int, int, int]:
        """LLaVA's pad colour: `tuple(int(x * 255) for x in mean)`."""
        return tuple(int(x * 255) for x in self.mean)  # type: ignore[return-value]

    # ---- presets ---------------------------------------------------------------------------------
    @classmethod
    def clip(cls, image_size: int = 224, *, crop_size: int | None = None,
             pad_to_square: bool = False) -> ImageProcessorConfig:
        """OpenAI CLIP preprocessing (bicubic, shortest edge `image_size`, center crop)."""
        return cls(kind="clip", image_size=image_size,
                   crop_size=image_size if crop_size is None else crop_size,
                   mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, resample="bicubic",
                   pad_to_square=pad_to_square)

    @classmethod
    def clip_336(cls, *, pad_to_square: bool = False) -> ImageProcessorConfig:
        """CLIP ViT-L/14-336 as in LLaVA-1.5 (`pad_to_square=True`: LLaVA's `pad` aspect mode)."""
        return cls.clip(336, pad_to_square=pad_to_square)

    @classmethod
    def siglip(cls, image_size: int = 384, *, resample: str = "bicubic") -> ImageProcessorConfig:
        """SigLIP preprocessing: square resize, mean = std = 0.5.

        Bicubic is the HF `SiglipImageProcessor` default and what the google/siglip and
        LLaVA-OneVision configs ship (`resample: 3`).
        """
        return cls(kind="siglip", image_size=image_size, crop_size=image_size,
                   mean=SIGLIP_MEAN, std=SIGLIP_STD, resample=resample, do_center_crop=False)

    # ---- from a Hugging Face checkpoint dir -----------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], *, pad_to_square: bool | None = None,
                     family: str | None = None,
                     image_size: int | None = None) -> ImageProcessorConfig:
        """Build from a `preprocessor_config.json` dict (CLIP / SigLIP / Llava / LlavaOnevision).

        `pad_to_square=None` takes the file's `do_pad` for `LlavaImageProcessor` and False for
        CLIP (llava-hf ships `CLIPImageProcessor`, i.e. no padding, although the original LLaVA-1.5
        evaluation pads: pass `pad_to_square=True` to reproduce it).
        `family` ("clip" | "siglip", the model's vision tower) decides the preprocessing when the
        dict names no processor type or size. Fields the dict lacks (`image_mean`, `image_std`,
        sizes, resample, ...) take the defaults of the processor's family: OpenAI-CLIP mean/std
        for CLIP (and LlavaOnevisionImageProcessor, as transformers), 0.5/0.5 for SigLIP;
        missing sizes take `image_size` (the tower's input size) when given, else 224.
        """
        if not isinstance(d, dict):
            raise ValueError(f"preprocessor config must be a JSON object, got {type(d).__name__}")
        if family is not None and family not in ("clip", "siglip"):
            raise ValueError(f"family must be 'clip' or 'siglip', got {family!r}")
        ptype = str(d.get("image_processor_type") or "")
        for suffix in ("Fast", "Pil"):
            if ptype.endswith(suffix):
                ptype = ptype[: -len(suffix)]
        size = d.get("size")
        crop = d.get("crop_size")
        if ptype in ("CLIPImageProcessor", "LlavaImageProcessor"):
            kind = "clip"
        elif ptype in ("SiglipImageProcessor", "LlavaOnevisionImageProcessor"):
            kind = "siglip"
        elif isinstance(size, dict) and "shortest_edge" in size:
            kind = "clip"
        elif isinstance(size, dict) and "height" in size:
            kind = "siglip"
        elif family is not None:
            kind = family
        else:
            raise ValueError(f"unsupported image processor config (type {ptype!r}, size {size!r})")

        fallback_size = 224 if image_size is None else int(image_size)
        if kind == "clip":
            default_mean, default_std, default_resample = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, 3
            image_size = _side(size, key="shortest_edge", default=fallback_size)
            do_center_crop = bool(d.get("do_center_crop", True))
            crop_size = (_side(crop, key="height", default=fallback_size) if do_center_crop
                         else image_size)
            if pad_to_square is None:
                pad_to_square = bool(d.get("do_pad", False)) and ptype == "LlavaImageProcessor"
        else:
            if ptype == "LlavaOnevisionImageProcessor":
                default_mean, default_std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
            else:
                default_mean, default_std = SIGLIP_MEAN, SIGLIP_STD
            default_resample = 3
            image_size = _side(size, key="height", default=fallback_size)
            crop_size, do_center_crop = image_size, False
            pad_to_square = bool(pad_to_square)
        resample = d.get("resample", default_resample)
        resample = _RESAMPLE_BY_CODE[int(resample)] if not isinstance(resample, str) else resample

        def _rgb(v: Any, default: tuple[float, ...], key: str) -> tuple[float, ...]:
            """An RGB triple from a field: a list of 3, one number, or missing/null."""
            if v is None:
                return tuple(float(x) for x in default)  # type: ignore[return-value]
            vals = list(v) if isinstance(v, (list, tuple)) else [v] * 3
            try:
                out = tuple(float(x) for x in vals)
            except (TypeError, ValueError):
                raise ValueError(f"preprocessor {key}={v!r}: expected 3 numbers") from None
            if len(out) != 3:
                raise ValueError(f"preprocessor {key}={v!r}: expected 3 numbers (RGB)")
            return out  # type: ignore[return-value]

        mean = _rgb(d.get("image_mean"), default_mean, "image_mean")
        std = _rgb(d.get("image_std"), default_std, "image_std")
        return cls(
            kind=kind, image_size=image_size, crop_size=crop_size, mean=mean, std=std,
            rescale_factor=float(d.get("rescale_factor", 1.0 / 255.0)), resample=resample,
            pad_to_square=pad_to_square, do_resize=bool(d.get("do_resize", True)),
            do_center_crop=do_center_crop, do_rescale=bool(d.get("do_rescale", True)),
            do_normalize=bool(d.get("do_normalize", True)))

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike, *,
                    pad_to_square: bool | None = None) -> ImageProcessorConfig:
        """Read `<path>/preprocessor_config.json` (see `from_hf_dict`)."""
        f = os.path.join(os.fspath(path), "preprocessor_config.json")
        if not os.path.isfile(f):
            raise FileNotFoundError(f"no preprocessor_config.json in {os.fspath(path)!r}")
        with open(f) as fh:
            return cls.from_hf_dict(json.load(fh), pad_to_square=pad_to_square)


def _side(v: Any, *, key: str, default: int) -> int:
    """One square side from an HF size field (int, {"shortest_edge"}, {"height","width"})."""
    if v is None:
        return default
    if isinstance(v, (int, float)):
        return int(v)
    if key in v:
        if "width" in v and "height" in v and v["width"] != v["height"]:
            raise ValueError(f"only square sizes are supported, got {v}")
        return int(v[key])
    for k in ("shortest_edge", "height"):
        if k in v:
            return int(v[k])
    raise ValueError(f"cannot read an image size from {v!r}")


# Presets as module-level functions (the names the rest of the package uses).
def clip_336(*, pad_to_square: bool = False) -> ImageProcessorConfig:
    return ImageProcessorConfig.clip_336(pad_to_square=pad_to_square)


def clip(image_size: int = 224, *, crop_size: int | None = None,
         pad_to_square: bool = False) -> ImageProcessorConfig:
    return ImageProcessorConfig.clip(image_size, crop_size=crop_size, pad_to_square=pad_to_square)


def siglip(image_size: int = 384, *, resample: str = "bicubic") -> ImageProcessorConfig:
    return ImageProcessorConfig.siglip(image_size, resample=resample)


# ---- image ops ----------------------------------------------------------------------------------
def to_rgb(image: ImageLike) -> PIL.Image.Image:
    """Any PIL image or uint8 array (HW, HW1, HW3, HW4) -> RGB PIL image.

    Transparency is composited onto white, as HF `convert_to_rgb`.
    """
    if isinstance(image, PIL.Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return PIL.Image.alpha_composite(white, rgba).convert("RGB")
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"image arrays must be uint8 HWC, got dtype {image.dtype}")
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
            raise ValueError(
                f"image arrays must be HW or HWC with C in (1, 3, 4), got {image.shape}")
        if image.shape[-1] == 1:
            image = np.repeat(image, 3, axis=-1)
        elif image.shape[-1] == 4:
            alpha = image[..., 3:4] / 255
            image = np.round(alpha * image[..., :3] + (1 - alpha) * 255).astype(np.uint8)
        return PIL.Image.fromarray(np.ascontiguousarray(image), mode="RGB")
    raise TypeError(f"expected a PIL image or a uint8 array, got {type(image).__name__}")


def expand2square(image: PIL.Image.Image,
                  background_color: tuple[int, int, int]) -> PIL.Image.Image:
    """LLaVA's `expand2square`: paste centered on a square of `background_color`."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = PIL.Image.new(image.mode, (side, side), background_color)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


def _shortest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    """HF `get_resize_output_image_size(default_to_square=False)`: (new_h, new_w)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def _center_crop(x: np.ndarray, size: int) -> np.ndarray:
    """HF `center_crop` on HWC: crop, zero-padding first when the image is smaller."""
    h, w = x.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    if top >= 0 and left >= 0:
        return x[top:top + size, left:left + size]
    nh, nw = max(size, h), max(size, w)
    pad_t, pad_l = -(-(nh - h) // 2), -(-(nw - w) // 2)
    canvas = np.zeros((nh, nw) + x.shape[2:], x.dtype)
    canvas[pad_t:pad_t + h, pad_l:pad_l + w] = x
    top, left = top + pad_t, left + pad_l
    return canvas[max(0, top):min(nh, top + size), max(0, left):min(nw, left + size)]


def preprocess_one(image: ImageLike, cfg: ImageProcessorConfig) -> np.ndarray:
    """One image -> `f32[H, W, 3]`."""
    img = to_rgb(image)
    if cfg.pad_to_square:
        img = expand2square(img, cfg.background_color)
    if cfg.do_resize:
        if cfg.kind == "clip":
            new_h, new_w = _shortest_edge_size(img.height, img.width, cfg.image_size)
        else:
            new_h = new_w = cfg.image_size
        img = img.resize((new_w, new_h), resample=_RESAMPLE[cfg.resample])
    x = np.asarray(img)
    if cfg.kind == "clip" and cfg.do_center_crop:
        x = _center_crop(x, cfg.crop_size)
    if cfg.do_rescale:
        x = (x.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    else:
        x = x.astype(np.float32)
    if cfg.do_normalize:
        x = (x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
    return np.ascontiguousarray(x, dtype=np.float32)


def preprocess(images: ImageLike | Sequence[ImageLike], cfg: ImageProcessorConfig) -> np.ndarray:
    """PIL images / uint8 HWC arrays (one or a list) -> `f32[B, H, W, 3]` (NHWC).

    A single image gives B = 1. Every output has side `cfg.output_size` (when resizing).
    """
    if isinstance(images, (PIL.Image.Image, np.ndarray)):
        images = [images]
    images = list(images)
    if not images:
        raise ValueError("preprocess: no images")
    return np.stack([preprocess_one(im, cfg) for im in images])


def load_image(path: str | os.PathLike) -> PIL.Image.Image:
    """Open and decode an image file as RGB (alpha composited onto white).

    Raises ValueError naming the path, in one line, when the file is missing, not readable
    (permissions), not an image, or a decompression bomb (more pixels than
    `PIL.Image.MAX_IMAGE_PIXELS`, e.g. a 20000x20000 PNG).
    """
    name = os.fspath(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(path) as im:
                im.load()
                return to_rgb(im).copy()
    except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as e:
        raise ValueError(
            f"image {name!r} is too large to decode safely: {str(e).split(',')[0]} (PIL's "
            f"limit is {PIL.Image.MAX_IMAGE_PIXELS} pixels); resize it, or raise "
            "PIL.Image.MAX_IMAGE_PIXELS if the file is trusted") from None
    except PermissionError:
        raise ValueError(f"cannot read image {name!r}: permission denied") from None
    except FileNotFoundError:
        raise ValueError(f"cannot read image {name!r}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"cannot read image {name!r}: it is a directory") from None
    except (OSError, PIL.UnidentifiedImageError, ValueError, SyntaxError) as e:
        msg = " ".join(str(e).split())
        raise ValueError(f"cannot read image {name!r}: {msg}") from e
