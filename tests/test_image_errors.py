"""Image files that cannot be used give one clear line naming the file (data.image.load_image)."""
from __future__ import annotations

import os
import subprocess
import sys

import PIL.Image
import pytest

from covipal_jax.data import image as image_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("side", [40, 100])   # > limit: PIL warns; > 2 x limit: PIL raises
def test_decompression_bomb(tmp_path, monkeypatch, side):
    p = tmp_path / f"big{side}.png"
    PIL.Image.new("RGB", (side, side)).save(p)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError) as e:
        image_lib.load_image(p)
    msg = str(e.value)
    assert f"big{side}.png" in msg and "too large to decode safely" in msg and "\n" not in msg


def test_permission_and_missing(tmp_path, monkeypatch):
    p = tmp_path / "secret.png"
    PIL.Image.new("RGB", (4, 4)).save(p)

    def denied(path, *a, **k):
        raise PermissionError(13, "Permission denied", os.fspath(path))

    with monkeypatch.context() as m:   # (root reads a chmod 000 file: simulate the error)
        m.setattr(PIL.Image, "open", denied)
        with pytest.raises(ValueError, match=r"secret.png.*permission denied"):
            image_lib.load_image(p)
    with pytest.raises(ValueError, match=r"nope.png'?: no such file"):
        image_lib.load_image(tmp_path / "nope.png")
    with pytest.raises(ValueError, match="is a directory"):
        image_lib.load_image(tmp_path)


def test_generate_cli_reports_a_20000px_bomb(tmp_path):
    """A real 20000x20000 PNG (1-bit, 50 MB in memory, 50 KB on disk) through the CLI."""
    bomb = tmp_path / "bomb.png"
    PIL.Image.new("1", (20000, 20000)).save(bomb)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "covipal_jax.generate", "--image", str(bomb),
                        "--prompt", "what is it?", "--compilation_cache="], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: image ") and "bomb.png" in lines[0]
    assert "too large to decode safely" in lines[0]
