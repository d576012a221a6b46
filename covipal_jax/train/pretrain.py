"""Full-model training of a small LLaVA from scratch (the demo's base model), answer-only LM loss.

Every parameter trains (vision tower, projector, decoder), through the same `Llava` code path the
real checkpoints run: `Llava.__call__` (tower -> projector -> splice at the image placeholder ->
decoder -> logits). Examples are `text.encode_example` sequences (prompt + answer, left-padded to
`max_len`); the loss is the token cross-entropy on the answer tokens (the answer word and the end
token), nothing on the prompt.

Letters: B batch, T text length (`max_len`), n_v vision tokens, L = T - 1 + n_v, V vocab.

    state = init_state(model, params, tx)
    step = jax.jit(make_train_step(model, tx), donate_argnums=0)
    state, metrics = step(state, batch)        # batch: pixels f32[B, H, W, 3], ids, mask,
                                               #        loss_mask (T), weight f32[B]

`pretrain(...)` runs the loop with a tqdm bar, evaluates every `eval_every` steps with a caller's
`evaluate(params) -> accuracy` and stops early once `target` is reached (deterministic: the same
seed gives the same batches, the same steps and the same stopping point).
"""
from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from covipal_jax.data import image as image_lib
from covipal_jax.data import text as text_lib
from covipal_jax.models.llava import Llava

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Hyperparameters of the full-model training (see configs/demo.py `pretrain`)."""

    steps: int = 1000            # the most steps; fewer when `target` is reached
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 50
    end_lr_ratio: float = 0.05
    weight_decay: float = 0.05
    clip_norm: float = 1.0
    b2: float = 0.98
    eval_every: int = 100        # 0: evaluate only at the end
    target: float = 1.1          # stop once evaluate(params) >= target (> 1: never)
    min_steps: int = 0           # never stop before this many steps
    seed: int = 0
    init: str = "fan_in"         # "fan_in": `fan_in_init` (from scratch); "as_is": keep params

    @classmethod
    def from_config(cls, c: Mapping[str, Any]) -> "PretrainConfig":
        d = dict(c.to_dict() if hasattr(c, "to_dict") else c)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# ----------------------------------------------------------------------------- data

@dataclasses.dataclass
class EncodedSet:
    """A split as fixed-shape arrays: images uint8[N, H, W, 3]; ids i32[N, T]; mask, loss_mask
    bool[N, T] (`encode_example`, left-padded); weight f32[N] (0: did not fit `max_len`)."""

    images: np.ndarray
    ids: np.ndarray
    mask: np.ndarray
    loss_mask: np.ndarray
    weight: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def trim_padding(self) -> "EncodedSet":
        """The same set without the leading columns that are padding in every row.

        Rows are left-padded and positions come from `cumsum(mask)` (`multimodal.splice`), so
        dropping all-padding columns leaves every loss term unchanged (up to float summation
        order) while the step runs on a shorter sequence: the demo's multi-turn rows fill at
        most 68 of `train_max_len` = 84 tokens (L = 131 instead of 147, ~9% per step).
        """
        used = self.mask.any(axis=0)
        first = int(np.argmax(used)) if used.any() else self.ids.shape[1] - 1
        if first == 0:
            return self
        return EncodedSet(self.images, self.ids[:, first:], self.mask[:, first:],
                          self.loss_mask[:, first:], self.weight)


def encode_set(images: np.ndarray, questions: Sequence[str], answers: Sequence[str], *,
               tokenizer: text_lib.Tokenizer, template: str, max_len: int) -> EncodedSet:
    """Tokenize (prompt + answer) pairs; rows that do not fit `max_len` get weight 0."""
    n = len(questions)
    ids = np.full((n, max_len), tokenizer.pad_id, np.int32)
    mask = np.zeros((n, max_len), bool)
    loss_mask = np.zeros((n, max_len), bool)
    weight = np.zeros((n,), np.float32)
    for i, (q, a) in enumerate(zip(questions, answers)):
        row = text_lib.encode_example(tokenizer, q, a, template=template, max_len=max_len)
        if row is None:
            ids[i, -1] = tokenizer.image_token_id  # a well-formed row of weight 0
            mask[i, -1] = True
            continue
        ids[i], mask[i], loss_mask[i] = row["ids"], row["mask"], row["loss_mask"]
        weight[i] = 1.0
    return EncodedSet(np.asarray(images), ids, mask, loss_mask, weight)


def pixels(images: np.ndarray, processor: image_lib.ImageProcessorConfig) -> np.ndarray:
    """uint8[B, H, W, 3] -> the tower's f32[B, S, S, 3] (the processor of the checkpoint)."""
    return image_lib.preprocess(list(images), processor)


def batch_at(data: EncodedSet, step: int, batch_size: int, seed: int,
             processor: image_lib.ImageProcessorConfig) -> dict[str, np.ndarray]:
    """The batch of global step `step`: epoch-wise permutations seeded by (seed, epoch)."""
    per_epoch = len(data) // batch_size
    if per_epoch < 1:
        raise ValueError(f"{len(data)} examples < batch size {batch_size}")
    epoch, slot = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(len(data))
    idx = np.sort(perm[slot * batch_size:(slot + 1) * batch_size])
    return {"pixels": pixels(data.images[idx], processor), "ids": data.ids[idx],
            "mask": data.mask[idx], "loss_mask": data.loss_mask[idx],
            "weight": data.weight[idx]}


# ----------------------------------------------------------------------------- init

def _fan_in(path: tuple[str, ...], shape: tuple[int, ...]) -> int:
    """Input size of a kernel: stacked layers carry a leading `layers` axis; attention output
    kernels are [N, H, D]; the patch conv is HWIO."""
    lead = 1 if "stack" in path else 0
    name = path[-2] if len(path) > 1 else ""
    if name == "patch_embed":
        return int(np.prod(shape[:3]))
    if name == "o":
        return int(np.prod(shape[lead:lead + 2]))
    return int(shape[lead])


def sincos_2d(grid: int, dim: int, cls: bool) -> np.ndarray:
    """f32[(cls) + grid * grid, dim]: MAE-style fixed 2D sin-cos position table (half the
    channels for the row, half for the column), unit variance; the CLS row is 0."""
    if dim % 4:
        raise ValueError(f"sin-cos positions need a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / (grid ** (np.arange(quarter) / max(quarter - 1, 1)))  # periods 2pi..2pi*grid
    r, c = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    parts = []
    for coord in (r.reshape(-1), c.reshape(-1)):
        ang = coord[:, None] * omega[None] * 0.5
        parts += [np.sin(ang), np.cos(ang)]
    table = np.concatenate(parts, axis=1).astype(np.float32) * np.sqrt(2.0)
    if cls:
        table = np.concatenate([np.zeros((1, dim), np.float32), table])
    return table


def fan_in_init(params: Any, rng: Array, *, embed_std: float = 1.0,
                pos_scale: float = 0.5) -> Any:
    """Re-draw a freshly initialized LLaVA for training from scratch at small width.

    `init_params` draws every kernel from N(0, 0.02^2), the convention of large pretrained
    models; at width 64-128 that makes attention logits ~0 and the first phase of training a
    long plateau. Here kernels get N(0, 1 / fan_in) (LeCun normal), token embeddings
    N(0, embed_std^2) (unit RMS, like the layer outputs they are summed with), and the ViT's
    position table starts as a 2D sin-cos table (`sincos_2d`, times `pos_scale`; still
    trained), so row and column are linearly readable from the start (position questions).
    Norm scales and biases are left as they are.
    """
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    treedef = jax.tree_util.tree_structure(params)
    keys = jax.random.split(rng, len(flat))
    out = []
    for key, (path, x) in zip(keys, flat):
        names = tuple(str(getattr(k, "key", k)) for k in path)
        leaf = names[-1]
        if leaf == "pos_embedding" and "vision_tower" in names:
            n_pos, dim = x.shape
            grid = int(round(np.sqrt(n_pos)))
            cls = grid * grid != n_pos
            if cls:
                grid = int(round(np.sqrt(n_pos - 1)))
            out.append(jnp.asarray(sincos_2d(grid, dim, cls) * pos_scale, x.dtype))
            continue
        if leaf == "kernel" and x.ndim >= 2:
            std = 1.0 / np.sqrt(_fan_in(names, x.shape))
        elif leaf == "embedding":
            std = embed_std
        elif leaf == "class_embedding":
            std = pos_scale
        else:
            out.append(x)
            continue
        out.append((jax.random.normal(key, x.shape, jnp.float32) * std).astype(x.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


# ----------------------------------------------------------------------------- the step

def answer_loss(model: Llava, params: Any, batch: Mapping[str, Array]) -> tuple[Array, dict]:
    """Mean cross-entropy over the answer tokens of the batch, and token accuracy.

    Row j of the spliced sequence predicts token j + 1; text token t > (image index) sits at
    row t + n_v - 1, so rows n_v - 1 .. L - 2 predict ids[:, 1:] (the answer lies after the
    image, so only those rows are weighted).
    """
    ids = batch["ids"]
    logits, _ = model.apply(params, batch["pixels"], ids, batch["mask"])
    n_v = logits.shape[1] - ids.shape[1] + 1
    logits = logits[:, n_v - 1:-1].astype(jnp.float32)                  # [B, T-1, V]
    return answer_nll(logits, batch)


def answer_nll(logits: Array, batch: Mapping[str, Array]) -> tuple[Array, dict]:
    """logits f32[B, T-1, V] (row j predicts ids[:, j + 1]) -> (mean cross-entropy over the
    answer tokens (`loss_mask` & `mask`, times the row `weight`), {"loss", "token_acc"})."""
    ids = batch["ids"]
    targets = ids[:, 1:]
    w = (batch["loss_mask"][:, 1:] & batch["mask"][:, 1:]).astype(jnp.float32)
    w = w * batch["weight"][:, None]
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    denom = jnp.maximum(jnp.sum(w), 1.0)
    loss = jnp.sum(nll * w) / denom
    acc = jnp.sum((jnp.argmax(logits, -1) == targets) * w) / denom
    return loss, {"loss": loss, "token_acc": acc}


def make_optimizer(cfg: PretrainConfig) -> tuple[optax.GradientTransformation, Callable]:
    """AdamW (decay on matrices only), linear warmup + cosine, global-norm clipping."""
    warmup = min(cfg.warmup_steps, max(cfg.steps - 1, 0))
    sched = optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, warmup, max(cfg.steps, warmup + 1), cfg.lr * cfg.end_lr_ratio)
    decay = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm),
                     optax.adamw(sched, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay))
    return tx, sched


def init_state(params: Any, tx: optax.GradientTransformation) -> dict:
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def make_train_step(model: Llava, tx: optax.GradientTransformation):
    """(state, batch) -> (state, metrics); jit it with `donate_argnums=0`."""

    def step(state, batch):
        (_, metrics), grads = jax.value_and_grad(
            lambda p: answer_loss(model, p, batch), has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics["grad_norm"] = optax.global_norm(grads)
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    return step


# ----------------------------------------------------------------------------- the loop

@dataclasses.dataclass
class PretrainResult:
    params: Any
    steps: int                     # steps actually run
    history: list[dict]            # one record per evaluation: step, loss, accuracy, seconds
    reached_target: bool
    seconds: float


def pretrain(model: Llava, params: Any, data: EncodedSet, cfg: PretrainConfig, *,
             processor: image_lib.ImageProcessorConfig,
             evaluate: Callable[[Any], float] | None = None,
             log: Callable[[str], None] | None = None, progress: bool = True
             ) -> PretrainResult:
    """Train every parameter of `model` on `data`; see the module docstring."""
    from tqdm import tqdm

    log = log or (lambda s: print(s, flush=True))
    tx, _ = make_optimizer(cfg)
    if cfg.init == "fan_in":
        params = fan_in_init(params, jax.random.key(cfg.seed))
    elif cfg.init != "as_is":
        raise ValueError(f"pretrain.init must be fan_in | as_is, got {cfg.init!r}")
    params = jax.tree.map(jnp.array, params)  # own copies: the step donates its state
    state = init_state(params, tx)
    step_fn = jax.jit(make_train_step(model, tx), donate_argnums=0)
    history: list[dict] = []
    t0 = time.perf_counter()
    reached = False
    losses: list[float] = []
    bar = tqdm(total=cfg.steps, desc="pretrain", disable=not progress, file=sys.stderr,
               dynamic_ncols=True, leave=False)
    step = 0
    try:
        while step < cfg.steps:
            batch = batch_at(data, step, cfg.batch_size, cfg.seed, processor)
            state, metrics = step_fn(state, batch)
            step += 1
            bar.update(1)
            if step % 10 == 0 or step == cfg.steps:
                losses.append(float(metrics["loss"]))
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
            due = cfg.eval_every and step % cfg.eval_every == 0
            if evaluate is not None and (due or step == cfg.steps):
                acc = float(evaluate(state["params"]))
                rec = {"step": step, "loss": float(metrics["loss"]), "accuracy": acc,
                       "seconds": time.perf_counter() - t0}
                history.append(rec)
                log(f"pretrain step {step}: loss {rec['loss']:.4f}, held-out accuracy "
                    f"{acc:.4f} ({rec['seconds']:.0f} s)")
                if acc >= cfg.target and step >= cfg.min_steps:
                    reached = True
                    break
    finally:
        bar.close()
    return PretrainResult(state["params"], step, history, reached, time.perf_counter() - t0)
