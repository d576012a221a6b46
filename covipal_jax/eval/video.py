"""The one place where video benchmarks meet the model: `load_input` and `predict_video`.

Video benchmarks (Video-MME, MVBench, NExT-QA) yield `Example`s whose `image` is a `VideoRef`
(a video file or a frame folder, local or `gs://`) and whose `meta` may hold a `start` / `end`
bound in seconds (MVBench). Two predictor interfaces are accepted:

* `predict_frames(batch, max_new_tokens)` with `(u8[F, H, W, 3] frames, prompt)` pairs: the
  harness decodes each video with `covipal_jax.data.video.load` (PyAV, or the frame folder),
  `F = predictor.num_frames` (default 32, LLaVA-OneVision's) sampled uniformly
  (`predictor.frame_sampling`, default "hf", transformers' sampler), per example, so an
  unreadable video becomes an error record (retried on the next run) like an unreadable image;
* `predict_video(batch, max_new_tokens)` with `(VideoRef, prompt, meta)` triples: the
  predictor decodes itself.

What remains (issue 12): the eval predictor (`LlavaPredictor`) has neither yet, because the
inference facade has no video entry (the model has `Llava.forward_video`; prefill / decoding
do not take frames). Once it has one, a `LlavaPredictor.predict_frames` that preprocesses with
`data.video.preprocess_videos` and generates is all that is missing. MVBench's `start`/`end`
bounds are passed in `meta` but `data.video.load` samples the whole video.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from covipal_jax.eval.benchmarks.base import VideoRef

DEFAULT_NUM_FRAMES = 32


def supports_video(predictor: Any) -> bool:
    return any(callable(getattr(predictor, name, None))
               for name in ("predict_frames", "predict_video"))


def load_input(ref: VideoRef, predictor: Any) -> Any:
    """What the predictor takes for one video: decoded frames u8[F, H, W, 3] when it has
    `predict_frames`, else the `VideoRef` itself."""
    if not callable(getattr(predictor, "predict_frames", None)):
        return ref
    from covipal_jax.data import video as video_data  # noqa: PLC0415  (PyAV, lazily)

    return video_data.load(ref.path, int(getattr(predictor, "num_frames", DEFAULT_NUM_FRAMES)),
                           sampling=getattr(predictor, "frame_sampling", "hf"))


def predict_video(predictor: Any, batch: Sequence[tuple[Any, str, dict[str, Any]]],
                  max_new_tokens: int) -> list[str]:
    """Answers for `(frames | VideoRef, prompt, meta)` triples, one string each, in order."""
    if callable(getattr(predictor, "predict_frames", None)):
        return list(predictor.predict_frames([(v, p) for v, p, _ in batch], max_new_tokens))
    if callable(getattr(predictor, "predict_video", None)):
        return list(predictor.predict_video(list(batch), max_new_tokens))
    raise NotImplementedError(
        f"{type(predictor).__name__} cannot answer video questions (no predict_frames or "
        "predict_video): video prediction lands with issue 12; see covipal_jax/eval/video.py")
