"""The one place where video benchmarks meet the model: `load_input` and `predict_video`.

Video benchmarks (Video-MME, MVBench, NExT-QA) yield `Example`s whose `image` is a `VideoRef`
(a video file or a frame folder, local or `gs://`) and whose `meta` may hold a `start` / `end`
bound in seconds (MVBench). Two predictor interfaces are accepted:

* `predict_frames(batch, max_new_tokens)` with `(u8[F, H, W, 3] frames, prompt)` pairs
  (`LlavaPredictor`): the harness decodes each video here, `F = predictor.num_frames`
  (default 32, LLaVA-OneVision's) sampled uniformly (`predictor.frame_sampling`, default "hf",
  transformers' sampler) with `covipal_jax.data.video.load` (PyAV, or the frame folder), per
  example, so an unreadable video becomes an error record (retried on the next run) like an
  unreadable image. A bounded example (MVBench's `start`/`end`) samples its F frames inside
  the bound as the official MVBench evaluation does (`bounded_indices`); lmms-eval ignores the
  bounds (whole video), so `predictor.use_bounds = False` gives its protocol;
* `predict_video(batch, max_new_tokens)` with `(VideoRef, prompt, meta)` triples: the
  predictor decodes itself.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from covipal_jax.eval.benchmarks.base import VideoRef

DEFAULT_NUM_FRAMES = 32
FRAME_FOLDER_FPS = 3.0  # MVBench's frame folders (tvqa frames_fps3_hq), first frame index 1


def supports_video(predictor: Any) -> bool:
    return any(callable(getattr(predictor, name, None))
               for name in ("predict_frames", "predict_video"))


def bounded_indices(start: float, end: float, fps: float, total: int, num_frames: int,
                    first: int = 0) -> np.ndarray:
    """i64[num_frames]: the official MVBench `get_index` (segment centres of [start, end]
    seconds at `fps`, clipped to the `total` frames)."""
    lo = max(first, round(start * fps))
    hi = min(round(end * fps), total - 1)
    if hi < lo:
        raise ValueError(f"bound [{start}, {end}] s holds no frame of a {total}-frame video "
                         f"at {fps:.3g} fps")
    seg = float(hi - lo) / num_frames
    idx = np.array([int(lo + seg / 2 + np.round(seg * i)) for i in range(num_frames)])
    return np.clip(idx, 0, total - 1).astype(np.int64)


def load_clip(path: str, num_frames: int, start: float, end: float) -> np.ndarray:
    """u8[num_frames, H, W, 3] sampled inside [start, end] seconds of a video file (PyAV,
    its average frame rate) or of a frame folder (`FRAME_FOLDER_FPS`)."""
    from covipal_jax.data import video as video_data  # noqa: PLC0415  (PyAV, lazily)

    if paths_is_dir(path):
        from etils import epath  # noqa: PLC0415

        files = sorted((f for f in epath.Path(path).iterdir()
                        if f.suffix.lower() in video_data.IMAGE_SUFFIXES),
                       key=lambda f: video_data._natural_key(f.name))  # noqa: SLF001
        if not files:
            raise video_data.VideoError(f"frame folder {path!r} holds no images")
        # official: frames numbered from 1 (`{i:05d}.jpg`), max_frame = the file count
        idx = bounded_indices(start, end, FRAME_FOLDER_FPS, len(files) + 1, num_frames,
                              first=1) - 1
        try:
            return _read_files([files[i] for i in idx.tolist()])
        except (OSError, ValueError) as e:
            raise video_data.VideoError(f"cannot read frames of {path!r}: {e}") from e
    import av  # noqa: PLC0415

    container, fh = video_data._open(path)  # noqa: SLF001  (local or gs://, clear errors)
    try:
        if not container.streams.video:
            raise video_data.VideoError(f"{path!r} has no video stream")
        stream = container.streams.video[0]
        fps = float(stream.average_rate or 0) or 30.0
        every = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    except (av.FFmpegError, OSError) as e:
        raise video_data.VideoError(f"cannot decode video {path!r}: {e}") from e
    finally:
        container.close()
        if fh is not None:
            fh.close()
    if not every:
        raise video_data.VideoError(f"{path!r}: no frames")
    idx = bounded_indices(start, end, fps, len(every), num_frames)
    return np.stack([every[i] for i in idx.tolist()])


def _read_files(files: Sequence[Any]) -> np.ndarray:
    import PIL.Image  # noqa: PLC0415

    from covipal_jax.data import image as im  # noqa: PLC0415

    out = []
    for f in files:
        with f.open("rb") as fh, PIL.Image.open(fh) as img:
            img.load()
            out.append(np.asarray(im.to_rgb(img)))
    return np.stack(out)


def paths_is_dir(path: str) -> bool:
    from etils import epath  # noqa: PLC0415

    return epath.Path(path).is_dir()


def load_input(ref: VideoRef, predictor: Any, meta: Mapping[str, Any] | None = None) -> Any:
    """What the predictor takes for one video: decoded frames u8[F, H, W, 3] when it has
    `predict_frames`, else the `VideoRef` itself. A `start`/`end` bound in `meta` samples
    inside it unless `predictor.use_bounds` is False."""
    if not callable(getattr(predictor, "predict_frames", None)):
        return ref
    from covipal_jax.data import video as video_data  # noqa: PLC0415  (PyAV, lazily)

    n = int(getattr(predictor, "num_frames", DEFAULT_NUM_FRAMES))
    meta = meta or {}
    if getattr(predictor, "use_bounds", True) and meta.get("start") is not None \
            and meta.get("end") is not None:
        return load_clip(ref.path, n, float(meta["start"]), float(meta["end"]))
    return video_data.load(ref.path, n, sampling=getattr(predictor, "frame_sampling", "hf"))


def predict_video(predictor: Any, batch: Sequence[tuple[Any, str, dict[str, Any]]],
                  max_new_tokens: int) -> list[str]:
    """Answers for `(frames | VideoRef, prompt, meta)` triples, one string each, in order."""
    if callable(getattr(predictor, "predict_frames", None)):
        return list(predictor.predict_frames([(v, p) for v, p, _ in batch], max_new_tokens))
    if callable(getattr(predictor, "predict_video", None)):
        return list(predictor.predict_video(list(batch), max_new_tokens))
    raise NotImplementedError(
        f"{type(predictor).__name__} cannot answer video questions (no predict_frames or "
        "predict_video): use a LlavaPredictor on a video model (LLaVA-OneVision), see "
        "covipal_jax/eval/video.py")
