"""The one place where video benchmarks meet the model: `predict_video`.

Video benchmarks (Video-MME, MVBench, NExT-QA) yield `Example`s whose `image` is a
`VideoRef` (a file path, or a frame folder) and whose `meta` may hold a `start` / `end` bound
in seconds (MVBench). The harness never decodes videos itself: it calls `predict_video` with
`(VideoRef, prompt, meta)` triples and stores the answers like image answers.

Today `predict_video` delegates to the predictor's own `predict_video(batch, max_new_tokens)`
(test predictors have one). What remains (issue 12): `covipal_jax/data/video.py` (frame
decoding with PyAV, uniform sampling of N frames, the OneVision video layout) and an
`inference` entry that takes frames; then this function decodes with the first and calls the
second, and nothing else in `covipal_jax/eval` changes.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from covipal_jax.eval.benchmarks.base import VideoRef


def supports_video(predictor: Any) -> bool:
    return callable(getattr(predictor, "predict_video", None))


def predict_video(predictor: Any, batch: Sequence[tuple[VideoRef, str, dict[str, Any]]],
                  max_new_tokens: int) -> list[str]:
    """Answers for `(video, prompt, meta)` triples, one string each, in order."""
    if not supports_video(predictor):
        raise NotImplementedError(
            f"{type(predictor).__name__} cannot answer video questions: video decoding and "
            "prediction land with issue 12 (covipal_jax/data/video.py); wire them in "
            "covipal_jax/eval/video.py:predict_video")
    return list(predictor.predict_video(list(batch), max_new_tokens))
