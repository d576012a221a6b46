"""Readers' shared helpers: tables (TSV, CSV, JSON, JSONL, parquet), image cells, prompts.

Every path goes through `covipal_jax.paths.as_path` (local or `gs://`). `.parquet` files
(lmms-eval / Hugging Face exports) are read with pyarrow, imported only then.
"""
from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from covipal_jax import paths
from covipal_jax.eval.benchmarks.base import (LETTERS, MC_SUFFIX, SHORT_ANSWER_SUFFIX, ImageRef,
                                              Malformed, ReadReport)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG", ".webp", ".bmp", ".gif")


# --------------------------------------------------------------------------------------------
# Paths.
# --------------------------------------------------------------------------------------------
def join(*parts: str) -> str:
    """`os.path.join` that keeps a `gs://` prefix intact."""
    return os.fspath(paths.as_path(parts[0]).joinpath(*parts[1:])) if parts[0] else \
        os.path.join(*parts[1:])


def dirname(path: str) -> str:
    return os.fspath(paths.as_path(path).parent)


def is_file(path: str) -> bool:
    return paths.as_path(path).is_file()


def is_dir(path: str) -> bool:
    return paths.as_path(path).is_dir()


def listdir(path: str) -> list[str]:
    return sorted(p.name for p in paths.as_path(path).iterdir())


def is_table(path: str) -> bool:
    """A table file, or a folder of parquet shards (how lmms-eval's datasets are stored)."""
    return is_file(path) or (is_dir(path) and any(n.endswith(".parquet")
                                                  for n in listdir(path)))


def read_text(path: str) -> str:
    return paths.as_path(path).read_text(encoding="utf-8")


def read_json(path: str) -> Any:
    return json.loads(read_text(path))


# --------------------------------------------------------------------------------------------
# Prompts and answers.
# --------------------------------------------------------------------------------------------
def short_answer_prompt(question: str) -> str:
    return f"{question.strip()}\n{SHORT_ANSWER_SUFFIX}"


def mc_prompt(question: str, options: Sequence[str], hint: str | None = None,
              hint_prefix: str = "") -> str:
    """LLaVA-style multiple-choice prompt: [hint\\n]question\\nA. opt\\n...\\nMC_SUFFIX."""
    lines = []
    if hint:
        lines.append(f"{hint_prefix}{hint.strip()}")
    lines.append(question.strip())
    lines.extend(f"{LETTERS[i]}. {str(o).strip()}" for i, o in enumerate(options))
    lines.append(MC_SUFFIX)
    return "\n".join(lines)


def is_missing(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, float) and v != v:  # NaN from pandas exports
        return True
    return isinstance(v, str) and v.strip().lower() in ("", "nan", "none")


def as_list(v: Any) -> list[Any] | None:
    """A list from a list/tuple, a numpy array (parquet) or a JSON string; else None."""
    if hasattr(v, "tolist"):
        v = v.tolist()
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except json.JSONDecodeError:
            return None
    return list(v) if isinstance(v, (list, tuple)) else None


def indexed(rows: list[Any]) -> list[Any]:
    """Rows with their position as `_row` (a qid fallback for tables without an id column)."""
    return [dict(r, _row=i) if isinstance(r, dict) else r for i, r in enumerate(rows)]


def table_options(row: dict[str, Any]) -> tuple[str, ...]:
    """Options from `A`, `B`, ... columns, stopping at the first missing one."""
    opts = []
    for letter in LETTERS:
        if letter not in row or is_missing(row[letter]):
            break
        opts.append(str(row[letter]).strip())
    return tuple(opts)


def letter_answer(value: Any, options: Sequence[str]) -> str:
    """Normalises an answer given as a letter, an int/str index, or the option text."""
    if isinstance(value, bool) or is_missing(value):
        raise Malformed(f"missing answer ({value!r})")
    n = len(options)
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        idx = int(value)
        if not 0 <= idx < n:
            raise Malformed(f"answer index {idx} out of range for {n} options")
        return LETTERS[idx]
    s = str(value).strip()
    m = re.fullmatch(r"\(?([A-Za-z])[\.\)]?", s)
    if m and (n == 0 or LETTERS.index(m.group(1).upper()) < n):
        return m.group(1).upper()
    for i, o in enumerate(options):
        if s.lower() == str(o).strip().lower():
            return LETTERS[i]
    raise Malformed(f"answer {s!r} matches no option of {n}")


def optional_letter(row: dict[str, Any], options: Sequence[str], key: str = "answer"
                    ) -> str | None:
    return None if is_missing(row.get(key)) else letter_answer(row[key], options)


# --------------------------------------------------------------------------------------------
# Images.
# --------------------------------------------------------------------------------------------
def find_image(directory: str | None, name: str) -> str | None:
    """`directory/name`, or `directory/name.<ext>` when `name` has no extension."""
    candidates = [name] if os.path.splitext(name)[1] else [name + e for e in IMAGE_EXTS]
    for c in candidates:
        p = join(directory, c) if directory else c
        if is_file(p):
            return p
    return None


def path_image(directory: str | None, name: str, check: bool) -> ImageRef:
    if check:
        p = find_image(directory, name)
        if p is None:
            raise Malformed(f"image not found: {join(directory or '', name)}")
        return ImageRef(path=p)
    return ImageRef(path=join(directory, name) if directory else name)


def _b64_like(s: str) -> bool:
    return len(s) > 64 and re.fullmatch(r"[A-Za-z0-9+/=\s]+", s[:256]) is not None


def coerce_image(value: Any, base_dir: str | None, check: bool) -> ImageRef:
    """Image cell -> ImageRef: bytes, HF dict, base64 string, or a path (rel. to base_dir)."""
    if isinstance(value, (bytes, bytearray)):
        return ImageRef(data=bytes(value))
    if isinstance(value, dict):
        if value.get("bytes"):
            return ImageRef(data=bytes(value["bytes"]))
        if value.get("path"):
            return path_image(base_dir, str(value["path"]), check)
        raise Malformed("image dict without bytes/path")
    if isinstance(value, str) and not is_missing(value):
        s = value.strip()
        if _b64_like(s) and find_image(base_dir, s[:200]) is None:
            try:
                base64.b64decode(s[:4 * 64], validate=False)
            except (binascii.Error, ValueError) as e:
                raise Malformed(f"bad base64 image: {e}") from e
            return ImageRef(b64=s)
        return path_image(base_dir, s, check)
    raise Malformed(f"no image in record (got {type(value).__name__})")


def tsv_image_index(rows: list[dict]) -> dict[str, Any]:
    """index -> image cell, for TSVs that store an image once and refer to it by index."""
    return {str(r.get("index")): r.get("image") for r in rows
            if isinstance(r.get("image"), str) and len(r["image"]) > 64}


def tsv_image(row: dict, by_index: dict[str, Any], base: str, check: bool) -> ImageRef:
    img = row.get("image")
    if isinstance(img, str) and len(img.strip()) <= 64 and img.strip() in by_index:
        img = by_index[img.strip()]
    if is_missing(img) and not is_missing(row.get("image_path")):
        img = row["image_path"]
    return coerce_image(img, base, check)


# --------------------------------------------------------------------------------------------
# Tables.
# --------------------------------------------------------------------------------------------
def read_jsonl(path: str, report: ReadReport, text: str | None = None) -> list[dict]:
    rows = []
    name = os.path.basename(path)
    text = read_text(path) if text is None else text
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            report.bad(f"{name}:{lineno}", f"bad JSON ({e.msg})")
            continue
        if not isinstance(rec, dict):
            report.bad(f"{name}:{lineno}", "line is not an object")
            continue
        rows.append(rec)
    return rows


def read_json_or_jsonl(path: str, report: ReadReport) -> Any:
    """A JSON document, or a list of records when the file is JSON lines."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return read_jsonl(path, report, text)


def read_parquet(path: str) -> list[dict[str, Any]]:
    """Rows of a parquet file (lmms-eval / HF datasets exports) as dicts: list cells are
    lists, HF image cells `{"bytes", "path"}` dicts. Needs pyarrow (imported only here)."""
    try:
        import pyarrow.parquet as pq  # noqa: PLC0415  (optional dependency)
    except ImportError as e:
        raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow); or export it "
                          "to TSV / JSONL") from e
    with paths.as_path(path).open("rb") as f:
        return pq.read_table(f).to_pylist()


def read_table(path: str, report: ReadReport | None = None) -> list[dict[str, Any]]:
    """Rows of a `.tsv`/`.csv`/`.jsonl`/`.json`/`.parquet` table (or a folder of parquet
    shards, as lmms-eval's datasets are stored) as dicts."""
    report = report or ReadReport("table", path)
    if is_dir(path):
        shards = [join(path, n) for n in listdir(path) if n.endswith(".parquet")]
        if not shards:
            raise ValueError(f"{path}: a folder without .parquet files is not a table")
        return [row for s in shards for row in read_parquet(s)]
    ext = os.path.splitext(path)[1].lower()
    if ext in (".tsv", ".csv"):
        csv.field_size_limit(sys.maxsize)  # base64 images are multi-megabyte cells
        reader = csv.DictReader(io.StringIO(read_text(path), newline=""),
                                delimiter="\t" if ext == ".tsv" else ",")
        rows = []
        for i, row in enumerate(reader, 2):
            if None in row:  # more cells than header columns
                report.bad(f"{os.path.basename(path)}:{i}", "extra cells in row")
                continue
            rows.append(dict(row))
        return rows
    if ext == ".jsonl":
        return read_jsonl(path, report)
    if ext == ".json":
        data = read_json_or_jsonl(path, report)
        if isinstance(data, dict):
            for key in ("data", "questions", "rows"):
                if isinstance(data.get(key), list):
                    return data[key]
            return [dict(v, _key=k) if isinstance(v, dict) else {"_key": k, "value": v}
                    for k, v in data.items()]
        return list(data)
    if ext == ".parquet":
        return read_parquet(path)
    raise ValueError(f"unsupported table format: {path}")
