"""Checks and media loading for one LLaVA-format record (the `covipal_llava` TFDS builder).

A record is single-image (`"image": "a.jpg"` or `["a.jpg"]`), multi-image (`"image": [...]`,
LLaVA-OneVision's multi-image data) or video (`"video": "clip.mp4"` or a folder of frames,
LLaVA-OneVision / LLaVA-Video data), with a `conversations` list of alternating human / gpt
turns. Placeholders: one `<image>` per image (anywhere in the conversation, in order); a video
record has exactly one placeholder, `<video>` or the `<image>` that LLaVA-OneVision's video data
uses, normalised to `<video>` in the stored turns.

`check_record(rec, ...)` validates the structure without touching files and returns a `Checked`;
`load_image_bytes(path)` / `load_video_frames(path, ...)` read the media. Every failure raises
`Skip(reason)` with one of `SKIP_REASONS`; the first failing check, in this order, wins:

  malformed_record     not a dict, no conversations list, a turn without string "from"/"value",
                       an unparsable JSON line, a non-string image / video path, both "image"
                       and "video"
  text_only            neither "image" nor "video"
  too_many_images      more images than the builder's `max_images`
  video_not_enabled    a video record while the builder keeps no frames (`num_frames=0`)
  bad_role_order       turns must alternate human, gpt, ... and end with gpt
  empty_answer         a blank gpt turn
  missing_placeholder  fewer placeholders than images (a video record without one)
  extra_placeholder    more placeholders than images (a video record with several, or an
                       image record with a `<video>`)
  missing_image_file / unreadable_image   (PIL cannot decode it; fully decoded when `verify`)
  missing_video_file / unreadable_video   (PyAV cannot decode it, or a bad frame folder)
  too_few_frames       a video with fewer frames than the configured count
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import PIL.Image

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
ROLE_ALIASES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}
SKIP_REASONS = (
    "malformed_record",
    "text_only",
    "too_many_images",
    "video_not_enabled",
    "bad_role_order",
    "empty_answer",
    "missing_placeholder",
    "extra_placeholder",
    "missing_image_file",
    "unreadable_image",
    "missing_video_file",
    "unreadable_video",
    "too_few_frames",
)
FRAME_FORMATS = ("jpeg", "png")


class Skip(Exception):
    """A record that is skipped; `reason` is one of `SKIP_REASONS`."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Checked:
    """A structurally valid record: media paths (relative, as in the JSON) and turns."""

    images: tuple[str, ...]   # () for a video record
    video: str                # "" for an image record
    roles: tuple[str, ...]    # "human" / "gpt", alternating
    values: tuple[str, ...]   # verbatim, except a video record's placeholder -> `<video>`

    @property
    def question(self) -> str:
        """The first human turn without its placeholders (and surrounding whitespace)."""
        return self.values[0].replace(IMAGE_TOKEN, "").replace(VIDEO_TOKEN, "").strip()


def record_id(rec: Any, index: int) -> str:
    if isinstance(rec, dict) and rec.get("id") is not None:
        return str(rec["id"])
    return str(index)


def _media(rec: dict) -> tuple[tuple[str, ...], str]:
    image, video = rec.get("image"), rec.get("video")
    no_image = image is None or image == "" or image == []
    no_video = video is None or video == ""
    if no_image and no_video:
        raise Skip("text_only")
    if not no_image and not no_video:
        raise Skip("malformed_record")
    if not no_video:
        if not isinstance(video, str):
            raise Skip("malformed_record")
        return (), video
    images = image if isinstance(image, list) else [image]
    if not all(isinstance(p, str) and p for p in images):
        raise Skip("malformed_record")
    return tuple(images), ""


def check_record(rec: Any, *, max_images: int = 16, num_frames: int = 32,
                 image_token: str = IMAGE_TOKEN, video_token: str = VIDEO_TOKEN) -> Checked:
    """Validates a record's structure (no file access); raises `Skip(reason)`."""
    if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list):
        raise Skip("malformed_record")
    roles, values = [], []
    for t in rec["conversations"]:
        if not isinstance(t, dict) or not isinstance(t.get("from"), str) \
                or not isinstance(t.get("value"), str):
            raise Skip("malformed_record")
        roles.append(ROLE_ALIASES.get(t["from"].strip().lower(), t["from"]))
        values.append(t["value"])
    images, video = _media(rec)
    if len(images) > max_images:
        raise Skip("too_many_images")
    if video and num_frames < 1:
        raise Skip("video_not_enabled")
    if not roles or len(roles) % 2 or any(
            r != ("human" if i % 2 == 0 else "gpt") for i, r in enumerate(roles)):
        raise Skip("bad_role_order")
    if any(not v.strip() for r, v in zip(roles, values) if r == "gpt"):
        raise Skip("empty_answer")
    n_image = sum(v.count(image_token) for v in values)
    n_video = sum(v.count(video_token) for v in values)
    if video:
        if n_image + n_video < 1:
            raise Skip("missing_placeholder")
        if n_image + n_video > 1:
            raise Skip("extra_placeholder")
        values = [v.replace(image_token, video_token) for v in values]
    else:
        if n_image < len(images):
            raise Skip("missing_placeholder")
        if n_image > len(images) or n_video:
            raise Skip("extra_placeholder")
    return Checked(images, video, tuple(roles), tuple(values))


def load_image_bytes(path: str, verify: bool = True) -> bytes:
    """Encoded bytes of an 8-bit RGB JPEG/PNG for `path` (original bytes when possible).

    Raises `Skip("missing_image_file")` or `Skip("unreadable_image")`.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise Skip("missing_image_file") from None
    except OSError:
        raise Skip("unreadable_image") from None
    try:
        with PIL.Image.open(io.BytesIO(data)) as im:
            if verify:
                im.load()
            if im.format in ("JPEG", "PNG") and im.mode == "RGB":
                return data
            im = im.convert("RGB")
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            return buf.getvalue()
    except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError):
        raise Skip("unreadable_image") from None


def encode_frame(frame: np.ndarray, fmt: str = "jpeg", quality: int = 95) -> bytes:
    """u8[H, W, 3] -> JPEG (`quality`) or PNG (lossless) bytes."""
    if fmt not in FRAME_FORMATS:
        raise ValueError(f"frame format must be one of {FRAME_FORMATS}, got {fmt!r}")
    buf = io.BytesIO()
    img = PIL.Image.fromarray(np.asarray(frame, np.uint8), "RGB")
    if fmt == "jpeg":
        img.save(buf, format="JPEG", quality=int(quality))
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()


def load_video_frames(path: str, num_frames: int, *, sampling: str = "hf",
                      fmt: str = "jpeg", quality: int = 95) -> list[bytes]:
    """`num_frames` uniformly sampled frames (`data.video.load`: a file or a frame folder) of
    `path`, each encoded as `fmt`. Raises `Skip("missing_video_file" | "too_few_frames" |
    "unreadable_video")`."""
    from covipal_jax.data import video as video_lib  # PyAV: only for video records

    if not os.path.exists(path):
        raise Skip("missing_video_file")
    try:
        frames = video_lib.load(path, num_frames, sampling=sampling)
    except video_lib.VideoError as e:
        if "fewer than the" in str(e):  # `video.sample_indices`: total < num_frames
            raise Skip("too_few_frames") from None
        raise Skip("unreadable_video") from None
    except (OSError, ValueError, MemoryError):
        raise Skip("unreadable_video") from None
    return [encode_frame(f, fmt, quality) for f in frames]


def read_records(path: str) -> Iterator[Any]:
    """Records of a JSON list or a JSON-lines file (an unparsable line yields `None`)."""
    with open(path, encoding="utf-8") as f:
        head = f.read(1)
        while head and head.isspace():
            head = f.read(1)
        f.seek(0)
        if head == "[":
            yield from json.load(f)
            return
        for line in f:
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    yield None
