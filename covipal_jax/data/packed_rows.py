"""Packed training rows (issue 12): one OneVision AnyRes image or one video per row, static
shapes per bucket, for PPM training on the inputs it prunes at inference.

Letters: C views per image (the crop bucket), S crop side, F frames.

`PackedSpec.kind`:
- "anyres": the record's single image through `data.anyres.preprocess` padded to C =
  `num_views` views (default: the processor's largest bucket, so every image fits one
  compiled program): row keys `anyres_pixels f32[C, S, S, 3]`, `anyres_plan i32[8]`
  (`models.anyres.plan_one`). The prompt keeps the image placeholder.
- "video": the record's `frames` (the TFDS builder stores exactly its `num_frames`) resampled
  to F = `num_frames` (`data.video.sample_indices`) and processed like OneVision's video
  frames: row key `frames f32[F, S, S, 3]`; the prompt's image placeholder becomes the model's
  video token.
A batch is all of one kind (the model's program differs); records of the other kind,
multi-image records (one packed input per row holds one image) and videos with fewer frames
than F become weight-0 rows counted in `PipelineStats.wrong_kind`. `train.objectives.encode`
turns the keys back into `inference.visual_inputs.AnyResImage` / `Video`
(`visual_from_batch`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from covipal_jax.data import anyres as data_anyres
from covipal_jax.data import video as video_lib
from covipal_jax.models import anyres

KINDS = ("anyres", "video")


class WrongKind(ValueError):
    """A record this packed pipeline cannot hold (other media kind, several images)."""


@dataclasses.dataclass(frozen=True)
class PackedSpec:
    kind: str
    processor: data_anyres.AnyResConfig
    grid: int                   # tower grid side g
    max_crops: int = 0          # anyres_max_N (0: no downsampling)
    num_views: int = 0          # anyres: C (0: the processor's largest bucket)
    num_frames: int = 0         # video: F
    video_token_id: int = -1    # video: the placeholder that replaces the image token

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"packed kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "video" and (self.num_frames < 1 or self.video_token_id < 0):
            raise ValueError("a video PackedSpec needs num_frames >= 1 and the model's "
                             "video_token_id")

    @classmethod
    def for_model(cls, cfg: Any, kind: str, *, num_frames: int = 0, num_views: int = 0,
                  **kw) -> "PackedSpec":
        """From a `LlavaConfig` with AnyRes (OneVision / NeXT)."""
        vid = -1 if cfg.video_token_id is None else int(cfg.video_token_id)
        return cls(kind=kind, processor=data_anyres.AnyResConfig.for_model(cfg, **kw),
                   grid=int(cfg.vision.grid[0]), max_crops=int(cfg.anyres_max_crops or 0),
                   num_views=num_views, num_frames=num_frames, video_token_id=vid)

    @property
    def views(self) -> int:
        return self.num_views or max(self.processor.buckets)


def media_from_record(record: Mapping[str, Any]) -> tuple[list, list]:
    """(images, frames) of a LLaVA TFDS record (format 2.0.0) or a synthetic one."""
    if "image" in record:
        return [np.asarray(record["image"])], []
    return ([np.asarray(x) for x in record.get("images", ())],
            [np.asarray(x) for x in record.get("frames", ())])


def visual_row(spec: PackedSpec, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The visual keys of one row; `WrongKind` for a record of another kind."""
    images, frames = media_from_record(record)
    if spec.kind == "anyres":
        if len(images) != 1 or frames:
            raise WrongKind(f"{len(images)} images, {len(frames)} frames (anyres rows hold "
                            "one image)")
        x = data_anyres.preprocess(images, spec.processor, num_views=spec.views)
        plan = anyres.plan_one(x.layout[0], spec.grid, spec.max_crops)
        return {"anyres_pixels": x.pixels[0], "anyres_plan": np.asarray(plan, np.int32)}
    if images or not frames:
        raise WrongKind(f"{len(images)} images, {len(frames)} frames (video rows hold a video)")
    try:
        idx = video_lib.sample_indices(len(frames), spec.num_frames)
    except video_lib.VideoError as e:  # fewer frames than the bucket
        raise WrongKind(str(e)) from None
    return {"frames": video_lib.preprocess_video([frames[i] for i in idx],
                                                 spec.processor.crop)}


def filler_row(spec: PackedSpec) -> dict[str, np.ndarray]:
    """The visual keys of a weight-0 row: zero views, an untiled plan / zero frames."""
    s = spec.processor.crop_size
    if spec.kind == "anyres":
        return {"anyres_pixels": np.zeros((spec.views, s, s, 3), np.float32),
                "anyres_plan": np.asarray(anyres.plan_one((0, 0, 0, 0), spec.grid), np.int32)}
    return {"frames": np.zeros((spec.num_frames, s, s, 3), np.float32)}


def fix_placeholder(spec: PackedSpec, ids: np.ndarray, image_token_id: int) -> np.ndarray:
    """Video rows: the chat template's image placeholder becomes the video token."""
    if spec.kind != "video":
        return ids
    return np.where(ids == image_token_id, spec.video_token_id, ids).astype(ids.dtype)
