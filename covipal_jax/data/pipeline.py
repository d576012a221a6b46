"""Training input pipeline: a TFDS random-access source -> fixed-shape NumPy batches per host.

A `Pipeline` maps an integer position (the number of global batches already consumed) to the
batch at that position, with no hidden state, so a run resumes exactly by saving one integer:

    position -> epoch e = position // batches_per_epoch, slot b = position % batches_per_epoch
             -> global example indices perm_e[b * G : (b + 1) * G]   (G = global batch size)
             -> this host's rows [h * G / H, (h + 1) * G / H)         (host h of H)

`perm_e` is a permutation of the split seeded by (seed, e) (identity with `shuffle=False`).
With `drop_remainder=True` an epoch has N // G batches (the last N % G examples of that epoch's
order are skipped); with `drop_remainder=False` it has ceil(N / G) and the last batch is filled
with padding rows of weight 0. Hosts read disjoint rows that together cover the global batch.

Each row: `pixels f32[H, W, 3]` (the model's image processor), `ids i32[T]`, `mask bool[T]`,
`loss_mask bool[T]` (`text.encode_example`: left-padded prompt + answer, loss on the answer),
`weight f32` (1 for a real example; 0 for padding and for examples whose prompt + answer does
not fit `max_len`, which keep the batch shape and are counted in `stats`), `index i32` (the
example's index in the split, -1 for padding).

Sources (`source_from_config`): `data.kind = "synthetic"` (the `covipal_synthetic_vqa` TFDS
builder, built offline into the data dir on first use) or `"llava"` (LLaVA-format JSON + image
folder through the `covipal_llava` builder; malformed records are skipped and counted at build
time, see `tfds_llava.py`, and reported here). The trainer's rows hold one image, so its LLaVA
source is built with `max_images=1, num_frames=0`: multi-image and video records are counted
(`too_many_images`, `video_not_enabled`) and skipped.

Packed rows (`packed=data.packed_rows.PackedSpec`, issue 12): one OneVision AnyRes image
(`anyres_pixels f32[C, S, S, 3]`, `anyres_plan i32[8]`), one video (`frames f32[F, S, S, 3]`)
or up to P images (`multi_pixels f32[P, C, S, S, 3]`, `multi_plan i32[P, 8]`, `image_valid
bool[P]`, the placeholders where the record's text puts them) per row instead of `pixels`,
static per bucket (C views / F frames / P images); records of the other kind are weight-0 rows
counted in `stats.wrong_kind`, records with more than P images in `stats.too_many_images` (a
LLaVA source for packed="multi" is built with `max_images=P`: the builder already skips them).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from covipal_jax.data import image as image_lib
from covipal_jax.data import packed_rows
from covipal_jax.data import text as text_lib


_str = packed_rows.as_text


def qa_from_record(record: Mapping[str, Any]) -> tuple[np.ndarray, str, str]:
    """(image uint8[H, W, 3], question, answer) of a synthetic or LLaVA TFDS record.

    LLaVA records use the first (human, gpt) turn; the `<image>` token is re-added by the chat
    template. A LLaVA record must hold exactly one image and no video: `build_source` builds
    with `max_images=1, num_frames=0`, so multi-image and video records are skipped and counted.
    """
    if "image" in record:  # synthetic
        return np.asarray(record["image"]), _str(record["question"]), _str(record["answer"])
    images, frames = record["images"], record.get("frames", ())
    if len(images) != 1 or len(frames):
        raise ValueError(f"record {_str(record.get('id', '?'))!r} has {len(images)} images and "
                         f"{len(frames)} video frames: the single-image pipeline needs one image")
    return np.asarray(images[0]), _str(record["question"]), _str(record["answer"])


@dataclasses.dataclass
class PipelineStats:
    too_long: int = 0          # examples that did not fit `max_len` (weight 0)
    wrong_kind: int = 0        # packed pipelines: records of another media kind (weight 0)
    too_many_images: int = 0   # packed multi-image pipelines: more than P images (weight 0)
    examples: int = 0          # real examples read by this host
    skipped_at_build: dict = dataclasses.field(default_factory=dict)  # llava: reason -> count


class Pipeline:
    """Deterministic, resumable, per-host batches from a random-access source."""

    def __init__(self, source: Sequence[Mapping[str, Any]], *, tokenizer: text_lib.Tokenizer,
                 processor: image_lib.ImageProcessorConfig, template: str, max_len: int,
                 global_batch: int, seed: int = 0, shuffle: bool = True,
                 drop_remainder: bool = True, process_index: int = 0, process_count: int = 1,
                 record_fn=qa_from_record, packed: packed_rows.PackedSpec | None = None):
        if global_batch < 1 or global_batch % process_count:
            raise ValueError(f"global batch {global_batch} must be a positive multiple of the "
                             f"{process_count} hosts")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} outside [0, {process_count})")
        self.source = source
        self.num_examples = len(source)
        if self.num_examples == 0:
            raise ValueError("the training split is empty")
        if drop_remainder and self.num_examples < global_batch:
            raise ValueError(f"{self.num_examples} examples < global batch {global_batch} "
                             "with drop_remainder")
        self.tokenizer = tokenizer
        self.processor = processor
        self.template = template
        self.max_len = int(max_len)
        self.global_batch = int(global_batch)
        self.local_batch = self.global_batch // process_count
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_remainder = drop_remainder
        self.process_index = process_index
        self.process_count = process_count
        self.record_fn = record_fn
        self.packed = packed
        self.stats = PipelineStats()
        self._lock = threading.Lock()
        self._perm_cache: dict[int, np.ndarray] = {}
        self._filler: dict[str, np.ndarray] | None = None

    # -- index arithmetic ----------------------------------------------------------------------

    @property
    def batches_per_epoch(self) -> int:
        n, g = self.num_examples, self.global_batch
        return n // g if self.drop_remainder else -(-n // g)

    def _perm(self, epoch: int) -> np.ndarray:
        with self._lock:
            p = self._perm_cache.get(epoch)
            if p is None:
                if self.shuffle:
                    p = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
                else:
                    p = np.arange(self.num_examples)
                self._perm_cache = {epoch: p}  # keep one epoch
            return p

    def global_indices(self, position: int) -> np.ndarray:
        """i64[G]: split indices of the global batch at `position` (-1 = padding row)."""
        if position < 0:
            raise ValueError(f"position must be >= 0, got {position}")
        epoch, slot = divmod(int(position), self.batches_per_epoch)
        perm = self._perm(epoch)
        g = self.global_batch
        idx = perm[slot * g:(slot + 1) * g]
        if len(idx) < g:
            idx = np.concatenate([idx, np.full(g - len(idx), -1, idx.dtype)])
        return idx.astype(np.int64)

    def local_indices(self, position: int) -> np.ndarray:
        """This host's rows of the global batch at `position`."""
        lo = self.process_index * self.local_batch
        return self.global_indices(position)[lo:lo + self.local_batch]

    # -- examples ------------------------------------------------------------------------------

    def encode(self, record: Mapping[str, Any]) -> dict[str, np.ndarray] | None:
        """One record -> a row (None when it does not fit `max_len`; a packed pipeline raises
        `packed_rows.WrongKind` for a record of another media kind)."""
        n_img = 1
        if self.packed is not None:
            question, answer = packed_rows.question(self.packed, record), _str(record["answer"])
            visual = packed_rows.visual_row(self.packed, record)
            n_img = self.packed.placeholders
        else:
            image, question, answer = self.record_fn(record)
        row = text_lib.encode_example(self.tokenizer, question, answer, template=self.template,
                                      max_len=self.max_len, max_images=n_img)
        if row is None:
            return None
        if self.packed is not None:
            packed_rows.check_placeholders(self.packed, row, visual,
                                           self.tokenizer.image_token_id)
            row["ids"] = packed_rows.fix_placeholder(self.packed, row["ids"],
                                                     self.tokenizer.image_token_id)
            row.update(visual)
            row["weight"] = np.float32(1.0)
            return row
        row["pixels"] = image_lib.preprocess_one(image, self.processor)
        row["weight"] = np.float32(1.0)
        return row

    def _filler_row(self) -> dict[str, np.ndarray]:
        """A weight-0 row of the right shapes: a blank image and `<image> ANSWER: </s>`-like ids
        (image placeholder, end token) so the model's inputs stay well formed."""
        if self._filler is None:
            t = self.max_len
            ids = np.full(t, self.tokenizer.pad_id, np.int32)
            mask = np.zeros(t, bool)
            ids[-2:] = (self.tokenizer.image_token_id, self.tokenizer.eos_id)
            mask[-2:] = True
            loss_mask = np.zeros(t, bool)
            loss_mask[-1] = True
            self._filler = dict(ids=ids, mask=mask, loss_mask=loss_mask,
                                weight=np.float32(0.0))
            if self.packed is not None:
                self._filler["ids"] = packed_rows.fix_placeholder(
                    self.packed, ids, self.tokenizer.image_token_id)
                self._filler.update(packed_rows.filler_row(self.packed))
            else:
                s = self.processor.crop_size
                self._filler["pixels"] = np.zeros((s, s, 3), np.float32)
        return self._filler

    def batch(self, position: int) -> dict[str, np.ndarray]:
        """This host's rows of the global batch at `position`, stacked: fixed shapes."""
        rows = []
        too_long = real = wrong = many = 0
        for i in self.local_indices(position):
            row = None
            if i >= 0:
                real += 1
                try:
                    row = self.encode(self.source[int(i)])
                    too_long += row is None
                except packed_rows.TooManyImages:
                    many += 1
                except packed_rows.WrongKind:
                    wrong += 1
            if row is None:
                row = dict(self._filler_row())
            row["index"] = np.int32(i)
            rows.append(row)
        with self._lock:
            self.stats.too_long += too_long
            self.stats.wrong_kind += wrong
            self.stats.too_many_images += many
            self.stats.examples += real
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def iterate(self, start: int = 0, prefetch: int = 2) -> Iterator[tuple[int, dict]]:
        """Yields (position, batch) from `start` on; `prefetch` batches are built ahead in a
        background thread (0: none). Deterministic whatever the prefetch."""
        if prefetch <= 0:
            pos = start
            while True:
                yield pos, self.batch(pos)
                pos += 1
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pipeline") as pool:
            pending = [pool.submit(self.batch, p) for p in range(start, start + prefetch)]
            pos = start
            try:
                while True:
                    b = pending.pop(0).result()
                    pending.append(pool.submit(self.batch, pos + prefetch))
                    yield pos, b
                    pos += 1
            finally:
                for f in pending:
                    f.cancel()


# ----------------------------------------------------------------------------- sources

def absolute(path: str) -> str:
    """`os.path.abspath` for local paths; URLs (`gs://...`) are kept as they are."""
    return path if "://" in path else os.path.abspath(path)


def data_dir(config: Any, workdir: str | None, override: str | None = None) -> str:
    """Where TFDS data lives: `--data_dir`, else `config.data.dir`, else `<workdir>/data`."""
    if override:
        return absolute(override)
    if config.data.get("dir"):
        return absolute(config.data.dir)
    if not workdir:
        raise ValueError("no data dir: pass --data_dir, set config.data.dir or a workdir")
    return absolute(workdir).rstrip("/") + "/data"


def build_source(config: Any, directory: str, *, prepare: bool = True
                 ) -> tuple[Sequence[Mapping[str, Any]], dict]:
    """(random-access source of `config.data.split`, {reason: count} skipped at build time).

    `prepare=False` only opens an already built dataset (non-primary hosts, after a barrier).
    """
    d = config.data
    if d.kind == "synthetic":
        from covipal_jax.data.synthetic import tfds_builder as tfds_synthetic

        b = tfds_synthetic.builder(directory, d.name)
        if prepare:
            b.download_and_prepare()
        return b.as_data_source(d.split), {}
    if d.kind == "llava":
        from covipal_jax.data import tfds_llava

        if not d.json:
            raise ValueError("data.kind='llava' needs config.data.json (LLaVA-format .json/.jsonl)")
        if not d.images:
            raise ValueError("data.kind='llava' needs config.data.images (the image folder)")
        # packed video training keeps the video records (`data.num_frames` frames each),
        # packed multi-image training the records of up to `data.max_images` images
        frames = int(d.get("num_frames", 8)) if d.get("packed", "") == "video" else 0
        n_img = int(d.get("max_images", 0)) if d.get("packed", "") == "multi" else 1
        b = tfds_llava.llava_builder(directory, d.name, {d.split: absolute(d.json)},
                                     absolute(d.images), max_images=max(n_img, 1),
                                     num_frames=frames)
        if prepare:
            b.download_and_prepare()
        skipped = dict(b.skipped.get(d.split, {}))
        return b.as_data_source(d.split), skipped
    raise ValueError(f"config.data.kind must be 'synthetic' or 'llava', got {d.kind!r}")


def packed_spec(config: Any, model_cfg: Any = None) -> packed_rows.PackedSpec | None:
    """The `PackedSpec` of `config.data.packed` ("anyres" | "video" with `data.num_frames` |
    "multi" with `data.max_images` P; `data.num_views` the crop bucket C, 0: the kind's
    default), or None (single image)."""
    d = config.data
    if not d.get("packed", ""):
        return None
    if model_cfg is None:
        raise ValueError("config.data.packed needs the model config (model_cfg=)")
    return packed_rows.PackedSpec.for_model(model_cfg, d.packed,
                                            num_frames=int(d.get("num_frames", 0)),
                                            num_views=int(d.get("num_views", 0)),
                                            max_images=int(d.get("max_images", 0)))


def from_config(config: Any, source: Sequence[Mapping[str, Any]], *, tokenizer,
                processor, global_batch: int, process_index: int = 0, process_count: int = 1,
                seed_offset: int = 0, skipped: dict | None = None,
                model_cfg: Any = None) -> Pipeline:
    """`config.data.packed` = "anyres" | "video" (with `data.num_frames`) | "multi" (with
    `data.max_images`) builds packed rows for the LLaVA `model_cfg` (`data.packed_rows`);
    "" (default) single-image rows."""
    d = config.data
    packed = packed_spec(config, model_cfg)
    p = Pipeline(source, tokenizer=tokenizer, processor=processor, template=config.template,
                 max_len=int(d.max_len), global_batch=global_batch,
                 seed=int(d.seed) + seed_offset, shuffle=bool(d.shuffle),
                 drop_remainder=bool(d.drop_remainder), process_index=process_index,
                 process_count=process_count, packed=packed)
    p.stats.skipped_at_build = dict(skipped or {})
    return p
