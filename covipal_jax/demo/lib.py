"""The main job, stage by stage: data -> tiny LLaVA from scratch -> PPM -> pruning sweep.

`run(config, workdir)` is what `python -m covipal_jax.demo` calls. Stages (each leaves its
outputs and a `done.json` with a fingerprint of the config it was made with; a rerun reuses a
stage whose fingerprint still matches, `force=True` redoes everything):

1. data (`DIR/data/`): the synthetic VQA set of `config.task` (`data/synthetic.py`): colour of
   a named shape, shape of a named colour, existence of a described object, count of a colour
   (relative-position questions exist too, `task.qtypes`; measured at chance on the held-out
   split within this budget, so the default leaves them out). Held-out design
   (`demo.heldout`, decided by experiment): 5 (shape, colour) combinations, no two sharing a
   shape or a colour, are never shown in the LEFT half of a training image (training may show
   and ask about them on the right). Every test question is about a held-out combination that
   lies in the left half: the (object, location) combination was never seen in training.
   Why not hold the combinations out of training altogether (`synthetic`'s own test split,
   `demo.heldout="qtype"` keeps a variant)? Then "what color is the triangle?" -> "red" asks
   for an answer that training never gave to that question: the answer prior is exactly zero
   and a model trained from scratch scores 0% on those questions (CLEVR-CoGenT's failure;
   measured here: 0-1% on held-out colour questions with 77% on i.i.d. ones, also with the
   held-out combinations shown as training distractors). The location split keeps what the
   pruning comparison needs: the queried object sits in a part of the image where training
   never had it, so a pruner (and the LLM) must find it from the text, not from where that
   object usually was.
   Training images carry 1 + `extra_turns` questions each (multi-turn, as LLaVA's instruction
   data): the example's own question first, then others about the same scene, then (with
   `demo.caption`) a caption of the whole scene (LLaVA's stage-1 kind of data).
   Splits kept: train (images + turns), dev (held-out questions for the stop rule of step 2;
   test-split indices after the test range), validation (i.i.d.), test.
2. pretrain (`DIR/llava/`): a LLaVA (`config.model`: CLIP-style ViT with a CLS token, GELU
   projector, LLaMA decoder) trained from scratch, every parameter, answer-only LM loss
   (`train/pretrain.py`), until the dev accuracy reaches `pretrain.target` or
   `pretrain.steps`. Exported as a Hugging Face checkpoint (`weights/hf.export_llava`) plus the
   built-in tokenizer, so every later stage loads it exactly as it loads a real checkpoint.
3. ppm (`DIR/ppm_train/`, PPM at `DIR/ppm_train/ppm`): `train/loop.py`'s trainer with
   `config.train` (stage 1 attention-guided, stage 2 soft pruning), the LLaVA of step 2 frozen,
   on the first-turn (single question) training examples.
3b. pdrop_star (`DIR/pdrop_star/`, the model at `DIR/pdrop_star/llava`): PDrop*, a copy of the
   LLaVA of step 2 fine-tuned (projector + LLM) with PyramidDrop active in every forward
   (`demo/finetune_stage.py`, `train/finetune.py`), `config.pdrop_star` steps; the sweep
   evaluates it with method pdrop as the row "pdrop_star" (shown as "pdrop*").
4. evaluate: greedy first-answer-token accuracy (`evaluation.py`) on the test split,
   unpruned and for every `eval.methods` x `eval.ratios`; measured prefill time per batch.
   Writes `DIR/results.json` (`{"unpruned": acc, "methods": {method: {ratio: acc}}}`),
   `DIR/results_detail.json` (tokens kept, prefill seconds, per-question-type accuracy, the
   share of examples whose queried objects' patches were all kept, dev / validation accuracy),
   `DIR/results.md` (the table) and `DIR/accuracy_vs_keep.png`.

With `config.checkpoint` set (a real LLaVA, e.g. `--config configs/ppm_llava15_7b.py
--config.checkpoint=/models/llava-1.5-7b-hf --data_dir DATA`), steps 1-2 are skipped: step 3
trains the PPM on `config.data` (TFDS under `--data_dir`; or takes
`config.pruning.ppm_checkpoint` when set) and step 4 evaluates on the synthetic held-out split
(built into `DIR/data`), with the checkpoint's tokenizer and template (an answer counts when
its first token is the first token of the answer word, lower- or capitalized).

Files: `common.py` (file names, config helpers, `Stages`), `data_stage.py` (step 1), this file
(steps 2-3 and `run`), `sweep.py` (step 4), `report.py` (results files, table, plot),
`evaluation.py` (the first-token `Evaluator`). Every name stays importable from here.
"""
from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np


from covipal_jax.demo.evaluation import make_evaluator  # noqa: F401  (re-exported)
from covipal_jax.demo.common import (  # noqa: F401  (re-exported)
    DETAIL, PLOT, RESULTS, STAGES, Stages, _baseline, _highlight, _plain, apply_quick, demo_defaults, fingerprint, section, task_config)
from covipal_jax.demo.data_stage import (  # noqa: F401  (re-exported)
    HELDOUT_DESIGNS, _accept, _as_arrays, _generate, _left, _progress, _split_configs, _train_split, data_stage, load_split)
from covipal_jax.demo.report import (  # noqa: F401  (re-exported)
    _rkey, format_table, plot, write_results)
from covipal_jax.demo.finetune_stage import (  # noqa: F401  (re-exported)
    STAR, pdrop_star_stage, train_set)
from covipal_jax.demo.sweep import (  # noqa: F401  (re-exported)
    _queried_kept, llm_budget, staged_schedule, sweep)


# ----------------------------------------------------------------------------- step 2: pretrain

def _tokenizer(task):
    from covipal_jax.data.synthetic import scene_qa
    from covipal_jax.data import text as text_lib

    return text_lib.BuiltinTokenizer(scene_qa.vocabulary(task))


def pretrain_stage(config: Any, workdir: str, data_dir: str, stages: Stages,
                   upstream: str) -> str:
    import flax.linen as nn
    import jax

    from covipal_jax.inference import loading
    from covipal_jax.models.config import LlavaConfig
    from covipal_jax.models.llava import Llava, init_params
    from covipal_jax import pruning
    from covipal_jax.train import pretrain as pt
    from covipal_jax.weights import hf

    directory = os.path.join(workdir, "llava")
    fp = fingerprint("pretrain", upstream, config.model, config.pretrain, config.template,
                     section(config, "demo").train_max_len, config.text_buckets)
    if stages.cached("pretrain", directory, fp):
        return directory
    t0 = time.perf_counter()
    stages.fresh(directory)
    log = stages.log
    task = task_config(config)
    tok = _tokenizer(task)
    cfg = LlavaConfig.from_config(config.model)
    if tok.vocab_size > cfg.text.vocab_size or tok.image_token_id != cfg.image_token_id:
        raise ValueError(f"config.model: vocab_size {cfg.text.vocab_size} / image_token_id "
                         f"{cfg.image_token_id} do not fit the tokenizer ({tok.vocab_size} "
                         f"tokens, image id {tok.image_token_id})")
    model = Llava(cfg)
    processor = loading.default_processor(cfg)
    pc = pt.PretrainConfig.from_config(config.pretrain)
    params = nn.unbox(init_params(cfg, jax.random.key(pc.seed)))

    data = train_set(config, data_dir, tok)
    n_turns = int(np.mean(data.loss_mask.sum(axis=1)) / 2)
    log(f"[pretrain] {cfg.num_vision_tokens} vision tokens; {len(data)} training images with "
        f"~{n_turns} questions each; {_count(params) / 1e6:.2f}M parameters")
    dev = load_split(data_dir, "dev")
    ev = make_evaluator(model, params, processor, tok, config.template, dev,
                        buckets=config.text_buckets, batch_size=int(config.eval.batch_size))
    none = pruning.NoneMethod()
    dev_types = dev["qtype"]

    def evaluate(p):
        ev.params = p
        res = ev.accuracy(none)
        log("[pretrain]   dev accuracy by question type: " + ", ".join(
            f"{q} {res.correct[dev_types == q].mean():.3f}" for q in dict.fromkeys(
                dev_types.tolist())))
        return res.accuracy

    res = pt.pretrain(model, params, data, pc, processor=processor, evaluate=evaluate,
                      log=log, progress=bool(section(config, "demo").get("progress", True)))
    if not res.reached_target:
        log(f"[pretrain] WARNING: held-out dev accuracy "
            f"{res.history[-1]['accuracy'] if res.history else float('nan'):.4f} did not "
            f"reach the target {pc.target} in {res.steps} steps")
    hf.export_llava(jax.device_get(res.params), cfg, directory)
    tok.save(directory)
    stages.finish("pretrain", directory, fp, time.perf_counter() - t0, steps=res.steps,
                  reached_target=res.reached_target, history=res.history,
                  dev_accuracy=res.history[-1]["accuracy"] if res.history else None)
    return directory


def _count(tree) -> int:
    import jax

    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


# ----------------------------------------------------------------------------- step 3: PPM

def checkpoint_config(config: Any, llava_dir: str) -> Any:
    """`config` pointed at the exported LLaVA (weights, tokenizer) like a real checkpoint."""
    c = copy.deepcopy(config)
    with c.unlocked():
        c.checkpoint = llava_dir
        c.tokenizer = ""
    return c


def ppm_stage(config: Any, workdir: str, stages: Stages, upstream: str, *,
              train_records=None, data_override: str | None = None) -> tuple[str, str]:
    """Trains (or reuses) the PPM; returns (its exported directory, the stage fingerprint).

    `train_records` (the synthetic demo set, in memory) replaces `config.data`'s TFDS set."""
    directory = os.path.join(workdir, "ppm_train")
    ppm_dir = os.path.join(directory, "ppm")
    given = config.pruning.get("ppm_checkpoint", "")
    if given:
        stages.log(f"[ppm] using the given PPM {given}")
        stages.seconds["ppm"] = 0.0
        return given, fingerprint(upstream, given, _mtime(os.path.join(given, "config.json")))
    fp = fingerprint("ppm", upstream, config.train, config.ppm, config.data)
    if stages.cached("ppm", directory, fp):
        return ppm_dir, fp
    t0 = time.perf_counter()
    stages.fresh(directory)
    from covipal_jax.train import loop

    summary = loop.train(config, directory, data_dir=data_override, log=stages.log,
                         source=train_records)
    last = [s["last"] for s in summary["stages"] if s.get("last")]
    stages.finish("ppm", directory, fp, time.perf_counter() - t0,
                  stages=[{k: v for k, v in (s or {}).items()
                           if isinstance(v, (int, float, str))} for s in last])
    return ppm_dir, fp


# ----------------------------------------------------------------------------- the job

def run(config: Any, workdir: str, *, force: bool = False, quick: bool = False,
        data_dir: str | None = None, log: Callable[[str], None] | None = None,
        stop_after: str | None = None) -> dict | None:
    """Steps 1-4 (or 3-4 with `config.checkpoint`); returns results.json's content (None when
    `stop_after` names an earlier stage)."""
    if stop_after is not None and stop_after not in STAGES:
        raise ValueError(f"stop_after must be one of {STAGES}, got {stop_after!r}")
    log = log or (lambda s: print(s, flush=True))
    if quick:
        config = apply_quick(config)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    stages = Stages(workdir, force, log)
    t_all = time.perf_counter()
    real = bool(config.checkpoint)
    d = section(config, "demo")
    progress = bool(d.get("progress", True))

    data = data_stage(config, workdir, stages, with_train=not real)
    if stop_after == "data":
        return None
    fp_data = json.load(open(stages.marker(data)))["fingerprint"]
    if real:
        llava_config = config
        records = None
        upstream = fingerprint(fp_data, config.checkpoint)
    else:
        llava_dir = pretrain_stage(config, workdir, data, stages, fp_data)
        if stop_after == "pretrain":
            return None
        upstream = json.load(open(stages.marker(llava_dir)))["fingerprint"]
        llava_config = checkpoint_config(config, llava_dir)
        train = load_split(data, "train")
        records = [{"image": im, "question": str(q), "answer": str(a)}
                   for im, q, a in zip(train["images"], train["question"], train["answer"])]
    ppm_dir, ppm_fp = ppm_stage(llava_config, workdir, stages, upstream,
                                train_records=records, data_override=data_dir)
    if stop_after == "ppm":
        return None
    star_dir, star_fp = pdrop_star_stage(config, workdir, data, stages, upstream,
                                         None if real else llava_dir)
    if stop_after == STAR:
        return None
    eval_dir = os.path.join(workdir, "evaluation")
    fp = fingerprint("evaluate", ppm_fp, star_fp, section(config, "eval"), config.pruning)
    cached = stages.cached("evaluate", eval_dir, fp)
    if cached and os.path.exists(os.path.join(workdir, RESULTS)):
        with open(os.path.join(workdir, DETAIL)) as f:
            detail = json.load(f)
        sweep_out = {"rows": detail["rows"]}
    else:
        t0 = time.perf_counter()
        stages.fresh(eval_dir)
        sweep_out = sweep(config, llava_config, ppm_dir, data, log, cased=real,
                          progress=progress, star_dir=star_dir)
        stages.finish("evaluate", eval_dir, fp, time.perf_counter() - t0)
        meta = json.load(open(stages.marker(data)))
        chance = meta.get("chance", {}).get("overall")
        timings = dict(stages.seconds, total=time.perf_counter() - t_all)
        write_results(workdir, sweep_out, timings, {"chance": chance,
                                                    "heldout": meta.get("heldout")})
    log("")
    log(format_table(sweep_out["rows"]))
    log("")
    log("stage wall times: " + ", ".join(f"{k} {v:.0f} s" for k, v in stages.seconds.items())
        + f"; total {time.perf_counter() - t_all:.0f} s")
    log(f"wrote {os.path.join(workdir, RESULTS)}, {os.path.join(workdir, PLOT)}")
    with open(os.path.join(workdir, RESULTS)) as f:
        return json.load(f)


def _mtime(path: str) -> float:
    return os.path.getmtime(path) if os.path.exists(path) else 0.0
