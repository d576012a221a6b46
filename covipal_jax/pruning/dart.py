"""DART (Wen et al., EMNLP 2025, "Stop Looking for Important Tokens in Multimodal Language
Models: Duplication Matters More"): keep the image tokens least duplicated by a few pivots.

Rule (official `get_retained_image_token` / `DART_K_norm.forward` of ZichenWen1/DART's LLaVA
LlamaModel, read from a public copy since the repo's code is not indexed here; identical logic
in ModelTC/llmc `llmc/compression/token_reduction/dart.py`), applied once at decoder layer
K (= 2) during prefill:
1. `K_states`: the post-RoPE keys of layer K-1, heads flattened ([S, K*H]). Image pivots: the
   `pivot_image_token` (= 4) image tokens with the largest L1 key norm
   (`torch.norm(k, p=1, dim=-1).topk`); text pivots: the `pivot_text_token` (= 4) tokens AFTER
   the image span with the largest L1 key norm.
2. `last_layer_state = self.norm(layer_outputs[0])`: the output of layer K-1 (= input of layer
   K) passed through the LLM's FINAL norm.
3. For each pivot in turn, among the image tokens not yet chosen (image pivots excluded from the
   start), add the `TOKEN_TOPK` tokens with the LOWEST cosine similarity to the pivot
   (`(-cosine_similarity).topk(TOKEN_TOPK)`), then remove them from the pool.
4. Keep the image pivots plus all chosen tokens (text pivots are only used as references), in
   original order; kept tokens keep their original position ids (`position_ids = keep_indexs`).

Static-budget adaptation (documented deviations):
- The official count is `pivot_image_token + (P_i + P_t) * TOKEN_TOPK` with
  `TOKEN_TOPK = max_num_trunction // (P_i + P_t)` (e.g. 4 + 8 * 16 = 132 for "128 tokens").
  Here the budget `k` includes the image pivots and is met exactly: `k - P_i` chosen tokens are
  split over the P pivots as `(k - P_i) // P` each, the remainder one extra each for the first
  pivots. `official_keep(max_num_trunction)` gives the k that reproduces the official count and
  per-pivot quota exactly.
- The official loop visits the pivots in Python `set` iteration order (hash-table slots). Here
  pivots are visited in ascending sequence position (image pivots first, then text pivots),
  deterministic and batch-independent.
- If k < P_i, only the k image pivots with the largest key norm are kept.

What `dart_keep` reads (from prefill's `LayerProbe` at layer K, sequence of length L):
    hidden f32[B, L, D]: `final_norm(h)`, h the input of layer K (output of layer K-1)
        (`probe.next_hidden_normed()`);
    keys f32[B, L, K*H] or [B, L, K, H]: post-RoPE keys of layer K-1 (`probe.keys()`;
        repeat_kv is not needed, it scales every L1 norm by G);
    vision_index i32[B, n]: sequence index of each vision token (ascending);
    seq_mask bool[B, L] (optional): real tokens, so padding never becomes a text pivot.
Text pivots are taken among the tokens after the last vision token.

Packed AnyRes / video input (`dart_keep_packed`): the whole packed buffer is the image span;
padding slots are never pivots nor chosen, `image_newline` slots are kept and counted in k
(the house rule of `select.masked_select`), and each example meets its own budget of real
tokens with its own quotas.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from covipal_jax.pruning.base import InLLMMethod, InLLMResult
from covipal_jax.pruning.probe_select import is_packed, probe_masks
from covipal_jax.pruning.registry import register
from covipal_jax.pruning.select import masked_topk, topk_indices

Array = jax.Array

DEFAULT_LAYER = 2
PIVOT_IMAGE_TOKENS = 4
PIVOT_TEXT_TOKENS = 4


def official_keep(max_num_trunction: int, pivot_image_token: int = PIVOT_IMAGE_TOKENS,
                  pivot_text_token: int = PIVOT_TEXT_TOKENS) -> int:
    """The number of image tokens official DART keeps for a given `max_num_trunction`."""
    p = pivot_image_token + pivot_text_token
    return pivot_image_token + p * (max_num_trunction // p)


def pivot_quotas(k: int, num_image_pivots: int = PIVOT_IMAGE_TOKENS,
                 num_text_pivots: int = PIVOT_TEXT_TOKENS) -> tuple[int, list[int]]:
    """(image pivots actually used, tokens each pivot chooses), pivots in visiting order."""
    if k < 1:
        raise ValueError(f"k={k} must be >= 1")
    p_img = min(num_image_pivots, k)
    p = p_img + num_text_pivots
    rest = k - p_img
    if rest and p == 0:
        raise ValueError("DART needs at least one pivot")
    base, extra = divmod(rest, p) if p else (0, 0)
    return p_img, [base + (1 if i < extra else 0) for i in range(p)]


def _l1(x: Array) -> Array:
    x = x.astype(jnp.float32)
    return jnp.sum(jnp.abs(x.reshape(x.shape[0], x.shape[1], -1)), axis=-1)


def select_in_llm(hidden: Array, keys: Array, image_start: Array, n_v: int, k: int, *,
                  seq_mask: Array | None = None,
                  num_image_pivots: int = PIVOT_IMAGE_TOKENS,
                  num_text_pivots: int = PIVOT_TEXT_TOKENS) -> Array:
    """`dart_keep` for one contiguous image span [image_start, image_start + n_v)."""
    vision_index = image_start.astype(jnp.int32)[:, None] + jnp.arange(n_v, dtype=jnp.int32)
    return dart_keep(hidden, keys, vision_index, k, seq_mask=seq_mask,
                     num_image_pivots=num_image_pivots, num_text_pivots=num_text_pivots)


def dart_keep(hidden: Array, keys: Array, vision_index: Array, k: int, *,
              seq_mask: Array | None = None, num_image_pivots: int = PIVOT_IMAGE_TOKENS,
              num_text_pivots: int = PIVOT_TEXT_TOKENS) -> Array:
    """DART's kept vision tokens, i32[B, k] ascending in [0, n) (see the module docstring)."""
    b, length = hidden.shape[:2]
    n_v = vision_index.shape[1]
    if not 1 <= k <= n_v:
        raise ValueError(f"k={k} outside [1, n_v={n_v}]")
    p_img, quotas = pivot_quotas(k, num_image_pivots, num_text_pivots)
    vidx = vision_index.astype(jnp.int32)

    # 1. pivots by L1 key norm
    knorm = _l1(keys)                                                   # [B, L]
    img_norm = jnp.take_along_axis(knorm, vidx, axis=1)                 # [B, n_v]
    img_piv = topk_indices(img_norm, p_img)                             # [B, P_i] ascending
    pos = jnp.arange(length)[None, :]
    after = pos > vidx[:, -1:]
    if seq_mask is not None:
        after = after & seq_mask.astype(bool)
    img_piv_seq = jnp.take_along_axis(vidx, img_piv, axis=1)
    if num_text_pivots:
        txt_norm = jnp.where(after, knorm, -jnp.inf)
        txt_piv = topk_indices(txt_norm, num_text_pivots)               # [B, P_t] sequence pos
        piv_seq = jnp.concatenate([img_piv_seq, txt_piv], axis=1)
    else:
        piv_seq = img_piv_seq

    # 2. cosine similarity of every pivot to every image token (final-normed hidden states)
    h = hidden.astype(jnp.float32)
    h = h / jnp.maximum(jnp.linalg.norm(h, axis=-1, keepdims=True), 1e-8)
    h_img = jnp.take_along_axis(h, vidx[..., None], axis=1)             # [B, n_v, D]
    h_piv = jnp.take_along_axis(h, piv_seq[..., None], axis=1)          # [B, P, D]
    cos = jnp.einsum("bpd,bnd->bpn", h_piv, h_img)                      # [B, P, n_v]

    # 3. greedy: each pivot takes its quota of least-similar tokens from the remaining pool
    avail = jnp.ones((b, n_v), bool).at[jnp.arange(b)[:, None], img_piv].set(False)
    chosen = [img_piv]
    for i, q in enumerate(quotas):
        if q == 0:
            continue
        neg = jnp.where(avail, -cos[:, i], -jnp.inf)
        _, sel = jax.lax.top_k(neg, q)
        chosen.append(sel.astype(jnp.int32))
        avail = avail.at[jnp.arange(b)[:, None], sel].set(False)
    kept = jnp.concatenate(chosen, axis=1)
    return jnp.sort(kept, axis=1).astype(jnp.int32)


def dart_keep_packed(hidden: Array, keys: Array, vision_index: Array, k: int, valid: Array,
                     forced: Array, budget: Array, *, seq_mask: Array | None = None,
                     num_image_pivots: int = PIVOT_IMAGE_TOKENS,
                     num_text_pivots: int = PIVOT_TEXT_TOKENS) -> tuple[Array, Array]:
    """`dart_keep` over a packed AnyRes / video buffer (the whole buffer is the image span).

    valid bool[B, n] slots that may be kept (padding / dropped: never pivots, never chosen);
    forced bool[B, n] the `image_newline` slots: kept first and counted in k, neither pivots nor
    in the pool; budget i32[B] tokens example b keeps (<= k). Each example's quotas are
    `pivot_quotas` of its own budget: `budget - P_i - newlines` split over the pivots
    (`(rest // P)` each, one more for the first `rest % P`), the greedy order unchanged.
    Returns (idx i32[B, k] ascending, kept bool[B, k]: False = not seen by the LLM).
    """
    b, length = hidden.shape[:2]
    n_v = vision_index.shape[1]
    if not 1 <= k <= n_v:
        raise ValueError(f"k={k} outside [1, n_v={n_v}]")
    p_img, quotas = pivot_quotas(k, num_image_pivots, num_text_pivots)
    vidx = vision_index.astype(jnp.int32)
    valid, forced = valid.astype(bool), forced.astype(bool) & valid
    cand = valid & ~forced
    rows = jnp.arange(b)[:, None]

    knorm = _l1(keys)
    img_norm = jnp.where(cand, jnp.take_along_axis(knorm, vidx, axis=1), -jnp.inf)
    piv_val, img_piv = jax.lax.top_k(img_norm, p_img)                   # best first
    piv_ok = jnp.isfinite(piv_val)
    after = jnp.arange(length)[None, :] > vidx[:, -1:]
    if seq_mask is not None:
        after = after & seq_mask.astype(bool)
    piv_seq = jnp.take_along_axis(vidx, img_piv, axis=1)
    if num_text_pivots:
        txt_piv = topk_indices(jnp.where(after, knorm, -jnp.inf), num_text_pivots)
        piv_seq = jnp.concatenate([jnp.sort(piv_seq, axis=1), txt_piv], axis=1)
    else:
        piv_seq = jnp.sort(piv_seq, axis=1)

    h = hidden.astype(jnp.float32)
    h = h / jnp.maximum(jnp.linalg.norm(h, axis=-1, keepdims=True), 1e-8)
    h_img = jnp.take_along_axis(h, vidx[..., None], axis=1)
    h_piv = jnp.take_along_axis(h, piv_seq[..., None], axis=1)
    cos = jnp.einsum("bpd,bnd->bpn", h_piv, h_img)                      # [B, P, n]

    chosen = forced.at[rows, img_piv].max(piv_ok)
    n_pivots = len(quotas)
    rest = jnp.maximum(budget.astype(jnp.int32) - jnp.sum(chosen, axis=-1), 0)   # i32[B]
    base, extra = rest // n_pivots, rest % n_pivots
    avail = cand & ~chosen
    for i, q in enumerate(quotas):
        if q == 0:
            continue
        q_b = base + (i < extra).astype(jnp.int32)                      # i32[B] <= q
        val, sel = jax.lax.top_k(jnp.where(avail, -cos[:, i], -jnp.inf), q)
        take = (jnp.arange(q)[None, :] < q_b[:, None]) & jnp.isfinite(val)
        chosen = chosen.at[rows, sel].max(take)
        avail = avail & ~chosen
    rank = chosen.astype(jnp.float32)
    return masked_topk(rank, k, valid, forced, jnp.clip(budget, 1, k))


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class DART(InLLMMethod):
    """DART at layer `layer` (K, default 2) with `pivots` pivots (config `dart_pivots`), split
    evenly into image and text pivots (`max(1, pivots // 2)` each): one stage."""

    name: ClassVar[str] = "dart"
    config_keys: ClassVar[tuple[str, ...]] = ("layer", "dart_pivots:pivots")
    description: ClassVar[str] = "DART: least-duplicated tokens w.r.t. K-norm pivots"
    layer: int = DEFAULT_LAYER
    pivots: int = PIVOT_IMAGE_TOKENS + PIVOT_TEXT_TOKENS

    def select_in_llm(self, probe, k: int, stage: int) -> Array | InLLMResult:
        half = max(1, int(self.pivots) // 2)
        if is_packed(probe):
            valid, forced, budget = probe_masks(probe)
            idx, ok = dart_keep_packed(
                probe.next_hidden_normed(), probe.keys(), probe.vision_index, k, valid, forced,
                budget, seq_mask=probe.seq_mask, num_image_pivots=half, num_text_pivots=half)
            return InLLMResult(kept=idx, valid=ok)
        return dart_keep(probe.next_hidden_normed(), probe.keys(), probe.vision_index, k,
                         seq_mask=probe.seq_mask, num_image_pivots=half, num_text_pivots=half)
