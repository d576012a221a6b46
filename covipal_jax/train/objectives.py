"""Training objectives of the PPM: the attention-guided stage 1 and the soft-pruning stage 2.

Letters: B batch, T text length (the padded prompt + answer), n_v vision tokens, L = T - 1 + n_v
(the unpruned sequence), D LLM width, N query heads, R query rows, V vocab, k = r * n_v.

The LLaVA is frozen; only the PPM is differentiated. A training batch (see
`covipal_jax.data.pipeline`) is `pixels f32[B, H, W, 3]`, `ids i32[B, T]` (left-padded prompt +
answer, one image placeholder), `mask bool[B, T]`, `loss_mask bool[B, T]` (the answer tokens,
end token included) and `weight f32[B]` (0 for padding / unusable rows).

Packed inputs (issue 12): `batch["visual"]` an `inference.visual_inputs.AnyResImage` / `Video`
instead of `pixels` (the placeholder in `ids` is then the image or the video token): the frozen
model packs it into N slots with `valid` / `coords` (`encode_packed`), all N are spliced and the
invalid ones masked out of the sequence (`anyres.mask_invalid_slots`, the LLM sees HF's compact
sequence), the PPM scores the slots with their layout, and every loss, target and budget counts
the real slots only (n_v below is then N; the stage-1 MSE scale is the example's real count).
The static k of a packed bucket is `ObjectiveSpec.k_for(N)` (the keep ratio of k / n_v).
A `MultiImage` (several images per prompt) splices image p's slots at the row's p-th
placeholder (`models.multimodal.splice_packed`, L = T - 1 + N whatever the image count): the
vision slots are then several spans (`Encoded.vis_index`), absent images' slots are invalid
(never a target, never kept), and every text token after an image is a stage-1 query row.

The PPM always sees what it sees at inference: the projected vision tokens H_v and the prompt's
text embeddings (`mask & ids != image & ~loss_mask`: the answer is hidden from it).

Stage 1 (the paper's, arXiv 2508.17243): the target of vision token i is the attention it
receives at the guide layer `l_g`, summed over heads and over a set of query rows, normalized
to sum to 1 per example:

    y_i = sum_{n, q in Q} A^{l_g}[n, q, i] / sum_{j, n, q in Q} A^{l_g}[n, q, j]

Layers [0, l_g) run normally (fused attention, no probabilities); at l_g only the R rows of Q
are recomputed (`Llava.attention_rows`), so the L x L matrix is never built for other layers.
Q (`label_queries`, which the paper leaves illegible):
- "text_after_image": every real token after the image (the question after the placeholder,
  the generation cue, and, with `label_answer_queries`, the teacher-forced answer);
  R = T - 1 rows (the most there can be), the ones before the image masked out.
- "all": every real token of the sequence (R = L); rows that cannot see the image (text before
  it) contribute nothing; vision tokens attending to earlier vision tokens do.
- "last": the last prompt token (the one that predicts the first answer token; FastV's row).
Losses on the PPM scores s (`loss`):
- "mse" (the paper's "MSE between scores and targets"): mean_i (s_i - n_v * y_i)^2. The n_v
  scale makes the targets mean 1 whatever n_v, so the loss scale and the learning rate do not
  depend on the image resolution; the ranking (all top-k needs) is unchanged.
- "kl": KL(y || softmax(s)).
- "pairwise": RankNet over the pairs with y_i > y_j, weighted by y_i - y_j:
  sum w_ij softplus(s_j - s_i) / sum w_ij.
- "listwise": ListMLE (Plackett-Luce likelihood) of the target's top-k order.
Logged: top-k recall@r = |TopK(s, k) & TopK(y, k)| / k (random scores give r on average).

Stage 2 (covipal_jax's design; the paper's objective is not recoverable): pruning made soft
and differentiable. Keep probabilities p = sigmoid(s) enter the frozen LLM as an additive
attention bias log p on every query's logit toward each vision-token key, in every layer
(`Llava.run(bias=)`): p = 1 is the unpruned model, p -> 0 removes the token. Loss on the answer
tokens:

    LM(soft-pruned) + lambda_kl * KL(unpruned || soft-pruned) + lambda_budget * (mean p - r)^2

The teacher (unpruned) logits are computed under `stop_gradient`. The budget term is at most
r^2 (0.0625 at r = 0.25), small next to the LM loss: with lambda_budget = 1 the tiny run's mean
p fell from 0.24 to 0.007 in 100 steps (a random LLM loses little without its vision tokens),
with 10 (the default) it stays at 0.25.
With `stage2_hard`, the forward uses the hard top-k keep set (bias 0 kept / -1e9 pruned) while
the gradient flows through log p (straight-through: bias = log p + stop_gradient(hard -
log p)); pruned tokens then get gradient only from the budget term.
The teacher's guide-layer attention is computed on the way (layers [0, l_g), rows, then
[l_g, N)), so stage 2 logs the same top-k recall.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from covipal_jax.inference import visual_inputs as vi
from covipal_jax.models import anyres
from covipal_jax.models.llava import Llava
from covipal_jax.models.multimodal import image_positions, splice, splice_packed
from covipal_jax.pruning import select
from covipal_jax.pruning.base import parse_keep, resolve_keep

Array = jax.Array

LABEL_QUERIES = ("text_after_image", "all", "last")
STAGE1_LOSSES = ("mse", "kl", "pairwise", "listwise")
HARD_NEG = -1e9  # additive bias of a hard-pruned key (exp underflows to exactly 0)


@dataclasses.dataclass(frozen=True)
class ObjectiveSpec:
    """Static description of one stage's objective (hashable: part of the jit signature)."""

    stage: int = 1
    n_v: int = 1
    k: int = 1
    guide_layer: int = 0
    label_queries: str = "text_after_image"
    label_answer_queries: bool = True
    loss: str = "mse"
    lambda_kl: float = 1.0
    lambda_budget: float = 1.0
    hard: bool = False
    inject_nan_step: int = -1  # fault injection for tests: NaN loss at this global step

    def __post_init__(self):
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage}")
        if self.label_queries not in LABEL_QUERIES:
            raise ValueError(f"train.label_queries must be one of {LABEL_QUERIES}, "
                             f"got {self.label_queries!r}")
        if self.loss not in STAGE1_LOSSES:
            raise ValueError(f"train.loss must be one of {STAGE1_LOSSES}, got {self.loss!r}")
        if not 1 <= self.k <= self.n_v:
            raise ValueError(f"k={self.k} outside [1, n_v={self.n_v}]")

    @property
    def keep_ratio(self) -> float:
        return self.k / self.n_v

    def k_for(self, n: int) -> int:
        """The static k for n vision slots: k itself for n_v, else the same keep ratio."""
        return self.k if n == self.n_v else max(1, min(n, round(self.keep_ratio * n)))

    @classmethod
    def from_config(cls, train_cfg: Any, llava_cfg: Any, stage: int) -> "ObjectiveSpec":
        """From `config.train` (see configs/common.py `train_config`) for one stage."""
        t = train_cfg
        n_v = llava_cfg.num_vision_tokens
        n_layers = llava_cfg.text.num_layers
        lg = int(t.guide_layer)
        if lg < 0:
            lg += n_layers
        if not 0 <= lg < n_layers:
            raise ValueError(f"train.guide_layer={t.guide_layer} outside [0, {n_layers})")
        return cls(stage=int(stage), n_v=n_v, k=resolve_keep(parse_keep(t.keep), n_v),
                   guide_layer=lg,
                   label_queries=t.label_queries,
                   label_answer_queries=bool(t.label_answer_queries), loss=t.loss,
                   lambda_kl=float(t.lambda_kl), lambda_budget=float(t.lambda_budget),
                   hard=bool(t.stage2_hard), inject_nan_step=int(t.get("inject_nan_step", -1)))


@flax.struct.dataclass
class Encoded:
    """The frozen model's inputs for one batch.

    vision f32[B, n_v, D] (H_v); text f32[B, T, D] (H_t); ppm_text_mask bool[B, T];
    seq f32[B, L, D]; seq_mask, is_vis, answer bool[B, L]; positions i32[B, L]; image_pos i32[B]
    (the first vision index); packed inputs only (else None): valid bool[B, n_v], coords
    i32[B, n_v, 3]; several images per prompt only (else None: one span from image_pos):
    vis_index i32[B, n_v] the sequence index of each vision slot.
    """

    vision: Array
    text: Array
    ppm_text_mask: Array
    seq: Array
    seq_mask: Array
    positions: Array
    is_vis: Array
    image_pos: Array
    answer: Array
    valid: Array | None = None
    coords: Array | None = None
    vis_index: Array | None = None

    @property
    def n_v(self) -> int:
        return self.vision.shape[1]


def visual_from_batch(cfg: Any, batch: dict) -> Any:
    """The packed visual input of a batch (None for single images): `batch["visual"]`, or the
    pipeline's flat keys (`data.packed_rows`): `anyres_pixels f32[B, C, S, S, 3]` +
    `anyres_plan i32[B, 8]` -> `AnyResImage` (capacity of the C-view bucket), `frames
    f32[B, F, S, S, 3]` -> `Video`, `multi_pixels f32[B, P, C, S, S, 3]` + `multi_plan
    i32[B, P, 8]` + `image_valid bool[B, P]` -> `MultiImage`."""
    if batch.get("visual") is not None:
        return batch["visual"]
    if "anyres_pixels" in batch:
        px = batch["anyres_pixels"]
        return vi.AnyResImage(px, batch["anyres_plan"], anyres.bucket_capacity(cfg, px.shape[1]))
    if "multi_pixels" in batch:
        px = batch["multi_pixels"]
        return vi.MultiImage(px, batch["multi_plan"], batch["image_valid"],
                             anyres.bucket_capacity(cfg, px.shape[2]))
    if "frames" in batch:
        return vi.Video(batch["frames"])
    return None


def encode(model: Llava, params: Any, batch: dict) -> Encoded:
    """Tower + projector + embeddings + splice (contiguous positions), all n_v tokens
    (all N slots of a packed `batch["visual"]`, the invalid ones masked)."""
    cfg = model.cfg
    ids, mask, loss_mask = batch["ids"], batch["mask"], batch["loss_mask"]
    valid = coords = vis_index = None
    visual = visual_from_batch(cfg, batch)
    if visual is not None:
        token = vi.placeholder_id(cfg, visual)
        vision, valid, coords = vi.encode_packed(model, params, visual)
        text = model.apply(params, jnp.where(ids == token, cfg.image_token_id, ids),
                           method=Llava.embed_text)
        image_pos = jnp.argmax(ids == token, axis=-1).astype(jnp.int32)
        if isinstance(visual, vi.MultiImage):  # image p's slots at the p-th placeholder
            n = vision.shape[1]
            img = jnp.broadcast_to(vi.slot_images(cfg, visual, n)[None], valid.shape)
            seq, seq_mask, positions, is_vis = splice_packed(
                text, mask, image_positions(ids, token, visual.max_images),
                vi.image_counts(visual), vision, img, valid)
            vis_index = jnp.argsort(~is_vis, axis=-1, stable=True)[:, :n].astype(jnp.int32)
            image_pos = vis_index[:, 0]
    else:
        token = cfg.image_token_id
        _, vision = model.apply(params, batch["pixels"], False, method=Llava.encode_image)
        text = model.apply(params, ids, method=Llava.embed_text)
        image_pos = image_positions(ids, cfg.image_token_id)
    n_v = vision.shape[1]
    if vis_index is None:
        idx = jnp.broadcast_to(jnp.arange(n_v, dtype=jnp.int32), vision.shape[:2])
        seq, seq_mask, positions, is_vis = splice(text, mask, image_pos, vision, idx,
                                                  "contiguous", n_v)
        if valid is not None:
            seq_mask, positions = anyres.mask_invalid_slots(seq_mask, is_vis, image_pos, valid)
    # Answer tokens all sit after the image(s): text index t > p lands at sequence index
    # t + n_v - 1 (several images: `splice_packed` keeps L = T - 1 + n_v), so a shifted copy
    # of loss_mask marks them (loss_mask is False up to the last placeholder).
    b = ids.shape[0]
    answer = jnp.concatenate([jnp.zeros((b, n_v - 1), bool), loss_mask.astype(bool)], axis=1)
    ppm_text_mask = mask & (ids != token) & ~loss_mask.astype(bool)
    return Encoded(vision, text, ppm_text_mask, seq, seq_mask, positions, is_vis, image_pos,
                   answer & seq_mask, valid, coords, vis_index)


def query_rows(enc: Encoded, n_v: int, label_queries: str,
               include_answer: bool = True) -> tuple[Array, Array]:
    """The query rows Q of the stage-1 target: (rows i32[B, R], valid bool[B, R])."""
    b, length = enc.seq_mask.shape
    allowed = enc.seq_mask & (include_answer | ~enc.answer)
    if label_queries == "text_after_image" and enc.vis_index is not None:
        # several image spans: the T - 1 text rows, those after the first image
        rows = jnp.argsort(enc.is_vis, axis=-1, stable=True)[:, :length - n_v]
        valid = (rows > enc.image_pos[:, None]) & jnp.take_along_axis(allowed, rows, 1)
    elif label_queries == "text_after_image":
        r = length - n_v                     # = T - 1: all text after the image when p = 0
        rows = jnp.broadcast_to(n_v + jnp.arange(r, dtype=jnp.int32), (b, r))
        valid = (rows >= (enc.image_pos + n_v)[:, None]) & jnp.take_along_axis(allowed, rows, 1)
    elif label_queries == "all":
        rows = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
        valid = allowed
    elif label_queries == "last":
        n_answer = jnp.sum(enc.answer, axis=1).astype(jnp.int32)
        rows = (length - 1 - n_answer)[:, None]
        valid = jnp.take_along_axis(enc.seq_mask, rows, 1)
    else:
        raise ValueError(f"label_queries must be one of {LABEL_QUERIES}, got {label_queries!r}")
    return rows.astype(jnp.int32), valid


def labels_from_rows(model: Llava, params: Any, h: Array, enc: Encoded,
                     spec: ObjectiveSpec) -> tuple[Array, Array]:
    """Stage-1 targets from the INPUT h f32[B, L, D] of the guide layer.

    Returns (labels f32[B, n_v], summing to 1 per example; valid bool[B]: some query row saw
    the image).
    """
    n_v = enc.n_v
    rows, valid = query_rows(enc, n_v, spec.label_queries, spec.label_answer_queries)
    probs = model.apply(params, h, method=Llava.attention_rows, layer=spec.guide_layer,
                        positions=enc.positions, key_valid=enc.seq_mask, rows=rows)
    if enc.vis_index is None:
        vis = select.slice_span(probs, enc.image_pos, n_v, axis=3)     # [B, N, R, n_v]
    else:
        vis = jnp.take_along_axis(probs, enc.vis_index[:, None, None, :], axis=3)
    received = jnp.einsum("bnri,br->bi", vis, valid.astype(vis.dtype))
    total = jnp.sum(received, axis=-1, keepdims=True)
    ok = total[:, 0] > 0
    labels = received / jnp.where(total > 0, total, 1.0)
    return jax.lax.stop_gradient(labels), ok


def guide_labels(model: Llava, params: Any, enc: Encoded, spec: ObjectiveSpec
                 ) -> tuple[Array, Array, Array]:
    """Run layers [0, l_g) and compute the targets. Returns (labels, valid, h at l_g)."""
    h, _ = model.apply(params, enc.seq, method=Llava.run, positions=enc.positions,
                       key_valid=enc.seq_mask, start=0, stop=spec.guide_layer)
    labels, ok = labels_from_rows(model, params, h, enc, spec)
    return labels, ok, h


# ----------------------------------------------------------------------------- stage 1 losses

def _wmean(x: Array, w: Array) -> Array:
    """Weighted mean over the batch; 0 when every weight is 0 (never NaN from a 0 row)."""
    x = jnp.where(w > 0, x, 0.0)
    return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1e-9)


def stage1_per_example(scores: Array, labels: Array, kind: str, k: int,
                       valid: Array | None = None) -> Array:
    """Per-example stage-1 loss f32[B] of scores f32[B, n_v] against labels f32[B, n_v].

    valid bool[B, n_v] (packed inputs): only the real slots count (the MSE's scale is the
    example's real count; invalid slots have label 0 and any score, -inf included)."""
    n_v = scores.shape[-1]
    if valid is not None:
        cnt = jnp.maximum(jnp.sum(valid, axis=-1), 1).astype(jnp.float32)
        if kind == "mse":
            s = jnp.where(valid, scores, 0.0)
            err = jnp.where(valid, (s - cnt[:, None] * labels) ** 2, 0.0)
            return jnp.sum(err, axis=-1) / cnt
        if kind == "pairwise":
            pair_ok = valid[:, :, None] & valid[:, None, :]
            s = jnp.where(valid, scores, 0.0)
            gap = labels[:, :, None] - labels[:, None, :]
            w = jnp.where(pair_ok, jnp.maximum(gap, 0.0), 0.0)
            pair = jax.nn.softplus(s[:, None, :] - s[:, :, None])
            return jnp.sum(w * pair, axis=(1, 2)) / jnp.maximum(jnp.sum(w, axis=(1, 2)), 1e-12)
        scores = jnp.where(valid, scores, -1e30)  # kl / listwise: exp() of a padding slot is 0
        labels = jnp.where(valid, labels, 0.0)
    if kind == "mse":
        return jnp.mean((scores - n_v * labels) ** 2, axis=-1)
    if kind == "kl":
        logq = jax.nn.log_softmax(scores, axis=-1)
        return jnp.sum(jax.scipy.special.xlogy(labels, labels) - labels * logq, axis=-1)
    if kind == "pairwise":
        gap = labels[:, :, None] - labels[:, None, :]                    # y_i - y_j
        w = jnp.maximum(gap, 0.0)
        pair = jax.nn.softplus(scores[:, None, :] - scores[:, :, None])  # softplus(s_j - s_i)
        return jnp.sum(w * pair, axis=(1, 2)) / jnp.maximum(jnp.sum(w, axis=(1, 2)), 1e-12)
    if kind == "listwise":
        order = jnp.argsort(-labels, axis=-1, stable=True)
        s = jnp.take_along_axis(scores, order, axis=-1)
        tail = jax.lax.cumlogsumexp(s, axis=s.ndim - 1, reverse=True)
        return jnp.mean((tail - s)[:, :k], axis=-1)
    raise ValueError(f"unknown stage-1 loss {kind!r}")


def topk_recall(scores: Array, labels: Array, k: int) -> Array:
    """f32[B]: |TopK(scores) & TopK(labels)| / k."""
    n_v = scores.shape[-1]
    a = select.keep_mask(select.topk_indices(scores, k), n_v)
    b = select.keep_mask(select.topk_indices(labels, k), n_v)
    return jnp.sum(a & b, axis=-1).astype(jnp.float32) / k


# ----------------------------------------------------------------------------- stage 2 pieces

def vision_key_bias(values: Array, enc: Encoded) -> Array:
    """Scatter per-vision-token values f32[B, n_v] onto the sequence keys: f32[B, L], 0 on text."""
    n_v = values.shape[-1]
    if enc.vis_index is None:
        j = jnp.arange(enc.seq.shape[1], dtype=jnp.int32)[None]
        src = jnp.clip(j - enc.image_pos[:, None], 0, n_v - 1)
    else:  # the m-th vision key of the sequence is slot m
        src = jnp.clip(jnp.cumsum(enc.is_vis, axis=1) - 1, 0, n_v - 1).astype(jnp.int32)
    return jnp.where(enc.is_vis, jnp.take_along_axis(values, src, axis=1), 0.0)


def keep_bias(scores: Array, enc: Encoded, k: int, hard: bool = False,
              kept: Array | None = None) -> tuple[Array, Array]:
    """The stage-2 attention bias f32[B, L] and keep probabilities p = sigmoid(s) f32[B, n_v].

    Soft: log p on vision keys. Hard (straight-through): forward 0 on the top-k / HARD_NEG on
    the others, gradient of log p.
    """
    logp = jax.nn.log_sigmoid(scores)
    if hard:
        if kept is None:  # bool[B, n_v] hard keep set (default: top-k of the scores)
            kept = select.keep_mask(select.topk_indices(scores, k), scores.shape[-1])
        hard_bias = jnp.where(kept, 0.0, HARD_NEG)
        logp = logp + jax.lax.stop_gradient(hard_bias - logp)
    return vision_key_bias(logp, enc), jax.nn.sigmoid(scores)


def answer_logits(model: Llava, params: Any, h: Array, n_v: int) -> Array:  # n_v: slots
    """Logits of the rows that predict text tokens 1..T-1: f32[B, T-1, V].

    Sequence row j predicts token j + 1; text token t > p sits at row t + n_v - 1, so rows
    n_v - 1 .. L - 2 predict ids[:, 1:] (only answer tokens are weighted).
    """
    length = h.shape[1]
    return model.apply(params, h[:, n_v - 1:length - 1], method=Llava.logits)


def answer_weights(batch: dict) -> Array:
    """f32[B, T-1]: 1 on answer targets ids[:, 1:] of usable rows."""
    w = batch["loss_mask"][:, 1:].astype(jnp.float32) * batch["weight"][:, None]
    return w * batch["mask"][:, 1:]


# ----------------------------------------------------------------------------- full objective

@flax.struct.dataclass
class Prepared:
    """Everything of a step that does not depend on the PPM params (no gradient flows here)."""

    enc: Encoded
    labels: Array          # f32[B, n_v]
    label_ok: Array        # bool[B]
    teacher_logp: Array | None = None  # f32[B, T-1, V] (stage 2)


def prepare(model: Llava, params: Any, batch: dict, spec: ObjectiveSpec) -> Prepared:
    """Frozen-model work: encode, stage-1 targets, and for stage 2 the unpruned teacher."""
    enc = encode(model, params, batch)
    labels, ok, h = guide_labels(model, params, enc, spec)
    if spec.stage == 1:
        return Prepared(enc, labels, ok)
    h, _ = model.apply(params, h, method=Llava.run, positions=enc.positions,
                       key_valid=enc.seq_mask, start=spec.guide_layer)
    teacher = jax.nn.log_softmax(answer_logits(model, params, h, enc.n_v), axis=-1)
    return Prepared(enc, labels, ok, jax.lax.stop_gradient(teacher))


def ppm_scores(ppm_module: Any, ppm_params: Any, enc: Encoded, rng: Array | None = None,
               deterministic: bool = True) -> Array:
    """PPM scores f32[B, n_v] of the batch's H_v and the prompt's text (answer hidden);
    packed inputs: with their layout, -inf on invalid slots."""
    rngs = None if deterministic or rng is None else {"dropout": rng}
    kw = {} if enc.valid is None else {"valid": enc.valid}
    if enc.coords is not None and ppm_module.cfg.position == "layout":
        kw["coords"] = enc.coords
    return ppm_module.apply({"params": ppm_params}, enc.vision, enc.text, enc.ppm_text_mask,
                            deterministic=deterministic, rngs=rngs, **kw)


def loss_fn(ppm_params: Any, *, ppm_module: Any, model: Llava, params: Any, prep: Prepared,
            batch: dict, spec: ObjectiveSpec, step: Array, rng: Array | None = None,
            deterministic: bool = True) -> tuple[Array, dict]:
    """The scalar loss (mean over the global batch) and metrics, differentiable in ppm_params."""
    enc = prep.enc
    k = spec.k_for(enc.n_v)
    scores = ppm_scores(ppm_module, ppm_params, enc, rng, deterministic)
    w_ex = batch["weight"].astype(jnp.float32)
    w_lab = w_ex * prep.label_ok
    recall = _wmean(topk_recall(scores, prep.labels, k), w_lab)
    metrics = {"recall": recall, "examples": jnp.sum(w_ex)}
    if spec.stage == 1:
        loss = _wmean(stage1_per_example(scores, prep.labels, spec.loss, k, enc.valid), w_lab)
    else:
        if enc.valid is not None:  # hard top-k on the -inf-masked scores; soft p on real slots
            kept = select.keep_mask(select.topk_indices(scores, k), enc.n_v)
            scores = jnp.where(enc.valid, scores, 0.0)
            bias, p = keep_bias(scores, enc, k, spec.hard, kept=kept)
            real = enc.valid.astype(jnp.float32)
            mean_p = jnp.sum(p * real, -1) / jnp.maximum(jnp.sum(real, -1), 1.0)
        else:
            bias, p = keep_bias(scores, enc, k, spec.hard)
            mean_p = jnp.mean(p, axis=-1)
        h, _ = model.apply(params, enc.seq, method=Llava.run, positions=enc.positions,
                           key_valid=enc.seq_mask, bias=bias)
        logits = answer_logits(model, params, h, enc.n_v)
        logq = jax.nn.log_softmax(logits, axis=-1)
        w = answer_weights(batch)
        denom = jnp.maximum(jnp.sum(w), 1e-9)
        targets = batch["ids"][:, 1:]
        nll = -jnp.take_along_axis(logq, targets[..., None], axis=-1)[..., 0]
        lm = jnp.sum(nll * w) / denom
        t = prep.teacher_logp
        kl_tok = jnp.sum(jnp.exp(t) * (t - logq), axis=-1)
        kl = jnp.sum(jnp.where(w > 0, kl_tok, 0.0) * w) / denom
        budget = _wmean((mean_p - spec.keep_ratio) ** 2, w_ex)
        loss = lm + spec.lambda_kl * kl + spec.lambda_budget * budget
        metrics.update(lm=lm, kl=kl, budget=budget, keep_prob=_wmean(mean_p, w_ex),
                       answer_tokens=jnp.sum(w))
    if spec.inject_nan_step >= 0:
        loss = jnp.where(step == spec.inject_nan_step, jnp.nan, loss)
    metrics["loss"] = loss
    return loss, metrics
