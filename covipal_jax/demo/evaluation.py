"""Short-answer accuracy under a prune spec, and measured prefill time: the demo's evaluation.

A question is answered by the greedy first answer token of the pruned prefill
(`prefill.prefill(...).last_logits`, the same jitted path `decoding.Generator` starts with): the
prediction is right when that token is the first token of the reference answer (for the
synthetic set every answer is one word = one token, so this is exact match; for a real
tokenizer the answer's first token after the template's answer prefix, lower- and title-case
accepted).

Letters: B batch (`batch_size`, static: the last batch is padded with copies and the padding
is dropped), T the text bucket, n_v vision tokens, k kept.

    ev = Evaluator(model, params, processor=..., images=uint8[N, H, W, 3], ids=i32[N, T],
                   mask=bool[N, T], answer_ids=[set of ids per question], batch_size=250)
    ev.accuracy(PPMMethod(keep=16, ppm=pcfg), variables)   -> EvalResult
    ev.prefill_seconds(FastV(keep=16, layer=2))             -> median seconds per batch

The first token comes from the inference facade's `sampler.first_token_fn` (the pruned prefill's
next-token logits). One program compiles per method value, ahead of time (`compile(methods)`
compiles several in parallel threads); the measured times never include compilation.

Stochastic methods (`random`) draw with the keys `split(fold_in(key(seed), i), B)` for batch i
(the demo's fixed protocol: `batch_size` is part of the demo config, and these keys reproduce
its published numbers); the eval harness draws per example instead (`inference/sampler.py`).
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from covipal_jax.data import image as image_lib
from covipal_jax.data import text as text_lib
from covipal_jax.inference.sampler import first_token_fn
from covipal_jax.models.llava import Llava
from covipal_jax.pruning.base import PruningMethod

Array = jax.Array


def answer_token_ids(tokenizer: text_lib.Tokenizer, template: str | text_lib.ChatTemplate,
                     question: str, answer: str, *, cased: bool = False) -> tuple[int, ...]:
    """The token id(s) that start `answer` right after the prompt of `question`.

    The first token where the tokenization of prompt + answer departs from the prompt's.
    `cased`: also accept the lower-case and capitalized spellings of the answer (real chat
    models answer "Red" as often as "red").
    """
    tmpl = text_lib.get_template(template, tokenizer)
    prompt = tmpl.prompt(question)
    bos = tokenizer.add_bos_default
    p_ids = tokenizer.encode(prompt, add_bos=bos)
    spellings = [answer] + ([answer.lower(), answer.capitalize()] if cased else [])
    out: list[int] = []
    for a in spellings:
        f_ids = tokenizer.encode(prompt + tmpl.answer_prefix + a, add_bos=bos)
        n = 0
        while n < min(len(p_ids), len(f_ids)) and p_ids[n] == f_ids[n]:
            n += 1
        if n < len(f_ids) and f_ids[n] not in out:
            out.append(int(f_ids[n]))
    if not out:
        raise ValueError(f"answer {answer!r} adds no token after the prompt")
    return tuple(out)


def encode_questions(tokenizer: text_lib.Tokenizer, template: str, questions: Sequence[str],
                     bucket: int) -> tuple[np.ndarray, np.ndarray]:
    """All prompts left-padded to one length `bucket`: ids i32[N, bucket], mask bool[N, bucket]."""
    return text_lib.encode_prompts(tokenizer, list(questions), template=template,
                                   buckets=(bucket,))


@dataclasses.dataclass
class EvalResult:
    """accuracy over the N questions; correct bool[N]; predicted i32[N] (first answer token);
    kept i32[N, k] source patch indices the LLM saw; k vision tokens kept; seconds: median wall
    time of one jitted prefill of a batch (compilation excluded)."""

    accuracy: float
    correct: np.ndarray
    predicted: np.ndarray
    kept: np.ndarray
    k: int
    seconds: float


class Evaluator:
    """Greedy first-token accuracy of one model on one question set, for any method value."""

    def __init__(self, model: Llava, params: Any, *, processor: image_lib.ImageProcessorConfig,
                 images: np.ndarray, ids: np.ndarray, mask: np.ndarray,
                 answer_ids: Sequence[Sequence[int]], batch_size: int = 256,
                 seed: int = 0):
        n = len(ids)
        if not (len(images) == n == len(mask) == len(answer_ids)) or n == 0:
            raise ValueError("images, ids, mask and answer_ids must have the same length > 0")
        self.model, self.params = model, params
        self.n = n
        self.batch_size = min(int(batch_size), n)
        self.seed = int(seed)
        self.pixels = image_lib.preprocess(list(images), processor)
        self.ids, self.mask = np.asarray(ids, np.int32), np.asarray(mask, bool)
        width = max(len(a) for a in answer_ids)
        self.answers = np.full((n, width), -1, np.int32)
        for i, a in enumerate(answer_ids):
            self.answers[i, :len(a)] = a
        self._fns: dict[PruningMethod, Any] = {}

    def _run_fn(self, method: PruningMethod):
        fn = first_token_fn(self.model, method)

        def run(params, variables, pixels, ids, mask, keys):
            logits, kept = fn(params, variables, pixels, ids, mask, keys)
            return jnp.argmax(logits, axis=-1).astype(jnp.int32), kept

        return run

    def _batch_args(self, idx):
        return jax.device_put((self.pixels[idx], self.ids[idx], self.mask[idx]))

    def _keys(self, i: int):
        return jax.random.split(jax.random.fold_in(jax.random.key(self.seed), i),
                                self.batch_size)

    def _fn(self, method: PruningMethod, variables: Any = None):
        """The compiled prefill of `method` for one batch (compiled ahead of time, once)."""
        if method not in self._fns:
            b = self.batch_size
            sds = lambda a: jax.ShapeDtypeStruct((b,) + a.shape[1:], a.dtype)
            lowered = jax.jit(self._run_fn(method)).lower(
                self.params, variables, sds(self.pixels), sds(self.ids), sds(self.mask),
                self._keys(0))
            self._fns[method] = lowered.compile()
        return self._fns[method]

    @staticmethod
    def _variables(method: PruningMethod, variables: Any) -> Any:
        if method.trainable and variables is None:
            raise ValueError(f"method {method.name!r} needs its trained variables")
        return variables if method.trainable else None

    def compile(self, methods: Sequence[PruningMethod], variables_of: Any = None,
                workers: int = 2) -> None:
        """Compile the prefill of every method ahead of time, `workers` at a time (XLA compiles
        outside the GIL, so this uses the cores that one compilation leaves idle);
        `variables_of(method)` gives a trainable method's variables."""
        import concurrent.futures

        todo = [m for m in dict.fromkeys(methods) if m not in self._fns]
        var = lambda m: variables_of(m) if m.trainable and variables_of else None
        if workers <= 1:
            for m in todo:
                self._fn(m, var(m))
            return
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda m: self._fn(m, var(m)), todo))

    def _batches(self):
        b = self.batch_size
        for start in range(0, self.n, b):
            idx = np.arange(start, start + b)
            real = idx < self.n
            idx = np.where(real, idx, start)  # pad the last batch with copies of its first row
            yield start // b, idx, real

    def accuracy(self, method: PruningMethod, variables: Any = None) -> EvalResult:
        """`variables`: the trainable method's (the PPM's); ignored by the others."""
        variables = self._variables(method, variables)
        fn = self._fn(method, variables)
        preds, kept, times = [], [], []
        single = self.n <= self.batch_size
        for i, idx, real in self._batches():
            keys = self._keys(i)
            args = self._batch_args(idx)
            for _ in range(2 if single else 1):  # one batch only: time it twice
                t0 = time.perf_counter()
                p, k = jax.block_until_ready(fn(self.params, variables, *args, keys))
                times.append(time.perf_counter() - t0)
            preds.append(np.asarray(p)[real])
            kept.append(np.asarray(k)[real])
        pred = np.concatenate(preds)
        correct = np.any(self.answers == pred[:, None], axis=1)
        kept_all = np.concatenate(kept)
        return EvalResult(float(correct.mean()), correct, pred, kept_all, int(kept_all.shape[1]),
                          float(np.median(times)))

    def prefill_seconds(self, method: PruningMethod, variables: Any = None, *,
                        repeats: int = 5) -> float:
        """Median wall time of one jitted prefill of the first batch (compiled beforehand)."""
        variables = self._variables(method, variables)
        fn = self._fn(method, variables)
        _, idx, _ = next(self._batches())
        args = (self.params, variables, *self._batch_args(idx), self._keys(0))
        jax.block_until_ready(fn(*args))
        times = []
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - t0)
        return float(np.median(times))


def make_evaluator(model, params, processor, tokenizer, template: str, split: dict, *,
                   buckets, batch_size: int, cased: bool = False, seed: int = 0) -> "Evaluator":
    """An `Evaluator` over a split of the demo's data (images, questions, answers)."""
    from covipal_jax.data import text as text_lib

    questions = [str(q) for q in split["question"]]
    ids, mask = text_lib.encode_prompts(tokenizer, questions, template=template,
                                        buckets=tuple(buckets))
    answers = [answer_token_ids(tokenizer, template, q, str(a), cased=cased)
               for q, a in zip(questions, split["answer"])]
    return Evaluator(model, params, processor=processor, images=split["images"],
                                ids=ids, mask=mask, answer_ids=answers,
                                batch_size=batch_size, seed=seed)
