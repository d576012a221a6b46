"""TFDS builder `covipal_synthetic_vqa` for the synthetic VQA task of `data/synthetic.py`.

Builds offline (no downloads) with ``download_and_prepare()``. The default file format is
ArrayRecord, which gives ``builder.as_data_source(split)`` / ``tfds.data_source(...)``: random
access by integer index, so a training loop can checkpoint its position as one integer. Pass
``file_format="tfrecord"`` to the builder (or to ``download_and_prepare``) for ``as_dataset()``
(tf.data) instead. Shuffling is disabled: record `i` of a split is ``synthetic.make_example(split,
i, config.seed, config.task)``, so the TFDS data and the NumPy generator agree exactly.

Configs (`name`: train / validation / test examples):
  ``tiny``: 256 / 64 / 128 (tests); ``demo``: 20000 / 1000 / 2000 at 64x64 (64 patches of 8);
  ``demo96``: 20000 / 1000 / 2000 at 96x96 (144 patches of 8).
Custom sizes: ``CovipalSyntheticVqa(config=SyntheticBuilderConfig(name=..., task=...,
n_train=...), data_dir=...)``.

Features: ``image`` (uint8[H, W, 3], PNG-encoded), ``question``, ``answer``, ``qtype``, ``id``
(Text; the NumPy data source returns `bytes`), ``objects`` (Sequence of ``{shape, color: Text,
x, y, size: int32, queried: bool}``) so analyses can ask which patches hold the queried objects.
"""
from __future__ import annotations

import dataclasses
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from covipal_jax.data.synthetic import task as synthetic

DEFAULT_FILE_FORMAT = "array_record"


@dataclasses.dataclass
class SyntheticBuilderConfig(tfds.core.BuilderConfig):
    """Task parameters, split sizes and seed of one `covipal_synthetic_vqa` config."""

    task: synthetic.SyntheticConfig = dataclasses.field(
        default_factory=synthetic.SyntheticConfig
    )
    n_train: int = 256
    n_validation: int = 64
    n_test: int = 128
    seed: int = 0

    def split_sizes(self) -> dict[str, int]:
        return {"train": self.n_train, "validation": self.n_validation, "test": self.n_test}


def default_to_array_record(builder: tfds.core.DatasetBuilder, file_format: str | None) -> None:
    """After `__init__`: make ArrayRecord the default format of a not-yet-prepared dataset.

    A prepared dataset keeps the format recorded in its `dataset_info.json`.
    """
    if file_format is None and not (builder.data_path / "dataset_info.json").exists():
        builder.info.set_file_format(DEFAULT_FILE_FORMAT, override=True)


class LocalBuild:
    """Mixin of builders that generate their data locally: one line instead of TFDS'
    "Downloading and preparing dataset Unknown size (download: Unknown size, ...)"."""

    def _log_download_bytes(self) -> None:
        print(f"Building dataset {self.name}/{self.builder_config.name} locally in "
              f"{self.data_dir} ...", flush=True)


class CovipalSyntheticVqa(LocalBuild, tfds.core.GeneratorBasedBuilder):
    """Synthetic shapes-and-colours VQA with held-out (shape, colour) combinations in `test`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        SyntheticBuilderConfig(
            name="tiny", description="Few hundred 64x64 examples for tests.",
            n_train=256, n_validation=64, n_test=128),
        SyntheticBuilderConfig(
            name="demo", description="64x64 images, 8-pixel cells (64 patches of 8).",
            n_train=20000, n_validation=1000, n_test=2000),
        SyntheticBuilderConfig(
            name="demo96", description="96x96 images, 8-pixel cells (144 patches of 8).",
            task=synthetic.SyntheticConfig(image_size=96),
            n_train=20000, n_validation=1000, n_test=2000),
    ]
    DEFAULT_CONFIG_NAME = "tiny"

    def __init__(self, *, file_format: str | None = None, **kwargs: Any):
        super().__init__(file_format=file_format, **kwargs)
        default_to_array_record(self, file_format)

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.builder_config.task.image_size
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(s, s, 3), encoding_format="png"),
                "question": tfds.features.Text(),
                "answer": tfds.features.Text(),
                "qtype": tfds.features.Text(),
                "id": tfds.features.Text(),
                "objects": tfds.features.Sequence({
                    "shape": tfds.features.Text(),
                    "color": tfds.features.Text(),
                    "x": np.int32,
                    "y": np.int32,
                    "size": np.int32,
                    "queried": np.bool_,
                }),
            }),
            supervised_keys=None,
            disable_shuffling=True,
            homepage="https://arxiv.org/abs/2508.17243",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # everything is generated
        return {
            split: self._generate_examples(split, n)
            for split, n in self.builder_config.split_sizes().items()
        }

    def _generate_examples(self, split: str, n: int):
        cfg: SyntheticBuilderConfig = self.builder_config
        for i, ex in enumerate(synthetic.generate(split, n, cfg.seed, cfg.task)):
            yield i, to_record(ex, f"{split}-{cfg.seed}-{i}")


def to_record(ex: Mapping[str, Any], example_id: str) -> dict[str, Any]:
    """A `synthetic.generate` example as a `covipal_synthetic_vqa` record."""
    queried = set(ex["queried"])
    return {
        "image": encode_png(ex["image"]),
        "question": ex["question"],
        "answer": ex["answer"],
        "qtype": ex["qtype"],
        "id": example_id,
        "objects": [
            {"shape": s, "color": c, "x": x, "y": y, "size": z, "queried": j in queried}
            for j, (s, c, x, y, z) in enumerate(ex["objects"])
        ],
    }


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of `uint8[H, W, 3]` (PIL: faster than TFDS's TF-graph encoder, no TF session)."""
    buf = io.BytesIO()
    PIL.Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def builder(data_dir: str, config_name: str = "tiny", **kwargs: Any) -> CovipalSyntheticVqa:
    """The builder for `config_name` (one of `BUILDER_CONFIGS` or a `SyntheticBuilderConfig`)."""
    return CovipalSyntheticVqa(config=config_name, data_dir=data_dir, **kwargs)


def load_synthetic(
    data_dir: str, config_name: str | SyntheticBuilderConfig = "tiny", split: str = "train"
) -> Sequence[dict[str, Any]]:
    """Random-access data source of one split, building the dataset first if needed (offline).

    Records are dicts of NumPy values (`image` uint8[H, W, 3], Text fields as `bytes`); use
    `decode_record` for `str` fields.
    """
    b = builder(data_dir, config_name)
    b.download_and_prepare()
    return b.as_data_source(split)


def decode_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """Copy of a data-source record with Text fields (also inside `objects`) as `str`."""

    def conv(v):
        if isinstance(v, bytes):
            return v.decode("utf-8")
        if isinstance(v, np.ndarray) and v.dtype == object:
            return [conv(x) for x in v.tolist()]
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, Mapping):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(record)
