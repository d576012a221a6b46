"""Several `<image>` placeholders in one prompt (OneVision multi-image, issue 12): parity of the
packed prefill with transformers' `LlavaOnevisionForConditionalGeneration`, one compilation per
(image count, crop bucket, text bucket, k), per-image / per-frame budgets, positions="original"
on packed inputs, `Generator.check_length` on packed lengths."""
from __future__ import annotations

import functools
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import covipal_jax.pruning.divprune  # noqa: F401  (registers "divprune")
import hf_models as H
from covipal_jax import pruning
from covipal_jax.configs import tiny_ov
from covipal_jax.data import anyres as data_anyres
from covipal_jax.inference import decoding
from covipal_jax.inference import prefill as P
from covipal_jax.inference import visual_inputs as vi
from covipal_jax.models import anyres
from covipal_jax.models.config import LlavaConfig
from covipal_jax.models.llava import Llava, init_params
from covipal_jax.pruning.select import group_quota
from covipal_jax.weights import load_llava

# Compile-heavy (tiny models, many programs): run in the CI step for slow tests.
pytestmark = pytest.mark.slow

transformers = pytest.importorskip("transformers")
ATOL = 1e-4


def _images(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]


@pytest.fixture(scope="module")
def hf_ov(tmp_path_factory):
    """(HF model, our cfg, params, AnyResConfig) of a tiny random OneVision (anyres_max_9)."""
    d = str(tmp_path_factory.mktemp("multi_image"))
    hc = H.onevision_hf_config()
    s = hc["vision_config"]["image_size"]
    hc["image_grid_pinpoints"] = [[s * r, s * c] for r in range(1, 4) for c in range(1, 4)]
    hc["vision_aspect_ratio"] = "anyres_max_9"
    torch.manual_seed(0)
    model = transformers.LlavaOnevisionForConditionalGeneration(
        transformers.LlavaOnevisionConfig(**hc)).float().eval()
    H.randomize_(model, seed=5)
    model.save_pretrained(os.path.join(d, "ov"))
    cfg, params = load_llava(os.path.join(d, "ov"))
    proc = data_anyres.AnyResConfig.onevision(s, hc["image_grid_pinpoints"])
    yield model, cfg, params, proc
    shutil.rmtree(d, ignore_errors=True)


def _prompts(counts, lengths, token, n_tokens, seed=0):
    """Left-padded prompts with counts[b] placeholders (ours) and HF's copies with placeholder
    p of row b expanded to n_tokens[b][p] tokens: (ids, mask, hf_ids, hf_mask, hf_pos)."""
    rng = np.random.default_rng(seed)
    b, t = len(lengths), max(lengths)
    ids, mask = np.zeros((b, t), np.int32), np.zeros((b, t), bool)
    rows = []
    for r, (c, n) in enumerate(zip(counts, lengths)):
        toks = rng.integers(10, 250, size=n)
        where = sorted(rng.choice(np.arange(1, n - 1), size=c, replace=False))
        toks[where] = token
        ids[r, t - n:], mask[r, t - n:] = toks, True
        it = iter(n_tokens[r])
        rows.append([x for tok in toks for x in ([tok] * next(it) if tok == token else [tok])])
    width = max(len(x) for x in rows)
    hf_ids, hf_mask = np.zeros((b, width), np.int64), np.zeros((b, width), np.int64)
    for r, row in enumerate(rows):
        hf_ids[r, width - len(row):], hf_mask[r, width - len(row):] = row, 1
    return ids, mask, hf_ids, hf_mask, np.maximum(np.cumsum(hf_mask, -1) - 1, 0)


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, -3)))


def _per_image_lengths(cfg, vis):
    b, n_img = vis.plan.shape[:2]
    lens = anyres.packed_lengths(np.asarray(vis.plan).reshape(b * n_img, 8), cfg.vision.grid[0])
    return lens.reshape(b, n_img)


@pytest.mark.parametrize("rows", [[[(37, 91), (60, 50)], [(101, 29), (64, 64)]],
                                  [[(37, 91), (60, 50)], [(77, 53)]]],
                         ids=["2+2", "2+1(anyres)"])
def test_multi_image_logits_match_hf(hf_ov, rows):
    model, cfg, params, proc = hf_ov
    imgs = [_images(r, seed=i) for i, r in enumerate(rows)]
    x = data_anyres.preprocess_multi(imgs, proc)
    vis = vi.MultiImage.from_layout(cfg, jnp.asarray(x.pixels), x.layout, x.image_valid)
    lens = _per_image_lengths(cfg, vis)
    counts = [len(r) for r in rows]
    ids, mask, hf_ids, hf_mask, pos = _prompts(counts, (11, 8), cfg.image_token_id,
                                               [lens[b, :c].tolist() for b, c in
                                                enumerate(counts)])
    logits, seq_mask, kept = jax.jit(functools.partial(
        P.forward_packed, Llava(cfg), method=pruning.NoneMethod()))(
            params, vis, jnp.asarray(ids), jnp.asarray(mask))
    logits, seq_mask = np.asarray(logits), np.asarray(seq_mask)
    valid = x.image_valid
    with torch.no_grad():
        hf = model(input_ids=torch.from_numpy(hf_ids), pixel_values=_nchw(x.pixels[valid]),
                   image_sizes=torch.from_numpy(x.layout[valid][:, 2:]),
                   batch_num_images=torch.tensor(counts), attention_mask=torch.from_numpy(hf_mask),
                   position_ids=torch.from_numpy(pos)).logits.numpy()
    d = 0.0
    for b in range(2):
        a, r = logits[b][seq_mask[b]], hf[b][hf_mask[b].astype(bool)]
        assert a.shape == r.shape
        d = max(d, float(np.abs(a - r).max()))
    np.testing.assert_array_equal((np.asarray(kept) >= 0).sum(1), vis.num_real_tokens(cfg))
    # the cached prefill's last logits are the same
    out = P.prefill(Llava(cfg), params, vis, jnp.asarray(ids), jnp.asarray(mask),
                    pruning.NoneMethod(), extra=2)
    last = float(np.abs(np.asarray(out.last_logits) - hf[:, -1]).max())
    print(f"multi-image {rows}: logits max|diff| {d:.2e}, prefill last {last:.2e}")
    assert d < ATOL and last < ATOL
    if counts[1] == 1:  # a lone image is tiled (AnyRes) as HF does, several are not
        assert lens[1, 0] > lens[0, 0] == lens[0, 1] == cfg.vision.grid[0] ** 2 + 1


# ----------------------------------------------------------------------------- tiny config

@functools.lru_cache(maxsize=None)
def _tiny():
    cfg = LlavaConfig.from_config(tiny_ov.get_config().model)
    params = nn.unbox(init_params(cfg, jax.random.key(0)))
    return cfg, Llava(cfg), params


def _multi(cfg, rows, seed=0, budget="global", **kw):
    imgs = [_images(r, seed=seed + i) for i, r in enumerate(rows)]
    x = data_anyres.preprocess_multi(imgs, data_anyres.AnyResConfig.for_model(cfg), **kw)
    return vi.MultiImage.from_layout(cfg, jnp.asarray(x.pixels), x.layout, x.image_valid,
                                     budget)


def _prompt(counts, t, token, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(10, 100, (len(counts), t)).astype(np.int32)
    mask = np.ones(ids.shape, bool)
    mask[0, :2], ids[0, :2] = False, 0
    for b, c in enumerate(counts):
        ids[b, 3:3 + 2 * c:2] = token
    return jnp.asarray(ids), jnp.asarray(mask)


def test_pruned_multi_image_prefill_equals_forward_and_splits_per_placeholder():
    cfg, model, params = _tiny()
    vis = _multi(cfg, [[(37, 91), (60, 50)], [(20, 90), (50, 50)]])
    ids, mask = _prompt([2, 2], 16, cfg.image_token_id)
    method = pruning.get("divprune")(keep=0.25)
    logits, seq_mask, kept = P.forward_packed(model, params, vis, ids, mask, method)
    out = P.prefill(model, params, vis, ids, mask, method, extra=2)
    np.testing.assert_array_equal(out.kept, kept)
    assert float(jnp.max(jnp.abs(out.last_logits - logits[:, -1]))) <= 1e-5
    n1, g = vis.image_slots(cfg), cfg.vision.grid[0]
    k = np.asarray(kept)
    # global top-k: the example's budget over both images; both images' newlines kept
    for b in range(2):
        kb = k[b][k[b] >= 0]
        assert len(kb) == np.round(0.25 * vis.num_real_tokens(cfg)[b])
        assert {g * g, n1 + g * g} <= set(kb.tolist())
    # the sequence: T - 1 + k slots, text tokens all visible
    assert seq_mask.shape[1] == 16 - 1 + k.shape[1]
    assert int(np.asarray(seq_mask).sum(1)[1]) == 16 - 2 + (k[1] >= 0).sum()


def test_one_compilation_per_image_count_bucket_text_bucket_and_k():
    cfg, model, params = _tiny()
    gen = decoding.Generator(model, pruning.get("random")(keep=0.25), max_new_tokens=3,
                             eos_id=2)
    ids, mask = _prompt([2, 2], 16, cfg.image_token_id)
    a = _multi(cfg, [[(37, 91), (60, 50)], [(20, 90), (50, 50)]])
    b = _multi(cfg, [[(90, 30), (50, 52)], [(28, 28), (33, 70)]], seed=3)
    assert a.pixels.shape == b.pixels.shape
    gen(params, a, ids, mask, rng=jax.random.key(0))
    out = gen(params, b, ids, mask, rng=jax.random.key(0))
    assert gen.compilations()["prefill"] == 1 and gen.compilations()["decode"] == 1
    assert out.tokens.shape == (2, 3)
    # a row with one image (fewer placeholders) in the same static shapes: same program
    ids1, mask1 = _prompt([2, 1], 16, cfg.image_token_id)
    c = _multi(cfg, [[(37, 91), (60, 50)], [(40, 40)]], patch_single=False)
    assert c.pixels.shape == a.pixels.shape
    gen(params, c, ids1, mask1, rng=jax.random.key(0))
    assert gen.compilations()["prefill"] == 1
    # three images: a new static image count, a second program; a new text bucket: a third
    d = _multi(cfg, [[(37, 91), (60, 50), (30, 30)], [(20, 90), (50, 50), (40, 40)]])
    ids3, mask3 = _prompt([3, 3], 16, cfg.image_token_id)
    gen(params, d, ids3, mask3, rng=jax.random.key(0))
    ids32, mask32 = _prompt([2, 2], 32, cfg.image_token_id)
    gen(params, a, ids32, mask32, rng=jax.random.key(0))
    assert gen.compilations()["prefill"] == 3


# ----------------------------------------------------------------------------- budgets

def test_grouped_topk_exact_per_group_counts():
    from covipal_jax.pruning.select import grouped_topk

    s = jnp.asarray([[9., 8., 7., 6., 1., 2., 3., 0.5]])
    groups = jnp.asarray([[0, 0, 0, 0, 1, 1, 1, 1]])
    valid = jnp.asarray([[1, 1, 1, 1, 1, 1, 1, 0]], bool)
    forced = jnp.asarray([[0, 0, 0, 0, 1, 0, 0, 0]], bool)
    idx, kept = grouped_topk(s, 5, groups, 2, valid, forced, jnp.asarray([4]))
    # group 0 keeps its best 2 (0, 1); group 1 its forced newline 4 and then its best (6)
    np.testing.assert_array_equal(np.asarray(idx)[np.asarray(kept)], [0, 1, 4, 6])
    np.testing.assert_array_equal(group_quota(jnp.asarray([5, 3]), jnp.asarray(
        [[1, 1, 0], [1, 0, 1]], bool)), [[3, 2, 0], [2, 0, 1]])


@pytest.mark.parametrize("name", ["random", "divprune"])
def test_per_image_budget_splits_evenly(name):
    cfg, model, params = _tiny()
    vis = _multi(cfg, [[(37, 91), (60, 50)], [(40, 40)]], budget="per_image",
                 patch_single=False)
    ids, mask = _prompt([2, 1], 16, cfg.image_token_id)
    method = pruning.get(name)(keep=0.25)
    _, _, _, kept, _ = P.packed_sequence(model, params, vis, ids, mask, method,
                                         rng=jax.random.key(0))
    k, n1 = np.asarray(kept), vis.image_slots(cfg)
    real = vis.num_real_tokens(cfg)
    for b, n_img in enumerate([2, 1]):
        kb = k[b][k[b] >= 0]
        budget = int(np.round(0.25 * real[b]))
        counts = np.bincount(kb // n1, minlength=2)
        want = [budget // n_img + (i < budget % n_img) if i < n_img else 0 for i in range(2)]
        np.testing.assert_array_equal(counts, want)
    # the global budget of the same input need not split evenly; per_frame needs a video
    with pytest.raises(ValueError, match="per_frame"):
        P.packed_sequence(model, params, vis.replace(budget="per_frame"), ids, mask, method)


def test_per_frame_budget_on_video():
    cfg, model, params = _tiny()
    rng = np.random.default_rng(0)
    frames = jnp.asarray(rng.standard_normal((2, 4, 28, 28, 3)).astype(np.float32))
    vis = vi.Video(frames, budget="per_frame")
    ids, mask = _prompt([1, 1], 16, cfg.video_token_id)
    _, _, _, kept, _ = P.packed_sequence(model, params, vis, ids, mask,
                                         pruning.get("divprune")(keep=0.5))
    p2 = (-(-cfg.vision.grid[0] // 2)) ** 2
    n = 4 * p2 + 1
    for b in range(2):
        kb = np.asarray(kept[b])
        kb = kb[kb >= 0]
        budget = int(np.round(0.5 * n))
        frame = np.minimum(kb // p2, 3)  # the final newline counts with the last frame
        np.testing.assert_array_equal(np.bincount(frame, minlength=4),
                                      [budget // 4 + (i < budget % 4) for i in range(4)])
        assert n - 1 in kb  # the newline is kept


# ----------------------------------------------------------------------------- positions

def test_original_positions_on_packed_input():
    cfg, model, params = _tiny()
    vis = _multi(cfg, [[(37, 91), (60, 50)], [(40, 40)]], patch_single=False)
    ids, mask = _prompt([2, 1], 16, cfg.image_token_id)
    method = pruning.get("random")(keep=0.5, positions="original")
    ctx, text, pos = vi.packed_context(model, params, vis, ids, mask, method,
                                       rng=jax.random.key(1))
    n = ctx.n_v
    everything = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (2, n))
    res = method.select(ctx, method.k(n))
    kept_valid = res.valid & jnp.take_along_axis(ctx.valid, res.indices, axis=1)
    marks = lambda idx: (idx + 1).astype(jnp.float32)[..., None]  # noqa: E731
    zeros = jnp.zeros(text.shape[:2] + (1,))
    full, fmask, fpos = vi.splice_selected(cfg, vis, ctx, zeros, mask, pos, everything,
                                           marks(everything), ctx.valid, "contiguous")
    seq, smask, spos = vi.splice_selected(cfg, vis, ctx, zeros, mask, pos, res.indices,
                                          marks(res.indices), kept_valid, "original")
    for b in range(2):
        # unpruned: every valid slot / text token -> its position
        f_slot, f_pos = np.asarray(full[b, :, 0])[fmask[b]], np.asarray(fpos[b])[fmask[b]]
        s_slot, s_pos = np.asarray(seq[b, :, 0])[smask[b]], np.asarray(spos[b])[smask[b]]
        want = dict(zip(f_slot[f_slot > 0].tolist(), f_pos[f_slot > 0].tolist()))
        got = dict(zip(s_slot[s_slot > 0].tolist(), s_pos[s_slot > 0].tolist()))
        assert got and all(want[s] == p for s, p in got.items())
        np.testing.assert_array_equal(s_pos[s_slot == 0], f_pos[f_slot == 0])  # text
        assert (np.diff(s_pos) > 0).all()
    # end to end: the cached prefill agrees with the cache-free forward; all kept = contiguous
    logits, _, _ = P.forward_packed(model, params, vis, ids, mask, method, rng=jax.random.key(1))
    out = P.prefill(model, params, vis, ids, mask, method, extra=2, rng=jax.random.key(1))
    assert float(jnp.max(jnp.abs(out.last_logits - logits[:, -1]))) <= 1e-5
    none_o = pruning.NoneMethod(positions="original")
    a = P.prefill(model, params, vis, ids, mask, none_o, extra=2).last_logits
    c = P.prefill(model, params, vis, ids, mask, pruning.NoneMethod(), extra=2).last_logits
    assert float(jnp.max(jnp.abs(a - c))) <= 1e-5


def test_check_length_counts_the_packed_length():
    cfg, model, _ = _tiny()
    vis = _multi(cfg, [[(37, 91), (60, 50)], [(40, 40), (20, 20)]])
    n = vis.num_slots(cfg)
    assert n > cfg.num_vision_tokens
    room = cfg.text.max_position_embeddings - (16 - 1 + n)
    decoding.Generator(model, pruning.NoneMethod(), max_new_tokens=room,
                       eos_id=2).check_length(16, vis)
    gen = decoding.Generator(model, pruning.NoneMethod(), max_new_tokens=room + 1, eos_id=2)
    gen.check_length(16)  # a single crop would fit
    with pytest.raises(ValueError, match=f"{n} vision tokens"):
        gen.check_length(16, vis)


# ----------------------------------------------------------------------------- CLI / Sampler

def test_generate_cli_two_images(tmp_path):
    from PIL import Image

    from covipal_jax import generate

    paths = []
    for i, img in enumerate(_images([(37, 91), (60, 50)], seed=2)):
        paths.append(str(tmp_path / f"img{i}.png"))
        Image.fromarray(img).save(paths[-1])
    c = tiny_ov.get_config()
    c.max_new_tokens = 3
    c.pruning.method, c.pruning.keep = "random", 0.5
    cfg, _, _ = _tiny()
    per_image = cfg.vision.grid[0] ** 2 + 1
    r = generate.run(c, paths, "what is it ?")
    assert r["input"] == "multi_image" and r["vision_tokens_total"] == 2 * per_image
    assert r["vision_tokens_kept"] == round(0.5 * 2 * per_image)
    assert isinstance(r["answer"], str)
    # placeholders in the prompt place the images; a count mismatch is a clear error
    c.pruning.budget = "per_image"
    r = generate.run(c, paths, "<image> what is <image> it ?")
    budget = round(0.5 * 2 * per_image)
    counts = np.bincount(np.asarray(r["kept_indices"]) // per_image, minlength=2)
    np.testing.assert_array_equal(counts, [budget - budget // 2, budget // 2])
    with pytest.raises(ValueError, match="placeholders"):
        generate.run(c, paths, "<image> what is it ?")
