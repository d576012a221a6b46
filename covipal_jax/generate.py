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

    from covipal_jax import sharding
    from covipal_jax.inference import decoding, loading
    from covipal_jax.weights import ppm_io
    from covipal_jax.data import image as image_lib
    from covipal_jax.data.synthetic import task as synthetic
    from covipal_jax.data import text as text_lib
    from covipal_jax.inference.prefill import PruneSpec

    if image_path is None and config.checkpoint:
        raise ValueError("--image is required with a real checkpoint")
    loaded = loading.load(config, with_params=False)
    cfg, tok = loaded.cfg, loaded.tokenizer
    if image_path is None:
        ex = synthetic.make_example("test", 0, seed=config.sampling.seed)
        image, prompt = ex["image"], prompt or ex["question"]
    else:
        image = image_lib.load_image(image_path)
    if not prompt:
        raise ValueError("--prompt is required")
    pixels = image_lib.preprocess([image], loaded.processor)
    template = None if raw else config.template
    ids, mask = text_lib.encode_prompts(tok, [prompt], template=template,
                                        buckets=tuple(config.text_buckets))
    spec = PruneSpec.from_config(config.pruning, cfg.num_vision_tokens)
    ppm_module, ppm_vars = ppm_io.load_for_inference(config, cfg) if spec.method == "ppm" \
        else (None, None)
    loaded = loading.load_params(config, loaded)  # weights last: config errors come first
    stops = text_lib.get_template(config.template).stop_ids(tok) if not raw else ()
    gen = decoding.Generator(
        loaded.model, spec, max_new_tokens=config.max_new_tokens, eos_id=tok.eos_id,
        pad_id=tok.pad_id, extra_stop_ids=tuple(stops), ppm_module=ppm_module,
        sampling=decoding.Sampling(config.sampling.temperature, config.sampling.top_p))
    with sharding.use_mesh(loaded.mesh, loaded.rules):
        t0 = time.perf_counter()
        out = gen(loaded.params, pixels, ids, mask, rng=jax.random.key(config.sampling.seed),
                  ppm_vars=ppm_vars)
        seconds = time.perf_counter() - t0
    answer_ids = decoding.trim(out.tokens, out.lengths, gen.stop_ids)[0]
    return dict(answer=tok.decode(answer_ids), prompt=prompt,
                vision_tokens_kept=out.num_vision_tokens,
                vision_tokens_total=cfg.num_vision_tokens, method=spec.method,
                kept_indices=np.asarray(out.kept[0]).tolist(), seconds=seconds)


def main(argv):
    del argv
    try:
        r = run(_CONFIG.value, _IMAGE.value, _PROMPT.value, _RAW.value)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"prompt: {r['prompt']}")
    print(f"answer: {r['answer']}")
    print(f"vision tokens kept: {r['vision_tokens_kept']} / {r['vision_tokens_total']} "
          f"(method {r['method']})")
    print(f"time (incl. compilation): {r['seconds']:.2f} s")


if __name__ == "__main__":
    _define_flags()
    from covipal_jax import cli

    cli.run(main)
