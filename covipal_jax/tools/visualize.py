r"""Show which image patches a pruning method kept: pruned patches greyed out.

    python -m covipal_jax.tools.visualize --config configs/llava15_7b.py \
        --config.checkpoint=/ckpt/llava-1.5-7b-hf --image cat.jpg --prompt "What is this?" \
        --config.pruning.method=visionzip --config.pruning.keep=0.25 --out kept.png
    # several methods side by side (same keep), each panel titled with its answer:
    python -m covipal_jax.tools.visualize --config configs/tiny.py --methods visionzip,fastv,pool \
        --config.pruning.keep=0.25 --out grid.png

The picture is what the vision tower saw (the processor's resize / crop / pad, without the
normalization), cut into the ViT's (h, w) patch grid. `kept` holds source patch indices in
[0, n_v) (row-major, `PrefillOutput.kept`), for every method:
- selection methods (PPM, FastV, DART, random, pool): the kept patches are shown, the rest
  greyed;
- VisionZip: tokens are [CLS, dominant..., contextual...] in its official order. With a CLIP
  tower the first index is the CLS token (index 0 by convention, which would otherwise alias
  patch 0): it is dropped from the grid and reported in the title. The dominant patches are
  shown as kept; each contextual token is a merge of several patches placed at its target
  patch, drawn kept with a coloured outline.
- a CLIP tower with `select_strategy="full"` (n_v = h * w + 1): index 0 is the CLS token and
  patch p has index p + 1.

Library: `render_kept(image, kept, grid, ...) -> PIL.Image`, `render_grid(panels)`,
`markers(spec, kept_row, cfg)` (which indices are CLS / dominant / contextual).
"""
from __future__ import annotations

from covipal_jax import configs as configs_lib
import dataclasses
import math
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from covipal_jax.data import image as image_lib

CONTEXTUAL_COLOR = (255, 170, 0)


# ----------------------------------------------------------------------------- library

def tower_view(image: Any, processor: image_lib.ImageProcessorConfig | None) -> np.ndarray:
    """uint8[H, W, 3]: the image after the processor's geometry (pad / resize / crop), i.e. the
    pixels the ViT patches cover, without rescaling or normalization. No processor: as is."""
    if processor is None:
        return np.asarray(image_lib.to_rgb(image), np.uint8)
    geo = dataclasses.replace(processor, do_rescale=False, do_normalize=False)
    x = image_lib.preprocess_one(image, geo)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def patch_bounds(size: int, n: int) -> np.ndarray:
    """Pixel boundaries of n patches over `size` pixels: i32[n + 1]."""
    return np.round(np.linspace(0, size, n + 1)).astype(np.int64)


def kept_grid(kept: Sequence[int], grid: tuple[int, int]) -> np.ndarray:
    """bool[h, w]: True where a patch index of `kept` lies (indices outside [0, h*w) raise)."""
    h, w = grid
    kept = np.asarray(kept, np.int64).reshape(-1)
    if kept.size and (kept.min() < 0 or kept.max() >= h * w):
        raise ValueError(f"kept indices must be in [0, {h * w}) for grid {grid}, got "
                         f"[{kept.min()}, {kept.max()}]")
    mask = np.zeros(h * w, bool)
    mask[kept] = True
    return mask.reshape(h, w)


def grey_out(pixels: np.ndarray, fade: float = 0.6, level: int = 170) -> np.ndarray:
    """Greyscale (luma), washed towards `level`: every output pixel has R == G == B."""
    luma = pixels[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    g = np.round((1 - fade) * luma + fade * level).clip(0, 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=-1)


def render_kept(image: Any, kept: Sequence[int], grid: tuple[int, int], *,
                processor: image_lib.ImageProcessorConfig | None = None,
                contextual: Sequence[int] = (), scale: int | None = None,
                min_side: int = 336, fade: float = 0.6, title: str | None = None
                ) -> Image.Image:
    """The tower's view of `image` with the patches NOT in `kept` greyed out.

    kept: patch indices in [0, h*w) (row-major) the LLM saw; contextual: those of `kept` that
    are merged tokens (outlined in `CONTEXTUAL_COLOR`). scale: integer nearest-neighbour
    upscaling (default: the smallest with a side >= `min_side`). title: a caption band on top.
    Kept pixels are the tower view unchanged (before scaling); pruned ones have R == G == B.
    """
    view = tower_view(image, processor)
    height, width = view.shape[:2]
    h, w = grid
    keep = kept_grid(kept, grid)
    ys, xs = patch_bounds(height, h), patch_bounds(width, w)
    # Per-pixel patch membership: row i of the grid covers ys[i]:ys[i+1].
    row_of = np.searchsorted(ys, np.arange(height), side="right") - 1
    col_of = np.searchsorted(xs, np.arange(width), side="right") - 1
    keep_px = keep[row_of][:, col_of]
    out = np.where(keep_px[..., None], view, grey_out(view, fade))
    if scale is None:
        scale = max(1, math.ceil(min_side / max(1, min(height, width))))
    img = Image.fromarray(out).resize((width * scale, height * scale), Image.Resampling.NEAREST)
    if len(contextual):
        draw = ImageDraw.Draw(img)
        lw = max(1, scale // 2)
        for p in np.asarray(contextual, np.int64).reshape(-1):
            i, j = divmod(int(p), w)
            draw.rectangle([xs[j] * scale, ys[i] * scale, xs[j + 1] * scale - 1,
                            ys[i + 1] * scale - 1], outline=CONTEXTUAL_COLOR, width=lw)
    return _caption(img, title) if title else img


def _caption(img: Image.Image, text: str, pad: int = 4) -> Image.Image:
    font = ImageFont.load_default()
    lines = _wrap(text, font, img.width - 2 * pad)
    line_h = _text_size(font, "Ag")[1] + 2
    band = pad * 2 + line_h * len(lines)
    canvas = Image.new("RGB", (img.width, img.height + band), (255, 255, 255))
    canvas.paste(img, (0, band))
    draw = ImageDraw.Draw(canvas)
    for n, line in enumerate(lines):
        draw.text((pad, pad + n * line_h), line, fill=(0, 0, 0), font=font)
    return canvas


def _text_size(font, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return right - left, bottom - top


def _wrap(text: str, font, width: int) -> list[str]:
    lines: list[str] = []
    for para in text.split("\n"):
        line = ""
        for word in para.split(" "):
            cand = f"{line} {word}".strip()
            if line and _text_size(font, cand)[0] > width:
                lines.append(line)
                line = word
            else:
                line = cand
        lines.append(line)
    return lines


def render_grid(panels: Sequence[Image.Image], cols: int | None = None, gap: int = 8
                ) -> Image.Image:
    """Panels side by side (`cols` per row, default all in one row), top-aligned."""
    if not panels:
        raise ValueError("no panels")
    cols = cols or len(panels)
    rows = math.ceil(len(panels) / cols)
    cw = max(p.width for p in panels)
    rh = [max(p.height for p in panels[r * cols:(r + 1) * cols]) for r in range(rows)]
    canvas = Image.new("RGB", (cols * cw + (cols - 1) * gap, sum(rh) + (rows - 1) * gap),
                       (255, 255, 255))
    y = 0
    for r in range(rows):
        for c, p in enumerate(panels[r * cols:(r + 1) * cols]):
            canvas.paste(p, (c * (cw + gap), y))
        y += rh[r] + gap
    return canvas


@dataclasses.dataclass
class Markers:
    """What one row of `kept` means on the patch grid."""

    patches: list[int]      # every kept patch position (dominant / selected + contextual)
    contextual: list[int]   # positions of merged (contextual) tokens
    cls: bool               # the CLS token is one of the LLM's vision tokens


def markers(spec: Any, kept_row: Sequence[int], cfg: Any) -> Markers:
    """Split a row of `PrefillOutput.kept` into grid patches / contextual targets / CLS.

    spec: the `PruningMethod` value (its `kept_layout`); cfg: the `LlavaConfig` (its vision
    grid, CLS, n_v).
    """
    h, w = cfg.vision.grid
    n_v = cfg.num_vision_tokens
    offset = n_v - h * w  # 1: CLS kept as token 0 (CLIP, select_strategy="full")
    idx = [int(i) for i in np.asarray(kept_row).reshape(-1)]
    cls, n_plain = spec.kept_layout(len(idx), bool(cfg.vision.has_cls))
    if cls:  # CLS first (index 0, aliasing patch 0)
        idx = idx[1:]
    contextual = idx[n_plain:]
    if offset:
        cls = cls or 0 in idx
        idx = [i - offset for i in idx if i >= offset]
        contextual = [i - offset for i in contextual if i >= offset]
    return Markers(sorted(set(idx)), sorted(set(contextual)), cls)


# ----------------------------------------------------------------------------- CLI

def panel(pred: Any, image: Any, prompt: str, max_new_tokens: int,
          title: str | None = None) -> tuple[Image.Image, dict[str, Any]]:
    """Answer with an `LlavaPredictor` and render its kept patches: (panel, info row)."""
    cfg = pred.loaded.cfg
    n_v = cfg.num_vision_tokens
    res = pred.generate([(image, prompt)], max_new_tokens)
    m = markers(pred.spec, res.kept[0], cfg)
    method = pred.spec.name
    if title is None:
        title = (f"{method}: {len(res.kept[0])}/{n_v} tokens{' + CLS' if m.cls else ''}"
                 + (f" ({len(m.contextual)} merged, outlined)" if m.contextual else "")
                 + f"\nA: {res.texts[0]}")
    img = render_kept(image, m.patches, cfg.vision.grid, processor=pred.processor,
                      contextual=m.contextual, title=title)
    row = dict(method=method, k=res.num_vision_tokens, n_v=n_v, answer=res.texts[0],
               kept=[int(i) for i in res.kept[0]], patches=m.patches,
               contextual=m.contextual, cls=m.cls, seconds=res.seconds)
    return img, row


def run(config: Any, image: Any, prompt: str | None, methods: Sequence[str] | None = None,
        out: str | None = None, cols: int | None = None, loaded: Any = None) -> dict[str, Any]:
    """Prune (and answer) with each method at `config.pruning.keep`; render the panels.

    image: a path, a PIL image / uint8 array, or None (a generated image; tiny model).
    Returns {"image": PIL grid, "panels": [...], "rows": [{method, k, answer, kept, ...}],
    "prompt"} and saves the grid to `out` when given.
    """
    from covipal_jax.inference import loading
    from covipal_jax.data.synthetic import task as synthetic
    from covipal_jax.eval.predictor import LlavaPredictor, method_for

    if image is None and config.checkpoint:
        raise ValueError("--image is required with a real checkpoint")
    loaded = loaded or loading.load(config)
    if image is None:
        ex = synthetic.make_example("test", 0, seed=config.sampling.seed)
        image, prompt = ex["image"], prompt or ex["question"]
    elif isinstance(image, str):
        image = image_lib.load_image(image)
    if not prompt:
        raise ValueError("--prompt is required")
    image = image_lib.to_rgb(image)
    methods = list(methods or [config.pruning.method])
    shards = loaded.mesh.shape["data"] * loaded.mesh.shape["fsdp"]
    base, rows, panels = None, [], []
    for method in methods:
        spec = method_for(config, method, config.pruning.keep)
        pred = LlavaPredictor.from_config(config, loaded, spec, batch_size=shards) \
            if base is None else base.with_method(spec)
        base = base or pred
        img, row = panel(pred, image, prompt, config.max_new_tokens)
        panels.append(img)
        rows.append(row)
    grid_img = render_grid(panels, cols)
    if out:
        grid_img.save(out)
    return dict(image=grid_img, panels=panels, rows=rows, prompt=prompt)


def main(argv):
    del argv
    try:
        r = run(_CONFIG.value, _IMAGE.value, _PROMPT.value, _METHODS.value or None, _OUT.value,
                _COLS.value)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"prompt: {r['prompt']}")
    for row in r["rows"]:
        print(f"{row['method']:>10s}: kept {row['k']}/{row['n_v']} tokens "
              f"({len(row['patches'])} patches, {len(row['contextual'])} merged"
              f"{', CLS' if row['cls'] else ''}); answer: {row['answer']}")
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    # Flags only when run as a program: importing this module (notebooks, tests, other entry
    # points) must not register a second --config flag.
    from absl import app, flags
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file("config", configs_lib.path("tiny"), "Config file.",
                                              lock_config=True)
    _IMAGE = flags.DEFINE_string("image", None, "Image path (default: a generated image).")
    _PROMPT = flags.DEFINE_string("prompt", None, "The question (plain; the template is added).")
    _METHODS = flags.DEFINE_list("methods", [], "Several methods side by side (default: "
                                 "config.pruning.method), all at config.pruning.keep.")
    _OUT = flags.DEFINE_string("out", "kept.png", "Output PNG.")
    _COLS = flags.DEFINE_integer("cols", None, "Panels per row (default: all in one row).")
    from covipal_jax import cli

    cli.run(main)
