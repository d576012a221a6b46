"""VisionZip per view on packed AnyRes images and videos (issue 12), against the official rule.

Reference: dvlab-research/VisionZip `visionzip/clip_encoder.py` (per-view dominant + contextual
tokens) and `visionzip/llava_arch.py` (`prepare_inputs_labels_for_multimodal_visionzip`,
`restore_image_features_sorted`) ported to torch below, almost verbatim (the 24 x 24 grid of
LLaVA-NeXT generalized to g; for SigLIP, no CLS: HoliTom's mean-attention score, no CLS slot),
run on the same per-view tower tensors. Our output must be the same token sequence.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from covipal_jax import pruning
from covipal_jax.configs import tiny_next, tiny_ov
from covipal_jax.data import anyres as data_anyres
from covipal_jax.inference import decoding
from covipal_jax.inference import prefill as P
from covipal_jax.inference import visual_inputs as vi
from covipal_jax.models import anyres
from covipal_jax.models.config import LlavaConfig
from covipal_jax.models.llava import Llava, init_params

# Compile-heavy (tiny models, many programs): run in the CI step for slow tests.
pytestmark = pytest.mark.slow

ATOL = 1e-5
SHAPES = [(37, 91), (60, 50)]          # a wide image (1 x 3 crops) and a near-square one


@functools.lru_cache(maxsize=None)
def _model(name: str):
    module = {"ov": tiny_ov, "next": tiny_next}[name]
    cfg = LlavaConfig.from_config(module.get_config().model)
    params = nn.unbox(init_params(cfg, jax.random.key(0)))
    return cfg, Llava(cfg), params


def _anyres(cfg, shapes, seed=0, num_views=None):
    rng = np.random.default_rng(seed)
    imgs = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    x = data_anyres.preprocess(imgs, data_anyres.AnyResConfig.for_model(cfg),
                               num_views=num_views)
    plan = anyres.pack_plan(x.layout, cfg.vision.grid[0], cfg.anyres_max_crops)
    cap = anyres.bucket_capacity(cfg, x.pixels.shape[1])
    return vi.AnyResImage(jnp.asarray(x.pixels), jnp.asarray(plan), cap), plan


def _video(b=2, f=4, seed=0, side=28):
    rng = np.random.default_rng(seed)
    return vi.Video(jnp.asarray(rng.standard_normal((b, f, side, side, 3)).astype(np.float32)))


def _prompt(b, t, token, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(10, 100, (b, t)).astype(np.int32)
    ids[:, 3] = token
    mask = np.ones((b, t), bool)
    mask[0, :2] = False
    ids[0, :2] = 0
    return jnp.asarray(ids), jnp.asarray(mask)


def _select(name, visual, method, token=None):
    cfg, model, params = _model(name)
    ids, mask = _prompt(visual.batch, 16, cfg.image_token_id if token is None else token)
    ctx, _, _ = vi.packed_context(model, params, visual, ids, mask, method)
    ctx = ctx.replace(project=lambda f: model.apply(params, f, method=Llava.project))
    return ctx, method.select(ctx, method.k(ctx.n_v))


# ----------------------------------------------------------------------------- the official rule

def official_view(hidden, score, metric, dominant_num, contextual_num, cls=True):
    """`CLIPVisionTower_VisionZip.forward` from the attention step on: hidden [V, (1+)n, Dv]
    (CLS first when cls), score [V, n] (the CLS row summed over heads; SigLIP: mean attention
    received), metric [V, (1+)n, H]. Returns (hidden_states_save, all_indices)."""
    if cls:
        topk_indices = score.topk(dominant_num, dim=1).indices + 1
        all_indices = torch.cat([torch.zeros((hidden.shape[0], 1), dtype=topk_indices.dtype),
                                 topk_indices], dim=1)
        n_dom = dominant_num + 1
    else:
        all_indices = score.topk(dominant_num, dim=1).indices
        n_dom = dominant_num
    mask = torch.ones_like(hidden[:, :, 0], dtype=torch.bool).scatter_(1, all_indices, False)
    dominant_tokens = hidden.masked_select(~mask.unsqueeze(-1)).view(
        hidden.shape[0], n_dom, hidden.shape[2])
    metric_filtered = metric[mask].view(hidden.shape[0], hidden.shape[1] - n_dom,
                                        metric.shape[2])
    hidden_filtered = hidden.masked_select(mask.unsqueeze(-1)).view(
        hidden.shape[0], hidden.shape[1] - n_dom, hidden.shape[2])
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
    step = max(1, metric_normalized.shape[1] // contextual_num)
    target_indices = torch.arange(0, metric_normalized.shape[1], step)[:contextual_num]
    target_tokens = metric_normalized[:, target_indices, :]
    others = ~torch.isin(torch.arange(metric_normalized.shape[1]), target_indices)
    tokens_to_merge = metric_normalized[:, others, :]
    similarity = torch.bmm(tokens_to_merge, target_tokens.transpose(1, 2))
    assign = torch.zeros(tokens_to_merge.shape[0], tokens_to_merge.shape[1], contextual_num,
                         dtype=hidden.dtype)
    assign.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = assign.sum(dim=1).clamp(min=1).unsqueeze(-1)
    aggregated = torch.bmm(assign.transpose(1, 2), hidden_filtered[:, others, :]) / counts
    contextual_tokens = hidden_filtered[:, target_indices, :] + aggregated
    return torch.cat([dominant_tokens, contextual_tokens], dim=1), all_indices


def official_restore(image_feature, cur_keep_idx, width, height, g, cls=True):
    """`restore_image_features_sorted` with 576 -> g*g, 24 -> g (no CLS: no CLS slot)."""
    num_img, total_patches, feature_dim = image_feature.shape
    num_keep = cur_keep_idx.shape[1]
    num_extra = total_patches - num_keep
    sorted_idx, _ = cur_keep_idx.sort(dim=1)
    restore_idx = sorted_idx[:, 1:] - 1 if cls else sorted_idx
    restored = torch.zeros((num_img, g * g, feature_dim), dtype=image_feature.dtype)
    mask = torch.zeros(num_img, g * g, dtype=torch.bool)
    mask.scatter_(1, restore_idx, True)
    kept = image_feature[:, 1:num_keep, :] if cls else image_feature[:, :num_keep, :]
    restored[mask] = kept.reshape(-1, feature_dim)
    assert width * height == restored.shape[0]
    restored = restored.view(height, width, g, g, feature_dim).permute(0, 2, 1, 3, 4)
    restored = restored.contiguous().view(height * g, width * g, feature_dim)
    mask = mask.view(height, width, g, g).permute(0, 2, 1, 3).contiguous()
    mask = mask.view(height * g, width * g)
    select = restored[mask]
    extra = image_feature[:, -num_extra:, ].reshape(-1, feature_dim)
    parts = [select, image_feature[:, 0, ]] if cls else [select]
    return torch.cat(parts + [extra])


def official_sequence(ctx, b, dominant, contextual, project, newline, plan=None):
    """Example b's LLM tokens by the official code, from ctx.views' per-view tensors."""
    v = ctx.views
    t = lambda a: torch.from_numpy(np.array(a[b], np.float32))  # noqa: E731
    cls = v.cls is not None
    feats, keys = t(v.features), t(v.keys)
    if cls:
        hidden = torch.cat([t(v.cls)[:, None], feats], 1)
        metric = torch.cat([torch.zeros_like(keys[:, :1]), keys], 1)
        score = t(v.cls_attention)
    else:
        hidden, metric, score = feats, keys, t(v.attention_received)
    n_views = int(np.asarray(v.view_valid[b]).sum())
    save, idx = official_view(hidden[:n_views], score[:n_views], metric[:n_views],
                              dominant - int(cls), contextual, cls=cls)
    proj = torch.from_numpy(np.array(project(jnp.asarray(save.numpy())), np.float32))
    nl = torch.from_numpy(np.array(newline[b], np.float32))[None]
    if plan is None:                          # video: frames in order, then the newline
        return torch.cat([proj.reshape(-1, proj.shape[-1]), nl]).numpy()
    rows, cols = int(plan[b, 0]), int(plan[b, 1])
    if n_views > 1:
        crops = official_restore(proj[1:], idx[1:], cols, rows, v.grid, cls=cls)
        return torch.cat([proj[0], crops]).numpy()
    return torch.cat([proj[0], nl]).numpy()


# ----------------------------------------------------------------------------- tests

@pytest.mark.parametrize("name,keep", [("next", 0.5), ("next", 6), ("ov", 0.5), ("ov", 5)])
def test_anyres_matches_official_llava_next_rule(name, keep):
    cfg, model, params = _model(name)
    visual, plan = _anyres(cfg, SHAPES + [(28, 28)] if name == "ov" else SHAPES)
    method = pruning.get("visionzip")(keep=keep)
    ctx, res = _select(name, visual, method)
    g = cfg.vision.grid[0]
    k_v = pruning.resolve_keep(keep, g * g)
    dominant, contextual = pruning.visionzip.split_budget(k_v)
    c = visual.pixels.shape[1]
    assert res.tokens.shape[1] == c * k_v + 1
    valid = np.asarray(res.valid)
    for b in range(visual.batch):
        ref = official_sequence(ctx, b, dominant, contextual, ctx.project,
                                ctx.vision_tokens[:, g * g], plan)
        ours = np.asarray(res.tokens[b])[valid[b]]
        assert ours.shape == ref.shape, (b, ours.shape, ref.shape)
        np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)
        # exact budget: every real view keeps k_v tokens (+ the newline of an untiled image)
        n_views = 1 + plan[b, 0] * plan[b, 1] if plan[b, 0] else 1
        assert valid[b].sum() == n_views * k_v + (plan[b, 0] == 0)
        # every token the LLM sees points at a real slot of the packed buffer
        idx = np.asarray(res.indices[b])[valid[b]]
        assert np.asarray(ctx.valid[b])[idx].all()


def test_untiled_image_keeps_its_newline_tiled_has_none():
    cfg, _, _ = _model("ov")
    visual, plan = _anyres(cfg, [(28, 28), (37, 91)])
    plan = plan.copy()
    plan[0] = anyres.plan_one((0, 0, 28, 28), cfg.vision.grid[0])  # untiled: base ++ newline
    visual = visual.replace(plan=jnp.asarray(plan))
    _, res = _select("ov", visual, pruning.get("visionzip")(keep=0.5))
    g = cfg.vision.grid[0]
    idx, valid = np.asarray(res.indices), np.asarray(res.valid)
    assert valid[0, -1] and idx[0, -1] == g * g and valid[0].sum() == g * g // 2 + 1
    assert not valid[1, -1]


def test_per_view_stats_equal_single_view_stats():
    cfg, model, params = _model("next")
    visual, _ = _anyres(cfg, SHAPES)
    ctx, _ = _select("next", visual, pruning.get("visionzip")(keep=0.5))
    for j in (0, 2):
        out, _ = model.apply(params, visual.pixels[:, j], True, method=Llava.encode_image)
        np.testing.assert_allclose(ctx.views.cls_attention[:, j], out.cls_attention.sum(1),
                                   atol=1e-6)
        np.testing.assert_allclose(ctx.views.keys[:, j], out.keys.mean(2), atol=1e-6)
        np.testing.assert_allclose(ctx.views.features[:, j], out.features, atol=1e-6)


@pytest.mark.parametrize("name", ["next", "ov"])
def test_batched_equals_per_example(name):
    cfg, _, _ = _model(name)
    method = pruning.get("visionzip")(keep=0.5)
    views = {"next": 5, "ov": 10}[name]
    both, _ = _anyres(cfg, SHAPES, num_views=views)
    _, res = _select(name, both, method)
    for b in range(2):
        one, _ = _anyres(cfg, SHAPES, num_views=views)
        one = vi.AnyResImage(one.pixels[b:b + 1], one.plan[b:b + 1], one.capacity)
        _, r1 = _select(name, one, method)
        np.testing.assert_allclose(r1.tokens[0], res.tokens[b], atol=ATOL)
        np.testing.assert_array_equal(r1.indices[0], res.indices[b])
        np.testing.assert_array_equal(r1.valid[0], res.valid[b])


def test_video_per_frame_matches_official_rule():
    cfg, _, _ = _model("ov")
    visual = _video()
    method = pruning.get("visionzip")(keep=4)   # 4 per frame: 3 dominant + 1 contextual
    ctx, res = _select("ov", visual, method, token=cfg.video_token_id)
    p = -(-cfg.vision.grid[0] // 2)
    k_v = pruning.resolve_keep(4, p * p)
    dominant, contextual = pruning.visionzip.split_budget(k_v)
    assert res.tokens.shape[1] == 4 * k_v + 1 and bool(np.asarray(res.valid).all())
    for b in range(2):
        ref = official_sequence(ctx, b, dominant, contextual, ctx.project,
                                ctx.vision_tokens[:, -1])
        np.testing.assert_allclose(np.asarray(res.tokens[b]), ref, atol=ATOL, rtol=0)
    assert (np.asarray(res.indices)[:, -1] == 4 * p * p).all()


@pytest.mark.parametrize("kind", ["anyres", "video"])
def test_pruned_prefill_equals_pruned_forward(kind):
    cfg, model, params = _model("ov")
    if kind == "anyres":
        visual, _ = _anyres(cfg, SHAPES)
        token = cfg.image_token_id
    else:
        visual, token = _video(), cfg.video_token_id
    ids, mask = _prompt(2, 16, token)
    method = pruning.get("visionzip")(keep=0.5)
    logits, _, kept = P.forward_packed(model, params, visual, ids, mask, method)
    out = P.prefill(model, params, visual, ids, mask, method, extra=2)
    np.testing.assert_array_equal(out.kept, kept)
    assert float(jnp.max(jnp.abs(out.last_logits - logits[:, -1]))) <= ATOL


def test_generation_compiles_once_per_bucket():
    cfg, model, params = _model("next")
    gen = decoding.Generator(model, pruning.get("visionzip")(keep=0.5), max_new_tokens=3,
                             eos_id=2)
    ids, mask = _prompt(2, 16, cfg.image_token_id)
    a, _ = _anyres(cfg, SHAPES, seed=0, num_views=5)
    b, _ = _anyres(cfg, [(90, 30), (50, 52)], seed=1, num_views=5)
    assert a.pixels.shape == b.pixels.shape and a.capacity == b.capacity
    out = gen(params, a, ids, mask, rng=jax.random.key(0))
    gen(params, b, ids, mask, rng=jax.random.key(0))
    assert gen.compilations()["prefill"] == 1 and gen.compilations()["decode"] == 1
    assert out.tokens.shape == (2, 3)


def test_spatial_order_refused_on_packed_input():
    cfg, _, _ = _model("next")
    visual, _ = _anyres(cfg, SHAPES)
    with pytest.raises(ValueError, match="official LLaVA-NeXT layout"):
        _select("next", visual, pruning.get("visionzip")(keep=0.5, order="spatial"))
