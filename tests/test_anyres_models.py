"""AnyRes packing and OneVision video pooling against transformers (tiny random models, f32).

HF reference: `model.model.get_image_features(...).pooler_output` (tower -> projector ->
`pack_image_features`) and `get_video_features` on tiny LlavaOnevision / LlavaNext models built
with transformers; ours: `Llava.encode_image` on every view, then `models.anyres` packing.
"""
from __future__ import annotations

import functools
import os
import shutil

import jax
import numpy as np
import pytest
import torch

import hf_models as H
from covipal_jax.data import anyres as data_anyres
from covipal_jax.inference.counted_jit import CountedJit
from covipal_jax.models import anyres
from covipal_jax.models.llava import Llava
from covipal_jax.weights import load_llava

transformers = pytest.importorskip("transformers")
ATOL = 1e-4
SHAPES = [(37, 91), (101, 29), (64, 64), (13, 200), (250, 9), (77, 53), (120, 100), (30, 110),
          (200, 190)]


def _images(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]


def _build(kind: str, tmp: str, aspect: str = "anyres_max_9"):
    """(HF model, our cfg, params, AnyResConfig, grid g, max_crops)."""
    if kind == "onevision":
        hc = H.onevision_hf_config()
        s = hc["vision_config"]["image_size"]
        hc["image_grid_pinpoints"] = [[s * r, s * c] for r in range(1, 5) for c in range(1, 5)]
        hc["vision_aspect_ratio"] = aspect
        cfg_cls, model_cls = transformers.LlavaOnevisionConfig, \
            transformers.LlavaOnevisionForConditionalGeneration
        proc = data_anyres.AnyResConfig.onevision(s, hc["image_grid_pinpoints"])
    else:
        hc = H.llava_hf_config()
        s = hc["vision_config"]["image_size"]
        hc.pop("image_seq_length")
        hc["image_grid_pinpoints"] = [[s, 2 * s], [2 * s, s], [2 * s, 2 * s], [3 * s, s],
                                      [s, 3 * s]]
        cfg_cls, model_cls = transformers.LlavaNextConfig, \
            transformers.LlavaNextForConditionalGeneration
        proc = data_anyres.AnyResConfig.next(s, hc["image_grid_pinpoints"])
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**hc)).float().eval()
    H.randomize_(model, seed=3)
    path = os.path.join(tmp, kind)
    model.save_pretrained(path)
    cfg, params = load_llava(path)  # the real loader: config.json's model_type and packing
    g = cfg.vision.grid[0]
    max_crops = anyres.parse_aspect_ratio(aspect) if kind == "onevision" else 0
    assert cfg.image_newline and cfg.anyres_max_crops == max_crops
    assert cfg.image_grid_pinpoints == tuple(map(tuple, hc["image_grid_pinpoints"]))
    assert (cfg.video_token_id >= 0) == (kind == "onevision")
    return model, cfg, params, proc, g, max_crops


@functools.lru_cache(maxsize=None)
def _encoder(cfg):
    model = Llava(cfg)
    return jax.jit(lambda p, x: model.apply(p, x, method=Llava.encode_image))


def _ours(cfg, params, pixels):
    """pixels f32[B, C, H, W, 3] -> (tower f32[B, C, n, Dv], projected f32[B, C, n, D])."""
    b, c = pixels.shape[:2]
    vis, proj = _encoder(cfg)(params, pixels.reshape(b * c, *pixels.shape[2:]))
    return (np.asarray(vis.features).reshape(b, c, *vis.features.shape[1:]),
            np.asarray(proj).reshape(b, c, *proj.shape[1:]))


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, -3)))


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    d = tmp_path_factory.mktemp("anyres_models")
    yield str(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("kind,aspect", [("onevision", "anyres_max_9"),
                                         ("onevision", "anyres_max_2"),
                                         ("next", "anyres")])
def test_anyres_packing_matches_hf(kind, aspect, tmp):
    model, cfg, params, proc, g, max_crops = _build(kind, tmp, aspect)
    inputs = data_anyres.preprocess(_images(SHAPES), proc)
    feats, proj = _ours(cfg, params, inputs.pixels)

    # tower features on every valid view
    valid = inputs.crop_valid
    hf_feats = H.hf_vision_features(model, np.moveaxis(inputs.pixels[valid], -1, -3).copy(),
                                    cfg.vision.feature_layer, cfg.vision.select_strategy)
    d_tower = float(np.abs(feats[valid] - hf_feats).max())

    plan = anyres.pack_plan(inputs.layout, g, max_crops)
    grids = proc.grids
    cap = anyres.grid_capacity(grids, g, max_crops)
    newline = params["params"]["image_newline"]
    packed, mask, coords = jax.jit(functools.partial(
        anyres.pack_image_features, grid=g, capacity=cap))(proj, newline, plan)
    packed, mask, coords = map(np.asarray, (packed, mask, coords))
    assert packed.shape == (len(SHAPES), g * g + cap, cfg.text.hidden_size)

    kw = dict(vision_aspect_ratio=aspect) if kind == "onevision" else {}
    with torch.no_grad():
        hf = model.model.get_image_features(
            pixel_values=_nchw(inputs.pixels), image_sizes=torch.from_numpy(inputs.layout[:, 2:]),
            return_dict=True, **kw).pooler_output
    lens = anyres.packed_lengths(plan, g)
    d_pack = 0.0
    downsampled = 0
    for b, ref in enumerate(hf):
        ref = ref.numpy()
        assert lens[b] == ref.shape[0] == mask[b].sum()
        assert mask[b, :lens[b]].all()  # a prefix
        d_pack = max(d_pack, float(np.abs(packed[b, :lens[b]] - ref).max()))
        assert not packed[b, lens[b]:].any() and (coords[b, lens[b]:, 0] == -1).all()
        nl = coords[b, :lens[b], 0] == anyres.KIND_NEWLINE
        assert nl.sum() == plan[b, 6]  # one newline per row
        np.testing.assert_allclose(packed[b, :lens[b]][nl], np.broadcast_to(
            np.asarray(newline), (nl.sum(), newline.shape[0])), atol=0)
        downsampled += int(plan[b, 6] != plan[b, 4])
    if kind == "onevision":
        assert downsampled >= 2, plan  # anyres_max downsampling exercised
    print(f"{kind} {aspect}: tower {d_tower:.2e} packed {d_pack:.2e}")
    assert d_tower < ATOL and d_pack < ATOL


def test_onevision_multi_image_views_match_hf(tmp):
    model, cfg, params, proc, g, max_crops = _build("onevision", tmp)
    imgs = _images([(37, 91), (101, 29)], seed=1)
    inputs = data_anyres.preprocess(imgs, proc, patch=False)
    _, proj = _ours(cfg, params, inputs.pixels)
    plan = anyres.pack_plan(inputs.layout, g, max_crops)
    packed, mask, _ = anyres.pack_image_features(proj, params["params"]["image_newline"], plan,
                                                 grid=g, capacity=1)
    with torch.no_grad():
        hf = model.model.get_image_features(
            pixel_values=_nchw(inputs.pixels), image_sizes=torch.from_numpy(inputs.layout[:, 2:]),
            batch_num_images=torch.tensor([2]), return_dict=True).pooler_output
    for b in range(2):
        ref = hf[b].numpy()
        assert ref.shape[0] == g * g + 1 == mask[b].sum()
        assert float(np.abs(np.asarray(packed[b]) - ref).max()) < ATOL


def test_onevision_video_matches_hf(tmp):
    model, cfg, params, proc, g, _ = _build("onevision", tmp)
    rng = np.random.default_rng(4)
    frames = rng.standard_normal((2, 4, cfg.vision.image_size, cfg.vision.image_size, 3))
    frames = frames.astype(np.float32)
    feats, proj = _ours(cfg, params, frames)
    video = np.asarray(jax.jit(functools.partial(anyres.pack_video_features, grid=g))(
        proj, params["params"]["image_newline"]))
    p = -(-g // 2)
    assert video.shape == (2, 4 * p * p + 1, cfg.text.hidden_size)
    with torch.no_grad():
        out = model.model.get_video_features(pixel_values_videos=_nchw(frames), return_dict=True)
    hf_tower = out.hidden_states[cfg.vision.feature_layer].numpy()
    d_tower = float(np.abs(feats.reshape(hf_tower.shape) - hf_tower).max())
    d_video = float(np.abs(video - out.pooler_output.numpy()).max())
    print(f"video: tower {d_tower:.2e} pooled {d_video:.2e}")
    assert d_tower < ATOL and d_video < ATOL


def test_plan_geometry():
    # 2x3 crops of a 4-grid (8 x 12 map); a wide image: rows are cut, centred.
    assert anyres.unpadded_size(2, 3, 100, 300, 4) == (2, 0, 4, 12)
    assert anyres.plan_one((0, 0, 50, 70), 4, 9) == (0, 0, 0, 0, 0, 0, 1, 0)
    assert anyres.downsampled_size(16, 16, 4, 9) == (12, 12)  # ratio 4/3 > 1.1
    assert anyres.downsampled_size(13, 13, 4, 9) == (13, 13)  # ratio 1.08 <= 1.1
    assert anyres.parse_aspect_ratio("anyres_max_9") == 9 and anyres.parse_aspect_ratio(None) == 0
    with pytest.raises(ValueError, match="anyres_max"):
        anyres.parse_aspect_ratio("max9")
    # OneVision-7B's real sizes: 27-grid, 6x6 pinpoints, anyres_max_9.
    ov = data_anyres.AnyResConfig.onevision()
    n = anyres.packed_length(ov.grids, 27, 9)
    assert 729 + 9 * 729 < n < 729 + 163 * 162, n
    nxt = data_anyres.AnyResConfig.next()
    assert anyres.packed_length(nxt.grids, 24, 0) == 576 + 48 * 49  # 672 x 672 square


def _prompts(lengths, token, n_tokens, vocab, seed=0):
    """Left-padded prompts with one placeholder `token` (ours) and HF's expanded copy with
    n_tokens[b] placeholders: (ids, mask, hf_ids, hf_mask, hf_positions)."""
    rng = np.random.default_rng(seed)
    b, t = len(lengths), max(lengths) + 1
    ids, mask = np.zeros((b, t), np.int32), np.zeros((b, t), bool)
    rows = []
    for r, n in enumerate(lengths):
        toks = rng.integers(10, min(vocab, 250), size=n)  # below every special id
        toks[min(1 + r, n - 1)] = token
        ids[r, t - n:], mask[r, t - n:] = toks, True
        rows.append([x for tok in toks for x in ([tok] * n_tokens[r] if tok == token else [tok])])
    width = max(len(x) for x in rows)
    hf_ids = np.zeros((b, width), np.int64)
    hf_mask = np.zeros((b, width), np.int64)
    for r, row in enumerate(rows):
        hf_ids[r, width - len(row):], hf_mask[r, width - len(row):] = row, 1
    pos = np.maximum(np.cumsum(hf_mask, -1) - 1, 0)
    return ids, mask, hf_ids, hf_mask, pos


def _logit_diff(ours, seq_mask, hf, hf_mask):
    d = 0.0
    for b in range(ours.shape[0]):
        a, r = ours[b][seq_mask[b]], hf[b][hf_mask[b].astype(bool)]
        assert a.shape == r.shape
        d = max(d, float(np.abs(a - r).max()))
    return d


@pytest.mark.parametrize("kind", ["onevision", "next"])
def test_anyres_logits_match_hf(kind, tmp):
    model, cfg, params, proc, g, max_crops = _build(kind, tmp, "anyres_max_2")
    cfg = cfg.replace(image_grid_pinpoints=proc.pinpoints, anyres_max_crops=max_crops)
    inputs = data_anyres.preprocess(_images([(37, 91), (120, 100)], seed=5), proc)
    plan = anyres.pack_plan(inputs.layout, g, max_crops)
    lens = anyres.packed_lengths(plan, g)
    assert lens[0] != lens[1]
    ids, mask, hf_ids, hf_mask, pos = _prompts((9, 5), cfg.image_token_id, lens,
                                               cfg.text.vocab_size)
    fwd = jax.jit(functools.partial(Llava(cfg).apply, method=Llava.forward_anyres,
                                    capacity=anyres.capacity(cfg)))
    logits, seq_mask = map(np.asarray, fwd(params, inputs.pixels, plan, ids, mask))
    kw = dict(vision_aspect_ratio="anyres_max_2") if kind == "onevision" else {}
    with torch.no_grad():
        hf = model(input_ids=torch.from_numpy(hf_ids), pixel_values=_nchw(inputs.pixels),
                   image_sizes=torch.from_numpy(inputs.layout[:, 2:]),
                   attention_mask=torch.from_numpy(hf_mask),
                   position_ids=torch.from_numpy(pos), **kw).logits.numpy()
    d = _logit_diff(logits, seq_mask, hf, hf_mask)
    print(f"{kind} anyres logits: {d:.2e}")
    assert d < ATOL


def test_video_logits_match_hf(tmp):
    model, cfg, params, proc, g, _ = _build("onevision", tmp)
    cfg = cfg.replace(video_token_id=model.config.video_token_id)
    rng = np.random.default_rng(6)
    frames = rng.standard_normal((2, 4, cfg.vision.image_size, cfg.vision.image_size, 3))
    frames = frames.astype(np.float32)
    n = 4 * (-(-g // 2)) ** 2 + 1
    ids, mask, hf_ids, hf_mask, pos = _prompts((8, 6), cfg.video_token_id, [n, n],
                                               cfg.text.vocab_size, seed=7)
    fwd = jax.jit(functools.partial(Llava(cfg).apply, method=Llava.forward_video))
    logits, seq_mask = map(np.asarray, fwd(params, frames, ids, mask))
    with torch.no_grad():
        hf = model(input_ids=torch.from_numpy(hf_ids), pixel_values_videos=_nchw(frames),
                   attention_mask=torch.from_numpy(hf_mask),
                   position_ids=torch.from_numpy(pos)).logits.numpy()
    d = _logit_diff(logits, seq_mask, hf, hf_mask)
    print(f"video logits: {d:.2e}")
    assert d < ATOL


def test_one_compilation_per_crop_bucket(tmp):
    """Images of different sizes and crop layouts in one bucket share one compiled forward."""
    model, cfg, params, proc, g, max_crops = _build("onevision", tmp, "anyres_max_2")
    cfg = cfg.replace(image_grid_pinpoints=proc.pinpoints, anyres_max_crops=max_crops)
    views = proc.buckets[-1]
    fwd = CountedJit(functools.partial(Llava(cfg).apply, method=Llava.forward_anyres,
                                       capacity=anyres.bucket_capacity(cfg, views)))
    ids, mask, *_ = _prompts((9, 5), cfg.image_token_id, [1, 1], cfg.text.vocab_size)
    layouts = set()
    for shapes in ([(37, 91), (120, 100)], [(250, 9), (64, 64)], [(13, 200), (77, 53)]):
        x = data_anyres.preprocess(_images(shapes), proc, num_views=views)
        plan = anyres.pack_plan(x.layout, g, max_crops)
        layouts |= {tuple(r) for r in plan[:, :2]}
        logits, seq_mask = fwd(params, x.pixels, plan, ids, mask)
        assert int(np.asarray(seq_mask).sum(1)[0]) == 8 + anyres.packed_lengths(plan, g)[0]
    assert len(layouts) >= 4 and fwd.traces == 1
    # a smaller bucket is a second (and smaller) program
    small = proc.bucket_for(3)
    assert anyres.bucket_capacity(cfg, small) < anyres.bucket_capacity(cfg, views)
