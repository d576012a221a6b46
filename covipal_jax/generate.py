r"""Generate an answer about an image, optionally pruning vision tokens.

    python -m covipal_jax.generate --config configs/llava15_7b.py \
        --config.checkpoint=/path/to/llava-1.5-7b-hf --image cat.jpg \
        --prompt "What is in the image?" \
        --config.pruning.method=visionzip --config.pruning.keep=0.25

With `configs/tiny.py` and no checkpoint it runs on random weights, with the built-in tokenizer
and a generated image when `--image` is omitted.
"""
from __future__ import annotations

from covipal_jax import configs as configs_lib
import sys
import time

from absl import app, flags
from ml_collections import config_flags



def _define_flags():
    """Flags are registered only when run as a program (importing this module adds none)."""
    global _CONFIG, _IMAGE, _PROMPT, _RAW
    _CONFIG = config_flags.DEFINE_config_file("config", configs_lib.path("tiny"), "Config file.",
                                              lock_config=True)
    _IMAGE = flags.DEFINE_string("image", None, "Image path (default: a generated image).")
    _PROMPT = flags.DEFINE_string("prompt", None,
                                  "The question (the chat template adds <image>).")
    _RAW = flags.DEFINE_bool("raw_prompt", False,
                             "Use --prompt as is (no chat template); it must contain <image>.")


def run(config, image_path: str | None, prompt: str | None, raw: bool = False) -> dict:
    """Load, prune, generate; returns a dict with the answer and what was kept."""
    import jax
    import numpy as np

    from covipal_jax import pruning
    from covipal_jax.inference import loading
    from covipal_jax.inference.sampler import Sampler
    from covipal_jax.data import image as image_lib
    from covipal_jax.data.synthetic import task as synthetic

    if image_path is None and config.checkpoint:
        raise ValueError("--image is required with a real checkpoint")
    method = pruning.from_config(config.pruning)
    loaded = loading.load(config, with_params=False)
    cfg = loaded.cfg
    method.k(cfg.num_vision_tokens)  # a bad keep is a config error before any weight loads
    if image_path is None:
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
                           rng=jax.random.key(config.sampling.seed))
    seconds = time.perf_counter() - t0
    from covipal_jax.data import text as text_lib

    template = text_lib.describe_template(sampler.template, loaded.tokenizer)
    return dict(answer=out.texts[0], prompt=prompt, vision_tokens_kept=out.num_vision_tokens,
                template=template,
                vision_tokens_total=cfg.num_vision_tokens, method=method.name,
                kept_indices=np.asarray(out.kept[0]).tolist(), seconds=seconds)


def main(argv):
    del argv
    try:
        r = run(_CONFIG.value, _IMAGE.value, _PROMPT.value, _RAW.value)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"prompt: {r['prompt']}  (template: {r['template']})")
    print(f"answer: {r['answer']}")
    print(f"vision tokens kept: {r['vision_tokens_kept']} / {r['vision_tokens_total']} "
          f"(method {r['method']})")
    print(f"time (incl. compilation): {r['seconds']:.2f} s")


if __name__ == "__main__":
    _define_flags()
    from covipal_jax import cli

    cli.run(main)
