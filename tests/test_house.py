"""The house rules: a method defined outside the package runs everywhere; the import rules; the
facade compiles once per shape; a multi-stage in-LLM method with merged tokens runs."""
from __future__ import annotations

import ast
import dataclasses
import json
import os
import pathlib
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

import tiny
from covipal_jax import pruning
from covipal_jax.inference import loading
from covipal_jax.inference.sampler import Sampler

PKG = pathlib.Path(__file__).resolve().parents[1] / "covipal_jax"


# ----------------------------------------------------------------------------- a new method

@pruning.register
@dataclasses.dataclass(frozen=True, kw_only=True)
class CornerFirst(pruning.PreLLMMethod):
    """Defined in a test file: keeps the first `k` patches in raster order, or the last ones
    (`from_end`, config key `corner_from_end`)."""

    name: ClassVar[str] = "test_corner_first"
    config_keys: ClassVar[tuple[str, ...]] = ("corner_from_end:from_end",)
    from_end: bool = False

    def select(self, ctx, k, variables=None):
        n_v = ctx.n_v
        start = n_v - k if self.from_end else 0
        idx = jnp.broadcast_to(jnp.arange(start, start + k, dtype=jnp.int32), (ctx.batch, k))
        tokens = jnp.take_along_axis(ctx.vision_tokens, idx[..., None], axis=1)
        return pruning.PruneResult(tokens=tokens, indices=idx)


@pruning.register
@dataclasses.dataclass(frozen=True, kw_only=True)
class TwoStageMerge(pruning.InLLMMethod):
    """Two in-LLM stages; the second also adds one merged token (the mean of the dropped)."""

    name: ClassVar[str] = "test_two_stage"

    def stages(self, n_v, num_layers):
        k = self.k(n_v)
        return ((1, max(k + 1, n_v // 2)), (2, k))

    def select_in_llm(self, probe, k, stage):
        rows = probe.last_index[:, None]
        att = probe.vision_columns(probe.attention_rows(rows, layer="next"))[:, :, 0].mean(1)
        keep = jnp.sort(jax.lax.top_k(att, k - stage)[1], axis=-1).astype(jnp.int32)
        if stage == 0:
            return keep
        h = jnp.take_along_axis(probe.next_hidden(), probe.vision_index[..., None], axis=1)
        merged = h.mean(axis=1, keepdims=True)
        return pruning.InLLMResult(kept=keep, merged=merged, merged_positions=keep[:, -1:])


def _sampler(batch_size=None):
    config = tiny.config()
    loaded = loading.load(config)
    return config, Sampler.from_config(config, loaded)


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(n)]


def test_new_method_through_the_facade_and_config():
    config, sampler = _sampler()
    with config.unlocked():
        config.pruning.method, config.pruning.keep = "test_corner_first", 4.0
        config.pruning.corner_from_end = True
    m = pruning.from_config(config.pruning)
    assert m == CornerFirst(keep=4, from_end=True)
    n_v = sampler.loaded.cfg.num_vision_tokens
    out = sampler.generate(_images(2), ["what color is the square ?"] * 2, method=m,
                           max_new_tokens=3)
    assert len(out.texts) == 2 and out.num_vision_tokens == 4
    np.testing.assert_array_equal(out.kept, [list(range(n_v - 4, n_v))] * 2)
    logits, kept = sampler.first_token_logits(_images(2), ["is there a ring ?"] * 2,
                                              method="test_corner_first")
    assert logits.shape[0] == 2 and np.isfinite(logits).all()


def test_new_method_through_the_eval_harness(tmp_path):
    from covipal_jax.eval import benchmarks as bm
    from covipal_jax.eval import harness as hs
    from covipal_jax.eval.predictor import LlavaPredictor, method_for

    config, sampler = _sampler()
    qs = {}
    for i in range(3):
        d = tmp_path / "images"
        d.mkdir(exist_ok=True)
        Image.fromarray(_images(1, seed=i)[0]).save(d / f"n{i}.jpg")
        qs[f"q{i}"] = {"imageId": f"n{i}", "question": f"what color {i} ?", "answer": "red"}
    (tmp_path / "gqa.json").write_text(json.dumps(qs))
    data = bm.read_gqa(str(tmp_path / "gqa.json"))
    pred = LlavaPredictor(sampler, method_for(config, "test_corner_first", 8), batch_size=2)
    out = str(tmp_path / "preds.jsonl")
    metrics = hs.run_benchmark(pred, data, out, batch_size=2, progress=False, num_workers=1)
    assert metrics and os.path.exists(out)
    assert pred.method.to_dict(16)["method"] == "test_corner_first"


def test_new_method_through_the_demo_evaluation():
    from covipal_jax.demo import evaluation
    from covipal_jax.demo import lib as demo_lib
    from covipal_jax.data import text as T

    model, params = tiny.model_and_params()
    tok = loading.builtin_tokenizer()
    ids, mask = T.encode_prompts(tok, ["what color is the ring ?"] * 3, template="plain",
                                 buckets=(20,))
    ev = evaluation.Evaluator(model, params, processor=loading.default_processor(model.cfg),
                              images=np.stack(_images(3)), ids=ids, mask=mask,
                              answer_ids=[(5,)] * 3, batch_size=2)
    n_v = model.cfg.num_vision_tokens
    for m in (CornerFirst(keep=0.25), TwoStageMerge(keep=0.25)):
        res = ev.accuracy(m)
        assert res.k == m.k(n_v) and res.kept.shape == (3, m.k(n_v))
        assert 0 < demo_lib.llm_budget(m, n_v, model.cfg.text.num_layers) <= 1
    row = lambda meth, r, acc: dict(method=meth, ratio=r, k=4, accuracy=acc, seconds=1.0,
                                    queried_kept=0.5, llm_budget=0.5)
    table = demo_lib.format_table([row("none", 1.0, 0.5), row("test_corner_first", 0.25, 0.4)])
    assert "test_corner_first" in table


def test_multi_stage_in_llm_with_merged_tokens():
    """Two stages -> three KV segments; the merged token enters the sequence."""
    from covipal_jax.inference.prefill import prefill

    model, params = tiny.model_and_params()
    pixels, ids, mask = tiny.batch()
    n_v, n_layers = model.cfg.num_vision_tokens, model.cfg.text.num_layers
    m = TwoStageMerge(keep=0.25)
    out = jax.jit(lambda p: prefill(model, p, pixels, ids, mask, m, extra=2))(params)
    (k1, _), (k2, k) = m.stages(n_v, n_layers)
    assert [(s.start, s.stop) for s in out.segments] == [(0, k1), (k1, k2), (k2, n_layers)]
    assert out.segments[-1].base == ids.shape[1] - 1 + k and out.kept.shape == (2, k)
    assert np.isfinite(np.asarray(out.last_logits)).all()


def test_facade_compiles_once_per_shape():
    config, sampler = _sampler()
    m = pruning.PoolMethod(keep=0.25)
    for n in range(3):
        sampler.generate(_images(2, seed=n), [f"what color {n} ?"] * 2, method=m,
                         max_new_tokens=2)
        sampler.first_token_logits(_images(2, seed=n), [f"is it red {n} ?"] * 2, method=m)
    assert sampler.compilations() == {"first_token": 1, "prefill": 1, "decode": 1,
                                      "decode_step": 0}
    sampler.generate(_images(2), ["x ?"] * 2, method=pruning.PoolMethod(keep=0.5),
                     max_new_tokens=2)
    assert sampler.compilations()["prefill"] == 2


def test_random_answers_do_not_depend_on_the_batch():
    config, sampler = _sampler()
    m = pruning.RandomMethod(keep=0.25)
    imgs, prompts = _images(3), [f"what color {i} ?" for i in range(3)]
    together = sampler.first_token_logits(imgs, prompts, method=m)[1]
    for i in range(3):
        alone = sampler.first_token_logits(imgs[i:i + 1], prompts[i:i + 1], method=m)[1]
        np.testing.assert_array_equal(alone[0], together[i])


# ----------------------------------------------------------------------------- import rules

CORE = ("models", "pruning", "inference", "weights", "data", "train", "eval")
# Entry points resolve `--config NAME` through `covipal_jax.configs.path`: the CLIs and the
# lmms-eval model adapter (lmms-eval builds it from `--model_args config=NAME,...`).
ENTRY_POINTS = ("__main__.py", "generate.py", "lmms_eval_model.py")


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        yield rel, ast.parse(path.read_text(), str(path))


def _imports(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module
            for a in node.names:
                yield f"{node.module}.{a.name}"


def test_import_rules():
    bad = []
    for rel, tree in _modules():
        parts = rel.parts
        for name in _imports(tree):
            if name == "configs" or name.startswith("configs."):
                bad.append(f"{rel}: imports the top-level configs package")
            if (parts[0] in CORE and rel.name not in ENTRY_POINTS
                    and name.startswith("covipal_jax.configs")):
                bad.append(f"{rel}: core library imports {name}")
            if parts[0] == "models" and name.startswith("covipal_jax.pruning"):
                bad.append(f"{rel}: models/ imports {name}")
    assert not bad, "\n".join(bad)


def test_no_method_name_string_comparison_outside_pruning():
    names = set(pruning.names()) - {n for n in pruning.names() if n.startswith("test_")}
    # Same strings, other concepts: a demo STAGE name (data, pretrain, ppm, evaluate), the
    # remat policy "none", a missing-value spelling in benchmark files, the "ppm" section key of
    # a PPM artifact's config.json.
    allowed = {("demo/lib.py", "stop_after"), ("models/layers.py", "name"),
               ("models/layers.py", "self.remat"),
               ("tools/aot.py", "r.get('remat_policy', 'none')"),
               ("tools/aot_report.py", "r.get('remat_policy', 'none')"),
               ("eval/benchmarks/common.py", "v.strip().lower()"),
               ("weights/ppm_io.py", "k")}
    bad = []
    for rel, tree in _modules():
        if rel.parts[0] == "pruning":
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.Compare):
                continue
            operands = [node.left, *node.comparators]
            consts = [o.value for o in operands if isinstance(o, ast.Constant)]
            consts += [e.value for o in operands if isinstance(o, (ast.Tuple, ast.List, ast.Set))
                       for e in o.elts if isinstance(e, ast.Constant)]
            hit = [c for c in consts if isinstance(c, str) and c in names]
            other = ast.unparse(node.left)
            if hit and (str(rel), other) not in allowed:
                bad.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
    assert not bad, "\n".join(bad)
