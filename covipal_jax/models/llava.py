"""The LLaVA composite: vision tower -> 2-layer GELU projector -> decoder.

Letters: B batch, T text length (bucket), k vision tokens in the sequence, L = T - 1 + k,
D width, V vocab, n_v vision tokens per image.

This module holds the pieces (sequence assembly: `models/multimodal.py`);
`covipal_jax.inference.prefill` is where a pruning method is applied
between them (encode -> project -> method -> splice -> decoder). Calling the module itself runs
the unpruned model on a batch of (image, left-padded prompt with one image placeholder), the
path that is checked for parity against Hugging Face.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from covipal_jax.models import anyres
from covipal_jax.models.config import LlavaConfig
from covipal_jax.models.decoder import Decoder, attention_backend
from covipal_jax.models.layers import activation, dense
from covipal_jax.models.multimodal import image_positions, splice
from covipal_jax.models.vit import VisionOutput, VisionTower

Array = jax.Array


class Projector(nn.Module):
    """LLaVA's multi_modal_projector: Linear -> GELU -> Linear."""

    cfg: LlavaConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """f32[B, n, Dv] -> f32[B, n, D]."""
        c = self.cfg
        kw = dict(dtype=c.compute_dtype, param_dtype=c.weight_dtype)
        x = dense(c.text.hidden_size, ("vision_embed", "mlp"), name="fc1", **kw)(x)
        x = activation(c.projector_act)(x)
        x = dense(c.text.hidden_size, ("mlp", "embed"), name="fc2", **kw)(x)
        return nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))


class Llava(nn.Module):
    cfg: LlavaConfig

    def setup(self):
        c = self.cfg
        self.vision_tower = VisionTower(c.vision, c.compute_dtype, c.weight_dtype,
                                        scan=c.scan_layers, remat=c.remat_policy,
                                        attention=attention_backend(c))
        self.projector = Projector(c)
        self.language_model = Decoder(c)
        if c.image_newline:
            self.image_newline = self.param(
                "image_newline", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                              ("embed",)),
                (c.text.hidden_size,), c.weight_dtype)

    # -- vision -------------------------------------------------------------------------------

    def encode_image(self, pixels: Array, with_stats: bool = False) -> tuple[VisionOutput, Array]:
        """pixels f32[B, H, W, 3] -> (tower output, projected tokens H_v f32[B, n_v, D])."""
        out = self.vision_tower(pixels, with_stats=with_stats)
        return out, self.projector(out.features)

    def project(self, features: Array) -> Array:
        return self.projector(features)

    # -- AnyRes images and video (models/anyres.py) --------------------------------------------

    def encode_views(self, pixels: Array) -> Array:
        """pixels f32[B, C, H, W, 3] -> projected tokens f32[B, C, n_v, D] (every view)."""
        b, c = pixels.shape[:2]
        _, vis = self.encode_image(pixels.reshape(b * c, *pixels.shape[2:]))
        return vis.reshape(b, c, *vis.shape[1:])

    def encode_anyres(self, pixels: Array, plan: Array, *, capacity: int):
        """AnyRes image: pixels f32[B, C, H, W, 3] (view 0 the base view), plan i32[B, 8]
        (`anyres.pack_plan`) -> (packed f32[B, N, D], valid bool[B, N], coords i32[B, N, 3]),
        N = n_v + capacity; the valid slots (a prefix) are HF's `pack_image_features`."""
        return anyres.pack_image_features(self.encode_views(pixels), self.image_newline, plan,
                                          grid=self.cfg.vision.grid[0], capacity=capacity)

    def encode_views_stats(self, pixels: Array) -> tuple[VisionOutput, Array]:
        """Every view with its tower statistics (for per-view pruning, VisionZip):
        pixels f32[B, C, H, W, 3] -> (VisionOutput with leaves [B, C, ...], projected
        f32[B, C, n_v, D])."""
        b, c = pixels.shape[:2]
        out, vis = self.encode_image(pixels.reshape(b * c, *pixels.shape[2:]), True)
        out = jax.tree.map(lambda a: a.reshape(b, c, *a.shape[1:]), out)
        return out, vis.reshape(b, c, *vis.shape[1:])

    def encode_anyres_stats(self, pixels: Array, plan: Array, *, capacity: int):
        """`encode_anyres` plus the per-view tower statistics: (packed, valid, coords,
        VisionOutput [B, C, ...])."""
        out, vis = self.encode_views_stats(pixels)
        packed = anyres.pack_image_features(vis, self.image_newline, plan,
                                            grid=self.cfg.vision.grid[0], capacity=capacity)
        return (*packed, out)

    def encode_video_stats(self, frames: Array) -> tuple[Array, VisionOutput]:
        """`encode_video` plus the per-frame tower statistics (VisionOutput [B, F, ...])."""
        out, vis = self.encode_views_stats(frames)
        return anyres.pack_video_features(vis, self.image_newline,
                                          grid=self.cfg.vision.grid[0]), out

    def encode_video(self, frames: Array) -> Array:
        """OneVision video: frames f32[B, F, H, W, 3] -> f32[B, F*p*p + 1, D] (pooled frames,
        one newline)."""
        return anyres.pack_video_features(self.encode_views(frames), self.image_newline,
                                          grid=self.cfg.vision.grid[0])

    def forward_packed(self, vis: Array, valid: Array, ids: Array, mask: Array,
                       token_id: int) -> tuple[Array, Array]:
        """Unpruned forward with one placeholder `token_id` per row replaced by the valid slots
        of vis f32[B, N, D] (valid bool[B, N]). Returns (logits f32[B, L, V], mask bool[B, L]),
        L = T - 1 + N; invalid slots are masked out and take no position."""
        text = self.embed_text(jnp.where(ids == token_id, self.cfg.image_token_id, ids))
        pos = image_positions(ids, token_id)
        seq, seq_mask, _, is_vis = splice(text, mask, pos, vis, None,
                                          positions_mode="contiguous")
        seq_mask, positions = anyres.mask_invalid_slots(seq_mask, is_vis, pos, valid)
        h, _ = self.run(seq, positions=positions, key_valid=seq_mask)
        return self.logits(h), seq_mask

    def forward_anyres(self, pixels: Array, plan: Array, ids: Array, mask: Array, *,
                       capacity: int) -> tuple[Array, Array]:
        """Unpruned forward of an AnyRes image per row (one image placeholder each)."""
        packed, valid, _ = self.encode_anyres(pixels, plan, capacity=capacity)
        return self.forward_packed(packed, valid, ids, mask, self.cfg.image_token_id)

    def forward_video(self, frames: Array, ids: Array, mask: Array) -> tuple[Array, Array]:
        """Unpruned forward of a video per row (one `video_token_id` placeholder each)."""
        vis = self.encode_video(frames)
        valid = jnp.ones(vis.shape[:2], bool)
        return self.forward_packed(vis, valid, ids, mask, self.cfg.video_token_id)

    # -- text / decoder -----------------------------------------------------------------------

    def embed_text(self, ids: Array) -> Array:
        """ids i32[B, T] -> f32[B, T, D]; the image placeholder id is embedded as id 0."""
        ids = jnp.where(ids == self.cfg.image_token_id, 0, ids)
        ids = jnp.clip(ids, 0, self.cfg.text.vocab_size - 1)
        return self.language_model.embed_tokens(ids)

    def run(self, x: Array, **kwargs):
        """Decoder layers on embeddings; see `Decoder.run`."""
        return self.language_model.run(x, **kwargs)

    def logits(self, h: Array) -> Array:
        return self.language_model.logits(h)

    def final_norm(self, h: Array) -> Array:
        """The decoder's final RMSNorm alone (DART compares hidden states through it)."""
        return self.language_model.final_norm(h)

    def attention_rows(self, x: Array, **kwargs) -> Array:
        return self.language_model.attention_rows(x, **kwargs)

    def layer_keys(self, x: Array, **kwargs) -> Array:
        return self.language_model.layer_keys(x, **kwargs)

    # -- the unpruned model --------------------------------------------------------------------

    def __call__(self, pixels: Array, ids: Array, mask: Array) -> tuple[Array, Array]:
        """Unpruned forward.

        pixels f32[B, H, W, 3]; ids i32[B, T] left-padded, one placeholder each; mask bool[B, T].
        Returns (logits f32[B, L, V], sequence mask bool[B, L]) with L = T - 1 + n_v.
        """
        _, vis = self.encode_image(pixels)
        if self.cfg.image_newline:
            _ = self.image_newline  # created at init; unused by single-crop inputs
        text = self.embed_text(ids)
        image_pos = image_positions(ids, self.cfg.image_token_id)
        n_v = vis.shape[1]
        idx = jnp.broadcast_to(jnp.arange(n_v, dtype=jnp.int32), vis.shape[:2])
        seq, seq_mask, positions, _ = splice(text, mask, image_pos, vis, idx,
                                             positions_mode="contiguous", n_v=n_v)
        h, _ = self.run(seq, positions=positions, key_valid=seq_mask)
        return self.logits(h), seq_mask


def init_params(cfg: LlavaConfig, rng: Array, batch: int = 1, text_len: int = 8):
    """Boxed params (LogicallyPartitioned leaves) of a freshly initialized model."""
    model = Llava(cfg)
    pixels, ids, mask = dummy_inputs(cfg, batch, text_len)
    return model.init(rng, pixels, ids, mask)


def dummy_inputs(cfg: LlavaConfig, batch: int = 1, text_len: int = 8):
    v = cfg.vision
    pixels = jnp.zeros((batch, v.image_size, v.image_size, 3), jnp.float32)
    ids = jnp.zeros((batch, text_len), jnp.int32).at[:, 0].set(cfg.image_token_id)
    mask = jnp.ones((batch, text_len), bool)
    return pixels, ids, mask
