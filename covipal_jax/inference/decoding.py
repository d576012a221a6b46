"""Batched generation over a fixed-size KV cache: jitted prefill, jitted decode step.

Letters: B batch, T prompt bucket, k kept vision tokens, M = max_new_tokens, V vocab.

`Generator` compiles two functions per (bucket, method value): `prefill` (encode, prune,
splice, fill the cache; see `covipal_jax.inference.prefill`) and `decode` (a `lax.while_loop` over the decode step, on
device, no Python per token; it stops when every row has emitted EOS or M tokens). The cache
holds `prompt + M` slots, so nothing is reallocated while decoding. Prompts are left-padded,
so every row writes the same cache index at each step.

On XLA:CPU a dynamic (scan) or static slice of the stacked layer weights is a copy, so a decode
loop that slices `layers/stack` per step moves every layer's weights twice per token.
`unstack_layers` (default: on for the CPU backend) slices each decoder layer's weights ONCE per
params (cached on the identity of the stacked weight arrays, reused by every later `decode`
call with the same weights; `decode(..., layers=gen.layer_slices(params))` passes them
explicitly), and runs the step layer by layer on those slices (memory: one extra copy of the
decoder layers while cached; `gen.clear_layer_slices()` frees it). In that path the
`while_loop` also carries one KV-cache buffer per layer instead of the stacked
[L, B, S, K, H] cache, so no step slices, rewrites and restacks the stacked cache; it is
split once before the loop and restacked once after it. TPU / GPU fuse the slice into the
matmul, so they keep the stacked scan.
The prepared weights (`DecodeWeights`) also store every decoder kernel and the LM head
transposed, [*out, *in] (`LlavaConfig.decoder_kernels="out_in"`, the one-layer twin's layout,
`Generator.TWIN_KERNELS`), and the twin's `Dense` runs each as ONE 2-D dot
[.., in] x [out, in]: XLA:CPU's dot with few rows (batch-8 decode) reads a kernel whose
contracted axis is the minor one faster, and the 2-D form keeps XLA's dot decomposer from
transposing the 3-D q/k/v/o kernels at every step (docs/decode_dots.md has the measurements).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from covipal_jax.inference import visual_inputs as vi
from covipal_jax.inference.counted_jit import CountedJit
from covipal_jax.inference.prefill import PrefillOutput, Segment, prefill
from covipal_jax.models.layers import kernel_out_first
from covipal_jax.models.llava import Llava
from covipal_jax.pruning.base import PruningMethod

Array = jax.Array


@flax.struct.dataclass
class DecodeWeights:
    """The CPU decode path's weights, prepared once per params (`Generator.layer_slices`):
    layers: per decoder layer its `layers/stack` leaves cut to [1, ...], every kernel stored
    [*out, *in]; lm_head f32[V, D] (the untied LM head kernel transposed) or None (tied)."""

    layers: tuple
    lm_head: Array | None = None


# ----------------------------------------------------------------------------- sampling

@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy; otherwise softmax(logits / temperature) cut to the top_p mass."""

    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"bad sampling settings {self}")


def sample(logits: Array, rng: Array, sampling: Sampling) -> Array:
    """logits f32[B, V] -> tokens i32[B]."""
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / sampling.temperature
    if sampling.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        cum_before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = cum_before < sampling.top_p
        cutoff = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------- state

@flax.struct.dataclass
class DecodeState:
    """tokens i32[B, M] generated so far (pad after EOS); done bool[B]; step: tokens emitted;
    position i32[B] position of the next token fed; segments: KV caches (see prefill)."""

    tokens: Array
    done: Array
    step: Array
    position: Array
    segments: tuple
    rng: Array


@dataclasses.dataclass
class GenerateOutput:
    tokens: np.ndarray        # i32[B, M], pad after EOS
    lengths: np.ndarray       # i32[B] tokens before (and including) EOS
    num_vision_tokens: int    # k: vision tokens the LLM saw per image
    kept: np.ndarray          # i32[B, k] source patch indices of the kept tokens


class Generator:
    """Jitted, batched, static-shape generation for one model config and pruning method value.

    Usage: `gen = Generator(model, method, max_new_tokens=32, eos_id=2, pad_id=0)`;
    `out = gen(params, pixels, ids, mask, rng=key, variables=...)` (`variables`: the method's
    trainable variables, the PPM's; `prune_keys`: PRNG keys [B], one per example, for
    stochastic methods).
    Jitted entry points (public; `tools/aot.py` lowers the unjitted `prefill_fn` /
    `decode_step_fn`): `prefill(params, variables, pixels, ids, mask, rng, prune_keys)` ->
    (DecodeState, kept i32[B, k]); `decode(params, state)` (the on-device loop);
    `decode_step(params, state)` (one token). `gen.compilations()` reports how many programs
    each has compiled.
    """

    # The decode twin's kernel layout (`LlavaConfig.decoder_kernels`): "out_in" on the CPU
    # decode path (see the module docstring); "in_out" keeps the checkpoint layout (A/B timing).
    TWIN_KERNELS = "out_in"

    def __init__(self, model: Llava, method: PruningMethod, *, max_new_tokens: int,
                 eos_id: int, pad_id: int = 0, sampling: Sampling = Sampling(),
                 extra_stop_ids: tuple[int, ...] = (), unstack_layers: bool | None = None):
        if not isinstance(method, PruningMethod):
            raise TypeError(f"method must be a PruningMethod value, got {type(method).__name__}")
        limit = model.cfg.text.max_position_embeddings
        if not 1 <= max_new_tokens <= limit:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be in [1, {limit}] (the "
                             "model's max_position_embeddings)")
        self.model, self.method, self.sampling = model, method, sampling
        self.max_new_tokens, self.eos_id, self.pad_id = max_new_tokens, eos_id, pad_id
        self.stop_ids = tuple(sorted({eos_id, *extra_stop_ids}))
        if unstack_layers is None:
            unstack_layers = jax.default_backend() == "cpu"
        self.unstack_layers = bool(unstack_layers)
        text = model.cfg.text
        # A one-layer twin of the model: runs one slice of the stacked decoder weights, its
        # kernels stored as `TWIN_KERNELS` says (`DecodeWeights`).
        self._one_layer = Llava(model.cfg.replace(
            text=dataclasses.replace(text, num_layers=1), decoder_kernels=self.TWIN_KERNELS))
        self.prefill = CountedJit(self.prefill_fn)
        self.decode_step = CountedJit(self.decode_step_fn, donate_argnums=(1,))
        self._decode = CountedJit(self._loop, donate_argnums=(1,))
        self._slice_layers = jax.jit(self._layer_stacks)
        self._sliced: tuple[list, tuple] | None = None  # (stacked leaves, per-layer slices)

    # -- traced bodies ------------------------------------------------------------------------

    def _is_stop(self, tok: Array) -> Array:
        return jnp.isin(tok, jnp.asarray(self.stop_ids, jnp.int32))

    def check_length(self, prompt_len: int, pixels: Any = None) -> None:
        """A clear error when prompt + max_new_tokens would pass the model's position limit
        (`prompt_len`: the text bucket T; the unpruned sequence has T - 1 + n_v positions, or
        T - 1 + N for a packed visual input `pixels` of N slots: AnyRes / video / several
        images, whose positions never exceed that)."""
        cfg = self.model.cfg
        n_vis = pixels.num_slots(cfg) if vi.is_packed(pixels) else cfg.num_vision_tokens
        total = prompt_len - 1 + n_vis + self.max_new_tokens
        if total > cfg.text.max_position_embeddings:
            raise ValueError(
                f"prompt ({prompt_len - 1} text + {n_vis} vision tokens) + "
                f"max_new_tokens={self.max_new_tokens} = {total} positions exceed the model's "
                f"max_position_embeddings={cfg.text.max_position_embeddings}")

    def prefill_fn(self, params, variables, pixels, ids, mask, rng, prune_keys=None
                   ) -> tuple[DecodeState, Array]:
        """Unjitted prefill: (DecodeState after the first token, kept i32[B, k]).

        rng: one key (sampling; and pruning when `prune_keys` is None); prune_keys: [B] keys,
        one per example, for stochastic methods (batch-independent draws)."""
        rng, r_prune, r_tok = jax.random.split(rng, 3)
        out: PrefillOutput = prefill(self.model, params, pixels, ids, mask, self.method,
                                     extra=self.max_new_tokens, variables=variables,
                                     rng=r_prune if prune_keys is None else prune_keys)
        tok = sample(out.last_logits, r_tok, self.sampling)
        b = ids.shape[0]
        tokens = jnp.full((b, self.max_new_tokens), self.pad_id, jnp.int32).at[:, 0].set(tok)
        state = DecodeState(tokens, self._is_stop(tok), jnp.ones((), jnp.int32),
                            out.next_position.astype(jnp.int32), out.segments, rng)
        return state, out.kept

    def _layer_stacks(self, params) -> DecodeWeights:
        """`DecodeWeights` of `params`: per decoder layer `language_model/layers/stack` cut to
        that layer ([1, ...] leaves, the params of `self._one_layer`'s stack) with its kernels
        stored [*out, *in]; the untied LM head transposed."""
        lm = params["params"]["language_model"]
        transpose = self.TWIN_KERNELS == "out_in"

        def out_first(path, a):
            keys = [getattr(k, "key", None) for k in path]
            if keys[-1] != "kernel" or not transpose:
                return a
            return kernel_out_first(a, 2 if keys[-2] == "o" else 1, lead=1)

        stack = jax.tree_util.tree_map_with_path(out_first, lm["layers"]["stack"])
        layers = tuple(jax.tree.map(lambda a, i=i: a[i:i + 1], stack)
                       for i in range(self.model.cfg.text.num_layers))
        head = lm["lm_head"]["kernel"].T if transpose and "lm_head" in lm else None
        return DecodeWeights(layers, head)

    @staticmethod
    def _with_layer(params, stack, lm_head=None) -> dict:
        """`params` with the stacked decoder weights replaced by one layer's `stack` (and the
        LM head kernel by `lm_head` when given)."""
        inner = params["params"]
        lm = {**inner["language_model"], "layers": {"stack": stack}}
        if lm_head is not None:
            lm["lm_head"] = {**lm["lm_head"], "kernel": lm_head}
        return {**params, "params": {**inner, "language_model": lm}}

    def layer_slices(self, params) -> DecodeWeights:
        """The prepared decode weights of `params` (per-layer slices, kernels [*out, *in]; see
        the module docstring), computed once and cached while the stacked weight arrays (and
        the LM head) are the same objects."""
        lm = params["params"]["language_model"]
        leaves = jax.tree.leaves((lm["layers"]["stack"], lm.get("lm_head")))
        if self._sliced is not None and len(self._sliced[0]) == len(leaves) and all(
                a is b for a, b in zip(self._sliced[0], leaves)):
            return self._sliced[1]
        self._sliced = None  # free the old slices before making new ones
        slices = self._slice_layers(params)
        self._sliced = (leaves, slices)
        return slices

    def clear_layer_slices(self) -> None:
        """Drop the cached decode weights (one copy of the decoder layers and LM head)."""
        self._sliced = None

    def _run_segment(self, params, layers, x, seg: Segment, **kw):
        """The layers [seg.start, seg.stop) on x with seg's cache: stacked [L', ...] (one
        `Llava.run`), or, with `layers`, a stacked cache or a tuple of per-layer [1, ...]
        caches (layer by layer on the weight slices; returns the cache in the same form)."""
        model = self.model
        if layers is None:
            return model.apply(params, x, method=Llava.run, cache=seg.cache, start=seg.start,
                               stop=seg.stop, **kw)
        per_layer = isinstance(seg.cache, tuple)
        caches = seg.cache if per_layer else _split_cache(seg.cache)
        out = []
        for i in range(seg.start, seg.stop):
            x, c = self._one_layer.apply(self._with_layer(params, layers.layers[i]), x,
                                         method=Llava.run, cache=caches[i - seg.start], **kw)
            out.append(c)
        return x, (tuple(out) if per_layer else _stack_cache(out))

    def decode_step_fn(self, params, state: DecodeState, layers: DecodeWeights | None = None
                       ) -> DecodeState:
        """Feed token step-1, emit token `step` (`layers`: per-layer weight slices, see
        `layer_slices`; the segments' caches may then be per-layer tuples, see `_loop`)."""
        model = self.model
        t = state.step
        last = jax.lax.dynamic_index_in_dim(state.tokens, t - 1, axis=1, keepdims=True)
        x = model.apply(params, last, method=Llava.embed_text)  # [B, 1, D]
        pos = state.position[:, None]
        segments = []
        for seg in state.segments:
            idx = seg.base + t - 1
            key_valid = jax.lax.dynamic_update_slice(
                seg.key_valid, jnp.ones((x.shape[0], 1), bool), (0, idx))
            x, cache = self._run_segment(params, layers, x, seg, positions=pos - seg.offset,
                                         key_valid=key_valid, cache_index=idx)
            segments.append(seg.replace(cache=cache, key_valid=key_valid))
        if layers is None:
            logits = model.apply(params, x, method=Llava.logits)[:, 0]
        else:
            logits = self._one_layer.apply(self._with_layer(params, layers.layers[0],
                                                            layers.lm_head),
                                           x, method=Llava.logits)[:, 0]
        rng, r = jax.random.split(state.rng)
        tok = sample(logits, r, self.sampling)
        tok = jnp.where(state.done, self.pad_id, tok)
        tokens = jax.lax.dynamic_update_slice(state.tokens, tok[:, None], (0, t))
        done = state.done | self._is_stop(tok)
        return DecodeState(tokens, done, t + 1, state.position + 1, tuple(segments), rng)

    def _loop(self, params, state: DecodeState, layers: DecodeWeights | None = None) -> DecodeState:
        """The on-device loop. With `layers` (per-layer weight slices) the loop carries one
        cache buffer per layer: split once here, restacked once after the loop."""
        cond = lambda s: (s.step < self.max_new_tokens) & ~jnp.all(s.done)
        body = lambda s: self.decode_step_fn(params, s, layers)
        if layers is None:
            return jax.lax.while_loop(cond, body, state)
        split = tuple(seg.replace(cache=_split_cache(seg.cache)) for seg in state.segments)
        out = jax.lax.while_loop(cond, body, state.replace(segments=split))
        return out.replace(segments=tuple(seg.replace(cache=_stack_cache(seg.cache))
                                          for seg in out.segments))

    def decode(self, params, state: DecodeState, layers: DecodeWeights | None = None) -> DecodeState:
        """The jitted on-device loop until every row stopped or M tokens (`state` is donated).
        On the unstacked path the layer weight slices are `layers` or `layer_slices(params)`
        (cached: sliced once per params, not per call)."""
        if self.unstack_layers and layers is None:
            layers = self.layer_slices(params)
        return self._decode(params, state, layers if self.unstack_layers else None)

    # -- public -------------------------------------------------------------------------------

    def __call__(self, params, pixels, ids, mask, *, rng: Array | None = None,
                 variables: Any = None, prune_keys: Array | None = None) -> GenerateOutput:
        rng = jax.random.key(0) if rng is None else rng
        if variables is None and self.method.trainable:
            raise ValueError(f"method {self.method.name!r} needs its trained variables")
        self.check_length(int(ids.shape[1]))
        state, kept = self.prefill(params, variables, pixels, ids, mask, rng, prune_keys)
        state = self.decode(params, state)
        tokens = np.asarray(state.tokens)
        return GenerateOutput(tokens, token_lengths(tokens, self.stop_ids, self.pad_id),
                              int(kept.shape[1]), np.asarray(kept))

    def compilations(self) -> dict[str, int]:
        fns = dict(prefill=self.prefill, decode=self._decode, decode_step=self.decode_step)
        return {name: f.traces for name, f in fns.items()}


def _split_cache(cache: dict) -> tuple:
    """{"k", "v": [L, ...]} -> L per-layer caches {"k", "v": [1, ...]}."""
    n = jax.tree.leaves(cache)[0].shape[0]
    return tuple(jax.tree.map(lambda a, j=j: a[j:j + 1], cache) for j in range(n))


def _stack_cache(caches) -> dict:
    """The inverse of `_split_cache`."""
    return jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *caches)


def token_lengths(tokens: np.ndarray, stop_ids: tuple[int, ...], pad_id: int) -> np.ndarray:
    """Generated length per row: up to and including the first stop token."""
    tokens = np.asarray(tokens)
    is_stop = np.isin(tokens, stop_ids)
    first = np.where(is_stop.any(1), is_stop.argmax(1) + 1, tokens.shape[1])
    return first.astype(np.int32)


def trim(tokens: np.ndarray, lengths: np.ndarray, stop_ids: tuple[int, ...]) -> list[list[int]]:
    """Per-row token lists without the stop token and padding."""
    out = []
    for row, n in zip(np.asarray(tokens), np.asarray(lengths)):
        row = list(row[:n])
        if row and row[-1] in stop_ids:
            row = row[:-1]
        out.append([int(t) for t in row])
    return out
