r"""lmms-eval model adapter: evaluate a covipal_jax model, with pruning, in lmms-eval.

    python -m covipal_jax.eval.lmms_eval_model --model covipal_jax \
        --model_args config=llava_ov_7b,checkpoint=/ckpt/ov7b,method=ppm,keep=0.25,ppm=/ckpt/ppm \
        --tasks gqa,mme --batch_size 8 --output_path logs/

runs lmms-eval's own command line with `covipal_jax` registered as a model (any lmms-eval
arguments work). Once the package declares the entry point (`pyproject.toml`:
`[project.entry-points."lmms_eval.models"] covipal_jax =
"covipal_jax.eval.lmms_eval_model:manifest"`), plain `lmms-eval --model covipal_jax ...` works.

`--model_args` keys: `config` (a packaged config name such as `llava15_7b`, or a config file;
default `tiny`), `checkpoint`, `method` (any registered pruning method; default `none`), `keep`
(ratio or token count), `ppm` (trained PPM directory), `tokenizer`, `template`,
`max_new_tokens`, `frames` (frames sampled per video, default the config's `video_frames`,
else 32); `batch_size` comes from lmms-eval's `--batch_size`. Requests are answered by the eval
predictor (`covipal_jax/eval/predictor.py`): greedy generation on one image or one video per
request, stopped at the task's `until` strings. Video tasks (videomme, mvbench, nextqa_mc_test,
...) hand a video path as the request's visual: it is decoded with PyAV (or read as a frame
folder), `frames` frames sampled uniformly, and answered through `predict_frames` (a OneVision
config); image and video requests of one call are batched separately. Not supported:
loglikelihood (multiple-choice tasks scored by likelihood), multi-round generation, several
images or videos per request; each raises a clear error.
"""
from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence
from typing import Any

import os

from PIL import Image

try:  # lmms-eval is optional: without it the adapter keeps the same API (tested directly).
    from lmms_eval.api.model import lmms as _LmmsBase
except ImportError:  # pragma: no cover  (exercised where lmms-eval is not installed)
    class _LmmsBase:  # noqa: D101  (the part of lmms_eval.api.model.lmms the adapter uses)
        is_simple = True

        def __init__(self) -> None:
            self._rank, self._world_size, self.task_dict = 0, 1, {}

        @property
        def rank(self) -> int:
            return self._rank

        @property
        def world_size(self) -> int:
            return self._world_size

        @classmethod
        def create_from_arg_string(cls, arg_string: str, additional_config=None):
            args = dict(kv.split("=", 1) for kv in arg_string.split(",") if kv.strip())
            extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
            return cls(**args, **extra)

MODEL_NAME = "covipal_jax"


def manifest():
    """lmms-eval's registration payload (entry point group `lmms_eval.models`)."""
    from lmms_eval.models.registry_v2 import ModelManifest  # noqa: PLC0415

    return ModelManifest(model_id=MODEL_NAME,
                         simple_class_path=f"{__name__}.CovipalJax")


def load_config(config: str = "tiny", **overrides: Any):
    """A packaged config name (`tiny`, `llava15_7b:layers=2`) or a config file, with
    `overrides` (`checkpoint`, `method`, `keep`, `ppm`, ...) applied."""
    from covipal_jax import configs as configs_lib  # noqa: PLC0415

    file, _, arg = (config if config.split(":")[0].endswith(".py")
                    else configs_lib.path(config)).partition(":")
    spec = importlib.util.spec_from_file_location(f"_covipal_cfg_{abs(hash(file))}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config(arg) if arg else module.get_config()
    keys = {"checkpoint": "checkpoint", "tokenizer": "tokenizer", "template": "template",
            "max_new_tokens": "max_new_tokens", "batch_size": "batch_size",
            "method": "pruning.method", "ppm": "pruning.ppm_checkpoint"}
    for key, value in overrides.items():
        if value is None or key == "keep":
            continue
        if key not in keys:
            raise ValueError(f"unknown covipal_jax model_args key {key!r}; known: "
                             f"{sorted([*keys, 'keep', 'config'])}")
        node, _, leaf = keys[key].rpartition(".")
        target = cfg
        for part in filter(None, node.split(".")):
            target = target[part]
        target[leaf] = value
    return cfg


class CovipalJax(_LmmsBase):
    """`lmms_eval.api.model.lmms` over the eval predictor (one pruning method and keep)."""

    is_simple = True

    def __init__(self, config: str = "tiny", checkpoint: str | None = None,
                 method: str = "none", keep: Any = None, ppm: str | None = None,
                 batch_size: Any = 1, max_new_tokens: int | None = None,
                 tokenizer: str | None = None, template: str | None = None,
                 predictor: Any = None, frames: Any = None, **unused: Any) -> None:
        super().__init__()
        self.batch_size_per_gpu = int(batch_size) if str(batch_size).isdigit() else 1
        if predictor is None:
            predictor = self._build(config, checkpoint, method, keep, ppm, tokenizer,
                                    template, max_new_tokens, frames)
        self.predictor = predictor
        self.max_new_tokens = int(max_new_tokens or getattr(self, "_default_max_new", 32))

    def _build(self, config, checkpoint, method, keep, ppm, tokenizer, template,
               max_new_tokens, frames=None):
        from covipal_jax.eval import suite  # noqa: PLC0415
        from covipal_jax.inference import loading  # noqa: PLC0415

        cfg = load_config(str(config), checkpoint=checkpoint, method=method, ppm=ppm,
                          tokenizer=tokenizer, template=template,
                          batch_size=self.batch_size_per_gpu)
        self._default_max_new = int(max_new_tokens or cfg.max_new_tokens)
        loaded = loading.load(cfg)
        keep = suite.parse_keep(keep) if keep is not None else cfg.pruning.keep
        (_, _, _, self.spec, pred), = suite.predictors(
            cfg, loaded, [(None, method, keep)], loaded.processor,
            num_frames=int(frames) if frames else None)
        return pred

    # -- lmms-eval API ---------------------------------------------------------------------

    def _visual(self, request_args: Sequence[Any]) -> tuple[str, Any]:
        """("image", RGB PIL image) or ("video", its path) of one request."""
        _, _, doc_to_visual, doc_id, task, split = request_args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
        visuals = [v for v in (visuals or []) if v is not None]
        if len(visuals) == 1 and isinstance(visuals[0], Image.Image):
            return "image", visuals[0].convert("RGB")
        if len(visuals) == 1 and isinstance(visuals[0], (str, os.PathLike)):
            return "video", os.fspath(visuals[0])
        kinds = [type(v).__name__ for v in visuals]
        raise NotImplementedError(
            f"covipal_jax answers requests with exactly one image or one video path; task "
            f"{task!r} doc {doc_id} has {kinds or 'none'}")

    def _frames(self, path: str) -> Any:
        """u8[F, H, W, 3]: `predictor.num_frames` frames sampled over the whole video (as
        lmms-eval does; no MVBench bounds)."""
        if not callable(getattr(self.predictor, "predict_frames", None)):
            raise NotImplementedError(f"{type(self.predictor).__name__} cannot answer video "
                                      "requests (no predict_frames)")
        from covipal_jax.eval import video as video_eval  # noqa: PLC0415
        from covipal_jax.eval.benchmarks.base import VideoRef  # noqa: PLC0415

        return video_eval.load_input(VideoRef(path=path), self.predictor)  # the whole video

    def generate_until(self, requests) -> list[str]:
        """Greedy answers; `until` strings cut the text, `max_new_tokens` from the task.
        Requests are grouped by (kind, max_new_tokens, until) and answered batch_size at a
        time (images through `predict`, videos through `predict_frames`)."""
        args = [r.args for r in requests]
        visuals = [self._visual(a) for a in args]
        groups: dict[tuple, list[int]] = {}
        for i, a in enumerate(args):
            kw = dict(a[1] or {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            groups.setdefault((visuals[i][0], int(kw.get("max_new_tokens") or
                                                  self.max_new_tokens), tuple(until)),
                              []).append(i)
        texts: dict[int, str] = {}
        for (kind, max_new, until), idx in groups.items():
            answer = (getattr(self.predictor, "predict_frames", None) if kind == "video"
                      else self.predictor.predict)
            for s in range(0, len(idx), self.batch_size_per_gpu):
                chunk = idx[s:s + self.batch_size_per_gpu]
                batch = [(self._frames(visuals[i][1]) if kind == "video" else visuals[i][1],
                          str(args[i][0])) for i in chunk]  # videos decoded per batch
                for i, text in zip(chunk, answer(batch, max_new)):
                    for stop in until:
                        if stop and stop in text:
                            text = text.split(stop)[0]
                    texts[i] = text
        return [texts[i] for i in range(len(args))]

    def loglikelihood(self, requests):
        raise NotImplementedError("covipal_jax: loglikelihood requests are not supported; use "
                                  "the generate_until variant of the task")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("covipal_jax: multi-round generation is not supported")


def main(argv: Sequence[str] | None = None) -> None:
    """lmms-eval's command line with `covipal_jax` registered as a model."""
    from lmms_eval import models as lmms_models  # noqa: PLC0415
    from lmms_eval.__main__ import cli_evaluate  # noqa: PLC0415

    lmms_models.MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
