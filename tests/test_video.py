"""covipal_jax.data.video: PyAV decoding of a video the test writes, frame folders, sampling,
clear errors for malformed input."""
from __future__ import annotations

import numpy as np
import PIL.Image
import pytest

from covipal_jax.data import anyres, video

av = pytest.importorskip("av")

H, W, TOTAL = 48, 64, 20


def _frame(i: int) -> np.ndarray:
    """A frame whose brightness encodes its index (survives lossy coding)."""
    x = np.full((H, W, 3), 10 + 12 * i, np.uint8)
    x[:, : W // 4] = 255 - 12 * i
    return x


def _write_video(path, n=TOTAL, codec="mpeg4"):
    with av.open(str(path), "w") as out:
        s = out.add_stream(codec, rate=10)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.bit_rate = 4_000_000
        for i in range(n):
            for pkt in s.encode(av.VideoFrame.from_ndarray(_frame(i), format="rgb24")):
                out.mux(pkt)
        for pkt in s.encode():
            out.mux(pkt)
    return path


def _index_of(frame: np.ndarray) -> int:
    return int(round((float(frame[:, W // 2:].mean()) - 10) / 12))


@pytest.mark.parametrize("sampling,suffix", [("hf", "mp4"), ("linspace", "mp4"),
                                             ("hf", "mkv")])  # mkv: no frame count in header
def test_load_video_samples_uniformly(tmp_path, sampling, suffix):
    path = _write_video(tmp_path / f"clip.{suffix}")
    frames = video.load_video(path, 4, sampling=sampling)
    assert frames.shape == (4, H, W, 3) and frames.dtype == np.uint8
    want = video.sample_indices(TOTAL, 4, sampling)
    assert [_index_of(f) for f in frames] == want.tolist()
    assert want.tolist() == ([0, 5, 10, 15] if sampling == "hf" else [0, 6, 12, 19])


def test_sampling_is_transformers_default():
    from transformers.video_utils import VideoMetadata, default_sample_indices_fn

    for total, n in [(20, 4), (33, 8), (7, 7), (100, 32)]:
        meta = VideoMetadata(total_num_frames=total, fps=10.0)
        ref = default_sample_indices_fn(meta, num_frames=n)
        np.testing.assert_array_equal(video.sample_indices(total, n), ref)


def test_frames_folder_natural_order(tmp_path):
    d = tmp_path / "frames"
    d.mkdir()
    for i in range(12):  # frame_2 must come before frame_10
        PIL.Image.fromarray(_frame(i)).save(d / f"frame_{i}.png")
    (d / "notes.txt").write_text("not a frame")
    frames = video.load(d, 4)
    assert [_index_of(f) for f in frames] == [0, 3, 6, 9]
    # The same frames through the OneVision per-frame pipeline: f32[F, S, S, 3].
    px = video.preprocess_videos([frames, frames], anyres.AnyResConfig.onevision(28).crop)
    assert px.shape == (2, 4, 28, 28, 3) and px.dtype == np.float32


def test_malformed_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(video.VideoError, match="no such video"):
        video.load_video(tmp_path / "missing.mp4", 4)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"this is not a video" * 50)
    with pytest.raises(video.VideoError, match="bad.mp4"):
        video.load_video(bad, 4)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(video.VideoError, match="empty.mp4"):
        video.load_video(empty, 4)
    short = _write_video(tmp_path / "short.mp4", n=3)
    with pytest.raises(video.VideoError, match="fewer than the 8"):
        video.load_video(short, 8)
    with pytest.raises(video.VideoError, match="is a folder"):
        video.load_video(tmp_path, 4)
    d = tmp_path / "mixed"
    d.mkdir()
    PIL.Image.fromarray(_frame(0)).save(d / "0.png")
    PIL.Image.fromarray(_frame(1)[:20]).save(d / "1.png")
    with pytest.raises(video.VideoError, match="differ in size"):
        video.load_frames(d, 2)
    with pytest.raises(video.VideoError, match="fewer than"):
        video.load_frames(d, 3)
    (d / "2.png").write_bytes(b"broken")
    with pytest.raises(video.VideoError, match="cannot read frame"):
        video.load_frames(d, 3)
    with pytest.raises(ValueError, match="sampling"):
        video.sample_indices(10, 2, "random")
    assert issubclass(video.VideoError, ValueError)
