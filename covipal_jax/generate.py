r"""Generate an answer about an image, optionally pruning vision tokens.

    python -m covipal_jax.generate --config configs/llava15_7b.py \
        --config.checkpoint=/path/to/llava-1.5-7b-hf --image cat.jpg \
        --prompt "What is in the image?" \
        --config.pruning.method=visionzip --config.pruning.keep=0.25

With `configs/tiny.py` and no checkpoint it runs on random weights, with the built-in tokenizer
and a generated image when `--image` is omitted.

AnyRes models (LLaVA-NeXT / OneVision configs, e.g. `configs/tiny_ov.py`) cut `--image` into a
base view plus crops (`--noanyres`: the base view only); a video goes in with
`--video FILE --frames N` (a file PyAV reads, or a folder of frames; N defaults to the config's
`video_frames`). Pruning is a global top-k over every crop / frame token; the `image_newline`
tokens are always kept and count toward the budget.

Several images (OneVision): repeat `--image`; `<image>` placeholders in `--prompt` place them
in order, a prompt without any gets them first. As in transformers, each of several images is
one untiled view (base + newline); `--config.pruning.budget=per_image` splits the budget evenly
over the images (default `global`: one top-k over all of them). One `--video` per run, not
mixed with images.
"""
from __future__ import annotations

from covipal_jax import configs as configs_lib
import sys
import time

from absl import app, flags
from ml_collections import config_flags



def _define_flags():
    """Flags are registered only when run as a program (importing this module adds none)."""
    global _CONFIG, _IMAGE, _PROMPT, _RAW, _VIDEO, _FRAMES, _ANYRES
    _CONFIG = config_flags.DEFINE_config_file("config", configs_lib.path("tiny"), "Config file.",
                                              lock_config=True)
    _IMAGE = flags.DEFINE_multi_string("image", None, "Image path (default: a generated "
                                       "image); repeat for several images in one prompt.")
    _PROMPT = flags.DEFINE_string("prompt", None,
                                  "The question (the chat template adds <image>).")
    _RAW = flags.DEFINE_bool("raw_prompt", False,
                             "Use --prompt as is (no chat template); it must contain <image>.")
    _VIDEO = flags.DEFINE_string("video", None, "Video file (PyAV) or folder of frames.")
    _FRAMES = flags.DEFINE_integer("frames", None, "Frames sampled uniformly from --video "
                                   "(default: the config's video_frames).")
    _ANYRES = flags.DEFINE_bool("anyres", None, "Cut --image into AnyRes crops (default: when "
                                "the model has image_grid_pinpoints).")


def run(config, image_path: str | list[str] | None, prompt: str | None, raw: bool = False, *,
        video: str | None = None, frames: int | None = None,
        anyres: bool | None = None) -> dict:
    """Load, prune, generate; returns a dict with the answer and what was kept.

    image_path: one path or a list (several images in one prompt); video: a video file or a
    folder of frames (`frames` sampled uniformly); anyres: AnyRes crops for the image (None:
    when the model config has pinpoints)."""
    import jax
    import numpy as np

    from covipal_jax import pruning
    from covipal_jax.inference import loading
    from covipal_jax.inference.sampler import Sampler
    from covipal_jax.data import image as image_lib
    from covipal_jax.data.synthetic import task as synthetic

    from covipal_jax.data import video as video_lib

    paths = [image_path] if isinstance(image_path, str) else list(image_path or [])
    image_path = paths[0] if len(paths) == 1 else None
    if video is not None and paths:
        raise ValueError("give --image or --video, not both (images and a video: not yet)")
    if not paths and video is None and config.checkpoint:
        raise ValueError("--image (or --video) is required with a real checkpoint")
    method = pruning.from_config(config.pruning)
    loaded = loading.load(config, with_params=False)
    cfg = loaded.cfg
    if anyres is None:
        anyres = bool(cfg.image_grid_pinpoints)
    if anyres and not cfg.image_grid_pinpoints:
        raise ValueError("--anyres needs a model with image_grid_pinpoints (NeXT / OneVision)")
    kind = "video" if video is not None else ("anyres" if anyres else "image")
    if len(paths) > 1:
        kind = "multi_image"
        if not cfg.image_newline:
            raise ValueError("several --image need a LLaVA-OneVision model (image_newline); "
                             "this model takes one image")
    if kind == "image":
        method.k(cfg.num_vision_tokens)  # a bad keep is a config error before weights load
    if video is not None:
        n = frames if frames is not None else config.get("video_frames", None)
        if not n or n < 1:
            raise ValueError("--frames N (>= 1) is required for --video (the config has no "
                             "video_frames)")
        image = video_lib.load(video, int(n))
        if not prompt:
            raise ValueError("--prompt is required")
    elif kind == "multi_image":
        image = [image_lib.load_image(p) for p in paths]
    elif image_path is None:
        ex = synthetic.make_example("test", 0, seed=config.sampling.seed)
        image, prompt = ex["image"], prompt or ex["question"]
    else:
        image = image_lib.load_image(image_path)
    if not prompt:
        raise ValueError("--prompt is required")
    sampler = Sampler.from_config(config, loaded, method=method)
    if raw:
        sampler.template, sampler.stop_ids = None, (loaded.tokenizer.eos_id,)
    method, _ = sampler.resolve(method)  # a trainable method's variables, before the weights
    sampler.loaded = loading.load_params(config, loaded)  # weights last: config errors first
    t0 = time.perf_counter()
    out = sampler.generate([image], [prompt], method=method,
                           max_new_tokens=config.max_new_tokens,
                           rng=jax.random.key(config.sampling.seed), kind=kind)
    seconds = time.perf_counter() - t0
    from covipal_jax.data import text as text_lib

    template = text_lib.describe_template(sampler.template, loaded.tokenizer)
    kept = np.asarray(out.kept[0])
    total = cfg.num_vision_tokens
    if kind != "image":  # packed: -1 marks slots the LLM does not see
        kept = kept[kept >= 0]
        visual, _ = sampler.visual([image], kind)
        total = _num_real_tokens(cfg, visual)
    return dict(answer=out.texts[0], prompt=prompt, vision_tokens_kept=int(kept.size),
                template=template, vision_tokens_total=total, method=method.name,
                input=kind, kept_indices=kept.tolist(), seconds=seconds)


def _num_real_tokens(cfg, visual) -> int:
    """Vision tokens of one packed input before pruning (HF's sequence length)."""
    from covipal_jax.inference import visual_inputs as vi
    from covipal_jax.models import anyres as anyres_model

    if isinstance(visual, vi.AnyResImage):
        return int(anyres_model.packed_lengths(visual.plan, cfg.vision.grid[0])[0])
    if isinstance(visual, vi.MultiImage):
        return int(visual.num_real_tokens(cfg)[0])
    return visual.num_slots(cfg)


def main(argv):
    del argv
    try:
        r = run(_CONFIG.value, _IMAGE.value, _PROMPT.value, _RAW.value, video=_VIDEO.value,
                frames=_FRAMES.value, anyres=_ANYRES.value)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"prompt: {r['prompt']}  (template: {r['template']})")
    print(f"answer: {r['answer']}")
    print(f"vision tokens kept: {r['vision_tokens_kept']} / {r['vision_tokens_total']} "
          f"(method {r['method']}, input {r['input']})")
    print(f"time (incl. compilation): {r['seconds']:.2f} s")


if __name__ == "__main__":
    _define_flags()
    from covipal_jax import cli

    cli.run(main)
