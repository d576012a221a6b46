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
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

STAGES = ("data", "pretrain", "ppm", "evaluate")
RESULTS = "results.json"


def _baseline() -> str:
    """The unpruned row's method name."""
    from covipal_jax import pruning

    return pruning.NoneMethod.name


def _highlight() -> str:
    """The method drawn bold in the plot: CoViPAL's PPM."""
    from covipal_jax import pruning

    return pruning.PPMMethod.name

DETAIL = "results_detail.json"
PLOT = "accuracy_vs_keep.png"


# ----------------------------------------------------------------------------- config helpers

def _plain(x: Any) -> Any:
    """ConfigDict / tuples -> JSON-able plain Python."""
    if hasattr(x, "to_dict"):
        x = x.to_dict()
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in sorted(x.items())}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    return x


def fingerprint(*parts: Any) -> str:
    blob = json.dumps([_plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def demo_defaults():
    """configs/demo.py: the defaults of sections a real-checkpoint config lacks."""
    from covipal_jax.configs import demo

    return demo.get_config()


def section(config: Any, name: str) -> Any:
    """`config.<name>`, or configs/demo.py's when the config has none (real checkpoints)."""
    if name in config:
        return config[name]
    return demo_defaults()[name]


def apply_quick(config: Any) -> Any:
    """A copy of `config` with `config.quick` merged in, section by section (configs/demo.py);
    sections the config lacks are skipped."""
    config = copy.deepcopy(config)
    overrides = config.get("quick") or demo_defaults().quick
    with config.unlocked():
        for name, values in overrides.items():
            if name in config:
                for key, value in values.items():
                    config[name][key] = value
    return config


def task_config(config: Any):
    from covipal_jax.data.synthetic import task as synthetic

    t = dict(_plain(section(config, "task")))
    for k, v in list(t.items()):
        if isinstance(v, list):
            t[k] = tuple(v)
    return synthetic.SyntheticConfig(**t)


# ----------------------------------------------------------------------------- stage bookkeeping

class Stages:
    """done.json markers: a stage is reused when its fingerprint matches (and not forced)."""

    def __init__(self, workdir: str, force: bool, log: Callable[[str], None]):
        self.workdir = workdir
        self.force = force
        self.log = log
        self.seconds: dict[str, float] = {}

    def marker(self, directory: str) -> str:
        return os.path.join(directory, "done.json")

    def cached(self, name: str, directory: str, fp: str) -> dict | None:
        path = self.marker(directory)
        if self.force or not os.path.exists(path):
            return None
        with open(path) as f:
            meta = json.load(f)
        if meta.get("fingerprint") != fp:
            self.log(f"[{name}] config changed since the last run: redoing it")
            return None
        self.log(f"[{name}] reusing {directory} (finished earlier; --force redoes it)")
        self.seconds[name] = 0.0
        return meta

    def fresh(self, directory: str) -> None:
        if os.path.isdir(directory):
            shutil.rmtree(directory)
        os.makedirs(directory, exist_ok=True)

    def finish(self, name: str, directory: str, fp: str, seconds: float, **info) -> dict:
        meta = dict(fingerprint=fp, seconds=seconds, **info)
        with open(self.marker(directory), "w") as f:
            json.dump(_plain(meta), f, indent=1)
        self.seconds[name] = seconds
        self.log(f"[{name}] done in {seconds:.0f} s")
        return meta


# ----------------------------------------------------------------------------- step 1: data

def _progress(it, total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(it, total=total, desc=desc, disable=not enabled, file=sys.stderr,
                dynamic_ncols=True, leave=False)


HELDOUT_DESIGNS = ("location", "qtype")


def _left(o, task) -> bool:
    """The object's grid cell is in the left half of the image (the held-out region)."""
    return o[2] // task.cell_size < task.grid // 2


def _accept(ex: dict, held: set, task, design: str, role: str) -> bool:
    """Whether a generated example belongs to a split under the held-out design.

    location: training / validation images never show a held-out combination in the left half;
    test / dev examples ask about a held-out combination shown there (every queried held-out
    object lies in the left half). qtype: every example is kept (the generator's pools do it).
    """
    if design != "location":
        return True
    objs = ex["objects"]
    if role == "train":
        return not any((o[0], o[1]) in held and _left(o, task) for o in objs)
    queried = [objs[i] for i in ex["queried"] if (objs[i][0], objs[i][1]) in held]
    return all(_left(o, task) for o in queried)


def _generate(split: str, cfg, seed: int, n: int, accept, start: int, desc: str,
              enabled: bool) -> tuple[list[dict], int]:
    """`n` accepted examples of `split` in index order from `start`; returns (rows, next)."""
    from covipal_jax.data.synthetic import task as synthetic

    rows, j = [], start
    bar = _progress(None, n, desc, enabled)
    while len(rows) < n:
        ex = synthetic.make_example(split, j, seed, cfg)
        j += 1
        if accept(ex):
            rows.append(ex)
            bar.update(1)
    bar.close()
    return rows, j


def _split_configs(task, design: str):
    """(train-side config, test-side config) of the generator for a held-out design."""
    if design == "location":
        # Every combination may be asked about in training (only never shown on the left).
        return dataclasses.replace(task, n_heldout=0), task
    if design == "qtype":
        return task, task
    raise ValueError(f"demo.heldout must be one of {HELDOUT_DESIGNS}, got {design!r}")


def _as_arrays(rows: list[dict], task) -> dict[str, np.ndarray]:
    from covipal_jax.data.synthetic import task as synthetic

    queried = np.stack([synthetic.object_patch_mask(r["objects"], task.image_size,
                                                    task.cell_size, r["queried"])
                        for r in rows])
    return {"images": np.stack([r["image"] for r in rows]),
            "question": np.array([r["question"] for r in rows]),
            "answer": np.array([r["answer"] for r in rows]),
            "qtype": np.array([r["qtype"] for r in rows]),
            "queried_patches": queried}


def _train_split(n: int, seed: int, task, d, enabled: bool) -> dict[str, np.ndarray]:
    """Training images with 1 + `extra_turns` questions each (see the module docstring)."""
    from covipal_jax.data.synthetic import scene_qa, task as synthetic

    design = str(d.get("heldout", "location"))
    held = set(synthetic.heldout_combos(task))
    train_cfg, _ = _split_configs(task, design)
    if design == "qtype":
        attr = tuple(q for q in task.qtypes if q not in scene_qa.PROTECTED_TYPES)
        rel = tuple(q for q in task.qtypes if q in scene_qa.PROTECTED_TYPES)
        cfgs = [dataclasses.replace(task, qtypes=q, n_heldout=0 if q == attr else
                                    task.n_heldout, qtype_weights=None)
                for q in (attr, rel) if q]
        share = np.array([len(q) for q in (attr, rel) if q], float)
        pick = np.random.default_rng([seed, 7]).choice(len(cfgs), size=n,
                                                       p=share / share.sum())
        rows = [synthetic.make_example("train", i, seed, cfgs[int(pick[i])])
                for i in _progress(range(n), n, "data: train", enabled)]
        protected = held
    else:
        rows, _ = _generate("train", train_cfg, seed, n,
                            lambda ex: _accept(ex, held, task, design, "train"), 0,
                            "data: train", enabled)
        protected = ()
    turns = []
    for i, ex in enumerate(rows):
        rng = np.random.default_rng([seed, 11, i])
        turns.append(scene_qa.turns_for_example(
            ex, task, int(d.extra_turns), rng, protected=protected,
            with_caption=bool(d.get("caption", False)), grounded=bool(d.get("grounded", False)),
            extra_types=tuple(d.get("extra_types", ()))))
    return {"images": np.stack([r["image"] for r in rows]),
            "question": np.array([t[0][0] for t in turns]),
            "answer": np.array([t[0][1] for t in turns]),
            "turns": np.array([json.dumps(t) for t in turns])}


def load_split(data_dir: str, split: str) -> dict[str, np.ndarray]:
    with np.load(os.path.join(data_dir, f"{split}.npz"), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def data_stage(config: Any, workdir: str, stages: Stages, *, with_train: bool = True) -> str:
    from covipal_jax.data.synthetic import task as synthetic

    task = task_config(config)
    d = section(config, "demo")
    seed = int(config.get("seed", 0))
    directory = os.path.join(workdir, "data")
    fp = fingerprint("data", dataclasses.asdict(task), d, seed, with_train)
    if stages.cached("data", directory, fp):
        return directory
    t0 = time.perf_counter()
    stages.fresh(directory)
    on = bool(d.get("progress", True))
    design = str(d.get("heldout", "location"))
    held = set(synthetic.heldout_combos(task))
    train_cfg, test_cfg = _split_configs(task, design)
    test_ok = lambda ex: _accept(ex, held, task, design, "test")
    rows, nxt = _generate("test", test_cfg, seed, int(d.n_test), test_ok, 0, "data: test", on)
    np.savez(os.path.join(directory, "test.npz"), **_as_arrays(rows, task))
    if int(d.n_dev) > 0:  # the pretraining stop rule's held-out questions: after the test ones
        rows, _ = _generate("test", test_cfg, seed, int(d.n_dev), test_ok, nxt, "data: dev", on)
        np.savez(os.path.join(directory, "dev.npz"), **_as_arrays(rows, task))
    if int(d.n_validation) > 0:  # i.i.d. with training
        rows, _ = _generate("validation", train_cfg, seed, int(d.n_validation),
                            lambda ex: _accept(ex, held, task, design, "train"), 0,
                            "data: validation", on)
        np.savez(os.path.join(directory, "validation.npz"), **_as_arrays(rows, task))
    if with_train:
        np.savez(os.path.join(directory, "train.npz"),
                 **_train_split(int(d.n_train), seed, task, d, on))
    stages.finish("data", directory, fp, time.perf_counter() - t0,
                  heldout=[list(h) for h in synthetic.heldout_combos(task)],
                  chance=synthetic.chance_accuracy(task, "test"))
    return directory


# ----------------------------------------------------------------------------- step 2: pretrain

def _tokenizer(task):
    from covipal_jax.data.synthetic import scene_qa
    from covipal_jax.data import text as text_lib

    return text_lib.BuiltinTokenizer(scene_qa.vocabulary(task))


def make_evaluator(model, params, processor, tokenizer, template: str, split: dict, *,
                   buckets, batch_size: int, cased: bool = False, seed: int = 0):
    from covipal_jax.demo import evaluation
    from covipal_jax.data import text as text_lib

    questions = [str(q) for q in split["question"]]
    ids, mask = text_lib.encode_prompts(tokenizer, questions, template=template,
                                        buckets=tuple(buckets))
    answers = [evaluation.answer_token_ids(tokenizer, template, q, str(a), cased=cased)
               for q, a in zip(questions, split["answer"])]
    return evaluation.Evaluator(model, params, processor=processor, images=split["images"],
                                ids=ids, mask=mask, answer_ids=answers,
                                batch_size=batch_size, seed=seed)


def pretrain_stage(config: Any, workdir: str, data_dir: str, stages: Stages,
                   upstream: str) -> str:
    import flax.linen as nn
    import jax

    from covipal_jax.inference import loading
    from covipal_jax.data.synthetic import scene_qa
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

    train = load_split(data_dir, "train")
    max_len = int(section(config, "demo").train_max_len)
    rows = [scene_qa.encode_turns(tok, json.loads(str(t)), template=config.template,
                                  max_len=max_len) for t in train["turns"]]
    keep = np.array([r is not None for r in rows])
    if not keep.any():
        raise ValueError(f"no training sequence fits demo.train_max_len={max_len}")
    rows = [r for r in rows if r is not None]
    data = pt.EncodedSet(train["images"][keep], np.stack([r["ids"] for r in rows]),
                         np.stack([r["mask"] for r in rows]),
                         np.stack([r["loss_mask"] for r in rows]),
                         np.ones(len(rows), np.float32))
    n_turns = int(np.mean([r["loss_mask"].sum() for r in rows]) / 2)
    log(f"[pretrain] {cfg.num_vision_tokens} vision tokens; {len(rows)} training images with "
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


# ----------------------------------------------------------------------------- step 4: evaluate

def sweep(config: Any, llava_config: Any, ppm_dir: str, data_dir: str, log,
          *, cased: bool = False, progress: bool = True) -> dict:
    """Accuracy / tokens / prefill time for unpruned and every method x ratio on `test`."""
    from covipal_jax import sharding
    from covipal_jax.inference import loading
    from covipal_jax import pruning

    ev_cfg = section(config, "eval")
    loaded = loading.load(llava_config)
    cfg = loaded.cfg
    n_v = cfg.num_vision_tokens
    test = load_split(data_dir, "test")
    qtypes = test["qtype"]
    mk = lambda split: make_evaluator(loaded.model, loaded.params, loaded.processor,
                                      loaded.tokenizer, llava_config.template, split,
                                      buckets=llava_config.text_buckets,
                                      batch_size=int(ev_cfg.batch_size), cased=cased,
                                      seed=int(config.get("seed", 0)))
    out: dict[str, Any] = {"n_v": n_v, "n_test": int(len(qtypes)), "rows": []}

    def record(method, ratio, spec, res):
        hit = _queried_kept(test["queried_patches"], res.kept, n_v)
        row = dict(method=method, ratio=ratio, k=res.k, accuracy=res.accuracy,
                   seconds=res.seconds, queried_kept=hit,
                   llm_budget=llm_budget(spec, n_v, cfg.text.num_layers),
                   by_qtype={q: float(res.correct[qtypes == q].mean())
                             for q in sorted(set(qtypes.tolist()))})
        out["rows"].append(row)
        return row

    var_of: dict = {}  # method value -> its trained variables (trainable methods only)

    def spec_for(method, ratio):
        cls = pruning.get(method)
        pc = copy.deepcopy(config.pruning)
        with pc.unlocked():
            pc.method, pc.keep = method, ratio if cls.budgeted else 1.0
            pc.layer = int(ev_cfg.get("in_llm_layer", pc.layer))
            pc.update(staged_schedule(method, ratio, n_v, ev_cfg.get("staged_layers", {})))
            if cls.trainable and not pc.get("ppm_checkpoint"):
                pc.ppm_checkpoint = ppm_dir
        m = cls.from_config(pc)
        if m.trainable:
            m, var_of[m] = m.load_variables(cfg)
        return m

    with sharding.use_mesh(loaded.mesh, loaded.rules):
        ev = mk(test)
        runs = [(pruning.NoneMethod.name, 1.0)] + [(m, float(r)) for m in ev_cfg.methods
                                    for r in ev_cfg.ratios]
        specs = [spec_for(m, r) for m, r in runs]
        t0 = time.perf_counter()
        ev.compile(specs, var_of.get, workers=int(ev_cfg.get("compile_workers", 2)))
        log(f"[evaluate] compiled {len(set(specs))} prefill programs in "
            f"{time.perf_counter() - t0:.0f} s")
        bar = _progress(list(zip(runs, specs)), len(runs), "evaluate", progress)
        for (method, ratio), spec in bar:
            bar.set_postfix_str(f"{method} {ratio}")
            res = ev.accuracy(spec, var_of.get(spec))
            record(method, ratio, spec, res)
        for name in ("dev", "validation"):
            path = os.path.join(data_dir, f"{name}.npz")
            if os.path.exists(path):
                split = load_split(data_dir, name)
                r = mk(split).accuracy(pruning.NoneMethod())
                out[f"{name}_unpruned"] = r.accuracy
    return out


def staged_schedule(method: str, ratio: float, n_v: int, staged_layers) -> dict:
    """Config overrides of the multi-stage in-LLM methods at demo ratio r (`staged_layers`:
    {method: stage layers in 32-layer units}): stages keep sqrt(r), then r of the n_v vision
    tokens (PDrop `ratios`, SparseVLM `counts`, before its recycled tokens). {} otherwise."""
    if method not in staged_layers:
        return {}
    layers = tuple(int(l) for l in staged_layers[method])
    if len(layers) != 2:
        raise ValueError(f"eval.staged_layers.{method}: two stage layers, got {layers}")
    from covipal_jax import pruning

    keys, fractions = pruning.get(method).config_keys, (math.sqrt(ratio), ratio)
    if "ratios" in keys:           # PDrop: kept ratios of n_v per stage
        return {"layers": layers, "ratios": fractions}
    if "counts" in keys:           # SparseVLM: kept counts per stage (before recycling)
        return {"layers": layers, "counts": tuple(max(1, round(x * n_v)) for x in fractions)}
    raise ValueError(f"eval.staged_layers: no demo schedule for {method!r} (it takes neither "
                     "`ratios` nor `counts`)")


def llm_budget(spec, n_v: int, num_layers: int) -> float:
    """The share of the LLM's (vision token, layer) pairs a method computes: k / n_v for a
    pre-LLM method; (K n_v + (N - K) k) / (N n_v) for an in-LLM method pruning at layer K of N
    (FastV / DART run layers [0, K) on every token). The equal-budget axis of the comparison:
    the paper's K = 2 of 32 layers costs 6% of the depth, K = 1 of the demo's 3 layers 33%."""
    if spec.where != "in_llm":
        return spec.k(n_v) / n_v
    pairs, start, tokens = 0, 0, n_v
    for kk, k in spec.stages(n_v, num_layers):
        pairs += (kk - start) * tokens
        start, tokens = kk, k
    pairs += (num_layers - start) * tokens
    return pairs / (num_layers * n_v)


def _queried_kept(queried: np.ndarray, kept: np.ndarray, n_v: int) -> float:
    """Share of examples whose queried objects' patches all enter the LLM."""
    if queried.shape[1] != n_v:
        return float("nan")
    keep = np.zeros_like(queried)
    np.put_along_axis(keep, np.clip(kept, 0, n_v - 1), True, axis=1)
    return float(np.mean(np.all(~queried | keep, axis=1)))


def write_results(workdir: str, sweep_out: dict, timings: dict, extra: dict) -> dict:
    rows = sweep_out["rows"]
    base = next(r for r in rows if r["method"] == _baseline())
    methods: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["method"] != _baseline():
            methods.setdefault(r["method"], {})[_rkey(r["ratio"])] = r["accuracy"]
    results = {"unpruned": base["accuracy"], "methods": methods}
    with open(os.path.join(workdir, RESULTS), "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
    detail = dict(sweep_out, timings=timings, **extra)
    with open(os.path.join(workdir, DETAIL), "w") as f:
        json.dump(_plain(detail), f, indent=1)
    table = format_table(rows)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(table + "\n")
    plot(rows, os.path.join(workdir, PLOT), chance=extra.get("chance"))
    return results


def _rkey(ratio: float) -> str:
    return repr(float(ratio))


def format_table(rows: list[dict]) -> str:
    base = next(r for r in rows if r["method"] == _baseline())
    acc0, t0 = base["accuracy"], base["seconds"]
    lines = ["| method | keep | vision tokens | LLM budget | accuracy | vs unpruned "
             "| queried kept | prefill time vs unpruned |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = "unpruned" if r["method"] == _baseline() else r["method"]
        rel = r["accuracy"] / acc0 if acc0 else float("nan")
        budget = r.get("llm_budget", r["k"] / base["k"])
        lines.append(f"| {name} | {r['ratio']:g} | {r['k']} | {budget:.2f} | "
                     f"{r['accuracy']:.4f} | "
                     f"{100 * rel:.1f}% | {100 * r['queried_kept']:.1f}% | "
                     f"{r['seconds'] / t0:.2f} |")
    lines += ["", "LLM budget: the share of (vision token, decoder layer) pairs the LLM computes "
              "(`llm_budget`); in-LLM methods (fastv, dart) run the layers before K on every "
              "vision token."]
    ratios = sorted({r["ratio"] for r in rows if r["method"] != _baseline()}, reverse=True)
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != _baseline()))
    acc = {(r["method"], r["ratio"]): r["accuracy"] for r in rows}
    lines += ["", "| accuracy | " + " | ".join(f"r={x:g}" for x in ratios) + " |",
              "|---|" + "---|" * len(ratios)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(f"{acc[(m, x)]:.3f}" for x in ratios) + " |")
    lines.append(f"| (unpruned) | {acc0:.3f} |" + " |" * (len(ratios) - 1))
    return "\n".join(lines)


def plot(rows: list[dict], path: str, chance: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next(r for r in rows if r["method"] == _baseline())
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.4), dpi=110, sharey=True)
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != _baseline()))
    ratios = sorted({r["ratio"] for r in rows if r["method"] != _baseline()})
    n_v = base["k"]
    for ax, key, xlabel in (
            (axes[0], "ratio", "keep ratio r (vision tokens kept / n_v)"),
            (axes[1], "llm_budget", "LLM budget (share of vision token x decoder layer pairs)")):
        for m in methods:
            pts = sorted((r.get(key, r["k"] / n_v), r["accuracy"]) for r in rows
                         if r["method"] == m)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    linewidth=2.4 if m == _highlight() else 1.4, label=m,
                    zorder=3 if m == _highlight() else 2)
        ax.axhline(base["accuracy"], color="black", linestyle="--", linewidth=1,
                   label="unpruned")
        if chance is not None:
            ax.axhline(chance, color="grey", linestyle=":", linewidth=1, label="chance")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ratios)
        ax.set_xticklabels([f"{x:g}" for x in ratios])
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out accuracy")
    axes[0].set_title("accuracy vs keep ratio", fontsize=10)
    axes[1].set_title("accuracy vs LLM compute on vision tokens\n(in-LLM methods run the "
                      "first K layers on all tokens)", fontsize=9)
    axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


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
    eval_dir = os.path.join(workdir, "evaluation")
    fp = fingerprint("evaluate", ppm_fp, section(config, "eval"), config.pruning)
    cached = stages.cached("evaluate", eval_dir, fp)
    if cached and os.path.exists(os.path.join(workdir, RESULTS)):
        with open(os.path.join(workdir, DETAIL)) as f:
            detail = json.load(f)
        sweep_out = {"rows": detail["rows"]}
    else:
        t0 = time.perf_counter()
        stages.fresh(eval_dir)
        sweep_out = sweep(config, llava_config, ppm_dir, data, log, cased=real,
                          progress=progress)
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
