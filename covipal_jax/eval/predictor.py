"""The harness's `Predictor` (and `OptionScorer`) over the inference facade (`Sampler`).

`LlavaPredictor` turns a batch of `(PIL image, plain-text prompt)` pairs into answers through
`covipal_jax.inference.sampler.Sampler`: preprocess (the checkpoint's image processor) -> chat
template + `encode_prompts` with the config's `text_buckets` (left-padded) -> pad the batch to
`batch_size` rows (static shapes: one compiled program per (bucket, method)) -> put the batch on
the mesh, sharded over (data, fsdp) -> prune + generate (greedy by default) -> trim at the stop
tokens -> decode. Stochastic methods draw per example (never per batch).

`score_options` (multiple choice, likelihood style): the log-probability of each option letter
as the FIRST answer token, read from the pruned prefill's next-token logits
(`Sampler.first_token_logits`). The letter's token is what the tokenizer produces for
`<prompt><answer_prefix><letter>` after the prompt's tokens (e.g. "▁A" for LLaVA-1.5's
SentencePiece vocabulary, "A" for Qwen2's byte-level BPE).

    loaded = loading.load(config)
    pred = LlavaPredictor.from_config(config, loaded)          # method from config.pruning
    pred.predict([(image, "What is this?")], max_new_tokens=16)
    sweep = pred.with_method(pruning.get("visionzip")(keep=64))  # same weights, other method

Video (OneVision configs): `predict_frames([(u8[F, H, W, 3] frames, prompt), ...])` answers
through the same Sampler with `kind="video"`: every video has exactly `num_frames` frames
(`config.video_frames`, default 32; the harness samples them, `eval/video.py`), so the frame
count is the static bucket: one program per (frames, text bucket, k). The prompt's `<image>`
placeholder (added by the chat template) becomes the model's `<video>` token.

Letters: B batch (= batch_size), T prompt bucket, k kept vision tokens, V vocab.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from covipal_jax import pruning
from covipal_jax.data import image as image_lib
from covipal_jax.data import text as text_lib
from covipal_jax.inference import decoding
from covipal_jax.inference.loading import Loaded
from covipal_jax.inference.sampler import Sampler
from covipal_jax.pruning.base import PruningMethod

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
DEFAULT_NUM_FRAMES = 32  # LLaVA-OneVision's evaluation setting


@dataclasses.dataclass
class Prediction:
    """What `LlavaPredictor.generate` returns for the real (unpadded) rows.

    texts: decoded answers; kept: i32[n, k] source patch index of each vision token the LLM
    saw (see `PrefillOutput.kept`); seconds: wall time of the generate call(s) (compilation
    included on the first call of a shape).
    """

    texts: list[str]
    kept: np.ndarray
    num_vision_tokens: int
    seconds: float


def option_token_ids(tokenizer: Any, template: str | None, letters: Sequence[str] = LETTERS
                     ) -> dict[str, int]:
    """{letter: token id} of the letter as the first token of an answer after the template's
    prompt, for the letters that are one known token, distinct from the other letters' (the
    built-in word tokenizer of the tiny model has none: option scoring needs letter tokens).
    """
    tmpl = text_lib.get_template(template, tokenizer)
    probe = tmpl.prompt("x") if tmpl is not None else "x"
    sep = tmpl.answer_prefix if tmpl is not None else " "
    base = tokenizer.encode(probe)
    unk = getattr(tokenizer, "unk_id", None)
    found: dict[str, int] = {}
    for letter in letters:
        full = tokenizer.encode(probe + sep + letter)
        n = 0
        for a, b in zip(base, full):
            if a != b:
                break
            n += 1
        if n < len(full) and full[n] != unk:
            found[letter] = int(full[n])
    ids = list(found.values())
    return {c: i for c, i in found.items() if ids.count(i) == 1}


def method_for(config: Any, method: str, keep: Any) -> PruningMethod:
    """The method value `method` at `keep` (ratio or token count) with the config's other
    pruning settings; a method without a budget (`none`) keeps all tokens.

    (Built from a fresh ConfigDict so an int `keep` stays an int: the config's `pruning.keep`
    field is a float, and a count of 1 would become the ratio 1.0.)
    """
    import ml_collections

    cls = pruning.get(method)
    d = config.pruning.to_dict()
    d.update(method=method, keep=keep if cls.budgeted else 1.0)
    return cls.from_config(ml_collections.ConfigDict(d))


def prune_spec(config: Any, method: str, keep: Any, n_v: int | None = None) -> PruningMethod:
    """`method_for` under its pre-method-value name (`n_v` unused)."""
    del n_v
    return method_for(config, method, keep)


class LlavaPredictor:
    """`Predictor` + `OptionScorer` (see `covipal_jax/eval/harness.py`) for one method value,
    over one `Sampler` (shared by `with_method`, so its compiled programs and loaded PPM are
    reused across a sweep)."""

    use_bounds = True  # MVBench start/end bounds honoured when the harness decodes videos

    def __init__(self, sampler: Sampler, method: PruningMethod, *, batch_size: int,
                 num_frames: int = DEFAULT_NUM_FRAMES, frame_sampling: str = "hf"):
        self.sampler, self.batch_size = sampler, int(batch_size)
        self.num_frames, self.frame_sampling = int(num_frames), frame_sampling
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        self.method, self.variables = sampler.resolve(method)
        self.loaded: Loaded = sampler.loaded
        shards = self.loaded.mesh.shape["data"] * self.loaded.mesh.shape["fsdp"]
        if self.batch_size < 1 or self.batch_size % shards:
            raise ValueError(f"batch_size={batch_size} must be a positive multiple of the "
                             f"{shards} batch shards of the mesh (data x fsdp); set "
                             f"--config.batch_size")
        self._letter_ids: dict[str, int] | None = None
        # Model time: seconds of generate / score calls (the first includes compilation).
        self.stats = dict(calls=0, items=0, seconds=0.0, first_call_seconds=None)

    @property
    def spec(self) -> PruningMethod:
        return self.method

    @property
    def template(self) -> str | None:
        return self.sampler.template

    @property
    def processor(self) -> image_lib.ImageProcessorConfig:
        return self.sampler.processor

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return self.sampler.stop_ids

    # -- construction ----------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Any, loaded: Loaded, method: PruningMethod | None = None, *,
                    processor: image_lib.ImageProcessorConfig | None = None,
                    batch_size: int | None = None, num_frames: int | None = None,
                    frame_sampling: str = "hf") -> "LlavaPredictor":
        """Method from `config.pruning` unless given (a trainable one loads its variables
        once). `batch_size` defaults to `config.batch_size`, `num_frames` to
        `config.video_frames` (else 32)."""
        sampler = Sampler.from_config(config, loaded, processor=processor)
        frames = num_frames or config.get("video_frames", None) or DEFAULT_NUM_FRAMES
        return cls(sampler, method or sampler.method,
                   batch_size=batch_size or config.batch_size, num_frames=frames,
                   frame_sampling=frame_sampling)

    def with_method(self, method: PruningMethod) -> "LlavaPredictor":
        """The same sampler (weights, settings, compiled programs) with another method."""
        return LlavaPredictor(self.sampler, method, batch_size=self.batch_size,
                              num_frames=self.num_frames, frame_sampling=self.frame_sampling)

    with_spec = with_method

    # -- inputs ----------------------------------------------------------------------------------

    def _chunks(self, batch):
        batch = list(batch)
        for i in range(0, len(batch), self.batch_size):
            yield batch[i:i + self.batch_size]

    # -- generation ------------------------------------------------------------------------------

    def generator(self, max_new_tokens: int) -> decoding.Generator:
        return self.sampler.generator(self.method, max_new_tokens)

    def generate(self, batch: Sequence[tuple[Any, str]], max_new_tokens: int, *,
                 kind: str = "image") -> Prediction:
        """Answers plus the kept patch indices (any number of items; chunks of batch_size);
        kind "video": items are (u8[F, H, W, 3] frames, prompt) (see `predict_frames`)."""
        texts, kept, seconds, k = [], [], 0.0, 0
        for chunk in self._chunks(batch):
            t0 = time.perf_counter()
            out = self.sampler.generate([im for im, _ in chunk], [p for _, p in chunk],
                                        method=self.method, max_new_tokens=max_new_tokens,
                                        pad_to=self.batch_size, kind=kind)
            dt = time.perf_counter() - t0
            seconds += dt
            self._count(len(chunk), dt)
            texts += out.texts
            kept.append(out.kept)
            k = out.num_vision_tokens
        return Prediction(texts, np.concatenate(kept, axis=0), k, seconds)

    def _count(self, n: int, dt: float) -> None:
        s = self.stats
        if s["first_call_seconds"] is None:
            s["first_call_seconds"] = dt
        s["calls"] += 1
        s["items"] += n
        s["seconds"] += dt

    def predict(self, batch: Sequence[tuple[Any, str]], max_new_tokens: int) -> list[str]:
        return self.generate(batch, max_new_tokens).texts

    # -- video -----------------------------------------------------------------------------------

    def check_video(self) -> None:
        """ValueError unless the model takes videos (a OneVision config)."""
        cfg = self.loaded.cfg
        if not cfg.image_newline or cfg.video_token_id is None or cfg.video_token_id < 0:
            raise ValueError("video benchmarks need a LLaVA-OneVision config (a model with "
                             "video_token_id and image_newline), e.g. configs/llava_ov_7b.py")

    def video_unsupported(self) -> str | None:
        """Why the method cannot prune video input (it reads single-view tower statistics,
        e.g. VisionZip's CLS attention), or None when it can."""
        from covipal_jax.inference import visual_inputs  # noqa: PLC0415

        return visual_inputs.unsupported_reason(self.method)

    def generate_frames(self, batch: Sequence[tuple[np.ndarray, str]], max_new_tokens: int
                        ) -> Prediction:
        """`generate` for `(u8[num_frames, H, W, 3], prompt)` pairs: `kept` holds slots of the
        packed video buffer (frame f, pooled row r, column c at f*p*p + r*p + c; the final
        newline last), -1 where the LLM sees no token."""
        batch = list(batch)
        bad = sorted({len(f) for f, _ in batch} - {self.num_frames})
        if bad:
            raise ValueError(f"videos must have num_frames={self.num_frames} frames (the static "
                             f"frame bucket), got {bad}")
        return self.generate(batch, max_new_tokens, kind="video")

    def predict_frames(self, batch: Sequence[tuple[np.ndarray, str]], max_new_tokens: int
                       ) -> list[str]:
        """Answers for `(u8[num_frames, H, W, 3] frames, prompt)` pairs (the harness's video
        interface, `covipal_jax/eval/video.py`)."""
        return self.generate_frames(batch, max_new_tokens).texts

    # -- option scoring --------------------------------------------------------------------------

    def letter_ids(self, letters: Sequence[str]) -> list[int]:
        """Token ids of `letters` as first answer tokens (ValueError when some have none)."""
        if self._letter_ids is None:
            self._letter_ids = option_token_ids(self.loaded.tokenizer, self.template)
        missing = [c for c in letters if c not in self._letter_ids]
        if missing:
            raise ValueError(f"option letters {missing} are not single distinct tokens of the "
                             "tokenizer: option scoring is not possible")
        return [self._letter_ids[c] for c in letters]

    def supports_option_scoring(self, letters: Sequence[str] = LETTERS[:4]) -> bool:
        try:
            self.letter_ids(letters)
        except ValueError:
            return False
        return True

    def score_options(self, batch: Sequence[tuple[Any, str, Sequence[str]]]
                      ) -> list[list[float]]:
        """log p(letter | image, prompt) of each item's letters, as the first answer token."""
        batch = list(batch)
        used = sorted({c for _, _, letters in batch for c in letters})
        table = dict(zip(used, self.letter_ids(used)))
        out: list[list[float]] = []
        for chunk in self._chunks(batch):
            t0 = time.perf_counter()
            logits, _ = self.sampler.first_token_logits(
                [im for im, _, _ in chunk], [p for _, p, _ in chunk], method=self.method,
                pad_to=self.batch_size)
            logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
            self._count(len(chunk), time.perf_counter() - t0)
            for row, (_, _, letters) in zip(logp, chunk):
                out.append([float(row[table[c]]) for c in letters])
        return out
