"""Video input for LLaVA-OneVision: decode (PyAV) or read a folder of frames, sample a fixed
number of frames uniformly, preprocess each frame like a base view.

    load_video(path, num_frames)        -> u8[F, H, W, 3]   (a video file, local or gs://)
    load_frames(folder, num_frames)     -> u8[F, H, W, 3]   (image files, sorted by name)
    preprocess_video(frames, cfg)       -> f32[F, S, S, 3]  (per frame: `data.image` pipeline)
    preprocess_videos([...], cfg)       -> f32[B, F, S, S, 3]

Sampling (`sample_indices`): "hf" is transformers' `default_sample_indices_fn`
(`arange(F) * total // F`, what `LlavaOnevisionVideoProcessor(do_sample_frames=True,
num_frames=F)` picks); "linspace" is the original LLaVA-OneVision evaluation's
`np.linspace(0, total - 1, F, dtype=int)` (first and last frame included). F is fixed, so the
model sees a static `f32[B, F, S, S, 3]`; a video with fewer than F frames is an error (HF
raises too), and so is an unreadable file, a file without a video stream, or a folder without
readable images: every one a `VideoError` (a ValueError) naming the path, so a data pipeline can
count and skip the record.

Frames are resized with PIL like the image processors (`LlavaOnevisionVideoProcessor` resizes
with torchvision when it is installed, which differs from PIL by up to a few 1e-2 after
normalization; it is not installed here, so no number is reported against it).
"""
from __future__ import annotations

import os
import re
from collections.abc import Sequence

import numpy as np
import PIL.Image
from etils import epath

from covipal_jax.data import image as im

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
SAMPLINGS = ("hf", "linspace")


class VideoError(ValueError):
    """A video (file or frame folder) that cannot be used; the message names the path."""


def sample_indices(total: int, num_frames: int, sampling: str = "hf") -> np.ndarray:
    """i64[num_frames]: which of `total` frames to keep (see the module docstring)."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if total < num_frames:
        raise VideoError(f"the video has {total} frames, fewer than the {num_frames} requested")
    if sampling == "hf":
        return np.arange(num_frames, dtype=np.int64) * total // num_frames
    if sampling == "linspace":
        return np.linspace(0, total - 1, num_frames, dtype=np.int64)
    raise ValueError(f"unknown sampling {sampling!r}; one of {SAMPLINGS}")


def _open(path: str | os.PathLike):
    """(PyAV container, file object or None): local paths by name, others (gs://) as files."""
    import av  # PyAV: a dependency of video input only

    name = os.fspath(path)
    p = epath.Path(path)
    if not p.exists():
        raise VideoError(f"no such video file: {name!r}")
    if p.is_dir():
        raise VideoError(f"{name!r} is a folder: use load_frames for frame folders")
    fh = p.open("rb") if "://" in name else None
    try:
        return av.open(name if fh is None else fh), fh
    except (av.FFmpegError, OSError, ValueError) as e:
        if fh is not None:
            fh.close()
        raise VideoError(f"cannot read video {name!r}: {e}") from e


def load_video(path: str | os.PathLike, num_frames: int, *, sampling: str = "hf") -> np.ndarray:
    """Decode a video file with PyAV and keep `num_frames` uniformly sampled RGB frames.

    Returns u8[num_frames, H, W, 3]. Raises `VideoError` for a missing / unreadable file, no
    video stream, a decoding error, or fewer frames than `num_frames`.
    """
    import av

    name = os.fspath(path)
    container, fh = _open(path)
    try:
        if not container.streams.video:
            raise VideoError(f"{name!r} has no video stream")
        stream = container.streams.video[0]
        total = int(stream.frames or 0)
        frames: list[np.ndarray] = []
        try:
            if total > 0:  # the container knows its length: decode up to the last index
                idx = sample_indices(total, num_frames, sampling)
                wanted, last = set(idx.tolist()), int(idx[-1])
                by_index = {}
                for i, frame in enumerate(container.decode(stream)):
                    if i in wanted:
                        by_index[i] = frame.to_ndarray(format="rgb24")
                    if i >= last:
                        break
                if len(by_index) < len(wanted):  # the header over-counted: fall back below
                    total = 0
                    container.seek(0)
                else:
                    frames = [by_index[i] for i in idx.tolist()]
            if total == 0:  # unknown length: decode everything, then sample
                every = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
                idx = sample_indices(len(every), num_frames, sampling)
                frames = [every[i] for i in idx.tolist()]
        except VideoError as e:
            raise VideoError(f"{name!r}: {e}") from e
        except (av.FFmpegError, OSError, ValueError) as e:
            raise VideoError(f"cannot decode video {name!r}: {e}") from e
    finally:
        container.close()
        if fh is not None:
            fh.close()
    return np.stack(frames)


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def load_frames(folder: str | os.PathLike, num_frames: int, *,
                sampling: str = "hf") -> np.ndarray:
    """A folder of frame images (sorted by name, numbers compared as numbers) -> u8[F, H, W, 3].

    All frames must have one size. Raises `VideoError` when the folder is missing, holds fewer
    readable images than `num_frames`, or a sampled image is unreadable or of another size.
    """
    p = epath.Path(folder)
    if not p.is_dir():
        raise VideoError(f"no such frame folder: {os.fspath(folder)!r}")
    files = sorted((f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES),
                   key=lambda f: _natural_key(f.name))
    try:
        idx = sample_indices(len(files), num_frames, sampling)
    except VideoError as e:
        raise VideoError(f"frame folder {os.fspath(folder)!r}: {e}") from e
    frames = []
    for i in idx.tolist():
        try:
            with files[i].open("rb") as fh, PIL.Image.open(fh) as img:
                img.load()
                frames.append(np.asarray(im.to_rgb(img)))
        except (OSError, PIL.UnidentifiedImageError, ValueError, SyntaxError) as e:
            raise VideoError(f"cannot read frame {os.fspath(files[i])!r}: {e}") from e
    if len({f.shape for f in frames}) != 1:
        raise VideoError(f"frames in {os.fspath(folder)!r} differ in size: "
                         f"{sorted({f.shape[:2] for f in frames})}")
    return np.stack(frames)


def load(source: str | os.PathLike, num_frames: int, *, sampling: str = "hf") -> np.ndarray:
    """`load_frames` for a folder, `load_video` for a file."""
    if epath.Path(source).is_dir():
        return load_frames(source, num_frames, sampling=sampling)
    return load_video(source, num_frames, sampling=sampling)


def preprocess_video(frames: np.ndarray | Sequence[im.ImageLike],
                     cfg: im.ImageProcessorConfig) -> np.ndarray:
    """u8[F, H, W, 3] (or F images) -> f32[F, S, S, 3], every frame through `cfg`
    (OneVision: `AnyResConfig.onevision().crop`, a square resize with CLIP mean/std)."""
    if len(frames) == 0:
        raise VideoError("no frames")
    return np.stack([im.preprocess_one(f, cfg) for f in frames])


def preprocess_videos(videos: Sequence[np.ndarray], cfg: im.ImageProcessorConfig) -> np.ndarray:
    """B videos of equal frame count -> f32[B, F, S, S, 3]."""
    counts = {len(v) for v in videos}
    if len(counts) != 1:
        raise ValueError(f"videos in a batch must have one frame count, got {sorted(counts)}")
    return np.stack([preprocess_video(v, cfg) for v in videos])
