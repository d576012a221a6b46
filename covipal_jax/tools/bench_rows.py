"""The LLM rows of the bench's packed-token suites (`next` in `bench_run.py`, `ov` in
`bench_ov.py`): N projected vision tokens f32[B, N, D] fed to the PPM (pruned rows) and to the
LLM prefill, ours and the peer's, one row per keep setting.

`prepare_row` adds a row's programs to the suite's interleaved thunks (keys `"{i}/ours_ppm"`,
`"{i}/ours_llm"`, `"{i}/peer_llm"`) and returns the row with its KV-cache bytes and FLOPs;
`finish_rows` fills every row's `ours` / `peer` times from the interleaved medians (a suite may
add `"{i}/ours_e2e"` / `"{i}/peer_e2e"` thunks: they replace the sum of the parts).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from covipal_jax.models.config import LlavaConfig
from covipal_jax.pruning import ppm as ppm_lib
from covipal_jax.pruning.base import resolve_keep
from covipal_jax.tools.bench_programs import FlopCounter, Programs, kv_bytes
from covipal_jax.tools.bench_report import label
from covipal_jax.tools.bench_timing import clocked


@dataclasses.dataclass
class LlmRows:
    """What every row of one (suite, batch) shares.

    tokens f32[B, N, D] (random projected tokens); ids i32[B, T] (numpy, for the peer) and
    ids_j / mask_j their device copies; vis_flops: the tower's FLOPs for the batch or None;
    sync: how a peer result is waited for (`clocked`'s second argument)."""
    cfg: LlavaConfig
    progs: Programs
    counter: FlopCounter | None
    peer: Any
    params: Any
    ppm_vars: Any
    pcfg: ppm_lib.PPMConfig
    n_v: int
    text_len: int
    image_pos: int
    tokens: jax.Array
    ids: np.ndarray
    ids_j: jax.Array
    mask_j: jax.Array
    full_depth: int
    vis_flops: float | None
    sync: Callable

    def prepare_row(self, i: int, keep, thunks: dict) -> tuple[dict, jax.Array, bool]:
        """Row `i` at `keep` (ratio or count): (row, kept tokens f32[B, k, D], pruned)."""
        P, pv, tokens, ids_j, mask_j = (self.params, self.ppm_vars, self.tokens, self.ids_j,
                                        self.mask_j)
        batch, n_v = tokens.shape[0], self.n_v
        k = resolve_keep(keep, n_v)
        pruned = k < n_v
        llm = self.progs.llm(n_v)
        if pruned:
            ppm_fn = self.progs.ppm(self.pcfg, k)
            kept_tokens, idx = ppm_fn(P, pv, tokens, ids_j, mask_j)
            thunks[f"{i}/ours_ppm"] = clocked(lambda f=ppm_fn: f(P, pv, tokens, ids_j, mask_j))
        else:
            kept_tokens = tokens
            idx = jnp.broadcast_to(jnp.arange(n_v, dtype=jnp.int32), (batch, n_v))
        thunks[f"{i}/ours_llm"] = clocked(
            lambda t_=kept_tokens, i_=idx: llm(P, t_, i_, ids_j, mask_j))
        row: dict[str, Any] = dict(keep=keep, k=k, label=label(keep, k, n_v),
                                   method="ppm" if pruned else "none",
                                   seq_len=self.text_len - 1 + k)
        if self.peer:
            import torch
            emb = self.peer.embeds(self.ids, self.image_pos,
                                   torch.from_numpy(np.array(kept_tokens)))
            thunks[f"{i}/peer_llm"] = clocked(lambda e=emb: self.peer.prefill(e), self.sync)
        row["kv_bytes"] = kv_bytes(self.cfg, batch, row["seq_len"])
        row["kv_bytes_full_depth"] = kv_bytes(self.cfg, batch, row["seq_len"], self.full_depth)
        if self.counter:
            c, one = self.counter, slice(0, 1)
            fl = dict(llm=c.llm(n_v, P, kept_tokens[one], idx[one], ids_j[one],
                                mask_j[one]) * batch, vision=self.vis_flops)
            fl["ppm"] = (c.ppm(self.pcfg, k, P, pv, tokens[one], ids_j[one], mask_j[one])
                         * batch if pruned else 0.0)
            fl["ppm_analytic"] = (ppm_lib.ppm_flops(self.pcfg, n_v, self.text_len) * batch
                                  if pruned else 0.0)
            fl["e2e"] = (None if self.vis_flops is None
                         else self.vis_flops + fl["ppm"] + fl["llm"])
            row["flops"] = fl
        return row, kept_tokens, pruned


def finish_rows(settings: list[dict], timings: dict, vision_s: dict, peer: bool) -> None:
    """Fill each row's `ours` / `peer` seconds (and raw `times_s`) from `interleaved`'s
    results; `vision_s`: {"ours": s, "peer": s} for the batch (missing: no e2e sum)."""
    med = lambda key: timings[key]["median_s"] if key in timings else None  # noqa: E731

    def e2e(i: int, side: dict, parts: tuple[str, ...], name: str):
        if side["vision_s"] is None:
            return med(f"{i}/{name}_e2e")
        return med(f"{i}/{name}_e2e") or sum(side[p] for p in parts)

    for i, row in enumerate(settings):
        ours = dict(vision_s=vision_s.get("ours"), ppm_s=med(f"{i}/ours_ppm") or 0.0,
                    llm_s=med(f"{i}/ours_llm"))
        ours["e2e_s"] = e2e(i, ours, ("vision_s", "ppm_s", "llm_s"), "ours")
        row["ours"] = ours
        if peer:
            theirs = dict(vision_s=vision_s.get("peer"), llm_s=med(f"{i}/peer_llm"))
            theirs["e2e_s"] = e2e(i, theirs, ("vision_s", "llm_s"), "peer")
            row["peer"] = theirs
        row["times_s"] = {k_.split("/", 1)[1]: v["times_s"] for k_, v in timings.items()
                          if k_.startswith(f"{i}/")}
