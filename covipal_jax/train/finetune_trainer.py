"""The PDrop* trainer mode: `python -m covipal_jax.train --config configs/pdrop_star_tiny.py`.

`config.train.mode = "finetune"` (with `pruning.method = "pdrop"`) runs this instead of the PPM
trainer. It is `train/loop.py`'s `Trainer` (sharded jitted step, Orbax checkpoints and exact
resume, metrics.jsonl, `--stop_after`, the same data pipeline and optimizer) with another
state: the LLaVA's projector + LLM train (f32 master weights, sharded by their logical axes,
Adam moments alongside), the vision tower is the frozen half (`train.frozen_dtype`), and the
step is `train/finetune.py`'s `make_step` (answer-only LM loss through PyramidDrop's stages).

At the end the whole model is exported as a Hugging Face checkpoint to `<workdir>/llava`
(`weights/hf.export_llava`, in the model's `param_dtype`), with the tokenizer / processor
files of the base checkpoint (or the built-in tokenizer), so generate / eval load it like any
checkpoint: `--config.checkpoint=<workdir>/llava --config.pruning.method=pdrop`.
"""
from __future__ import annotations

import functools
import json
from typing import Any, Callable

import jax
import jax.numpy as jnp

from covipal_jax import paths, pruning, sharding
from covipal_jax.inference import loading
from covipal_jax.train import checkpoint as ckpt_lib
from covipal_jax.train import finetune
from covipal_jax.train import loop
from covipal_jax.train import state as state_lib

EXPORT_DIR = "llava"
# Files of a checkpoint / tokenizer directory that are not the weights or the model config.
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")
_SKIP_NAMES = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")


class FinetuneTrainer(loop.Trainer):
    """One PDrop* fine-tuning run in `workdir` (resumes from its checkpoints)."""

    def _setup(self, config: Any, source: Any, eval_source: Any) -> None:
        self.mesh = sharding.make_mesh(config.mesh)
        self.rules = config.logical_axis_rules
        self.method = finetune.check_method(pruning.from_config(config.pruning))
        loaded = loading.load(config, mesh=self.mesh,
                              rng=jax.random.key(int(config.get("init_seed", 0))))
        self.cfg, self.model = loaded.cfg, loaded.model
        self.tokenizer, self.processor = loaded.tokenizer, loaded.processor
        self.method.stages(self.cfg.num_vision_tokens, self.cfg.text.num_layers)  # errors now
        trainable, frozen = finetune.split_params(loaded.params)
        del loaded
        shard_of = lambda t: jax.tree.map(lambda x: x.sharding, t)  # noqa: E731
        self.frozen_sh, self._trainable_sh = shard_of(frozen), shard_of(trainable)
        cast = lambda tree, dt, sh: jax.jit(functools.partial(loop._cast_floats, dtype=dt),
                                            out_shardings=sh, donate_argnums=0)(tree)
        with sharding.use_mesh(self.mesh, self.rules):
            self.frozen = cast(frozen, jnp.dtype(self.t.frozen_dtype), self.frozen_sh)
            self._trainable = cast(trainable, jnp.float32, self._trainable_sh)
        self.max_queries = int(self.t.get("max_queries", finetune.MAX_QUERIES))
        self.global_batch, self.seq_len = state_lib.batch_geometry(
            self.mesh, self.t.batch_size, self.pc, config.data.max_len, self.cfg.num_vision_tokens)
        n_v, n_layers = self.cfg.num_vision_tokens, self.cfg.text.num_layers
        self.expected_meta = {
            "base_model": self.cfg.architecture_dict(),
            "finetune": {"method": self.method.name, "positions": self.method.positions,
                         "stages": [list(s) for s in self.method.stages(n_v, n_layers)],
                         "frozen": list(finetune.FROZEN), "max_queries": self.max_queries}}
        self.ckpt = ckpt_lib.Checkpointer(self._dir / "checkpoints",
                                          keep=int(self.t.keep_checkpoints),
                                          async_save=bool(self.t.get("async_checkpoint", True)))
        self._source, self._skipped = source, {}
        self._eval_source = eval_source

    def init_params(self):
        """The trainable half of the loaded LLaVA (projector + LLM, f32) and its shardings."""
        return self._trainable, self._trainable_sh

    def make_step(self, spec, tx):
        del spec  # the PPM objective's; PDrop* has its own loss
        return finetune.make_step(self.model, self.method, tx, max_queries=self.max_queries)

    def make_eval(self, spec):
        del spec
        return lambda params, frozen, batch: {"weight": jnp.sum(batch["weight"])}

    def _eval(self, eval_fn, params) -> float | None:
        return None  # no held-out metric here: evaluate the export with `covipal_jax.eval`

    def export(self, params, step: int) -> str:
        """The fine-tuned LLaVA as a Hugging Face checkpoint directory `<workdir>/llava`."""
        from covipal_jax.weights import hf

        path = self._dir / EXPORT_DIR
        merged = finetune.merge_params(params, self.frozen)
        hf.export_llava(merged, self.cfg, path, dtype=jnp.dtype(self.cfg.weight_dtype))
        if self.primary:
            self._copy_tokenizer(path)
            info = {"trained_steps": int(step), **self.expected_meta["finetune"],
                    "base_checkpoint": str(self.config.get("checkpoint") or ""),
                    "train_config": json.loads(self.config.to_json_best_effort())}
            paths.write_atomic(path / "pdrop_star.json", json.dumps(info, indent=1))
            self._log(f"exported the PDrop* LLaVA to {path} (load it with "
                      f"--config.checkpoint={path} --config.pruning.method="
                      f"{self.method.name})")
        return str(path)

    def _copy_tokenizer(self, out) -> None:
        src = self.config.tokenizer or self.config.checkpoint
        if not src or src == "builtin":
            self.tokenizer.save(str(out))
            return
        dirs = [paths.as_path(src)]
        if self.config.checkpoint and self.config.checkpoint != src:
            dirs.append(paths.as_path(self.config.checkpoint))   # the image processor's files
        for d in dirs:
            for f in d.iterdir():
                if (f.is_dir() or f.name in _SKIP_NAMES or f.name.endswith(_SKIP_SUFFIXES)
                        or (out / f.name).exists()):
                    continue
                (out / f.name).write_bytes(f.read_bytes())


def train(config: Any, workdir: str, *, data_dir: str | None = None,
          log: Callable[[str], None] | None = None, stop_after: int | None = None,
          source: Any = None, eval_source: Any = None) -> dict:
    """Fine-tune (or resume) in `workdir`; the summary of `loop.train`."""
    return FinetuneTrainer(config, workdir, data_dir=data_dir, log=log, stop_after=stop_after,
                           source=source, eval_source=eval_source).run()
