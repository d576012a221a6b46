"""From a config to a ready model: weights, tokenizer, image processor, mesh.

`load(config)` is what every entry point (generate, eval, bench, demo) calls:
- `config.checkpoint` set: a Hugging Face LLaVA directory, local or `gs://` (every path goes
  through `etils.epath`). The model config comes from its `config.json` (a given
  `config.model` must agree on every field that changes the computation, else an error
  listing them: `weights.hf_config.resolve_config`, the rule the HF loader uses too), weights
  load straight into their shardings, tokenizer and image processor from the same directory.
- no checkpoint: random weights from `config.model` (tests, benchmarks, the tiny demo), with
  the built-in word tokenizer and a processor matching the tower.
"""
from __future__ import annotations

import dataclasses
import tempfile
from typing import Any

import jax
from etils import epath

from covipal_jax import paths, sharding
from covipal_jax.data import image as image_lib
from covipal_jax.data.synthetic import task as synthetic
from covipal_jax.data import text as text_lib
from covipal_jax.models.config import LlavaConfig
from covipal_jax.models.llava import Llava, init_params


@dataclasses.dataclass
class Loaded:
    cfg: LlavaConfig
    model: Llava
    params: Any
    tokenizer: Any
    processor: image_lib.ImageProcessorConfig
    mesh: Any
    rules: Any


def builtin_tokenizer() -> text_lib.BuiltinTokenizer:
    """The word tokenizer of the tiny model and the synthetic demo."""
    return text_lib.BuiltinTokenizer(synthetic.vocabulary())


def default_processor(cfg: LlavaConfig) -> image_lib.ImageProcessorConfig:
    v = cfg.vision
    if v.kind == "clip":
        return image_lib.ImageProcessorConfig.clip(v.image_size)
    return image_lib.ImageProcessorConfig.siglip(v.image_size)


def model_config(config: Any) -> LlavaConfig:
    """`config.model` -> LlavaConfig, checked against the checkpoint's config.json if any."""
    from covipal_jax.weights import hf_config  # local import: keeps startup light

    given = LlavaConfig.from_config(config.model) if len(config.model) else None
    if not config.checkpoint:
        if given is None:
            raise ValueError("config.model is empty and no config.checkpoint was given")
        return given
    path = paths.as_path(config.checkpoint)
    with paths.user_path_errors(path, "checkpoint directory"):
        if not path.is_dir():
            what = "is not a directory" if path.exists() else "does not exist"
            raise FileNotFoundError(f"checkpoint directory '{path}' {what}")
    return hf_config.resolve_config(given, hf_config.config_from_hf(path))


# What `text_lib.load_tokenizer` may read from a checkpoint directory (all small files).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "config.json", "added_tokens.json", "chat_template.json", "chat_template.jinja",
                   "generation_config.json", text_lib.BUILTIN_FILENAME)


def local_tokenizer_dir(path: paths.PathLike) -> str:
    """`path` itself when local; for a remote (`gs://`) directory, a local temporary copy of
    its tokenizer files (`TOKENIZER_FILES`, a few MB), so the tokenizer libraries can read it."""
    if not paths.is_remote(path):
        return str(path)
    src = paths.as_path(path)
    if not src.is_dir():  # a saved BuiltinTokenizer file
        if not src.exists():
            raise FileNotFoundError(f"no tokenizer at '{src}'")
        dst = epath.Path(tempfile.mkdtemp(prefix="covipal_tok_")) / src.name
        dst.write_bytes(src.read_bytes())
        return str(dst)
    dst = epath.Path(tempfile.mkdtemp(prefix="covipal_tok_"))
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            (dst / name).write_bytes((src / name).read_bytes())
    return str(dst)


def load_processor(checkpoint: paths.PathLike | None,
                   cfg: LlavaConfig) -> image_lib.ImageProcessorConfig:
    """The checkpoint's `preprocessor_config.json` (missing fields: the tower's defaults), or
    the tower's default processor when there is none."""
    if checkpoint:
        f = paths.as_path(checkpoint) / "preprocessor_config.json"
        with paths.user_path_errors(f, "checkpoint file"):
            if f.exists():
                return image_lib.ImageProcessorConfig.from_hf_dict(
                    paths.read_json(f), family=cfg.vision.kind, image_size=cfg.vision.image_size)
    return default_processor(cfg)


def load(config: Any, *, rng: jax.Array | None = None, mesh=None,
         with_params: bool = True) -> Loaded:
    """Model config, tokenizer, processor, and (unless `with_params=False`) the weights.

    Cheap parts come first, so configuration errors surface before any weights are read.
    """
    from covipal_jax.weights import hf

    cfg = model_config(config)
    mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
    rules = config.logical_axis_rules
    tok_dir = config.tokenizer or config.checkpoint
    if tok_dir == "builtin" or not tok_dir:
        tokenizer = builtin_tokenizer()
    else:
        with paths.user_path_errors(tok_dir, "tokenizer directory"):
            tokenizer = text_lib.load_tokenizer(local_tokenizer_dir(tok_dir))
    processor = load_processor(config.checkpoint, cfg)
    if tokenizer.image_token_id != cfg.image_token_id:
        raise ValueError(f"tokenizer image token id {tokenizer.image_token_id} != model "
                         f"image_token_id {cfg.image_token_id}")
    if tokenizer.vocab_size > cfg.text.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens, the model's embedding "
                         f"only {cfg.text.vocab_size}")
    params = None
    if with_params and config.checkpoint:
        cfg, params = hf.load_llava(config.checkpoint, cfg=cfg, mesh=mesh, rules=rules)
    elif with_params:
        rng = jax.random.key(0) if rng is None else rng
        params, _ = sharding.init_sharded(lambda r: init_params(cfg, r), rng, mesh, rules)
    return Loaded(cfg, Llava(cfg), params, tokenizer, processor, mesh, rules)


def load_params(config: Any, loaded: Loaded, *, rng: jax.Array | None = None) -> Loaded:
    """Fill in the weights of a `load(..., with_params=False)` result."""
    return load(config, rng=rng, mesh=loaded.mesh, with_params=True)


