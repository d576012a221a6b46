"""PDrop*: full-model fine-tuning of a LLaVA with PyramidDrop active (the PDrop paper's
training-time use), answer-only LM loss.

Official recipe (Cooperx521/PyramidDrop @6444f30, `scripts/v1_5/pdrop_train/finetune.sh`,
`llava/model/modeling_llama_pdrop.py` `pdrop_forward` / `pdrop_rank_drop` with
`self.training`): LLaVA-1.5's instruction stage (projector + LLM trained, CLIP tower frozen,
lr 2e-5, weight decay 0, warmup ratio 0.03, cosine, 1 epoch on mix665k), with
`--layer_list [8,16,24] --image_token_ratio_list [0.5,0.25,0.125]` (lambda = 0.5). At each
stage layer the hidden states entering layer K are ranked by layer K's q/k (input norm, RoPE):
the query rows are every token just BEFORE an answer span ("index_before_answer"), softmax with
the causal mask, mean over heads, image columns, mean over those rows; `topk(keep)` re-sorted,
the sequence rebuilt as [prefix, kept image tokens, suffix] and renumbered `arange(len)`. The
ranking is under `detach()` (no gradient through the scores); the LM loss flows through the
kept tokens' hidden states.

Here (the same, static-shaped): `pdrop_forward` runs the decoder stage by stage WITHOUT a KV
cache (`Llava.run` on layers [start, K-1), [K-1, K)), scores with `in_llm.Probe` (the probe of
inference, under `stop_gradient`) on up to `max_queries` rows before answer spans (a masked
mean; one row for single-turn data, where it is exactly inference's "last instruction token"),
gathers the kept sequence and renumbers it like `run_in_llm`. Differences from the official:
an example without an answer span is scored from its last token (the official skips its
pruning); answer spans beyond `max_queries` do not vote; the stage schedule is the method's
(`PyramidDrop.stages`: layers scaled to the depth, `pruning.ratios` / `lam` / `keep`).

Letters: B batch, T text length, n_v vision tokens, n current vision tokens, k kept, R query
rows, V vocab.

    trainable, frozen = split_params(params)          # tower frozen, the rest trains
    step = jax.jit(make_step(model, method, tx), donate_argnums=0)
    state, metrics = step(state, frozen, batch)       # state {"step", "params", "opt_state"}

`finetune(...)` is the small in-memory loop (the demo); `FinetuneTrainer` in
`train/finetune_trainer.py` is the sharded, checkpointed trainer mode
(`python -m covipal_jax.train --config configs/pdrop_star_tiny.py`).
"""
from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from covipal_jax.inference import in_llm
from covipal_jax.models import multimodal as mm
from covipal_jax.models.llava import Llava
from covipal_jax.pruning.pdrop import PyramidDrop
from covipal_jax.pruning.select import topk_indices
from covipal_jax.train import pretrain
from covipal_jax.train import state as state_lib

Array = jax.Array

FROZEN = ("vision_tower",)   # top-level param collections that do not train (official)
MAX_QUERIES = 8              # answer spans whose preceding token votes in the ranking


# ----------------------------------------------------------------------------- params

def _inner(params: Mapping) -> tuple[Mapping, bool]:
    return (params["params"], True) if "params" in params else (params, False)


def split_params(params: Mapping, frozen: tuple[str, ...] = FROZEN) -> tuple[dict, dict]:
    """(trainable, frozen) halves of LLaVA params (`{"params": ...}` or the inner tree), each
    in the same wrapping; `frozen` names top-level modules (default: the vision tower)."""
    inner, wrapped = _inner(params)
    missing = [f for f in frozen if f not in inner]
    if missing:
        raise ValueError(f"split_params: no {missing} in the params ({sorted(inner)})")
    a = {k: v for k, v in inner.items() if k not in frozen}
    b = {k: v for k, v in inner.items() if k in frozen}
    return ({"params": a}, {"params": b}) if wrapped else (a, b)


def merge_params(trainable: Mapping, frozen: Mapping) -> dict:
    """The inverse of `split_params`."""
    a, wrapped = _inner(trainable)
    b, _ = _inner(frozen)
    out = {**a, **b}
    return {"params": out} if wrapped else out


def check_method(method: Any) -> PyramidDrop:
    if not isinstance(method, PyramidDrop):
        raise ValueError(f"PDrop* fine-tuning needs pruning.method={PyramidDrop.name!r}, got "
                         f"{getattr(method, 'name', method)!r}")
    return method


# ----------------------------------------------------------------------------- the forward

def answer_queries(ids: Array, mask: Array, loss_mask: Array,
                   max_queries: int = MAX_QUERIES) -> tuple[Array, Array]:
    """Text indices of the tokens just before each answer span (the official training query
    rows), the first `max_queries` in order: (i32[B, R], valid bool[B, R]). A row without
    any answer gets its last token (valid)."""
    t = ids.shape[1]
    ans = loss_mask & mask
    prev = jnp.pad(ans[:, :-1], ((0, 0), (1, 0)))
    start = ans & ~prev
    start = start.at[:, 0].set(False)
    pos = jnp.arange(t, dtype=jnp.int32)
    r = min(max_queries, t)
    vals, idx = jax.lax.top_k(jnp.where(start, t - pos, 0), r)   # earliest spans first
    valid = vals > 0
    none = ~jnp.any(valid, axis=1, keepdims=True)
    rows = jnp.where(valid, idx - 1, t - 1).astype(jnp.int32)
    valid = valid | (none & (jnp.arange(r) == 0)[None])
    return rows, valid


def training_scores(probe: in_llm.Probe, rows: Array, valid: Array) -> Array:
    """f32[B, n]: layer K's head-mean attention (on layer K-1's output) from the query rows
    i32[B, R] (sequence indices) to the current vision tokens, mean over the valid rows. With
    one row it is `pruning.pdrop.pdrop_scores`."""
    att = probe.attention_rows(rows, layer="next").astype(jnp.float32)   # f32[B, N, R, S]
    att = probe.vision_columns(jnp.mean(att, axis=1))                    # f32[B, R, n]
    w = valid.astype(jnp.float32)
    return jnp.sum(att * w[..., None], axis=1) / jnp.maximum(jnp.sum(w, 1), 1.0)[:, None]


def pdrop_forward(model: Llava, params: Any, method: PyramidDrop, batch: Mapping[str, Array],
                  *, max_queries: int = MAX_QUERIES) -> tuple[Array, int]:
    """Teacher-forced forward with PyramidDrop's stages, no cache.

    batch: pixels f32[B, H, W, 3], ids i32[B, T] (left-padded, one image placeholder), mask,
    loss_mask bool[B, T]. Returns (logits f32[B, T - 1, V] where row j predicts ids[:, j + 1]
    for every text token after the image, k_last): the rows k_last - 1 .. L' - 2 of the
    pruned sequence (L' = T - 1 + k_last), exactly `pretrain.answer_loss`'s layout.
    """
    check_method(method)
    ids, mask = batch["ids"], batch["mask"]
    cfg = model.cfg
    n_layers = cfg.text.num_layers
    _, vis = model.apply(params, batch["pixels"], method=Llava.encode_image)
    text = model.apply(params, ids, method=Llava.embed_text)
    image_pos = mm.image_positions(ids, cfg.image_token_id)
    b, n_v = vis.shape[:2]
    src = jnp.broadcast_to(jnp.arange(n_v, dtype=jnp.int32), (b, n_v))
    h, seq_mask, positions, is_vis = mm.splice(text, mask, image_pos, vis, src, "contiguous",
                                               n_v)
    text_mask = seq_mask & ~is_vis
    q_text, q_valid = answer_queries(ids, mask, batch["loss_mask"], max_queries)
    # A text index t after the image sits at t + n - 1 with n vision tokens in the sequence.
    after = q_text > image_pos[:, None]
    renumber = in_llm.renumbers_stages(method)
    sg_params = jax.lax.stop_gradient(params)
    run = lambda x, lo, hi: model.apply(params, x, method=Llava.run, positions=positions,
                                        key_valid=seq_mask, start=lo, stop=hi)[0]
    start, n = 0, n_v
    for s, (kk, k) in enumerate(method.stages(n_v, n_layers)):
        if not start < kk < n_layers or not 1 <= k <= n:
            raise ValueError(f"pdrop stage {s} (K={kk}, k={k}) must have K in ({start}, "
                             f"{n_layers}) and k in [1, {n}]")
        if kk - 1 > start:
            h = run(h, start, kk - 1)
        h_in, h = h, run(h, kk - 1, kk)
        vision_index = image_pos[:, None] + jnp.arange(n, dtype=jnp.int32)[None]
        probe = in_llm.Probe(model, sg_params, kk - 1, jax.lax.stop_gradient(h_in), seq_mask,
                             positions, vision_index, text_mask,
                             q_text[:, 0] + n - 1, _out=jax.lax.stop_gradient(h))
        rows = jnp.where(after, q_text + n - 1, q_text)
        kept = topk_indices(training_scores(probe, rows, q_valid), k)      # i32[B, k] sorted
        keep_seq = mm.keep_sequence_indices(vision_index, kept, h.shape[1])
        h, seq_mask, positions, text_mask = (mm.gather_sequence(a, keep_seq)
                                             for a in (h, seq_mask, positions, text_mask))
        if renumber:
            positions = mm.text_positions(seq_mask)
        start, n = kk, k
    h = run(h, start, n_layers)
    logits = model.apply(params, h[:, n - 1:-1], method=Llava.logits)
    return logits.astype(jnp.float32), n


def finetune_loss(model: Llava, trainable: Any, frozen: Any, method: PyramidDrop,
                  batch: Mapping[str, Array], *, max_queries: int = MAX_QUERIES
                  ) -> tuple[Array, dict]:
    """Mean answer-token cross-entropy of the PDrop forward (and token accuracy); the frozen
    half gets no gradient."""
    params = merge_params(trainable, jax.lax.stop_gradient(frozen))
    logits, _ = pdrop_forward(model, params, method, batch, max_queries=max_queries)
    return pretrain.answer_nll(logits, batch)


def make_step(model: Llava, method: PyramidDrop, tx: optax.GradientTransformation, *,
              max_queries: int = MAX_QUERIES):
    """(state, frozen, batch) -> (state, metrics), the trainer's step signature; an update
    whose loss or gradient norm is not finite is skipped (`metrics["ok"]` = 0)."""
    check_method(method)

    def step(state, frozen, batch):
        (loss, metrics), grads = jax.value_and_grad(
            lambda p: finetune_loss(model, p, frozen, method, batch, max_queries=max_queries),
            has_aux=True)(state["params"])
        new, guard = state_lib.guarded_update(state, loss, grads, tx)
        metrics.update(guard)
        return new, metrics

    return step


# ----------------------------------------------------------------------------- in-memory loop

@dataclasses.dataclass
class FinetuneResult:
    params: Any              # the whole LLaVA (tower as given, the rest fine-tuned)
    steps: int
    losses: list[float]      # every step's loss
    seconds: float


def finetune(model: Llava, params: Any, data: Any, cfg: Any, *, method: PyramidDrop,
             processor: Any, max_queries: int = MAX_QUERIES,
             log: Callable[[str], None] | None = None, progress: bool = True
             ) -> FinetuneResult:
    """Fine-tune `params` (a whole LLaVA) with PyramidDrop active on `data`
    (`pretrain.EncodedSet`), `cfg` a `pretrain.PretrainConfig` (steps, batch_size, lr, ...;
    its `init` is ignored: training starts from `params`). Deterministic given `cfg.seed`."""
    from tqdm import tqdm

    from covipal_jax.train import pretrain as pt

    log = log or (lambda s: print(s, flush=True))
    trainable, frozen = split_params(params)
    trainable = jax.tree.map(jnp.array, trainable)   # own copies: the step donates its state
    tx, _ = pt.make_optimizer(cfg)
    state = pt.init_state(trainable, tx)
    step_fn = jax.jit(make_step(model, method, tx, max_queries=max_queries), donate_argnums=0)
    losses: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.steps, desc="pdrop* finetune", disable=not progress,
               file=sys.stderr, dynamic_ncols=True, leave=False)
    try:
        for step in range(cfg.steps):
            batch = pt.batch_at(data, step, cfg.batch_size, cfg.seed, processor)
            state, metrics = step_fn(state, frozen, batch)
            losses.append(float(metrics["loss"]))
            if not metrics["ok"]:
                raise FloatingPointError(f"PDrop* fine-tuning: non-finite loss at step {step}")
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    if losses:
        log(f"[pdrop*] {cfg.steps} steps: loss {np.mean(losses[:5]):.4f} (first 5) -> "
            f"{np.mean(losses[-5:]):.4f} (last 5) in {seconds:.0f} s")
    return FinetuneResult(merge_params(state["params"], frozen), cfg.steps, losses, seconds)
