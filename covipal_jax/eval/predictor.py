"""The harness's `Predictor` (and `OptionScorer`) over our jitted `Generator`.

`LlavaPredictor` turns a batch of `(PIL image, plain-text prompt)` pairs into answers:
preprocess (the checkpoint's image processor) -> chat template + `encode_prompts` with the
config's `text_buckets` (left-padded) -> pad the batch to `batch_size` rows (static shapes: one
compiled program per (bucket, k)) -> put the batch on the mesh, sharded over (data, fsdp) ->
prune + generate (greedy by default) -> trim at the stop tokens -> decode.

`score_options` (multiple choice, likelihood style): the log-probability of each option letter
as the FIRST answer token, read from the pruned prefill's next-token logits. The letter's token
is what the tokenizer produces for `<prompt><answer_prefix><letter>` after the prompt's tokens
(e.g. "▁A" for LLaVA-1.5's SentencePiece vocabulary, "A" for Qwen2's byte-level BPE).

    loaded = loading.load(config)
    pred = LlavaPredictor.from_config(config, loaded)          # spec from config.pruning
    pred.predict([(image, "What is this?")], max_new_tokens=16)
    sweep = pred.with_spec(PruneSpec("visionzip", k=64))       # same weights, other method

Letters: B batch (= batch_size), T prompt bucket, k kept vision tokens, V vocab.
"""
from __future__ import annotations

import dataclasses
import time
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from covipal_jax import sharding
from covipal_jax.inference import decoding
from covipal_jax.data import image as image_lib
from covipal_jax.data import text as text_lib
from covipal_jax.inference.loading import Loaded
from covipal_jax.inference.prefill import PruneSpec, prefill

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


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
    tmpl = text_lib.get_template(template)
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


def prune_spec(config: Any, method: str, keep: Any, n_v: int) -> PruneSpec:
    """PruneSpec for `method` at `keep` (ratio or token count) with the config's other
    pruning settings; `none` always keeps all n_v tokens.

    (Built from a fresh ConfigDict so an int `keep` stays an int: the config's `pruning.keep`
    field is a float, and a count of 1 would become the ratio 1.0.)
    """
    import ml_collections

    d = config.pruning.to_dict()
    d.update(method=method, keep=n_v if method == "none" else keep)
    return PruneSpec.from_config(ml_collections.ConfigDict(d), n_v)


class LlavaPredictor:
    """`Predictor` + `OptionScorer` (see `covipal_jax/eval/harness.py`) for one prune spec.

    Generators are cached per `max_new_tokens`, so every batch of a benchmark (and every
    benchmark of a run) reuses the same compiled programs.
    """

    def __init__(self, loaded: Loaded, spec: PruneSpec, *, template: str | None,
                 buckets: Sequence[int], batch_size: int,
                 sampling: decoding.Sampling = decoding.Sampling(), seed: int = 0,
                 ppm: tuple[Any, Any] | None = None,
                 processor: image_lib.ImageProcessorConfig | None = None):
        self.loaded, self.spec, self.template = loaded, spec, template
        self.buckets, self.batch_size = tuple(int(b) for b in buckets), int(batch_size)
        self.sampling, self.seed, self.ppm = sampling, seed, ppm
        self.processor = processor or loaded.processor
        if spec.method == "ppm" and ppm is None:
            raise ValueError("pruning.method='ppm' needs trained PPM params "
                             "(--config.pruning.ppm_checkpoint=DIR)")
        shards = loaded.mesh.shape["data"] * loaded.mesh.shape["fsdp"]
        if self.batch_size < 1 or self.batch_size % shards:
            raise ValueError(f"batch_size={batch_size} must be a positive multiple of the "
                             f"{shards} batch shards of the mesh (data x fsdp); set "
                             f"--config.batch_size")
        tok = loaded.tokenizer
        self.stop_ids = tuple(text_lib.get_template(template).stop_ids(tok)) if template \
            else (tok.eos_id,)
        self._generators: dict[int, decoding.Generator] = {}
        self._scorer = None
        self._letter_ids: dict[str, int] | None = None
        # Model time: seconds of generate / score calls (the first includes compilation).
        self.stats = dict(calls=0, items=0, seconds=0.0, first_call_seconds=None)

    # -- construction ----------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Any, loaded: Loaded, spec: PruneSpec | None = None, *,
                    ppm: tuple[Any, Any] | None = None,
                    processor: image_lib.ImageProcessorConfig | None = None,
                    batch_size: int | None = None) -> "LlavaPredictor":
        """Spec from `config.pruning` unless given; the PPM is loaded when the spec needs it.
        `batch_size` defaults to `config.batch_size`."""
        from covipal_jax.weights import ppm_io

        spec = spec or PruneSpec.from_config(config.pruning, loaded.cfg.num_vision_tokens)
        if spec.method == "ppm" and ppm is None:
            ppm = ppm_io.load_for_inference(config, loaded.cfg)
        return cls(loaded, spec, template=config.template or None,
                   buckets=tuple(config.text_buckets),
                   batch_size=batch_size or config.batch_size,
                   sampling=decoding.Sampling(config.sampling.temperature,
                                              config.sampling.top_p),
                   seed=config.sampling.seed, ppm=ppm, processor=processor)

    def with_spec(self, spec: PruneSpec, ppm: tuple[Any, Any] | None = None
                  ) -> "LlavaPredictor":
        """The same weights and settings with another prune spec (the PPM carries over)."""
        return LlavaPredictor(self.loaded, spec, template=self.template, buckets=self.buckets,
                              batch_size=self.batch_size, sampling=self.sampling,
                              seed=self.seed, ppm=ppm if ppm is not None else self.ppm,
                              processor=self.processor)

    # -- inputs ----------------------------------------------------------------------------------

    def encode(self, batch: Sequence[tuple[Any, str]]) -> tuple[Any, int, jax.Array]:
        """(image, prompt) pairs -> ((pixels, ids, mask) on the mesh, n_real, rng).

        Rows are padded to `batch_size` by repeating the last one. The rng depends only on the
        prompts (stochastic methods give the same result when an evaluation is resumed).
        """
        if not batch:
            raise ValueError("empty batch")
        if len(batch) > self.batch_size:
            raise ValueError(f"batch of {len(batch)} > batch_size {self.batch_size}")
        n_real = len(batch)
        batch = list(batch) + [batch[-1]] * (self.batch_size - n_real)
        pixels = image_lib.preprocess([im for im, _ in batch], self.processor)
        ids, mask = text_lib.encode_prompts(self.loaded.tokenizer, [p for _, p in batch],
                                            template=self.template, buckets=self.buckets)
        digest = zlib.crc32("\x00".join(p for _, p in batch[:n_real]).encode("utf-8"))
        rng = jax.random.fold_in(jax.random.key(self.seed), digest & 0x7FFFFFFF)
        return sharding.put_batch(self.loaded.mesh, (pixels, ids, mask)), n_real, rng

    def _chunks(self, batch):
        batch = list(batch)
        for i in range(0, len(batch), self.batch_size):
            yield batch[i:i + self.batch_size]

    # -- generation ------------------------------------------------------------------------------

    def generator(self, max_new_tokens: int) -> decoding.Generator:
        gen = self._generators.get(max_new_tokens)
        if gen is None:
            tok = self.loaded.tokenizer
            gen = decoding.Generator(
                self.loaded.model, self.spec, max_new_tokens=max_new_tokens, eos_id=tok.eos_id,
                pad_id=tok.pad_id, extra_stop_ids=tuple(s for s in self.stop_ids
                                                        if s != tok.eos_id),
                sampling=self.sampling, ppm_module=None if self.ppm is None else self.ppm[0])
            self._generators[max_new_tokens] = gen
        return gen

    def generate(self, batch: Sequence[tuple[Any, str]], max_new_tokens: int) -> Prediction:
        """Answers plus the kept patch indices (any number of items; chunks of batch_size)."""
        gen = self.generator(max_new_tokens)
        tok = self.loaded.tokenizer
        texts, kept, seconds, k = [], [], 0.0, 0
        for chunk in self._chunks(batch):
            (pixels, ids, mask), n_real, rng = self.encode(chunk)
            t0 = time.perf_counter()
            with sharding.use_mesh(self.loaded.mesh, self.loaded.rules):
                out = gen(self.loaded.params, pixels, ids, mask, rng=rng,
                          ppm_vars=None if self.ppm is None else self.ppm[1])
            dt = time.perf_counter() - t0
            seconds += dt
            self._count(n_real, dt)
            rows = decoding.trim(out.tokens, out.lengths, gen.stop_ids)[:n_real]
            texts += [tok.decode(r).strip() for r in rows]
            kept.append(np.asarray(out.kept)[:n_real])
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

    def _score_fn(self):
        if self._scorer is None:
            model, spec, ppm_module = self.loaded.model, self.spec, (
                None if self.ppm is None else self.ppm[0])

            def score(params, ppm_vars, pixels, ids, mask, rng, letter_ids):
                # Same rng split as Generator._prefill: stochastic methods keep the same tokens.
                _, r_prune, _ = jax.random.split(rng, 3)
                ppm = None if ppm_vars is None else (ppm_module, ppm_vars)
                out = prefill(model, params, pixels, ids, mask, spec, extra=1, ppm=ppm,
                              rng=r_prune)
                logp = jax.nn.log_softmax(out.last_logits.astype(jnp.float32), axis=-1)
                return jnp.take(logp, letter_ids, axis=-1)  # f32[B, 26]

            self._scorer = jax.jit(score)
        return self._scorer

    def score_options(self, batch: Sequence[tuple[Any, str, Sequence[str]]]
                      ) -> list[list[float]]:
        """log p(letter | image, prompt) of each item's letters, as the first answer token."""
        batch = list(batch)
        used = sorted({c for _, _, letters in batch for c in letters})
        table = dict(zip(used, self.letter_ids(used)))
        # One static [26] id vector (unused letters -> 0): one program for any option count.
        letter_ids = jnp.asarray([table.get(c, 0) for c in LETTERS], jnp.int32)
        fn = self._score_fn()
        out: list[list[float]] = []
        for chunk in self._chunks(batch):
            (pixels, ids, mask), n_real, rng = self.encode([(im, p) for im, p, _ in chunk])
            t0 = time.perf_counter()
            with sharding.use_mesh(self.loaded.mesh, self.loaded.rules):
                logp = np.asarray(fn(self.loaded.params,
                                     None if self.ppm is None else self.ppm[1],
                                     pixels, ids, mask, rng, letter_ids))
            self._count(n_real, time.perf_counter() - t0)
            for row, (_, _, letters) in zip(logp[:n_real], chunk):
                out.append([float(row[LETTERS.index(c)]) for c in letters])
        return out
