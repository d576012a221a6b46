"""Suite `ov` of the benchmark (`bench.py`): LLaVA-OneVision-7B widths on one packed AnyRes image.

Letters: B batch, T text length, C views of the image (its crop bucket: base view + crops),
g tower grid side (g*g tokens per view), N packed vision tokens, k kept, L = T - 1 + k, D width.

The model is `Options.ov_config` (default `configs/llava_ov_7b.py`: SigLIP-so400m/14-384 +
Qwen2-7B) at the bench's reduced decoder depth, f32. The image is square and tiled
rows x cols = C - 1 crops (C = `ov_views`, default 10: 3 x 3 crops), so every one of its
N = g*g + (rows*g) * (cols*g + 1) packed slots is real (7,371 for OneVision-7B: the 10-view
bucket of `models/anyres.py`). What is timed, interleaved with the peer as the other suites:
- LLM: N projected tokens (random, f32[B, N, D]) fed straight to the PPM (pruned rows) and to
  the LLM prefill (splice + decoder into a KV cache + last logits), as the `next` suite does;
  the peer (`LlavaOnevisionForConditionalGeneration`, sdpa, the same weights) runs its
  language model over the same kept tokens spliced the same way.
- Vision, by default estimated: C x the measured single-view tower + projector time (ours and
  the peer's; `vision_source: "estimated"`; the packing itself is a gather). With `ov_vision`
  (`--full`, `--quick`) it is measured on the real packed path instead: ours
  `visual_inputs.encode_packed` on an `AnyResImage` (tower on every view, projector, unpadding,
  newlines), the peer's `get_image_features` (the same, HF's packing); and end to end ours
  the jitted `prefill.prefill` on that `AnyResImage` (its PPM sees the packed layout: a global
  top-k that always keeps the newlines) vs the peer's tower + packing + the tokens OUR prefill
  kept + prefill, with the next-token logits compared (`parity_rel`).
- `ov_vocab` (default 32,000; 0 = the config's 152,064) shrinks the vocabulary of both sides
  so that ours and the peer's weights fit in memory together: the prefill embeds T ids and
  projects one position, so the vocabulary adds ~2 x D x V FLOPs (< 0.02% here) but
  2 x V x D x 4 bytes per side (4.4 GB at the full vocabulary).
FLOPs: the LLM and PPM as compiled (unrolled layers), the tower C x one view.
"""
from __future__ import annotations

import gc
import math
import time
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from covipal_jax.inference import visual_inputs as vi
from covipal_jax.inference.prefill import prefill
from covipal_jax.models import anyres
from covipal_jax.models.config import LlavaConfig
from covipal_jax.models.llava import init_params
from covipal_jax.pruning import NoneMethod, PPMMethod
from covipal_jax.pruning import ppm as ppm_lib
from covipal_jax.pruning.base import resolve_keep
from covipal_jax.tools.bench_programs import FlopCounter, Programs, make_inputs
from covipal_jax.tools.bench_report import _derive
from covipal_jax.tools.bench_rows import LlmRows, finish_rows
from covipal_jax.tools.bench_timing import clocked, interleaved
from covipal_jax.weights.ppm_io import init_ppm

if TYPE_CHECKING:
    from covipal_jax.tools.bench_run import Options


def crop_layout(views: int) -> tuple[int, int]:
    """(rows, cols) of `views - 1` crops, as square as possible (10 views -> (3, 3))."""
    if views < 2:
        raise ValueError(f"an AnyRes image needs >= 2 views (base + crops), got {views}")
    n = views - 1
    rows = max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0)
    return rows, n // rows


def anyres_image(cfg: LlavaConfig, batch: int, views: int, seed: int
                 ) -> tuple[vi.AnyResImage, np.ndarray, np.ndarray, int]:
    """A random square AnyRes image per row tiled into `views` views (no padding).

    Returns (the packed input, pixels f32[B, C, H, W, 3], image_sizes i64[B, 2] (height,
    width) for transformers, N its packed length)."""
    rows, cols = crop_layout(views)
    s, g = cfg.vision.image_size, cfg.vision.grid[0]
    if (rows, cols) not in anyres.crop_grids(cfg):
        raise ValueError(f"{views} views = {rows} x {cols} crops: not a layout of this config's "
                         f"image_grid_pinpoints {anyres.crop_grids(cfg)}")
    layout = np.tile(np.asarray([[rows, cols, rows * s, cols * s]], np.int32), (batch, 1))
    plan = anyres.pack_plan(layout, g, cfg.anyres_max_crops)
    cap = anyres.bucket_capacity(cfg, views)
    n = int(anyres.packed_lengths(plan, g)[0])
    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((batch, views, s, s, 3)).astype(np.float32)
    visual = vi.AnyResImage(jnp.asarray(pixels), jnp.asarray(plan), cap)
    if visual.num_slots(cfg) != n:
        raise ValueError(f"packed length {n} != the bucket's {visual.num_slots(cfg)} slots")
    return visual, pixels, layout[:, 2:].astype(np.int64), n


class OvSuite:
    """The `ov` suite (module docstring): its own model, weights, PPM and peer."""

    def __init__(self, cfg: LlavaConfig, ppm_section: Any, full_depth: int, opts: Options,
                 log, peer: bool):
        self.cfg, self.opts, self.log = cfg, opts, log
        self.full_depth = full_depth
        o = opts
        self.views = o.ov_views
        _, _, _, self.n_packed = anyres_image(cfg, 1, self.views, 0)
        self.n_v = self.n_packed if o.ov_tokens < 0 else o.ov_tokens
        if o.ov_vision and self.n_v != self.n_packed:
            raise ValueError(f"ov_vision runs the real {self.views}-view image "
                             f"({self.n_packed} tokens); ov_tokens={self.n_v} differs")
        g2 = cfg.vision.grid[0] ** 2
        self.crops = self.views if self.n_v == self.n_packed else max(1, round(self.n_v / g2))
        self.pcfg = ppm_lib.PPMConfig(n_v=self.n_v, d_model=cfg.text.hidden_size,
                                      width=ppm_section.width,
                                      num_layers=ppm_section.num_layers,
                                      num_heads=ppm_section.num_heads,
                                      mlp_ratio=ppm_section.mlp_ratio)
        self.progs = Programs(cfg, o.text_len, o.decode_tokens)
        self.counter = (FlopCounter(cfg, o.text_len, o.decode_tokens, compile=o.flops_compiled)
                        if o.flops else None)
        t0 = time.perf_counter()
        self.params = jax.jit(lambda r: nn.unbox(init_params(cfg, r)))(jax.random.key(o.seed))
        self.pv = jax.jit(lambda r: nn.unbox(init_ppm(self.pcfg, r)))(jax.random.key(7))
        self.log(f"[bench] ov params ready ({time.perf_counter() - t0:.1f} s)")
        self.peer = None
        if peer:
            from covipal_jax.tools.bench_peer import TorchPeer, torch_llava
            t0 = time.perf_counter()
            self.peer = TorchPeer(torch_llava(self.params, cfg), cfg, threads=o.threads)
            self.log(f"[bench] ov torch peer ready ({time.perf_counter() - t0:.1f} s)")

    def close(self) -> None:
        """Drop the weights (ours and the peer's) and compiled programs."""
        self.params = self.pv = self.peer = self.progs = self.counter = None
        gc.collect()

    def _vision_thunks(self, batch: int) -> tuple[dict, dict]:
        """(thunks timing the tower, what the rows need to use it)."""
        cfg, o, P = self.cfg, self.opts, self.params
        if o.ov_vision:
            visual, pixels, sizes, _ = anyres_image(cfg, batch, self.views, o.seed + 300)
            model = self.progs.model
            enc = jax.jit(lambda p, v: vi.encode_packed(model, p, v)[0])
            thunks = {"vision/ours": clocked(lambda: enc(P, visual))}
            if self.peer:
                thunks["vision/peer"] = clocked(lambda: self.peer.vision_anyres(pixels, sizes),
                                                lambda x: x)
            return thunks, dict(visual=visual, pixels=pixels, sizes=sizes)
        px, _, _ = make_inputs(cfg, batch, o.text_len, o.image_pos, o.seed + 300)
        px_j = jnp.asarray(px)
        vision = self.progs.vision()
        thunks = {"vision/ours": clocked(lambda: vision(P, px_j))}
        if self.peer:
            thunks["vision/peer"] = clocked(lambda: self.peer.vision(px), lambda x: x)
        return thunks, dict(px=px_j)

    def run(self, batch: int) -> dict:
        cfg, o, P, pv, pcfg = self.cfg, self.opts, self.params, self.pv, self.pcfg
        n_v = self.n_v
        _, ids, mask = make_inputs(cfg, batch, o.text_len, o.image_pos, o.seed + 400 + batch)
        ids_j, mask_j = jnp.asarray(ids), jnp.asarray(mask)
        tokens = jax.random.normal(jax.random.key(5), (batch, n_v, cfg.text.hidden_size),
                                   jnp.float32)
        thunks, vis = self._vision_thunks(batch)
        vis_flops = None
        if self.counter:
            px1 = make_inputs(cfg, 1, o.text_len, o.image_pos, o.seed)[0]
            vis_flops = self.counter.vision(P, jnp.asarray(px1)) * self.crops * batch
        rows = LlmRows(cfg, self.progs, self.counter, self.peer, P, pv, pcfg, n_v, o.text_len,
                       o.image_pos, tokens, ids, ids_j, mask_j, self.full_depth, vis_flops,
                       lambda x: x)
        settings = []
        for i, keep in enumerate(o.ov_keeps):
            self.log(f"[bench] ov B={batch}: prepare keep={keep} (k={resolve_keep(keep, n_v)})")
            row, _, pruned = rows.prepare_row(i, keep, thunks)
            if o.ov_vision:
                spec = PPMMethod(keep=row["k"], ppm=pcfg) if pruned else NoneMethod()
                self._e2e(thunks, row, i, spec, ids, ids_j, mask_j, vis, pruned)
            settings.append(row)
        self.log(f"[bench] ov B={batch}: timing {len(thunks)} programs, interleaved")
        t = interleaved(thunks, o.reps, o.warmup)
        scale = 1 if o.ov_vision else self.crops
        vis_s = {side: t[f"vision/{side}"]["median_s"] * scale for side in ("ours", "peer")
                 if f"vision/{side}" in t}
        finish_rows(settings, t, vis_s, bool(self.peer))
        suite = dict(name="ov", batch=batch, n_v=n_v, crops=self.crops,
                     vision_source="measured" if o.ov_vision else "estimated",
                     full_depth=self.full_depth, model=self.cfg.to_dict(),
                     vision_times_s={k_.split("/", 1)[1]: v["times_s"] for k_, v in t.items()
                                     if k_.startswith("vision/")},
                     settings=settings)
        return _derive(suite, cfg, o, full_depth=self.full_depth)

    def _e2e(self, thunks, row, i, spec, ids, ids_j, mask_j, vis, pruned) -> None:
        """The real packed path end to end: ours `prefill` on the AnyResImage; the peer's
        tower + HF packing + our kept slots + prefill; the logits compared."""
        o, P = self.opts, self.params
        model, visual = self.progs.model, vis["visual"]
        pv_arg = self.pv if pruned else None
        e2e = jax.jit(lambda p, v_, x, i_, m: prefill(model, p, x, i_, m, spec,
                                                      extra=o.decode_tokens, variables=v_))
        out = e2e(P, pv_arg, visual, ids_j, mask_j)
        thunks[f"{i}/ours_e2e"] = clocked(lambda: e2e(P, pv_arg, visual, ids_j, mask_j))
        if not self.peer:
            return
        import torch
        kept = np.asarray(out.kept)
        if (kept < 0).any():
            raise ValueError("the packed prefill left slots unseen on a padding-free image")
        kept_arg = kept if pruned else None

        def peer_e2e():
            tokens = self.peer.vision_anyres(vis["pixels"], vis["sizes"])
            if kept_arg is not None:
                idx = torch.from_numpy(kept_arg.astype(np.int64))
                tokens = torch.gather(tokens, 1, idx[..., None].expand(-1, -1, tokens.shape[-1]))
            return self.peer.prefill(self.peer.embeds(ids, o.image_pos, tokens))
        thunks[f"{i}/peer_e2e"] = clocked(peer_e2e, lambda x: x)
        theirs = peer_e2e()
        a, b = np.asarray(out.last_logits, np.float64), theirs.numpy().astype(np.float64)
        row["parity_rel"] = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
