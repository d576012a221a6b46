"""The PPM's config, initialization, and the trained PPM as a shareable artifact.

A trained PPM is a directory (local or `gs://`), shareable like a Hugging Face model:
- `model.safetensors`: the PPM variables, keys `params.<module path joined by ".">`;
- `config.json`: `{"format": "covipal_ppm", "format_version": 2, "ppm": PPMConfig,
  "base_model": {"name", "architecture", "model_type", "fingerprint", "config"},
  "training": the training config, plus the trainer's `extra` keys (trained_steps, keep,
  stages, ...)}`. `base_model.config` holds every field of the base LLaVA that changes the
  computation (`hf_config.computation_dict`); `fingerprint` is its SHA-256.

`save_ppm` never leaves a partial artifact: locally it writes a temporary directory and renames
it into place; on an object store (no rename) it deletes config.json first, writes
model.safetensors, and config.json last, so a directory without config.json is incomplete and
`load_ppm` refuses it. `load_ppm` checks the base model: a mismatch is an error naming every
differing field. Only the PPM is saved: the frozen LLaVA always comes from its own directory.

Format 2 (issue 12) adds `ppm.position` ("layout": positions computed from the slots' layout,
any number of tokens; "table": a learned [n_v, d] table). Format-1 artifacts predate it and
load as "table" PPMs (they still run on exactly their n_v tokens: single images).
Old exports (Orbax `params/` + `ppm.json`, before format 1) still load (`_load_orbax`);
`convert_ppm(old_dir, new_dir, llava_cfg)` re-exports one as the artifact.
"""
from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from covipal_jax import paths
from covipal_jax.models.config import LlavaConfig
from covipal_jax.pruning.ppm import PPM, PPMConfig
from covipal_jax.weights import hf_config
from covipal_jax.weights.safetensors_io import SafetensorsFile, listing, save_safetensors

FORMAT, FORMAT_VERSION = "covipal_ppm", 2
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
LEGACY_META, LEGACY_PARAMS = "ppm.json", "params"


def ppm_config(config: Any, llava_cfg: LlavaConfig) -> PPMConfig:
    """PPMConfig from `config.ppm` for a given LLaVA (n_v and width come from the model)."""
    p = config.ppm
    return PPMConfig(n_v=llava_cfg.num_vision_tokens, d_model=llava_cfg.text.hidden_size,
                     width=p.width, num_layers=p.num_layers, num_heads=p.num_heads,
                     mlp_ratio=p.mlp_ratio, dropout=p.dropout,
                     position=p.get("position", "layout"), attention=p.get("attention", "auto"))


def config_from_meta(ppm: Mapping[str, Any], format_version: int) -> PPMConfig:
    """The PPMConfig an artifact records; format < 2 (no `position`) is a "table" PPM."""
    fields = dict(ppm)
    if format_version < 2:
        fields.setdefault("position", "table")
    return PPMConfig(**fields)


def init_ppm(pcfg: PPMConfig, rng: jax.Array, batch: int = 1, text_len: int = 4):
    """Boxed PPM variables {"params": ...}."""
    v = jnp.zeros((batch, pcfg.n_v, pcfg.d_model), jnp.float32)
    t = jnp.zeros((batch, text_len, pcfg.d_model), jnp.float32)
    m = jnp.ones((batch, text_len), bool)
    return PPM(pcfg).init(rng, v, t, m)


# ----------------------------------------------------------------------------- base model


def base_model_info(llava_cfg: LlavaConfig, name: str | None = None) -> dict[str, Any]:
    """What a PPM records of its base model: name, HF architecture, fingerprint, fields."""
    hf = hf_config.hf_config_dict(llava_cfg)
    fields = _jsonable(hf_config.computation_dict(llava_cfg))
    return {"name": name or "", "architecture": hf["architectures"][0],
            "model_type": hf["model_type"], "fingerprint": fingerprint(llava_cfg),
            "config": fields}


def fingerprint(llava_cfg: LlavaConfig) -> str:
    """SHA-256 of the base model's computation fields (`hf_config.computation_dict`)."""
    fields = _jsonable(hf_config.computation_dict(llava_cfg))
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def check_base_model(meta: Mapping[str, Any], llava_cfg: LlavaConfig, where: str) -> None:
    """ValueError naming every base-model field where the PPM's record and `llava_cfg` differ."""
    base = meta.get("base_model") or {}
    if base.get("fingerprint") == fingerprint(llava_cfg):
        return
    theirs = base.get("config") or {}
    ours = _jsonable(hf_config.computation_dict(llava_cfg))
    diffs = [f"  {k}: PPM's base model {theirs.get(k)!r}, given model {ours.get(k)!r}"
             for k in sorted(set(theirs) | set(ours))
             if not hf_config._same(theirs.get(k), ours.get(k))]
    if not diffs and theirs:  # same fields, other fingerprint: an older field set
        return
    name = f" ({base['name']})" if base.get("name") else ""
    raise ValueError(f"PPM at '{where}' was trained for a different base model{name}; "
                     f"differing fields:\n" + ("\n".join(diffs) or "  (no record of its base "
                                                "model fields)"))


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=_json_default))


def _json_default(o: Any) -> Any:
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if isinstance(o, (np.generic,)):
        return o.item()
    if isinstance(o, (tuple, set, frozenset)):
        return list(o)
    return str(o)


# ----------------------------------------------------------------------------- save


def _to_host(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def save_ppm(path: paths.PathLike, variables: Any, pcfg: PPMConfig, llava_cfg: LlavaConfig,
             extra: dict | None = None, *, base_model_name: str | None = None,
             train_config: Any = None) -> str:
    """Export a trained PPM (see the module docstring); returns the directory as a string.

    variables: `{"params": ...}` (boxed or not, possibly sharded). extra: top-level metadata
    (the trainer's trained_steps, keep, stages). base_model_name: the base checkpoint's name or
    path. train_config: the training config (a ConfigDict or dict), stored under "training".
    With several processes every process calls this (arrays are gathered); process 0 writes.
    """
    out = paths.as_path(path)
    flat = traverse_util.flatten_dict(nn.unbox(variables), sep=".")
    host = {k: _to_host(v) for k, v in flat.items()}  # collective: every process
    meta = dict(format=FORMAT, format_version=FORMAT_VERSION, ppm=pcfg.to_dict(),
                base_model=base_model_info(llava_cfg, base_model_name))
    if train_config is not None:
        meta["training"] = _jsonable(train_config)
    meta.update(_jsonable(extra or {}))
    if jax.process_index() == 0:
        with paths.user_path_errors(out, "PPM directory"):
            _write_dir(out, host, meta)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f"save_ppm:{out}")
    return str(path)


def _write_dir(out, tensors: dict[str, np.ndarray], meta: dict) -> None:
    if paths.is_remote(out):  # no rename on object stores: config.json marks completeness
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_FILE).unlink(missing_ok=True)
        save_safetensors(out / WEIGHTS_FILE, tensors, metadata={"format": FORMAT})
        paths.write_json(out / CONFIG_FILE, meta)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp, old = out.parent / f".{out.name}.tmp-{tag}", out.parent / f".{out.name}.old-{tag}"
    try:
        tmp.mkdir()
        save_safetensors(tmp / WEIGHTS_FILE, tensors, metadata={"format": FORMAT})
        paths.write_json(tmp / CONFIG_FILE, meta)
        if out.exists():
            out.rename(old)
        tmp.rename(out)
    except BaseException:
        if tmp.exists():
            tmp.rmtree()
        if old.exists() and not out.exists():
            old.rename(out)
        raise
    if old.exists():
        old.rmtree()


# ----------------------------------------------------------------------------- load


def load_ppm(path: paths.PathLike, llava_cfg: LlavaConfig) -> tuple[PPM, Any, dict]:
    """(module, variables, metadata) of an exported PPM; checks it fits `llava_cfg`.

    variables: `{"params": ...}` of jax arrays. metadata: config.json's content.
    """
    p = paths.as_path(path)
    with paths.user_path_errors(p, "PPM directory"):
        if not p.exists():
            raise FileNotFoundError(f"PPM directory '{p}' does not exist")
        if (p / CONFIG_FILE).exists():
            return _load_safetensors(p, llava_cfg)
        if (p / LEGACY_META).exists():
            return _load_orbax(p, llava_cfg)
        if (p / WEIGHTS_FILE).exists():
            raise ValueError(f"'{p}' is an incomplete PPM export ({WEIGHTS_FILE} but no "
                             f"{CONFIG_FILE}: the export was interrupted); export it again")
        raise FileNotFoundError(f"'{p}' is not an exported PPM (no {CONFIG_FILE})")


def _abstract(pcfg: PPMConfig) -> dict[str, Any]:
    return jax.eval_shape(lambda: nn.unbox(init_ppm(pcfg, jax.random.key(0))))


def _load_safetensors(p, llava_cfg: LlavaConfig) -> tuple[PPM, Any, dict]:
    meta = paths.read_json(p / CONFIG_FILE)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{p / CONFIG_FILE}: not a covipal PPM config (format "
                         f"{meta.get('format') if isinstance(meta, dict) else None!r}, "
                         f"expected {FORMAT!r})")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{p / CONFIG_FILE}: PPM format version {meta['format_version']} is "
                         f"newer than this covipal_jax reads ({FORMAT_VERSION}); upgrade")
    check_base_model(meta, llava_cfg, str(p))
    try:
        pcfg = config_from_meta(meta["ppm"], int(meta.get("format_version", 0)))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{p / CONFIG_FILE}: bad PPM config ({e})") from None
    want = traverse_util.flatten_dict(_abstract(pcfg), sep=".")
    f = SafetensorsFile(p / WEIGHTS_FILE)
    try:
        missing, unused = set(want) - set(f.keys()), set(f.keys()) - set(want)
        bad = [f"  {k}: file {f.shape(k)} {f.dtype(k)}, PPM {tuple(want[k].shape)} "
               f"{want[k].dtype}" for k in sorted(set(want) & set(f.keys()))
               if f.shape(k) != tuple(want[k].shape)]
        if missing or unused or bad:
            lines = [f"{f.path}: tensors do not match the PPM config in {CONFIG_FILE}:"]
            if missing:
                lines.append(f"  missing: {listing(missing)}")
            if unused:
                lines.append(f"  unexpected: {listing(unused)}")
            raise ValueError("\n".join(lines + bad))
        flat = {k: jnp.asarray(f.get(k).astype(want[k].dtype)) for k in want}
    finally:
        f.close()
    return PPM(pcfg), traverse_util.unflatten_dict(flat, sep="."), meta


def _load_orbax(p, llava_cfg: LlavaConfig) -> tuple[PPM, Any, dict]:
    """An export of the older format: Orbax `params/` + `ppm.json` (architecture only)."""
    import orbax.checkpoint as ocp

    meta = paths.read_json(p / LEGACY_META)
    if meta.get("base_model") != _jsonable(llava_cfg.architecture_dict()):
        raise ValueError(f"PPM at '{p}' was trained for a different base model")
    pcfg = config_from_meta(meta["ppm"], 0)
    variables = ocp.StandardCheckpointer().restore(p / LEGACY_PARAMS, _abstract(pcfg))
    return PPM(pcfg), variables, meta


def convert_ppm(old_dir: paths.PathLike, new_dir: paths.PathLike, llava_cfg: LlavaConfig,
                **kw) -> str:
    """Re-export an older (Orbax) PPM export as the safetensors artifact."""
    module, variables, meta = load_ppm(old_dir, llava_cfg)
    extra = {k: v for k, v in meta.items() if k not in ("ppm", "base_model")}
    return save_ppm(new_dir, variables, module.cfg, llava_cfg, extra, **kw)


def load_for_inference(config: Any, llava_cfg: LlavaConfig) -> tuple[PPM, Any]:
    path = config.pruning.ppm_checkpoint
    if not path:
        raise ValueError("pruning.method='ppm' needs --config.pruning.ppm_checkpoint=DIR "
                         "(a PPM exported by `python -m covipal_jax.train`)")
    module, variables, _ = load_ppm(path, llava_cfg)
    return module, variables
