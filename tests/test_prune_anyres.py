"""Pruning over packed AnyRes images and videos (issue 12): masked top-k, methods on padded
buffers, pruned prefill / generation with static shapes, parity of the unpruned path with
`Llava.forward_anyres` / `forward_video`, one compilation per (bucket, text bucket, k)."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import covipal_jax.pruning.divprune  # noqa: F401  (registers "divprune")
from covipal_jax import pruning
from covipal_jax.configs import tiny_next, tiny_ov
from covipal_jax.data import anyres as data_anyres
from covipal_jax.inference import decoding
from covipal_jax.inference import prefill as P
from covipal_jax.inference import visual_inputs as vi
from covipal_jax.models import anyres
from covipal_jax.models.config import LlavaConfig
from covipal_jax.models.llava import Llava, init_params
from covipal_jax.pruning.base import PruneContext
from covipal_jax.pruning.ppm import PPM, PPMConfig, PPMMethod
from covipal_jax.pruning.select import example_budget, masked_topk

ATOL = 1e-5
SHAPES = [(37, 91), (60, 50)]


@functools.lru_cache(maxsize=None)
def _model(name: str):
    module = {"ov": tiny_ov, "next": tiny_next}[name]
    cfg = LlavaConfig.from_config(module.get_config().model)
    params = nn.unbox(init_params(cfg, jax.random.key(0)))
    return cfg, Llava(cfg), params


def _images(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]


def _anyres(cfg, shapes, seed=0, num_views=None):
    x = data_anyres.preprocess(_images(shapes, seed), data_anyres.AnyResConfig.for_model(cfg),
                               num_views=num_views)
    plan = anyres.pack_plan(x.layout, cfg.vision.grid[0], cfg.anyres_max_crops)
    cap = anyres.bucket_capacity(cfg, x.pixels.shape[1])
    return vi.AnyResImage(jnp.asarray(x.pixels), jnp.asarray(plan), cap), plan, cap


def _prompt(b, t, token, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(10, 100, (b, t)).astype(np.int32)
    ids[:, 3] = token
    mask = np.ones((b, t), bool)
    mask[0, :2] = False  # left padding on row 0
    ids[0, :2] = 0
    return jnp.asarray(ids), jnp.asarray(mask)


def _video(b=2, f=4, seed=0, side=28):
    rng = np.random.default_rng(seed)
    return vi.Video(jnp.asarray(rng.standard_normal((b, f, side, side, 3)).astype(np.float32)))


# ----------------------------------------------------------------------------- masked top-k

def test_masked_topk_excludes_invalid_forces_newlines_and_budget():
    s = jnp.asarray([[0.1, 0.9, 0.5, 0.7, 0.2, 0.3], [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    valid = jnp.asarray([[1, 0, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], bool)
    forced = jnp.asarray([[0, 0, 0, 0, 1, 0], [0, 1, 0, 0, 0, 0]], bool)
    idx, kept = masked_topk(s, 3, valid, forced, jnp.asarray([2, 3]))
    # row 0: newline 4 forced, then the best valid (3); 2 is ranked third but over budget
    np.testing.assert_array_equal(idx, [[2, 3, 4], [0, 1, 2]])
    np.testing.assert_array_equal(kept, [[False, True, True], [True, True, False]])
    # every kept slot is valid; ties go to the lower index
    idx, kept = masked_topk(jnp.zeros((1, 5)), 2, jnp.ones((1, 5), bool))
    np.testing.assert_array_equal(idx, [[0, 1]])
    with pytest.raises(ValueError, match="outside"):
        masked_topk(s, 7)


def test_example_budget_ratio_of_real_tokens():
    valid = jnp.asarray([[1] * 68 + [0] * 71, [1] * 106 + [0] * 33], bool)
    np.testing.assert_array_equal(example_budget(0.25, 35, valid), [17, 26])  # half to even
    np.testing.assert_array_equal(example_budget(20, 35, valid), [20, 20])
    np.testing.assert_array_equal(example_budget(1.0, 139, valid), [68, 106])


# ----------------------------------------------------------------------------- methods

def _packed_ctx(seed=0):
    cfg, model, params = _model("ov")
    vis, _, _ = _anyres(cfg, SHAPES, seed)
    ids, mask = _prompt(2, 16, cfg.image_token_id)
    ctx, _, _ = vi.packed_context(model, params, vis, ids, mask, pruning.NoneMethod(),
                                  rng=jax.random.key(seed))
    return ctx


@pytest.mark.parametrize("name,keep", [("random", 0.25), ("random", 40), ("divprune", 0.25),
                                       ("divprune", 0.9), ("none", 1.0), ("ppm", 0.5)])
@pytest.mark.slow
def test_methods_never_keep_padding_and_always_keep_newlines(name, keep):
    ctx = _packed_ctx()
    n = ctx.n_v
    variables = None
    if name == "ppm":
        pcfg = PPMConfig(n_v=n, d_model=ctx.vision_tokens.shape[-1], width=16, num_heads=2)
        method = PPMMethod(keep=keep, ppm=pcfg)
        variables = PPM(pcfg).init(jax.random.key(1), ctx.vision_tokens, ctx.text_embeds,
                                   ctx.text_mask)
    else:
        method = pruning.get(name)(keep=keep)
    k = method.k(n)
    res = method.select(ctx, k, variables)
    valid, kind = np.asarray(ctx.valid), np.asarray(ctx.coords[..., 0])
    kept_valid = np.ones(res.indices.shape, bool) if res.valid is None else np.asarray(res.valid)
    budget = np.asarray(example_budget(method.keep, k, ctx.valid))
    for b in range(ctx.batch):
        kept = np.asarray(res.indices[b])[kept_valid[b]]
        assert len(set(kept.tolist())) == len(kept)
        assert valid[b, kept].all(), "a padding slot was kept"
        assert set(np.flatnonzero(kind[b] == anyres.KIND_NEWLINE)) <= set(kept.tolist())
        assert len(kept) == budget[b]


@pytest.mark.parametrize("name,kw", [("pool", {"mode": "avg"}),
                                     ("visionzip", {"order": "spatial"})])
def test_grid_only_options_refuse_packed_input(name, kw):
    # pool (stride) and visionzip run per view (tests/test_pruning_{pool,visionzip}_packed.py)
    ctx = _packed_ctx()
    method = pruning.get(name)(keep=0.5, **kw)
    with pytest.raises(ValueError, match="multi-crop"):
        method.select(ctx.replace(project=lambda f: f), method.k(ctx.n_v))


def test_in_llm_and_tower_stat_methods_refused_clearly():
    cfg, model, params = _model("ov")
    vis, _, _ = _anyres(cfg, SHAPES)
    ids, mask = _prompt(2, 16, cfg.image_token_id)
    with pytest.raises(ValueError, match="in-LLM"):  # in-LLM methods: prefill only
        P.forward_packed(model, params, vis, ids, mask, pruning.get("fastv")(keep=0.5))


# ----------------------------------------------------------------------------- parity

@pytest.mark.slow
@pytest.mark.parametrize("name", ["ov", "next"])
def test_unpruned_anyres_prefill_equals_forward_anyres(name):
    cfg, model, params = _model(name)
    vis, plan, cap = _anyres(cfg, SHAPES)
    ids, mask = _prompt(2, 16, cfg.image_token_id)
    ref, rmask = model.apply(params, vis.pixels, plan, ids, mask, capacity=cap,
                             method=Llava.forward_anyres)
    logits, smask, kept = P.forward_packed(model, params, vis, ids, mask, pruning.NoneMethod())
    np.testing.assert_array_equal(smask, rmask)
    diff = float(jnp.max(jnp.abs(jnp.where(rmask[..., None], logits - ref, 0.0))))
    out = P.prefill(model, params, vis, ids, mask, pruning.NoneMethod(), extra=3)
    last = float(jnp.max(jnp.abs(out.last_logits - ref[:, -1])))
    print(f"anyres {name}: full logits max|diff| {diff:.2e}, prefill last {last:.2e}")
    assert diff <= ATOL and last <= ATOL
    lengths = anyres.packed_lengths(plan, cfg.vision.grid[0])
    np.testing.assert_array_equal((np.asarray(kept) >= 0).sum(1), lengths)


@pytest.mark.slow
def test_unpruned_video_prefill_equals_forward_video():
    cfg, model, params = _model("ov")
    vis = _video()
    ids, mask = _prompt(2, 16, cfg.video_token_id)
    ref, rmask = model.apply(params, vis.frames, ids, mask, method=Llava.forward_video)
    out = P.prefill(model, params, vis, ids, mask, pruning.NoneMethod(), extra=3)
    last = float(jnp.max(jnp.abs(out.last_logits - ref[:, -1])))
    print(f"video: prefill last logits max|diff| {last:.2e}")
    assert last <= ATOL
    assert out.kept.shape == (2, 4 * 2 * 2 + 1)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["anyres", "video"])
def test_pruned_prefill_equals_pruned_forward(kind):
    """The cached prefill's last logits equal the cache-free pruned forward's."""
    cfg, model, params = _model("ov")
    if kind == "anyres":
        vis, _, _ = _anyres(cfg, SHAPES)
        token = cfg.image_token_id
    else:
        vis, token = _video(), cfg.video_token_id
    ids, mask = _prompt(2, 16, token)
    method = pruning.get("divprune")(keep=0.25)
    logits, _, kept = P.forward_packed(model, params, vis, ids, mask, method)
    out = P.prefill(model, params, vis, ids, mask, method, extra=2)
    np.testing.assert_array_equal(out.kept, kept)
    assert float(jnp.max(jnp.abs(out.last_logits - logits[:, -1]))) <= ATOL


# ----------------------------------------------------------------------------- generation

@pytest.mark.slow
def test_generation_compiles_once_per_bucket_text_bucket_and_k():
    cfg, model, params = _model("ov")
    gen = decoding.Generator(model, pruning.get("random")(keep=0.25), max_new_tokens=3,
                             eos_id=2)
    ids, mask = _prompt(2, 16, cfg.image_token_id)
    # two batches in the same crop bucket (different aspect ratios / plans): one program
    a, _, _ = _anyres(cfg, SHAPES, seed=0, num_views=10)
    b, _, _ = _anyres(cfg, [(90, 30), (50, 52)], seed=1, num_views=10)
    assert a.capacity == b.capacity and a.pixels.shape == b.pixels.shape
    out_a = gen(params, a, ids, mask, rng=jax.random.key(0))
    gen(params, b, ids, mask, rng=jax.random.key(0))
    assert gen.compilations()["prefill"] == 1 and gen.compilations()["decode"] == 1
    assert out_a.tokens.shape == (2, 3)
    # another crop bucket: a second program
    c, _, _ = _anyres(cfg, [(28, 28), (30, 29)], seed=2)
    assert c.pixels.shape[1] < 10
    gen(params, c, ids, mask, rng=jax.random.key(0))
    assert gen.compilations()["prefill"] == 2
    # another text bucket: a third
    ids32, mask32 = _prompt(2, 32, cfg.image_token_id)
    gen(params, a, ids32, mask32, rng=jax.random.key(0))
    assert gen.compilations()["prefill"] == 3
    # another k is another method value: its own Generator, one program for the same input
    gen2 = decoding.Generator(model, pruning.get("random")(keep=0.5), max_new_tokens=3,
                              eos_id=2)
    gen2(params, a, ids, mask, rng=jax.random.key(0))
    gen2(params, b, ids, mask, rng=jax.random.key(0))
    assert gen2.compilations()["prefill"] == 1


@pytest.mark.slow
def test_video_generation_greedy_matches_unpruned_forward_first_token():
    cfg, model, params = _model("ov")
    vis = _video()
    ids, mask = _prompt(2, 16, cfg.video_token_id)
    gen = decoding.Generator(model, pruning.NoneMethod(), max_new_tokens=4, eos_id=2)
    out = gen(params, vis, ids, mask, rng=jax.random.key(0))
    ref, _ = model.apply(params, vis.frames, ids, mask, method=Llava.forward_video)
    np.testing.assert_array_equal(out.tokens[:, 0], np.argmax(np.asarray(ref[:, -1]), -1))
    # the second token: the unpruned forward on the prompt + the first token
    ids2 = jnp.concatenate([ids, jnp.asarray(out.tokens[:, :1])], axis=1)
    mask2 = jnp.concatenate([mask, jnp.ones((2, 1), bool)], axis=1)
    ref2, _ = model.apply(params, vis.frames, ids2, mask2, method=Llava.forward_video)
    np.testing.assert_array_equal(out.tokens[:, 1], np.argmax(np.asarray(ref2[:, -1]), -1))


def test_packed_context_has_layout():
    ctx = _packed_ctx()
    kind = np.asarray(ctx.coords[..., 0])
    assert ((kind == anyres.KIND_INVALID) == ~np.asarray(ctx.valid)).all()
    vctx, _, _ = vi.packed_context(*_model("ov")[1:], _video(), *_prompt(2, 16, 5),
                                   pruning.NoneMethod())
    k = np.asarray(vctx.coords[0])
    assert (k[:-1, 0] == vi.KIND_FRAME).all() and k[-1, 0] == anyres.KIND_NEWLINE
    assert k[-2, 1] == 4 * 2 - 1 and k[-2, 2] == 1  # last frame's last row / col
    assert isinstance(vctx, PruneContext)


# ----------------------------------------------------------------------------- the CLI

def _write_video(path, n=12, h=48, w=64):
    import av

    with av.open(str(path), "w") as out:
        s = out.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            x = np.full((h, w, 3), 10 + 15 * i, np.uint8)
            for pkt in s.encode(av.VideoFrame.from_ndarray(x, format="rgb24")):
                out.mux(pkt)
        for pkt in s.encode():
            out.mux(pkt)
    return path


def _ov_config(**pruning_kw):
    c = tiny_ov.get_config()
    c.max_new_tokens = 3
    for k, v in pruning_kw.items():
        c.pruning[k] = v
    return c


@pytest.mark.slow
def test_generate_cli_video_and_anyres(tmp_path):
    pytest.importorskip("av")
    from PIL import Image

    from covipal_jax import generate

    path = _write_video(tmp_path / "clip.mp4")
    r = generate.run(_ov_config(method="random", keep=0.5), None, "what happens ?",
                     video=str(path), frames=4)
    # 4 frames x 2 x 2 pooled tokens + 1 newline = 17; half of them, the newline kept
    assert r["input"] == "video" and r["vision_tokens_total"] == 17
    assert r["vision_tokens_kept"] == 8 and 16 in r["kept_indices"]
    assert isinstance(r["answer"], str)
    img = tmp_path / "img.png"
    Image.fromarray(_images([(37, 91)])[0]).save(img)
    r = generate.run(_ov_config(method="divprune", keep=0.25), str(img), "what is it ?")
    assert r["input"] == "anyres" and r["vision_tokens_total"] == 68
    assert r["vision_tokens_kept"] == 17
    r = generate.run(_ov_config(), str(img), "what is it ?", anyres=False)
    assert r["input"] == "image" and r["vision_tokens_kept"] == 16
    with pytest.raises(ValueError, match="not both"):
        generate.run(_ov_config(), str(img), "x", video=str(path), frames=4)
    with pytest.raises(ValueError, match="cannot|video"):
        generate.run(_ov_config(), None, "x", video=str(tmp_path / "missing.mp4"), frames=4)
