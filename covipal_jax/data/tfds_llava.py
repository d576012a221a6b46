"""TFDS builder `covipal_llava` for LLaVA-format instruction data stored as local files.

Input: a JSON list (or JSON-lines file) of records as in LLaVA-665K and the LLaVA-OneVision
data (single-image, multi-image and video records), plus an image folder and a video folder::

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus is white and red."}, ...]}
    {"id": "m1", "image": ["a.jpg", "b.jpg"], "conversations": [... "<image> <image> Differ?" ...]}
    {"id": "v1", "video": "clips/v1.mp4", "conversations": [... "<image>\\nWhat happens?" ...]}

Nothing is downloaded. Paths come from a `LlavaConfig`: absolute paths are used as they are,
relative ones are resolved against the manual dir (``download_config=tfds.download.
DownloadConfig(manual_dir=...)``, default ``<data_dir>/downloads/manual``)::

    cfg = LlavaConfig(name="mix665k_local", json_files={"train": "/data/llava_v1_5_mix665k.json"},
                      image_dir="/data/images")
    b = CovipalLlava(config=cfg, data_dir="/data/tfds")          # ArrayRecord by default
    b.download_and_prepare()
    src = b.as_data_source("train")                               # random access by index
    # later, without the config object: load_llava("/data/tfds", "mix665k_local", "train")

The registered config ``llava_v1_5_mix665k`` expects ``llava_v1_5_mix665k.json`` and the image
folders (coco/, gqa/, ocr_vqa/, textvqa/, vg/) directly in the manual dir.

Options (`LlavaConfig`): ``max_images`` (16; a record with more is skipped), ``num_frames``
(32, LLaVA-OneVision's count; 0 skips video records), ``frame_sampling`` ("hf" or
"linspace", see data/video.py), ``frame_format`` ("jpeg" at ``frame_quality`` 95, or "png"),
``video_dir`` (default: ``image_dir``), ``verify_images``, ``num_workers``.

Output features (one record per valid input record; all turns kept):
  ``id`` Text; ``images`` Sequence(Image uint8[H, W, 3]) of 0..max_images images in
  placeholder order, stored encoded and decoded on access (original JPEG/PNG bytes when already
  8-bit RGB, otherwise converted to RGB and re-encoded as PNG); ``image_paths``
  Sequence(Text) (relative paths from the JSON); ``frames`` Sequence(Image) of exactly
  ``num_frames`` frames for a video record (sampled and encoded at build time with
  data/video.py), empty otherwise; ``video_path`` Text ("" for image records); ``roles`` /
  ``values`` parallel Sequence(Text) of every turn, roles normalised to "human" / "gpt"
  (aliases "user" / "assistant" accepted), values verbatim (placeholders kept, so their
  positions are known; a video record's placeholder is written `<video>`); ``question`` /
  ``answer`` the first turn pair, placeholders and surrounding whitespace removed from the
  question. Multi-turn training should use ``roles`` / ``values`` (loss on every gpt turn);
  single-turn consumers may use ``question`` / ``answer``.

Malformed records are skipped, never fatal, and counted per reason (data/llava_records.py lists
the reasons and their order: unreadable image or video, too few frames, placeholders that do
not match the images, ...). One warning summary (absl) is logged after the whole build; counts
are kept in ``builder.info.metadata["skipped"][split]`` (saved with the dataset) with
``metadata["kept"][split]`` and a few example ids per reason in ``metadata["skipped_ids"]``,
and written to ``skipped.json`` beside the dataset files.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import tensorflow_datasets as tfds
from absl import logging

from covipal_jax.data import llava_records as R
from covipal_jax.data.synthetic.tfds_builder import LocalBuild, default_to_array_record

# the record-level API, re-exported
IMAGE_TOKEN, VIDEO_TOKEN, ROLE_ALIASES = R.IMAGE_TOKEN, R.VIDEO_TOKEN, R.ROLE_ALIASES
SKIP_REASONS, Skip, Checked = R.SKIP_REASONS, R.Skip, R.Checked
check_record, load_image_bytes, read_records = R.check_record, R.load_image_bytes, R.read_records
load_video_frames = R.load_video_frames
SKIPPED_FILE = "skipped.json"  # beside the dataset files: the skip counts of the build
_IDS_PER_REASON = 5
_CHUNK = 64  # records validated concurrently


@dataclasses.dataclass
class LlavaConfig(tfds.core.BuilderConfig):
    """Where the LLaVA-format files are (absolute, or relative to the manual dir) and how
    multi-image and video records are stored."""

    json_files: dict[str, str] = dataclasses.field(default_factory=dict)  # split -> .json/.jsonl
    image_dir: str = "."
    video_dir: str = ""          # "" = image_dir
    image_token: str = IMAGE_TOKEN
    video_token: str = VIDEO_TOKEN
    max_images: int = 16         # images per record (more: skipped as too_many_images)
    num_frames: int = 32         # frames kept per video (0: video records are skipped)
    frame_sampling: str = "hf"   # hf | linspace (data/video.py)
    frame_format: str = "jpeg"   # jpeg | png (lossless)
    frame_quality: int = 95
    verify_images: bool = True  # fully decode every image at build time (else header only)
    num_workers: int = 8  # threads reading and checking images and videos


class CovipalLlava(LocalBuild, tfds.core.GeneratorBasedBuilder):
    """LLaVA-format (conversations + images or a video) instruction data from local files."""

    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release.",
                     "2.0.0": "Multi-image and video records: `images`, `image_paths`, "
                              "`frames`, `video_path` replace `image`, `image_path`."}
    BUILDER_CONFIGS = [
        LlavaConfig(
            name="llava_v1_5_mix665k",
            description="LLaVA-1.5 665K instruction mix (text-only records are skipped).",
            json_files={"train": "llava_v1_5_mix665k.json"},
            image_dir=".",
        ),
    ]
    DEFAULT_CONFIG_NAME = "llava_v1_5_mix665k"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Place llava_v1_5_mix665k.json and its image folders (coco/, gqa/, ocr_vqa/, textvqa/, "
        "vg/) in the manual dir, or build with a LlavaConfig holding absolute paths."
    )

    def __init__(self, *, file_format: str | None = None, **kwargs: Any):
        super().__init__(file_format=file_format, **kwargs)
        default_to_array_record(self, file_format)
        self._skipped: dict[str, collections.Counter] = {}
        self._skipped_ids: dict[str, dict[str, list[str]]] = {}
        self._kept: dict[str, int] = {}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(),
                "images": tfds.features.Sequence(tfds.features.Image(shape=(None, None, 3))),
                "image_paths": tfds.features.Sequence(tfds.features.Text()),
                "frames": tfds.features.Sequence(tfds.features.Image(shape=(None, None, 3))),
                "video_path": tfds.features.Text(),
                "roles": tfds.features.Sequence(tfds.features.Text()),
                "values": tfds.features.Sequence(tfds.features.Text()),
                "question": tfds.features.Text(),
                "answer": tfds.features.Text(),
            }),
            metadata=tfds.core.MetadataDict(),
            homepage="https://llava-vl.github.io/",
        )

    def _resolve(self, path: str, dl_manager: tfds.download.DownloadManager) -> str:
        path = os.path.expanduser(path)
        if os.path.isabs(path):
            return path
        return os.fspath(dl_manager.manual_dir / path)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        cfg: LlavaConfig = self.builder_config
        if not cfg.json_files:
            raise ValueError("LlavaConfig.json_files is empty")
        if cfg.frame_format not in R.FRAME_FORMATS:
            raise ValueError(f"LlavaConfig.frame_format must be one of {R.FRAME_FORMATS}, got "
                             f"{cfg.frame_format!r}")
        image_dir = self._resolve(cfg.image_dir, dl_manager)
        video_dir = self._resolve(cfg.video_dir, dl_manager) if cfg.video_dir else image_dir
        return {
            split: self._generate_examples(split, self._resolve(p, dl_manager), image_dir,
                                           video_dir)
            for split, p in cfg.json_files.items()
        }

    def convert(self, rec: Any, index: int, image_dir: str, video_dir: str) -> dict[str, Any]:
        """One input record -> a TFDS example; raises `Skip(reason)`."""
        cfg: LlavaConfig = self.builder_config
        c = check_record(rec, max_images=cfg.max_images, num_frames=cfg.num_frames,
                         image_token=cfg.image_token, video_token=cfg.video_token)
        images = [load_image_bytes(os.path.join(image_dir, p), cfg.verify_images)
                  for p in c.images]
        frames = []
        if c.video:
            frames = load_video_frames(os.path.join(video_dir, c.video), cfg.num_frames,
                                       sampling=cfg.frame_sampling, fmt=cfg.frame_format,
                                       quality=cfg.frame_quality)
        return {
            "id": R.record_id(rec, index),
            "images": images,
            "image_paths": list(c.images),
            "frames": frames,
            "video_path": c.video,
            "roles": list(c.roles),
            "values": list(c.values),
            "question": c.question,
            "answer": c.values[1],
        }

    def _generate_examples(self, split: str, json_path: str, image_dir: str, video_dir: str):
        counts: collections.Counter = collections.Counter()
        ids: dict[str, list[str]] = collections.defaultdict(list)
        kept = 0

        def convert(item: tuple[int, Any]) -> tuple[str, Any]:
            index, rec = item
            try:
                return "", self.convert(rec, index, image_dir, video_dir)
            except Skip as e:
                return e.reason, None

        workers = max(1, self.builder_config.num_workers)
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            records = enumerate(read_records(json_path))
            while True:
                chunk = [item for _, item in zip(range(_CHUNK), records)]
                if not chunk:
                    break
                for (index, rec), (reason, example) in zip(chunk, pool.map(convert, chunk)):
                    if reason:
                        counts[reason] += 1
                        if len(ids[reason]) < _IDS_PER_REASON:
                            ids[reason].append(R.record_id(rec, index))
                        continue
                    kept += 1
                    yield index, example
        self._skipped[split] = counts
        self._skipped_ids[split] = dict(ids)
        self._kept[split] = kept
        md = self.info.metadata
        md["skipped"] = {s: dict(c) for s, c in self._skipped.items()}
        md["skipped_ids"] = dict(self._skipped_ids)
        md["kept"] = dict(self._kept)

    def _download_and_prepare(self, *args: Any, **kwargs: Any) -> Any:
        out = super()._download_and_prepare(*args, **kwargs)
        total = sum(sum(c.values()) for c in self._skipped.values())
        if total:
            logging.warning(
                "covipal_llava/%s: skipped %d malformed record(s), kept %s; by split and "
                "reason: %s; example ids: %s",
                self.builder_config.name, total, self._kept,
                {s: dict(c) for s, c in self._skipped.items() if c}, self._skipped_ids)
        else:
            logging.info("covipal_llava/%s: no malformed records, kept %s",
                         self.builder_config.name, self._kept)
        if self._kept:  # a fresh build (not a reuse of prepared data)
            (self.data_path / SKIPPED_FILE).write_text(json.dumps(
                {"skipped": self.skipped, "kept": dict(self._kept),
                 "skipped_ids": dict(self._skipped_ids)}, indent=1, sort_keys=True))
        return out

    @property
    def skipped(self) -> dict[str, dict[str, int]]:
        """Skip counts per split and reason (after a build; else from the saved metadata)."""
        if self._skipped:
            return {s: dict(c) for s, c in self._skipped.items()}
        return dict(self.info.metadata.get("skipped", {}))


def llava_builder(
    data_dir: str,
    name: str,
    json_files: dict[str, str] | str,
    image_dir: str,
    **kwargs: Any,
) -> CovipalLlava:
    """A builder for local LLaVA-format files (`json_files`: one path = the "train" split).

    Extra kwargs go to `LlavaConfig` when they are its fields, else to the builder
    (`file_format=...`).
    """
    if isinstance(json_files, str):
        json_files = {"train": json_files}
    fields = {f.name for f in dataclasses.fields(LlavaConfig)}
    cfg_kw = {k: kwargs.pop(k) for k in list(kwargs) if k in fields}
    cfg = LlavaConfig(name=name, json_files=dict(json_files), image_dir=image_dir, **cfg_kw)
    return CovipalLlava(config=cfg, data_dir=data_dir, **kwargs)


def load_llava(data_dir: str, name: str, split: str = "train",
               version: str = str(CovipalLlava.VERSION), **kwargs: Any) -> Sequence[dict[str, Any]]:
    """Random-access data source of a prepared `covipal_llava/<name>` (any config, including
    custom `LlavaConfig`s, which the registry does not know): read from its directory."""
    path = os.path.join(data_dir, CovipalLlava.name, name, version)
    b = tfds.builder_from_directory(path)
    return b.as_data_source(split, **kwargs)
