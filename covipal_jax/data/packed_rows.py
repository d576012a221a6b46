"""Packed training rows (issue 12): one OneVision AnyRes image, one video or several images
per row, static shapes per bucket, for PPM training on the inputs it prunes at inference.

Letters: C views per image (the crop bucket), S crop side, F frames, P images per row.

`PackedSpec.kind`:
- "anyres": the record's single image through `data.anyres.preprocess` padded to C =
  `num_views` views (default: the processor's largest bucket, so every image fits one
  compiled program): row keys `anyres_pixels f32[C, S, S, 3]`, `anyres_plan i32[8]`
  (`models.anyres.plan_one`). The prompt keeps the image placeholder.
- "video": the record's `frames` (the TFDS builder stores exactly its `num_frames`) resampled
  to F = `num_frames` (`data.video.sample_indices`) and processed like OneVision's video
  frames: row key `frames f32[F, S, S, 3]`; the prompt's image placeholder becomes the model's
  video token.
- "multi": up to P = `max_images` images per row, `data.anyres.preprocess_multi`'s rule
  (transformers 5.24 OneVision): several images give one untiled view each (C = `num_views`,
  default 1), one image is tiled when its views fit C (else it belongs to the "anyres" kind):
  row keys `multi_pixels f32[P, C, S, S, 3]`, `multi_plan i32[P, 8]`, `image_valid bool[P]`
  (a prefix; absent images are zero with an untiled plan, never kept: their slots are
  invalid). The prompt keeps the record's placeholders where its text puts them (the LLaVA
  record's first human turn, `values[0]`; without one, one placeholder per image in front).
  A record with more than P images raises `TooManyImages` (counted apart:
  `PipelineStats.too_many_images`).
A batch is all of one kind (the model's program differs); records of the other kind (several
images in an "anyres" / "video" pipeline, a video in a "multi" one) and videos with fewer
frames than F become weight-0 rows counted in `PipelineStats.wrong_kind`.
`train.objectives.encode` turns the keys back into `inference.visual_inputs.AnyResImage` /
`Video` / `MultiImage` (`visual_from_batch`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from covipal_jax.data import anyres as data_anyres
from covipal_jax.data.llava_records import IMAGE_TOKEN
from covipal_jax.data import video as video_lib
from covipal_jax.models import anyres

KINDS = ("anyres", "video", "multi")
# the batch keys of each kind's visual input (`train.state.batch_keys`)
VISUAL_KEYS = {"anyres": ("anyres_pixels", "anyres_plan"), "video": ("frames",),
               "multi": ("multi_pixels", "multi_plan", "image_valid")}


class WrongKind(ValueError):
    """A record this packed pipeline cannot hold (other media kind, several images)."""


class TooManyImages(WrongKind):
    """A multi-image record with more images than the pipeline's P (`max_images`)."""


def as_text(v: Any) -> str:
    """A TFDS text feature (bytes, 0-d array or str) as str."""
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, np.ndarray) and v.shape == ():
        return as_text(v.item())
    return str(v)


@dataclasses.dataclass(frozen=True)
class PackedSpec:
    kind: str
    processor: data_anyres.AnyResConfig
    grid: int                   # tower grid side g
    max_crops: int = 0          # anyres_max_N (0: no downsampling)
    num_views: int = 0          # anyres: C (0: the processor's largest bucket)
    num_frames: int = 0         # video: F
    video_token_id: int = -1    # video: the placeholder that replaces the image token
    max_images: int = 0         # multi: P

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"packed kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "video" and (self.num_frames < 1 or self.video_token_id < 0):
            raise ValueError("a video PackedSpec needs num_frames >= 1 and the model's "
                             "video_token_id")
        if self.kind == "multi" and self.max_images < 1:
            raise ValueError("a multi-image PackedSpec needs max_images >= 1 (data.max_images)")

    @classmethod
    def for_model(cls, cfg: Any, kind: str, *, num_frames: int = 0, num_views: int = 0,
                  max_images: int = 0, **kw) -> "PackedSpec":
        """From a `LlavaConfig` with AnyRes (OneVision / NeXT)."""
        vid = -1 if cfg.video_token_id is None else int(cfg.video_token_id)
        return cls(kind=kind, processor=data_anyres.AnyResConfig.for_model(cfg, **kw),
                   grid=int(cfg.vision.grid[0]), max_crops=int(cfg.anyres_max_crops or 0),
                   num_views=num_views, num_frames=num_frames, video_token_id=vid,
                   max_images=max_images)

    @property
    def views(self) -> int:
        """C: the views per image (anyres default: the largest bucket; multi default: 1)."""
        if self.num_views:
            return self.num_views
        return 1 if self.kind == "multi" else max(self.processor.buckets)

    @property
    def placeholders(self) -> int:
        """The most image placeholders a row's prompt holds."""
        return self.max_images if self.kind == "multi" else 1


def media_from_record(record: Mapping[str, Any]) -> tuple[list, list]:
    """(images, frames) of a LLaVA TFDS record (format 2.0.0) or a synthetic one."""
    if "image" in record:
        return [np.asarray(record["image"])], []
    return ([np.asarray(x) for x in record.get("images", ())],
            [np.asarray(x) for x in record.get("frames", ())])


def visual_row(spec: PackedSpec, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The visual keys of one row; `WrongKind` for a record of another kind."""
    images, frames = media_from_record(record)
    if spec.kind == "multi":
        return _multi_row(spec, images, frames)
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


def _multi_row(spec: PackedSpec, images: list, frames: list) -> dict[str, np.ndarray]:
    if frames or not images:
        raise WrongKind(f"{len(images)} images, {len(frames)} frames (multi-image rows hold "
                        "images)")
    if len(images) > spec.max_images:
        raise TooManyImages(f"{len(images)} images > max_images={spec.max_images}")
    if len(images) == 1:  # HF tiles a lone image: it must fit the bucket
        h, w = images[0].shape[:2]
        rows, cols = spec.processor.grid_for(h, w)
        if 1 + rows * cols > spec.views:
            raise WrongKind(f"a single image needs {1 + rows * cols} views > C={spec.views} "
                            "(train it with packed='anyres' or a larger data.num_views)")
    x = data_anyres.preprocess_multi([images], spec.processor, max_images=spec.max_images,
                                     num_views=spec.views)
    plan = anyres.pack_plan(x.layout[0], spec.grid, spec.max_crops)
    return {"multi_pixels": x.pixels[0], "multi_plan": plan, "image_valid": x.image_valid[0]}


def question(spec: PackedSpec, record: Mapping[str, Any]) -> str:
    """The row's question: a multi-image row keeps the record's placeholders where its first
    human turn (`values[0]`) puts them (or puts one per image in front); the other kinds take
    `question` (the chat template adds the one placeholder)."""
    q = as_text(record["question"])
    if spec.kind != "multi":
        return q
    n = len(media_from_record(record)[0])
    values = record.get("values")
    if values is not None and len(values):
        v = as_text(values[0]).strip()
        if v.count(IMAGE_TOKEN) == n:
            return v
    return " ".join([IMAGE_TOKEN] * n + [q])


def check_placeholders(spec: PackedSpec, row: Mapping[str, np.ndarray],
                       visual: Mapping[str, np.ndarray], image_token_id: int) -> None:
    """Multi-image rows: one prompt placeholder per real image, none in the answer
    (`WrongKind` otherwise)."""
    if spec.kind != "multi":
        return
    ph = np.asarray(row["ids"]) == image_token_id
    n = int(np.sum(visual["image_valid"]))
    if int(ph.sum()) != n or bool((ph & np.asarray(row["loss_mask"], bool)).any()):
        raise WrongKind(f"{int(ph.sum())} image placeholders for {n} images (or one in the "
                        "answer)")


def filler_row(spec: PackedSpec) -> dict[str, np.ndarray]:
    """The visual keys of a weight-0 row: zero views, an untiled plan / zero frames (multi:
    one zero image, the others absent)."""
    s = spec.processor.crop_size
    if spec.kind == "multi":
        p, untiled = spec.max_images, anyres.plan_one((0, 0, 0, 0), spec.grid)
        return {"multi_pixels": np.zeros((p, spec.views, s, s, 3), np.float32),
                "multi_plan": np.tile(np.asarray(untiled, np.int32), (p, 1)),
                "image_valid": np.arange(p) < 1}
    if spec.kind == "anyres":
        return {"anyres_pixels": np.zeros((spec.views, s, s, 3), np.float32),
                "anyres_plan": np.asarray(anyres.plan_one((0, 0, 0, 0), spec.grid), np.int32)}
    return {"frames": np.zeros((spec.num_frames, s, s, 3), np.float32)}


def fix_placeholder(spec: PackedSpec, ids: np.ndarray, image_token_id: int) -> np.ndarray:
    """Video rows: the chat template's image placeholder becomes the video token."""
    if spec.kind != "video":
        return ids
    return np.where(ids == image_token_id, spec.video_token_id, ids).astype(ids.dtype)
