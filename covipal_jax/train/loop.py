"""The PPM training loop: stages, a sharded jitted step, Orbax checkpoints, metrics, export.

Only the PPM trains. The frozen LLaVA (`loading.load`, random weights without a checkpoint) is
cast to `train.frozen_dtype` and sharded by its logical axis names; the PPM params and the
optimizer state stay f32, sharded by theirs (`ppm_*` map to no mesh axis by default; the input
projections' `embed` dim follows `fsdp`). Batches are global arrays built from each host's rows
(`sharding.put_batch`). One jitted step per stage:

    state {"step", "params", "opt_state"}, frozen params, batch -> state, metrics
    jax.jit(step, in_shardings=(state, frozen, batch), out_shardings=(state, replicated),
            donate_argnums=(0,))

The step skips its own update when the loss or the gradient norm is not finite (so the state in
memory stays the last good one) and reports it; the host then waits for pending checkpoint
writes and raises `NonFiniteLossError` without saving.

Stages (`train.stages`, `train.steps` per stage, or `train.stage` alone) share one global step
counter and one checkpoint directory; each stage starts a fresh optimizer (warmup + cosine over
its own steps) and its own data order, from the previous stage's params (or `train.init_from`,
an exported PPM). A checkpoint records the stage, the step within it and the data position, so
a restarted run continues exactly where the last checkpoint left off (same batches, same
losses).

Outputs in the workdir: `checkpoints/` (Orbax), `metrics.jsonl` (one JSON object per logged
step: step, stage, loss, recall (top-k recall@r of the PPM scores against the stage-1 targets,
on the batch before its update), lr, grad_norm, param_norm, steps_per_s, tokens_per_s (LLM
sequence positions, global batch x (max_len - 1 + n_v), per second), data_position, and the
stage-2 terms lm, kl, budget, keep_prob; eval lines carry `eval_recall` on `data.eval_split`),
`config.json`, and at the end `ppm/` (the exported PPM for inference:
`--config.pruning.method=ppm --config.pruning.ppm_checkpoint=<workdir>/ppm`).
`--stop_after=N` ends a run at global step N with a checkpoint (no export), like a preemption.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from covipal_jax import paths, sharding
from covipal_jax.inference import loading
from covipal_jax.weights import ppm_io
from covipal_jax.data import pipeline as pipeline_lib
from covipal_jax.pruning.ppm import PPM
from covipal_jax.train import checkpoint as ckpt_lib
from covipal_jax.train import objectives
from covipal_jax.train import resume as resume_lib
from covipal_jax.train import state as state_lib
from covipal_jax.train.plan import StagePlan, make_optimizer, stage_plan  # noqa: F401
from covipal_jax.train.state import BATCH_KEYS, state_shardings  # noqa: F401 (re-exported)


class NonFiniteLossError(RuntimeError):
    """The loss (or its gradient) became NaN/inf; training stopped, nothing was saved."""


def make_step(model, ppm_module, spec: objectives.ObjectiveSpec, tx, *, seed: int,
              deterministic: bool):
    """The (unjitted) train step of one stage."""

    def step(state, frozen, batch):
        prep = objectives.prepare(model, frozen, batch, spec)
        rng = jax.random.fold_in(jax.random.key(seed), state["step"])
        loss_fn = functools.partial(objectives.loss_fn, ppm_module=ppm_module, model=model,
                                    params=frozen, prep=prep, batch=batch, spec=spec,
                                    step=state["step"], rng=rng, deterministic=deterministic)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        new, guard = state_lib.guarded_update(state, loss, grads, tx)
        metrics.update(guard)
        return new, metrics

    return step


def make_eval(model, ppm_module, spec: objectives.ObjectiveSpec):
    """(params, frozen, batch) -> sums of (recall * weight, weight) for the stage-1 targets."""

    def evaluate(params, frozen, batch):
        enc = objectives.encode(model, frozen, batch)
        labels, ok, _ = objectives.guide_labels(model, frozen, enc, spec)
        scores = objectives.ppm_scores(ppm_module, params, enc)
        w = batch["weight"] * ok
        r = objectives.topk_recall(scores, labels, spec.k_for(enc.n_v))
        return {"recall_sum": jnp.sum(r * w), "weight": jnp.sum(w)}

    return evaluate


def _cast_floats(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                        else x, tree)


class Trainer:
    """One training run in `workdir` (resumes from its checkpoints)."""

    def __init__(self, config: Any, workdir: str, *, data_dir: str | None = None,
                 log: Callable[[str], None] | None = None, stop_after: int | None = None,
                 source: Any = None, eval_source: Any = None):
        """source / eval_source: random-access sequences of records (dicts with `image`,
        `question`, `answer`) to train / evaluate on instead of `config.data`'s TFDS set."""
        self.config = config
        self.stop_after = stop_after
        self.workdir = pipeline_lib.absolute(workdir)   # local, or a URL such as gs://...
        self.t = config.train
        self.plan = stage_plan(self.t)
        self.pi, self.pc = jax.process_index(), jax.process_count()
        self.primary = self.pi == 0
        self._log = log or (lambda s: print(s, flush=True))
        self.data_dir = pipeline_lib.data_dir(config, workdir, data_dir)
        self._dir = paths.as_path(self.workdir)
        self._metrics_lines: list[str] | None = None
        # One run per workdir: taken before anything is written there (Orbax cleans temporary
        # checkpoint directories when it opens one); released at the end of `run()`.
        self._lock = (paths.WorkdirLock(self._dir, "training run").acquire() if self.primary
                      else None)
        try:
            self._setup(config, source, eval_source)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the workdir lock (`run()` does it when it ends)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _setup(self, config: Any, source: Any, eval_source: Any) -> None:

        self.mesh = sharding.make_mesh(config.mesh)
        self.rules = config.logical_axis_rules
        loaded = loading.load(config, mesh=self.mesh,
                              rng=jax.random.key(int(config.get("init_seed", 0))))
        self.cfg, self.model = loaded.cfg, loaded.model
        self.tokenizer, self.processor = loaded.tokenizer, loaded.processor
        frozen_sh = jax.tree.map(lambda x: x.sharding, loaded.params)
        dtype = jnp.dtype(self.t.frozen_dtype)
        with sharding.use_mesh(self.mesh, self.rules):
            self.frozen = jax.jit(functools.partial(_cast_floats, dtype=dtype),
                                  out_shardings=frozen_sh, donate_argnums=0)(loaded.params)
        self.frozen_sh = frozen_sh
        del loaded

        self.pcfg = ppm_io.ppm_config(config, self.cfg)
        self.ppm = PPM(self.pcfg)
        self.deterministic = float(self.pcfg.dropout) == 0.0
        self.global_batch, self.seq_len = state_lib.batch_geometry(
            self.mesh, self.t.batch_size, self.pc, config.data.max_len, self.cfg.num_vision_tokens)
        self.expected_meta = {"base_model": self.cfg.architecture_dict(),
                              "ppm": self.pcfg.to_dict()}
        self.ckpt = ckpt_lib.Checkpointer(self._dir / "checkpoints",
                                          keep=int(self.t.keep_checkpoints),
                                          async_save=bool(self.t.get("async_checkpoint", True)))
        self._source, self._skipped = source, {}
        self._eval_source = eval_source

    # -- data ----------------------------------------------------------------------------------

    def _sources(self):
        if self._source is None:
            from jax.experimental import multihost_utils

            if self.primary:
                src, skipped = pipeline_lib.build_source(self.config, self.data_dir)
            if self.pc > 1:
                multihost_utils.sync_global_devices("covipal_data_built")
            if not self.primary:
                src, skipped = pipeline_lib.build_source(self.config, self.data_dir,
                                                         prepare=False)
            self._source, self._skipped = src, skipped
            if skipped and self.primary:
                self._log(f"data: {sum(skipped.values())} malformed records skipped at build "
                          f"time: {skipped}")
            es = self.config.data.get("eval_split", "")
            if es and self.config.data.kind != "synthetic":
                self._log(f"data.eval_split={es!r} is only supported for the synthetic set; "
                          "no eval")
                es = ""
            if es and int(self.t.get("eval_batches", 0)):
                import copy

                c = copy.deepcopy(self.config)
                with c.unlocked():
                    c.data.split = es
                self._eval_source, _ = pipeline_lib.build_source(c, self.data_dir,
                                                                 prepare=False)
        return self._source

    def pipeline(self, plan: StagePlan) -> pipeline_lib.Pipeline:
        return pipeline_lib.from_config(
            self.config, self._sources(), tokenizer=self.tokenizer, processor=self.processor,
            global_batch=self.global_batch, process_index=self.pi, process_count=self.pc,
            seed_offset=plan.index, skipped=self._skipped, model_cfg=self.cfg)

    # -- state ---------------------------------------------------------------------------------

    def init_params(self):
        """Fresh (or `train.init_from`) PPM params, sharded by logical names."""
        pcfg = self.pcfg
        rng = jax.random.key(int(self.t.seed))
        init_fn = lambda r: ppm_io.init_ppm(pcfg, r)
        variables, shardings = sharding.init_sharded(init_fn, rng, self.mesh, self.rules)
        params, param_sh = variables["params"], shardings["params"]
        if self.t.get("init_from"):
            _, loaded, _ = ppm_io.load_ppm(self.t.init_from, self.cfg)
            loaded = nn.unbox(loaded)["params"]
            params = jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s), loaded,
                                  param_sh)
            self._log(f"PPM initialized from {self.t.init_from}")
        return params, param_sh

    def new_state(self, params, param_sh, tx):
        _, shard = state_lib.abstract_state(params, param_sh, tx, self.mesh)
        with sharding.use_mesh(self.mesh, self.rules):
            opt_state = jax.jit(tx.init, out_shardings=shard["opt_state"])(params)
        step = jax.device_put(jnp.zeros((), jnp.int32), shard["step"])
        return {"step": step, "params": params, "opt_state": opt_state}, shard

    def _meta(self, plan: StagePlan, global_step: int, position: int, spec) -> dict:
        return dict(step=global_step, stage=plan.stage, stage_index=plan.index,
                    stage_step=global_step - plan.start, data_position=position,
                    plan=[dataclasses.asdict(p) for p in self.plan],
                    objective=dataclasses.asdict(spec), **self.expected_meta,
                    config=json.loads(self.config.to_json_best_effort()))

    # -- logging -------------------------------------------------------------------------------

    def _truncate_metrics(self, step: int | None) -> None:
        """Drop the metrics after `step` (all when None): the resumed run writes them again."""
        if self.primary:
            self._metrics_lines = resume_lib.truncate_metrics(self._dir / "metrics.jsonl", step)

    def _write_metrics(self, rec: dict) -> None:
        if not self.primary:
            return
        path = self._dir / "metrics.jsonl"
        line = json.dumps(rec) + "\n"
        if paths.is_remote(path):         # object stores have no append: rewrite the file
            if self._metrics_lines is None:
                self._metrics_lines = [path.read_text()] if path.exists() else []
            self._metrics_lines.append(line)
            path.write_text("".join(self._metrics_lines))
        else:
            with path.open("a") as f:
                f.write(line)
        keys = [k for k in ("loss", "recall", "eval_recall", "lm", "kl", "keep_prob", "lr",
                            "steps_per_s", "tokens_per_s") if k in rec]
        self._log(f"step {rec['step']} stage {rec['stage']}: " + ", ".join(
            f"{k}={rec[k]:.4g}" for k in keys))

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> dict:
        """Train (or resume), then release the workdir lock."""
        try:
            with sharding.use_mesh(self.mesh, self.rules):
                return self._run()
        finally:
            self.close()

    def _run(self) -> dict:
        params, param_sh = self.init_params()
        found = resume_lib.restore_latest(
            self.ckpt, self.plan, self.t, self.expected_meta, params, param_sh, self.mesh,
            log=self._log, primary=self.primary, process_count=self.pc)
        meta, restored = found if found is not None else (None, None)
        if meta is None:
            stage_index, global_step, position = 0, 0, 0
        else:
            stage_index, global_step = int(meta["stage_index"]), int(meta["step"])
            position = int(meta["data_position"])
        self._truncate_metrics(None if meta is None else global_step)
        if self.primary:       # only once the checkpoint is accepted
            paths.write_atomic(self._dir / "config.json",
                               self.config.to_json_best_effort(indent=1))
        summary: dict[str, Any] = {"stages": [], "resumed_from": meta and meta["step"]}
        state = None
        for plan in self.plan[stage_index:]:
            spec = objectives.ObjectiveSpec.from_config(self.t, self.cfg, plan.stage)
            tx, sched = make_optimizer(self.t, plan.steps, plan.stage)
            fresh, shard = self.new_state(params if state is None else state["params"],
                                          param_sh, tx)
            if meta is not None:  # resuming inside (or at the end of) this stage
                state, restored = restored, None
                self._log(f"resumed from checkpoint step {meta['step']} (stage {plan.stage}, "
                          f"data position {position})")
                done = int(meta["stage_step"]) >= plan.steps
                meta = None
                if done:
                    global_step, position = plan.stop, 0
                    continue
            else:
                state, position = fresh, 0
            state["step"] = jax.device_put(jnp.asarray(global_step, jnp.int32), shard["step"])
            state, stats = self._run_stage(plan, spec, tx, sched, state, shard, global_step,
                                           position)
            summary["stages"].append(stats)
            if stats["stopped_at"] is not None:        # --stop_after: checkpointed, no export
                self.ckpt.wait()
                summary["step"] = stats["stopped_at"]
                return summary
            global_step = plan.stop
        self.ckpt.wait()
        self.export(state["params"], global_step)
        summary["step"] = global_step
        return summary

    def export(self, params, step: int) -> str:
        path = self._dir / "ppm"
        ppm_io.save_ppm(path, {"params": params}, self.pcfg, self.cfg,
                        extra={"trained_steps": int(step), "keep": self.t.keep,
                               "stages": [p.stage for p in self.plan],
                               "stage_steps": [p.steps for p in self.plan]},
                        base_model_name=str(self.config.get("checkpoint") or ""),
                        train_config=json.loads(self.config.to_json_best_effort()))
        if self.primary:
            self._log(f"exported PPM to {path}")
        return str(path)

    def make_step(self, spec, tx):
        """The (unjitted) train step `(state, frozen, batch) -> (state, metrics)` of a stage
        (a subclass trains something else: `train/finetune_trainer.py`)."""
        return make_step(self.model, self.ppm, spec, tx, seed=int(self.t.seed),
                         deterministic=self.deterministic)

    def make_eval(self, spec):
        """The (unjitted) `(params, frozen, batch) -> sums` of `_eval`."""
        return make_eval(self.model, self.ppm, spec)

    def _eval(self, eval_fn, params) -> float | None:
        """Mean top-k recall of the PPM against the stage-1 targets on `data.eval_split`."""
        n = int(self.t.get("eval_batches", 0))
        self._sources()
        if not n or self._eval_source is None:
            return None
        pipe = pipeline_lib.Pipeline(
            self._eval_source, tokenizer=self.tokenizer, processor=self.processor,
            template=self.config.template, max_len=int(self.config.data.max_len),
            global_batch=self.global_batch, shuffle=False, drop_remainder=False,
            process_index=self.pi, process_count=self.pc,
            packed=pipeline_lib.packed_spec(self.config, self.cfg))
        keys = state_lib.batch_keys(self.config.data.get("packed") or None)
        num = den = 0.0
        for pos in range(min(n, pipe.batches_per_epoch)):
            b = sharding.put_batch(self.mesh, {k: v for k, v in pipe.batch(pos).items()
                                               if k in keys})
            out = jax.device_get(eval_fn(params, self.frozen, b))
            num += float(out["recall_sum"])
            den += float(out["weight"])
        return num / max(den, 1e-9)

    def _run_stage(self, plan: StagePlan, spec, tx, sched, state, shard, global_step: int,
                   position: int):
        from tqdm import tqdm

        mesh = self.mesh
        keys = state_lib.batch_keys(self.config.data.get("packed") or None)
        batch_sh = state_lib.batch_shardings(mesh, keys)
        rep = NamedSharding(mesh, P())
        step_fn = jax.jit(self.make_step(spec, tx),
                          in_shardings=(shard, self.frozen_sh, batch_sh),
                          out_shardings=(shard, rep), donate_argnums=(0,))
        eval_fn = jax.jit(self.make_eval(spec),
                          in_shardings=(shard["params"], self.frozen_sh, batch_sh),
                          out_shardings=rep)
        pipe = self.pipeline(plan)
        log_every = max(1, int(self.t.log_every))
        save_every = max(1, int(self.t.save_every))
        eval_every = int(self.t.get("eval_every", 0))
        stats = {"stage": plan.stage, "first": None, "last": None, "eval": [],
                 "stopped_at": None}
        stop = plan.stop if self.stop_after is None else min(plan.stop, self.stop_after)

        def do_eval(at_step):
            r = self._eval(eval_fn, state["params"])
            if r is not None:
                rec = {"step": at_step, "stage": plan.stage, "eval_recall": r,
                       "random_recall": spec.keep_ratio}
                self._write_metrics(rec)
                stats["eval"].append(rec)

        if global_step == plan.start and plan.index == 0:
            do_eval(global_step)
        bar = tqdm(total=plan.steps, initial=global_step - plan.start,
                   desc=f"stage {plan.stage}", disable=not (self.primary and
                                                           self.t.get("progress", True)),
                   file=sys.stderr, dynamic_ncols=True, leave=False)
        t_window, n_window = time.perf_counter(), 0
        it = pipe.iterate(position, prefetch=int(self.config.data.get("prefetch", 2)))
        try:
            while global_step < stop:
                pos, local = next(it)
                batch = sharding.put_batch(mesh, {k: v for k, v in local.items()
                                                  if k in keys})
                state, metrics = step_fn(state, self.frozen, batch)
                metrics = jax.device_get(metrics)
                global_step += 1
                position = pos + 1
                n_window += 1
                bar.update(1)
                if not metrics["ok"]:
                    self.ckpt.wait()
                    raise NonFiniteLossError(
                        f"non-finite loss ({float(metrics['loss'])}) or gradient norm "
                        f"({float(metrics['grad_norm'])}) at step {global_step} (stage "
                        f"{plan.stage}); stopped without saving. The last good checkpoint is "
                        f"step {self.ckpt.latest_step()} in {self.ckpt.directory}.")
                stage_done = global_step == plan.stop
                stopping = global_step == stop and not stage_done
                if (global_step % log_every == 0 or global_step - plan.start == 1
                        or stage_done):
                    dt = time.perf_counter() - t_window
                    rec = {"step": global_step, "stage": plan.stage,
                           **{k: float(v) for k, v in metrics.items() if k != "ok"},
                           "lr": float(sched(global_step - plan.start - 1)),
                           "steps_per_s": n_window / dt,
                           "tokens_per_s": n_window * self.global_batch * self.seq_len / dt,
                           "data_position": position}
                    self._write_metrics(rec)
                    stats["first"] = stats["first"] or rec
                    stats["last"] = rec
                    t_window, n_window = time.perf_counter(), 0
                if global_step % save_every == 0 or stage_done or stopping:
                    self.ckpt.save(global_step, state,
                                   self._meta(plan, global_step, position, spec))
                if stage_done or (eval_every and global_step % eval_every == 0):
                    do_eval(global_step)
        finally:
            bar.close()
            it.close()
        stats["too_long"] = pipe.stats.too_long
        if pipe.packed is not None:  # records of another kind / over max_images (weight 0)
            stats["wrong_kind"] = pipe.stats.wrong_kind
            stats["too_many_images"] = pipe.stats.too_many_images
        if global_step < plan.stop:
            stats["stopped_at"] = global_step
            self._log(f"stopped after step {global_step} (--stop_after); checkpoint saved")
        return state, stats


def train(config: Any, workdir: str, *, data_dir: str | None = None,
          log: Callable[[str], None] | None = None, stop_after: int | None = None,
          source: Any = None, eval_source: Any = None) -> dict:
    """Train (or resume) in `workdir`; returns a summary. See the module docstring.

    stop_after: stop once the global step reaches it (checkpointed, like a preemption; run
    again to continue). source / eval_source: in-memory record sequences instead of TFDS.
    """
    return Trainer(config, workdir, data_dir=data_dir, log=log, stop_after=stop_after,
                   source=source, eval_source=eval_source).run()


def read_metrics(workdir: str) -> list[dict]:
    """The records of `<workdir>/metrics.jsonl` (all of them, in order)."""
    path = paths.as_path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
