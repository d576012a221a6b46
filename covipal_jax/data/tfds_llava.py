"""TFDS builder `covipal_llava` for LLaVA-format instruction data stored as local files.

Input: a JSON list (or JSON-lines file) of records as in LLaVA-665K and LLaVA-OneVision
single-image data, plus an image folder::

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus is white and red."}, ...]}

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

Output features (one record per valid input record; all turns kept):
  ``id`` Text; ``image`` Image uint8[H, W, 3], stored encoded and decoded on access (original
  JPEG/PNG bytes when already 8-bit RGB, otherwise converted to RGB and re-encoded as PNG; pass
  ``decoders={"image": tfds.decode.SkipDecoding()}`` to get the bytes); ``image_path`` Text
  (relative path from the JSON); ``roles`` / ``values`` parallel Sequence(Text) of every turn,
  roles normalised to "human" / "gpt" (aliases "user" / "assistant" accepted), values verbatim
  (the first human turn keeps its `<image>` token, so its position is known); ``question`` /
  ``answer`` the first turn pair, `<image>` token and surrounding whitespace removed from the
  question. Multi-turn training should use ``roles`` / ``values`` (loss on every gpt turn);
  single-turn consumers may use ``question`` / ``answer``.

Malformed records are skipped, never fatal, and counted per reason (the first failing check, in
this order): ``malformed_record`` (not a dict, no conversations list, a turn without string
"from"/"value", an unparsable JSON line), ``text_only`` (no "image"), ``multi_image`` (a list of
several images), ``bad_role_order`` (turns must alternate human, gpt, ... and end with gpt),
``empty_answer`` (a blank gpt turn), ``no_image_token`` (first human turn lacks `<image>`),
``extra_image_token`` (`<image>` more than once in the conversation), ``missing_image_file``,
``unreadable_image`` (PIL cannot decode it; fully decoded when `verify_images`). One warning
summary (absl) is logged after the whole build; counts are kept in
``builder.info.metadata["skipped"][split]`` (saved with the dataset) with
``metadata["kept"][split]`` and a few example ids per reason in ``metadata["skipped_ids"]``.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import io
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import PIL.Image
import tensorflow_datasets as tfds
from absl import logging

from covipal_jax.data.synthetic.tfds_builder import LocalBuild, default_to_array_record

IMAGE_TOKEN = "<image>"
ROLE_ALIASES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}
SKIP_REASONS = (
    "malformed_record",
    "text_only",
    "multi_image",
    "bad_role_order",
    "empty_answer",
    "no_image_token",
    "extra_image_token",
    "missing_image_file",
    "unreadable_image",
)
_IDS_PER_REASON = 5
_CHUNK = 256  # records validated concurrently


@dataclasses.dataclass
class LlavaConfig(tfds.core.BuilderConfig):
    """Where the LLaVA-format files are (absolute, or relative to the manual dir)."""

    json_files: dict[str, str] = dataclasses.field(default_factory=dict)  # split -> .json/.jsonl
    image_dir: str = "."
    image_token: str = IMAGE_TOKEN
    verify_images: bool = True  # fully decode every image at build time (else header only)
    num_workers: int = 8  # threads reading and checking images


class _Skip(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _record_id(rec: Any, index: int) -> str:
    if isinstance(rec, dict) and rec.get("id") is not None:
        return str(rec["id"])
    return str(index)


def check_conversation(rec: Any, image_token: str = IMAGE_TOKEN) -> tuple[str, list[str],
                                                                         list[str]]:
    """Validates a record's structure; returns (image relative path, roles, values).

    Raises `_Skip(reason)` for the structural reasons of `SKIP_REASONS` (no file access).
    """
    if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list):
        raise _Skip("malformed_record")
    turns = rec["conversations"]
    roles, values = [], []
    for t in turns:
        if not isinstance(t, dict) or not isinstance(t.get("from"), str) \
                or not isinstance(t.get("value"), str):
            raise _Skip("malformed_record")
        roles.append(ROLE_ALIASES.get(t["from"].strip().lower(), t["from"]))
        values.append(t["value"])
    image = rec.get("image")
    if image is None or image == "" or image == []:
        raise _Skip("text_only")
    if isinstance(image, list):
        if len(image) != 1:
            raise _Skip("multi_image")
        image = image[0]
    if not isinstance(image, str):
        raise _Skip("malformed_record")
    if not roles or len(roles) % 2 or any(
            r != ("human" if i % 2 == 0 else "gpt") for i, r in enumerate(roles)):
        raise _Skip("bad_role_order")
    if any(not v.strip() for r, v in zip(roles, values) if r == "gpt"):
        raise _Skip("empty_answer")
    if image_token not in values[0]:
        raise _Skip("no_image_token")
    if sum(v.count(image_token) for v in values) > 1:
        raise _Skip("extra_image_token")
    return image, roles, values


def load_image_bytes(path: str, verify: bool = True) -> bytes:
    """Encoded bytes of an 8-bit RGB JPEG/PNG for `path` (original bytes when possible).

    Raises `_Skip("missing_image_file")` or `_Skip("unreadable_image")`.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise _Skip("missing_image_file") from None
    except OSError:
        raise _Skip("unreadable_image") from None
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
        raise _Skip("unreadable_image") from None


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


class CovipalLlava(LocalBuild, tfds.core.GeneratorBasedBuilder):
    """LLaVA-format (conversations + one image) instruction data from local files."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
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
                "image": tfds.features.Image(shape=(None, None, 3)),
                "image_path": tfds.features.Text(),
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
        image_dir = self._resolve(cfg.image_dir, dl_manager)
        return {
            split: self._generate_examples(split, self._resolve(p, dl_manager), image_dir)
            for split, p in cfg.json_files.items()
        }

    def _generate_examples(self, split: str, json_path: str, image_dir: str):
        cfg: LlavaConfig = self.builder_config
        counts: collections.Counter = collections.Counter()
        ids: dict[str, list[str]] = collections.defaultdict(list)
        kept = 0

        def convert(item: tuple[int, Any]) -> tuple[int, str, Any]:
            index, rec = item
            try:
                image, roles, values = check_conversation(rec, cfg.image_token)
                data = load_image_bytes(os.path.join(image_dir, image), cfg.verify_images)
            except _Skip as e:
                return index, e.reason, None
            question = values[0].replace(cfg.image_token, "").strip()
            return index, "", {
                "id": _record_id(rec, index),
                "image": data,
                "image_path": image,
                "roles": roles,
                "values": values,
                "question": question,
                "answer": values[1],
            }

        with concurrent.futures.ThreadPoolExecutor(max(1, cfg.num_workers)) as pool:
            chunk: list[tuple[int, Any]] = []
            records = enumerate(read_records(json_path))
            while True:
                chunk = [item for _, item in zip(range(_CHUNK), records)]
                if not chunk:
                    break
                for (index, rec), (_, reason, example) in zip(chunk, pool.map(convert, chunk)):
                    if reason:
                        counts[reason] += 1
                        if len(ids[reason]) < _IDS_PER_REASON:
                            ids[reason].append(_record_id(rec, index))
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
               version: str = "1.0.0", **kwargs: Any) -> Sequence[dict[str, Any]]:
    """Random-access data source of a prepared `covipal_llava/<name>` (any config, including
    custom `LlavaConfig`s, which the registry does not know): read from its directory."""
    path = os.path.join(data_dir, CovipalLlava.name, name, version)
    b = tfds.builder_from_directory(path)
    return b.as_data_source(split, **kwargs)
