"""PPM training on multi-image rows (issue 12, `config.data.packed = "multi"`): LLaVA-OneVision
multi-image records (`"image": [a, b]`) through the TFDS builder into packed rows (placeholders
where the text puts them, per-image validity), stage-1 targets on every image's valid tokens
only, both stages through `loop.train` on a tiny OneVision, the trained PPM pruning a
`MultiImage` prompt through prefill, and records with more than P images counted."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest

from covipal_jax.data import packed_rows
from covipal_jax.data import pipeline as pl
from covipal_jax.inference import loading
from covipal_jax.inference import prefill as P
from covipal_jax.inference import visual_inputs as vi
from covipal_jax.models import anyres
from covipal_jax.pruning import select
from covipal_jax.pruning.ppm import PPMMethod
from covipal_jax.train import loop, objectives as ob, state as state_lib
from covipal_jax.weights import ppm_io
from tests.test_pipeline_packed import MAX_LEN, _model, _pipe as _packed_pipe
from tests.test_train_packed_loop import _config as _packed_config

# Compile-heavy (tiny models, many programs): run in the CI step for slow tests.
pytestmark = pytest.mark.slow

P_IMG = 2
Q, A = "what color is the square", "red"


def _img(r, h, w):
    return r.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _records():
    """In-memory records as the TFDS builder stores them: two-image, one-image (tiled only if
    it fits the bucket), three-image (over P = 2), a video (another kind)."""
    r = np.random.default_rng(0)
    two = lambda i: dict(id=f"m{i}", images=[_img(r, 20, 30), _img(r, 30, 20)], frames=[],  # noqa
                         values=[f"<image> {Q} <image>", A], question=Q, answer=A)
    return [two(0), dict(id="one", images=[_img(r, 28, 28)], frames=[], question=Q, answer=A),
            two(1), dict(id="three", images=[_img(r, 20, 20)] * 3, frames=[], question=Q,
                         answer=A),
            dict(id="v", images=[], frames=[_img(r, 20, 20)] * 4, question=Q, answer=A),
            two(2), two(3), two(4)]


def _pipe(source, **kw):
    return _packed_pipe("multi", source, max_images=P_IMG, **kw)


def _config(**data):
    c = _packed_config("multi")
    c.data.max_images = P_IMG
    for k, v in data.items():
        c.data[k] = v
    return c


@pytest.fixture(scope="module")
def llava_source(tmp_path_factory):
    """A LLaVA-format JSON with multi-image records built by `pipeline.build_source`."""
    root = tmp_path_factory.mktemp("multi_llava")
    r = np.random.default_rng(1)
    (root / "img").mkdir()
    for name, (h, w) in {"a.png": (20, 30), "b.png": (30, 20), "c.png": (28, 28)}.items():
        PIL.Image.fromarray(_img(r, h, w)).save(root / "img" / name)
    ask = lambda q: [{"from": "human", "value": q}, {"from": "gpt", "value": A}]  # noqa: E731
    recs = [{"id": "ab", "image": ["a.png", "b.png"], "conversations": ask(f"<image> {Q} <image>")},
            {"id": "ba", "image": ["b.png", "a.png"], "conversations": ask(f"{Q} <image> <image>")},
            {"id": "abc", "image": ["a.png", "b.png", "c.png"],
             "conversations": ask("<image> <image> <image> " + Q)},
            {"id": "c", "image": "c.png", "conversations": ask(f"<image>\n{Q}")}]
    (root / "data.json").write_text(json.dumps(recs))
    c = _config(kind="llava", name="multi", json=str(root / "data.json"),
                images=str(root / "img"), shuffle=False)
    src, skipped = pl.build_source(c, str(root / "tfds"))
    return c, src, skipped


def test_builder_rows_place_placeholders_and_mark_valid_images(llava_source):
    cfg = _model()[0]
    c, src, skipped = llava_source
    assert skipped == {"too_many_images": 1}            # 3 images > data.max_images = 2
    assert len(src) == 3
    p = pl.from_config(c, src, tokenizer=loading.builtin_tokenizer(),
                       processor=loading.default_processor(cfg), global_batch=3,
                       model_cfg=cfg, skipped=skipped)
    b = p.batch(0)                                       # ab, ba, c in some order
    s = p.packed.processor.crop_size
    assert b["multi_pixels"].shape == (3, P_IMG, 1, s, s, 3) and "pixels" not in b
    assert b["multi_plan"].shape == (3, P_IMG, 8) and b["image_valid"].dtype == bool
    rec_id = {int(i): packed_rows.as_text(src[int(i)]["id"]) for i in b["index"]}
    row_of = {rec_id[int(i)]: j for j, i in enumerate(b["index"])}
    assert set(row_of) == {"ab", "ba", "c"}
    # "c" (one image: 1 + 1x1 tiles > C = 1 view) is another kind: a weight-0 filler row
    assert p.stats.wrong_kind == 1 and p.stats.skipped_at_build == {"too_many_images": 1}
    np.testing.assert_array_equal(b["weight"][[row_of["ab"], row_of["ba"], row_of["c"]]],
                                  [1, 1, 0])
    np.testing.assert_array_equal(b["image_valid"][row_of["c"]], [True, False])
    tok = loading.builtin_tokenizer()
    for name, prompt in [("ab", f"<image> {Q} <image> ANSWER:"),
                         ("ba", f"{Q} <image> <image> ANSWER:")]:
        j = row_of[name]
        np.testing.assert_array_equal(b["image_valid"][j], [True, True])
        ref = tok.encode(prompt, add_bos=tok.add_bos_default)
        np.testing.assert_array_equal(b["ids"][j][b["mask"][j]][:len(ref)], ref)
        assert (b["ids"][j] == cfg.image_token_id).sum() == 2
        assert (b["multi_plan"][j, :, 0] == 0).all()     # untiled views (multi-image rule)
    # the first image of "ba" is the second of "ab" (b.png)
    np.testing.assert_array_equal(b["multi_pixels"][row_of["ab"], 1],
                                  b["multi_pixels"][row_of["ba"], 0])
    vis = ob.visual_from_batch(cfg, {k: jnp.asarray(x) for k, x in b.items()})
    assert isinstance(vis, vi.MultiImage) and vis.max_images == P_IMG
    assert vis.capacity == anyres.bucket_capacity(cfg, 1)


def test_over_limit_and_other_kinds_counted_not_fatal():
    cfg = _model()[0]
    p, spec = _pipe(_records())
    b0, b1 = p.batch(0), p.batch(1)     # two, one, two, three | video, two, two, two
    np.testing.assert_array_equal(b0["weight"], [1, 0, 1, 0])
    np.testing.assert_array_equal(b1["weight"], [0, 1, 1, 1])
    assert p.stats.too_many_images == 1 and p.stats.wrong_kind == 2
    # with a bucket that holds its tiles, a lone image is tiled (HF's single-image rule)
    big, _ = _pipe(_records(), num_views=max(spec.processor.buckets))
    row = big.encode(_records()[1])
    np.testing.assert_array_equal(row["image_valid"], [True, False])
    assert row["multi_plan"][0, 0] >= 1 and (row["ids"] == cfg.image_token_id).sum() == 1
    with pytest.raises(ValueError, match="max_images"):
        packed_rows.PackedSpec.for_model(cfg, "multi")
    assert state_lib.batch_keys("multi")[:3] == ("multi_pixels", "multi_plan", "image_valid")


def _prepared(stage=1, **kw):
    cfg, model, params = _model()
    p, _ = _pipe(_records())
    batch = {k: jnp.asarray(v) for k, v in p.batch(1).items() if k != "index"}
    n_v = cfg.num_vision_tokens
    spec = ob.ObjectiveSpec(stage=stage, n_v=n_v, k=n_v // 4, guide_layer=1, **kw)
    return cfg, batch, jax.jit(lambda b: ob.prepare(model, params, b, spec))(batch)


@pytest.mark.parametrize("queries", ["text_after_image", "all"])
def test_targets_live_on_valid_tokens_of_every_image(queries):
    cfg, batch, prep = _prepared(label_queries=queries)
    valid = np.asarray(prep.enc.valid)
    labels = np.asarray(prep.labels)
    n = valid.shape[1]
    n1 = n // P_IMG
    assert n == vi.MultiImage.num_slots(ob.visual_from_batch(cfg, batch), cfg)
    assert (labels[~valid] == 0).all()
    ok = np.asarray(prep.label_ok)
    np.testing.assert_allclose(labels[ok].sum(-1), 1.0, rtol=1e-5)
    w = np.asarray(batch["weight"]) > 0
    assert ok[w].all()
    for b in np.flatnonzero(w):          # both images get target mass
        assert labels[b, :n1].sum() > 0 and labels[b, n1:].sum() > 0
    # the filler row's absent image: no valid slot, so no target there
    assert not valid[0, n1:].any()
    # the LLM sees the compact sequence: text without placeholders + the valid slots
    ids, mask = np.asarray(batch["ids"]), np.asarray(batch["mask"])
    n_ph = (ids == cfg.image_token_id).sum(-1)
    np.testing.assert_array_equal(np.asarray(prep.enc.seq_mask).sum(-1),
                                  valid.sum(-1) + mask.sum(-1) - n_ph)
    # each vision slot sits at its sequence index; the answer is marked after both images
    vis_index = np.asarray(prep.enc.vis_index)
    assert np.asarray(prep.enc.is_vis)[np.arange(4)[:, None], vis_index].all()
    ans = np.asarray(prep.enc.answer)
    assert (ans.sum(-1)[w] == np.asarray(batch["loss_mask"]).sum(-1)[w]).all()
    assert (np.argmax(ans, -1)[w] > vis_index[w, -1]).all()
    # masked MSE: invalid slots' scores do not move the loss
    scores = jnp.where(prep.enc.valid, 1.0, 123.0)
    l1 = ob.stage1_per_example(scores, prep.labels, "mse", 4, prep.enc.valid)
    l2 = ob.stage1_per_example(jnp.ones_like(scores), prep.labels, "mse", 4, prep.enc.valid)
    np.testing.assert_allclose(np.asarray(l1), np.asarray(l2))


def test_stage2_bias_reaches_every_image_span():
    cfg, batch, prep = _prepared(stage=2)
    n = prep.enc.n_v
    values = jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.float32)[None], (4, n))
    bias = np.asarray(ob.vision_key_bias(values, prep.enc))
    vis_index = np.asarray(prep.enc.vis_index)
    np.testing.assert_array_equal(bias[np.arange(4)[:, None], vis_index], np.asarray(values))
    assert (bias[~np.asarray(prep.enc.is_vis)] == 0).all()
    assert np.isfinite(np.asarray(prep.teacher_logp)).all()


def test_trainer_runs_both_stages_and_ppm_prunes_a_multi_image_prompt(tmp_path):
    cfg, model, params = _model()
    summary = loop.train(_config(), str(tmp_path), source=_records())
    assert summary["step"] == 6 and [s["stage"] for s in summary["stages"]] == [1, 2]
    assert all(s["too_many_images"] >= 1 for s in summary["stages"])
    metrics = [m for m in loop.read_metrics(str(tmp_path)) if "loss" in m]
    s1 = [m["loss"] for m in metrics if m["stage"] == 1]
    s2 = [m["loss"] for m in metrics if m["stage"] == 2]
    assert s1 and s2 and np.isfinite(s1 + s2).all()
    module, variables, _ = ppm_io.load_ppm(str(tmp_path / "ppm"), cfg)
    assert module.cfg.position == "layout"
    # the trained PPM prunes two-image prompts through prefill
    p, _ = _pipe(_records())
    rows = [p.encode(_records()[i]) for i in (0, 5)]
    vis = ob.visual_from_batch(cfg, {k: jnp.asarray(np.stack([r[k] for r in rows]))
                                     for k in packed_rows.VISUAL_KEYS["multi"]})
    ids = np.stack([r["ids"] for r in rows])
    prompt_len = MAX_LEN - int(rows[0]["loss_mask"].sum())
    ids, mask = ids[:, :prompt_len], np.stack([r["mask"] for r in rows])[:, :prompt_len]
    method = PPMMethod(keep=0.25, ppm=module.cfg)
    out = jax.jit(lambda v, i, m: P.prefill(model, params, v, i, m, method, extra=2,
                                            variables=variables))(vis, jnp.asarray(ids),
                                                                  jnp.asarray(mask))
    assert np.isfinite(np.asarray(out.last_logits)).all()
    kept = np.asarray(out.kept)
    n1 = vis.image_slots(cfg)
    ctx_valid = np.asarray(vi.encode_packed(model, params, vis)[1])
    budget = np.asarray(select.example_budget(method.keep, kept.shape[1], jnp.asarray(ctx_valid)))
    for b in range(2):
        k = kept[b][kept[b] >= 0]
        assert len(k) == budget[b] and ctx_valid[b, k].all()      # never a padding slot
        assert (k < n1).any() and (k >= n1).any()                  # tokens of both images
