"""The inference facade: load a model once, then generate / score with any pruning method.

    from covipal_jax.inference.sampler import Sampler
    from covipal_jax import pruning

    sampler = Sampler.from_checkpoint("/models/llava-1.5-7b-hf")   # or Sampler.from_config(cfg)
    out = sampler.generate([image], ["What is in the picture?"],
                           method=pruning.get("visionzip")(keep=64), max_new_tokens=32)
    out.texts, out.kept                    # answers; i32[B, k] kept patch indices
    logits, kept = sampler.first_token_logits([image], ["Is there a dog?"], method="fastv")

Everything heavy is done once per Sampler (checkpoint, tokenizer, image processor, the mesh);
a trainable method's variables (the PPM's) are loaded once per method value; one `Generator`
(two jitted programs: `prefill`, `decode`) is cached per (method, max_new_tokens), and one
jitted first-token program per method. The public jitted entry points for tools
(`tools/aot.py`, `tools/bench.py`) are `Sampler.generator(method, n).prefill / .decode /
.decode_step` and their unjitted bodies `prefill_fn` / `decode_step_fn`, plus the module-level
`first_token_fn` (unjitted, for ahead-of-time compilation).

Randomness is per example: a stochastic method (`random`) draws with the key
`fold_in(key(seed), crc32(example))`, where the example is its prompt and pixels, so an answer
never depends on the batch it was computed in.

Several images per prompt: pass a list of images per prompt (`kind="multi_image"`, chosen
automatically): `<image>` placeholders in the prompt place them, a prompt without any gets
them first (`multi_image_prompts`); OneVision semantics (a lone image AnyRes, several images
one view each). `config.pruning.budget` ("global" default, "per_image", "per_frame") splits the
budget per image / frame (`Sampler.budget`).

AnyRes images and videos (`kind="anyres"` / `"video"` in `encode`, `generate`,
`first_token_logits`) go through the same Generator: the batch becomes a packed visual input
(`inference/visual_inputs.py`), one program per (crop bucket or frame count, text bucket, k);
pruning is a global top-k over every crop / frame token (padding never kept, newlines always).
`kept` then holds source slots of the packed buffer, -1 where the LLM sees no token.

Letters: B batch, T prompt bucket, k kept vision tokens, V vocab.
"""
from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from covipal_jax import pruning, sharding
from covipal_jax.data import anyres as anyres_data
from covipal_jax.data import image as image_lib
from covipal_jax.data import text as text_lib
from covipal_jax.data import video as video_lib
from covipal_jax.inference import decoding
from covipal_jax.inference import visual_inputs as vi
from covipal_jax.inference.counted_jit import CountedJit
from covipal_jax.models import anyres as anyres_model
from covipal_jax.inference.loading import Loaded
from covipal_jax.inference.prefill import prefill
from covipal_jax.pruning.base import PruningMethod

Array = jax.Array


def example_keys(seed: int, digests: Sequence[int]) -> Array:
    """PRNG keys [B], one per example: `fold_in(key(seed), digest)`."""
    base = jax.random.key(int(seed))
    d = jnp.asarray([int(x) & 0x7FFFFFFF for x in digests], jnp.uint32)
    return jax.vmap(lambda x: jax.random.fold_in(base, x))(d)


def example_digests(pixels: np.ndarray, prompts: Sequence[str]) -> list[int]:
    """crc32 of each example's prompt and pixels (the identity of an example)."""
    px = np.asarray(pixels)
    return [zlib.crc32(px[i].tobytes(), zlib.crc32(p.encode("utf-8")))
            for i, p in enumerate(prompts)]


def first_token_fn(model, method: PruningMethod):
    """Unjitted `(params, variables, pixels, ids, mask, prune_keys) -> (logits f32[B, V],
    kept i32[B, k])`: the pruned prefill's next-token logits (no decode cache kept)."""

    def fn(params, variables, pixels, ids, mask, prune_keys):
        out = prefill(model, params, pixels, ids, mask, method, extra=1, variables=variables,
                      rng=prune_keys)
        return out.last_logits.astype(jnp.float32), out.kept

    return fn


@dataclasses.dataclass
class SampleOutput:
    """texts: decoded answers; tokens i32[B, M] (pad after EOS); kept i32[B, k] source patch
    index of each vision token the LLM saw; num_vision_tokens: k."""

    texts: list[str]
    tokens: np.ndarray
    kept: np.ndarray
    num_vision_tokens: int


class Sampler:
    """A loaded model + tokenizer + processor, generating with any pruning method value."""

    def __init__(self, loaded: Loaded, *, template: str | None, buckets: Sequence[int],
                 method: PruningMethod | None = None,
                 sampling: decoding.Sampling = decoding.Sampling(), seed: int = 0,
                 processor: image_lib.ImageProcessorConfig | None = None):
        self.loaded, self.template = loaded, template
        self.buckets = tuple(int(b) for b in buckets)
        self.sampling, self.seed = sampling, int(seed)
        self.processor = processor or loaded.processor
        self.method = method or pruning.NoneMethod()
        tok = loaded.tokenizer
        self.stop_ids = (tuple(text_lib.get_template(template, tok).stop_ids(tok)) if template
                         else (tok.eos_id,))
        self._variables: dict[PruningMethod, tuple[PruningMethod, Any]] = {}
        self._generators: dict[tuple, decoding.Generator] = {}
        self._first: dict[PruningMethod, Any] = {}

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Any, loaded: Loaded | None = None, **kw) -> "Sampler":
        """From a covipal config (`checkpoint`, `template`, `text_buckets`, `sampling`,
        `pruning`: the default method); `loaded` reuses already loaded weights."""
        from covipal_jax.inference import loading

        loaded = loaded or loading.load(config)
        kw.setdefault("method", pruning.from_config(config.pruning))
        kw.setdefault("sampling", decoding.Sampling(config.sampling.temperature,
                                                    config.sampling.top_p))
        kw.setdefault("seed", config.sampling.seed)
        sampler = cls(loaded, template=config.template or None,
                      buckets=tuple(config.text_buckets), **kw)
        sampler.budget = str(config.pruning.get("budget", "global"))
        if sampler.budget not in vi.BUDGETS:
            raise ValueError(f"config.pruning.budget={sampler.budget!r} not in {vi.BUDGETS}")
        return sampler

    @classmethod
    def from_checkpoint(cls, directory: str, *, template: str | None = "llava15",
                        buckets: Sequence[int] = (64, 128, 256, 512), mesh: Any = None,
                        **kw) -> "Sampler":
        """A Hugging Face LLaVA directory (local or gs://): model config, weights, tokenizer
        and image processor all from it; a data-parallel mesh over every device."""
        import ml_collections

        from covipal_jax.inference import loading

        config = ml_collections.ConfigDict(dict(
            checkpoint=str(directory), tokenizer="", model={},
            mesh=dict(data=-1, fsdp=1, tensor=1),
            logical_axis_rules=sharding.LOGICAL_AXIS_RULES))
        loaded = loading.load(config, mesh=mesh)
        return cls(loaded, template=template, buckets=buckets, **kw)

    # -- methods --------------------------------------------------------------------------------

    def resolve(self, method: PruningMethod | str | None) -> tuple[PruningMethod, Any]:
        """(method value, its variables): a name uses the registered class's defaults with
        the default method's keep; trainable variables are loaded once per method value."""
        if method is None:
            method = self.method
        elif isinstance(method, str):
            cls = pruning.get(method)
            method = cls(keep=self.method.keep) if cls.budgeted else cls()
        if method not in self._variables:
            self._variables[method] = method.load_variables(self.loaded.cfg) \
                if method.trainable else (method, None)
        return self._variables[method]

    def set_variables(self, method: PruningMethod, variables: Any) -> None:
        """Use in-memory variables for a trainable method (e.g. a PPM just trained)."""
        self._variables[method] = (method, variables)

    def generator(self, method: PruningMethod, max_new_tokens: int) -> decoding.Generator:
        """The cached `Generator` (jitted `prefill` / `decode` / `decode_step`)."""
        key = (method, int(max_new_tokens))
        gen = self._generators.get(key)
        if gen is None:
            tok = self.loaded.tokenizer
            gen = decoding.Generator(
                self.loaded.model, method, max_new_tokens=int(max_new_tokens),
                eos_id=tok.eos_id, pad_id=tok.pad_id,
                extra_stop_ids=tuple(s for s in self.stop_ids if s != tok.eos_id),
                sampling=self.sampling)
            self._generators[key] = gen
        return gen

    def first_token(self, method: PruningMethod):
        """The cached jitted `first_token_fn(model, method)`."""
        fn = self._first.get(method)
        if fn is None:
            fn = self._first[method] = CountedJit(first_token_fn(self.loaded.model, method))
        return fn

    # -- inputs ---------------------------------------------------------------------------------

    KINDS = ("image", "anyres", "video", "multi_image")
    budget = "global"  # "global" | "per_image" | "per_frame" (`visual_inputs.BUDGETS`)

    def anyres_processor(self) -> anyres_data.AnyResConfig:
        """The AnyRes processor: the checkpoint's `preprocessor_config.json` when there is
        one, else the model config's pinpoints (`AnyResConfig.for_model`)."""
        proc = getattr(self, "_anyres_proc", None)
        if proc is None:
            ckpt = getattr(self.loaded, "checkpoint", None)
            proc = (anyres_data.AnyResConfig.from_hf_dir(ckpt) if ckpt
                    else anyres_data.AnyResConfig.for_model(self.loaded.cfg))
            self._anyres_proc = proc
        return proc

    def visual(self, items: Sequence[Any], kind: str) -> tuple[Any, np.ndarray]:
        """Images / videos -> (the prefill's visual input, host pixels for the example keys).

        kind "image": f32[B, H, W, 3] (one base-resolution view); "anyres": `AnyResImage`
        padded to the smallest crop bucket that fits the batch; "video": `Video` from frame
        stacks u8[F, H, W, 3] of one frame count F (`data.video.load` reads a file or a folder
        of frames); "multi_image": `MultiImage` from one list of images per prompt (OneVision
        multi-image: a lone image is tiled, several get one view each; P = the most images
        of a row)."""
        if kind == "image":
            px = image_lib.preprocess(items, self.processor)
            return px, px
        cfg = self.loaded.cfg
        proc = self.anyres_processor()
        if kind == "anyres":
            x = anyres_data.preprocess(items, proc)
            plan = anyres_model.pack_plan(x.layout, cfg.vision.grid[0], cfg.anyres_max_crops)
            cap = anyres_model.bucket_capacity(cfg, x.pixels.shape[1])
            return vi.AnyResImage(x.pixels, plan, cap, self.budget), x.pixels
        if kind == "video":
            frames = video_lib.preprocess_videos([np.asarray(v) for v in items], proc.crop)
            return vi.Video(frames, self.budget), frames
        if kind == "multi_image":
            x = anyres_data.preprocess_multi(items, proc)
            return (vi.MultiImage.from_layout(cfg, x.pixels, x.layout, x.image_valid,
                                              self.budget), x.pixels)
        raise ValueError(f"kind must be one of {self.KINDS}, got {kind!r}")

    def encode(self, images: Sequence[Any], prompts: Sequence[str], *, pad_to: int | None = None,
               kind: str = "image") -> tuple[tuple[Any, Array, Array], Array]:
        """Images (PIL / uint8 arrays; videos: u8[F, H, W, 3] each) and plain prompts ->
        ((visual input, ids, mask) on the mesh, per-example keys [B]); rows padded to `pad_to`
        by repeating the last one. For a video the template's `<image>` placeholder becomes
        the model's `<video>` token."""
        images, prompts = list(images), list(prompts)
        if not images or len(images) != len(prompts):
            raise ValueError(f"need as many images as prompts (> 0), got {len(images)} and "
                             f"{len(prompts)}")
        if pad_to is not None:
            if len(images) > pad_to:
                raise ValueError(f"batch of {len(images)} > batch_size {pad_to}")
            images += [images[-1]] * (pad_to - len(images))
            prompts += [prompts[-1]] * (pad_to - len(prompts))
        visual, pixels = self.visual(images, kind)
        n_img = 1
        if kind == "multi_image":
            prompts, n_img = multi_image_prompts(images, prompts), vi.num_images(visual)
        ids, mask = text_lib.encode_prompts(self.loaded.tokenizer, prompts,
                                            template=self.template, buckets=self.buckets,
                                            max_images=n_img)
        if kind == "multi_image":
            found = (ids == self.loaded.tokenizer.image_token_id).sum(-1)
            want = np.asarray([len(x) for x in images])
            if (found != want).any():
                i = int(np.argmax(found != want))
                raise ValueError(f"prompt {i} has {found[i]} <image> placeholders for "
                                 f"{want[i]} images")
        if kind == "video":
            ids = np.where(ids == self.loaded.tokenizer.image_token_id,
                           vi.placeholder_id(self.loaded.cfg, visual), ids)
        keys = example_keys(self.seed, example_digests(pixels, prompts))
        return sharding.put_batch(self.loaded.mesh, (visual, ids, mask)), keys

    # -- generation -----------------------------------------------------------------------------

    def generate(self, images: Sequence[Any], prompts: Sequence[str], *,
                 method: PruningMethod | str | None = None, max_new_tokens: int = 32,
                 rng: Array | None = None, pad_to: int | None = None,
                 kind: str = "image") -> SampleOutput:
        """Answers for a batch (one program per (bucket, method, max_new_tokens, batch));
        kind: "image" | "anyres" | "video" | "multi_image" (see `visual`); a batch in which
        some prompt has a list of images is "multi_image"."""
        kind = _auto_kind(images, kind)
        method, variables = self.resolve(method)
        gen = self.generator(method, max_new_tokens)
        n = len(prompts)
        (pixels, ids, mask), keys = self.encode(images, prompts, pad_to=pad_to, kind=kind)
        rng = jax.random.key(self.seed) if rng is None else rng
        with sharding.use_mesh(self.loaded.mesh, self.loaded.rules):
            out = gen(self.loaded.params, pixels, ids, mask, rng=rng, variables=variables,
                      prune_keys=keys)
        rows = decoding.trim(out.tokens, out.lengths, gen.stop_ids)[:n]
        tok = self.loaded.tokenizer
        return SampleOutput([tok.decode(r).strip() for r in rows], out.tokens[:n],
                            out.kept[:n], out.num_vision_tokens)

    def first_token_logits(self, images: Sequence[Any], prompts: Sequence[str], *,
                           method: PruningMethod | str | None = None,
                           pad_to: int | None = None, kind: str = "image"
                           ) -> tuple[np.ndarray, np.ndarray]:
        """(next-token logits f32[B, V], kept i32[B, k]) after the pruned prompt."""
        kind = _auto_kind(images, kind)
        method, variables = self.resolve(method)
        n = len(prompts)
        (pixels, ids, mask), keys = self.encode(images, prompts, pad_to=pad_to, kind=kind)
        with sharding.use_mesh(self.loaded.mesh, self.loaded.rules):
            logits, kept = self.first_token(method)(self.loaded.params, variables, pixels, ids,
                                                    mask, keys)
        return np.asarray(logits)[:n], np.asarray(kept)[:n]

    def compilations(self) -> dict[str, int]:
        """Programs compiled so far by every cached jitted entry point."""
        out = {"first_token": sum(f.traces for f in self._first.values())}
        for name in ("prefill", "decode", "decode_step"):
            out[name] = sum(g.compilations()[name] for g in self._generators.values())
        return out


def _auto_kind(images: Sequence[Any], kind: str) -> str:
    """"multi_image" when some prompt of an image batch has a list of images."""
    if kind in ("image", "anyres") and any(isinstance(x, (list, tuple)) for x in images):
        return "multi_image"
    return kind


def multi_image_prompts(images: Sequence[Any], prompts: Sequence[str]) -> list[str]:
    """Prompts for several images each: a prompt with `<image>` placeholders is kept (they
    place the images, in order); one without gets one `<image>` line per image in front."""
    out = []
    for x, p in zip(images, prompts):
        n = len(x) if isinstance(x, (list, tuple)) else 1
        if n < 1:
            raise ValueError("a prompt needs at least one image")
        out.append(p if text_lib.IMAGE_TOKEN in p else "\n".join(["<image>"] * n) + "\n" + p)
    return out
