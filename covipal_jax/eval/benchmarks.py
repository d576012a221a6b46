"""Readers for the image benchmarks in the formats users keep locally.

Every reader returns a `BenchmarkData`: a list of `Example`s plus a `ReadReport` that counts
what was read, what was filtered out on purpose (e.g. ScienceQA questions without an image,
SEED-Bench video questions) and what was malformed (missing keys, bad answers, missing image
files). Malformed records are counted and a few messages kept; they never abort a read.

Expected layouts (`path` is what `load_benchmark(name, path, ...)` takes; the table in
`covipal_jax/eval/README.md` has more detail):

* gqa: `testdev_balanced_questions.json` (`{qid: {imageId, question, answer, types}}`), or a
  JSON list / JSONL of `{question_id, image|imageId, question|text, answer}`;
  images `image_dir/<imageId>.jpg` (default `<dir>/images`).
* mme: the `MME_Benchmark_release_version/` folder, one subfolder per task, holding either
  per-image `<stem>.txt` (`question\tanswer` lines) next to `<stem>.png|jpg`, or `images/` +
  `questions_answers_YN/`; or `<task>/<task>.txt` with `image\tquestion\tanswer` lines (the
  eval_tool layout). Or a flat TSV with `category, question, answer, image|image_path`.
* pope: a folder of `*pope_{adversarial,popular,random}.json[l]` (JSON lines
  `{question_id, image, text, label}`), or one JSONL with a `category` (split) field;
  images `image_dir/<image>` (COCO val2014; default `<path>/images`).
* textvqa: `TextVQA_0.5.1_val.json` (`{"data": [{question_id, image_id, question,
  answers[10]}]}`); images `image_dir/<image_id>.jpg` (default `<dir>/train_images`);
  optional Rosetta OCR json for LLaVA-1.5's OCR-token prompt.
* scienceqa: a folder with `problems.json`, `pid_splits.json`; images
  `images/<split>/<pid>/image.png`. Only questions with an image (ScienceQA-IMG).
* mmbench: VLMEvalKit / OpenCompass TSV `index, question, hint, A..D, answer, category,
  l2-category, image` (base64).
* seed: `SEED-Bench.json` (`{"questions": [...], "question_type": {...}}`); images
  `image_dir/<data_id>` (default `<dir>/SEED-Bench-image`). Image questions only.
* ai2d: JSONL `{question_id?, image, question, options[], answer}` (image: path relative to
  the file's folder, or base64; answer: index, letter or option text), or a VLMEvalKit TSV
  like MMBench's (`AI2D_TEST.tsv`).
* mmstar: VLMEvalKit TSV `index, question` (options inline), `answer`, `category`,
  `l2_category`, `image` (base64); `A..D` columns are used when present.

Tables (`.tsv`, `.csv`, `.jsonl`, `.json`) are read with the standard library; `.parquet`
(lmms-eval / HF exports) needs `pandas` + `pyarrow`, imported lazily. HF image columns
(`{"bytes": ..., "path": ...}`) are accepted wherever an image is.

Prompts follow the LLaVA-1.5 evaluation prompts: short-answer benchmarks append
`SHORT_ANSWER_SUFFIX`, multiple-choice ones list `A. option` lines and append `MC_SUFFIX`.
"""
from __future__ import annotations

import base64
import binascii
import collections
import csv
import dataclasses
import io
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from PIL import Image

SHORT_ANSWER_SUFFIX = "Answer the question using a single word or phrase."
MC_SUFFIX = "Answer with the option's letter from the given choices directly."
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG", ".webp", ".bmp", ".gif")

MME_PERCEPTION = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
    "artwork", "OCR",
)
MME_COGNITION = (
    "commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning",
)
POPE_SPLITS = ("adversarial", "popular", "random")
MMBENCH_CIRCULAR_OFFSET = 1_000_000  # OpenCompass circular copies: index + k * 1e6.


# --------------------------------------------------------------------------------------------
# Data classes.
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ImageRef:
    """A lazily loaded image: a file path, raw encoded bytes, or a base64 string."""

    path: str | None = None
    data: bytes | None = None
    b64: str | None = None

    def load(self) -> Image.Image:
        """Decodes the image into an RGB `PIL.Image` (raises on unreadable data)."""
        if self.path is not None:
            with Image.open(self.path) as im:
                return im.convert("RGB")
        if self.data is not None:
            raw = self.data
        elif self.b64 is not None:
            raw = base64.b64decode(self.b64)
        else:
            raise ValueError("empty ImageRef")
        with Image.open(io.BytesIO(raw)) as im:
            return im.convert("RGB")

    def describe(self) -> str:
        if self.path is not None:
            return self.path
        n = len(self.data) if self.data is not None else len(self.b64 or "")
        return f"<inline image, {n} bytes>"


@dataclasses.dataclass
class Example:
    """One benchmark question.

    `answer` is the canonical reference: an option letter for multiple choice, "yes"/"no" for
    MME/POPE, the answer string for GQA, the most common human answer for TextVQA (whose full
    list of 10 is in `answers`). It is None where the split has no public labels.
    """

    qid: str
    image: ImageRef
    question: str
    prompt: str
    answer: str | None
    answers: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        """The JSON-serialisable part written next to a prediction."""
        return {
            "qid": self.qid,
            "question": self.question,
            "answer": self.answer,
            "answers": list(self.answers),
            "options": list(self.options),
            "meta": self.meta,
        }


@dataclasses.dataclass
class ReadReport:
    """Counts of a read. `errors` keeps the first `max_errors` malformed-record messages."""

    benchmark: str
    source: str
    read: int = 0
    malformed: int = 0
    filtered: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    errors: list[str] = dataclasses.field(default_factory=list)
    max_errors: int = 20

    def bad(self, where: Any, msg: str) -> None:
        self.malformed += 1
        if len(self.errors) < self.max_errors:
            self.errors.append(f"{where}: {msg}")

    def skip(self, reason: str) -> None:
        self.filtered[reason] += 1

    def summary(self) -> str:
        parts = [f"{self.benchmark}: {self.read} examples from {self.source}"]
        if self.filtered:
            parts.append("filtered " + ", ".join(f"{k}={v}" for k, v in self.filtered.items()))
        if self.malformed:
            parts.append(f"{self.malformed} malformed (first: {self.errors[:3]})")
        return "; ".join(parts)


@dataclasses.dataclass
class BenchmarkData:
    name: str
    examples: list[Example]
    report: ReadReport

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)


class _Malformed(ValueError):
    """Raised inside a per-record conversion; counted by the reader loop."""


# --------------------------------------------------------------------------------------------
# Shared helpers.
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


def _is_missing(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, float) and v != v:  # NaN from pandas exports
        return True
    return isinstance(v, str) and v.strip().lower() in ("", "nan", "none")


def _find_image(directory: str | None, name: str) -> str | None:
    """`directory/name`, or `directory/name.<ext>` when `name` has no extension."""
    candidates = [name] if os.path.splitext(name)[1] else [name + e for e in IMAGE_EXTS]
    for c in candidates:
        p = os.path.join(directory, c) if directory else c
        if os.path.isfile(p):
            return p
    return None


def _path_image(directory: str | None, name: str, check: bool) -> ImageRef:
    if check:
        p = _find_image(directory, name)
        if p is None:
            raise _Malformed(f"image not found: {os.path.join(directory or '', name)}")
        return ImageRef(path=p)
    return ImageRef(path=os.path.join(directory, name) if directory else name)


def _b64_like(s: str) -> bool:
    return len(s) > 64 and re.fullmatch(r"[A-Za-z0-9+/=\s]+", s[:256]) is not None


def _coerce_image(value: Any, base_dir: str | None, check: bool) -> ImageRef:
    """Image cell -> ImageRef: bytes, HF dict, base64 string, or a path (rel. to base_dir)."""
    if isinstance(value, (bytes, bytearray)):
        return ImageRef(data=bytes(value))
    if isinstance(value, dict):
        if value.get("bytes"):
            return ImageRef(data=bytes(value["bytes"]))
        if value.get("path"):
            return _path_image(base_dir, str(value["path"]), check)
        raise _Malformed("image dict without bytes/path")
    if isinstance(value, str) and not _is_missing(value):
        s = value.strip()
        if _b64_like(s) and _find_image(base_dir, s) is None:
            try:
                base64.b64decode(s[:4 * 64], validate=False)
            except (binascii.Error, ValueError) as e:
                raise _Malformed(f"bad base64 image: {e}") from e
            return ImageRef(b64=s)
        return _path_image(base_dir, s, check)
    raise _Malformed(f"no image in record (got {type(value).__name__})")


def _read_jsonl(path: str, report: ReadReport) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                report.bad(f"{os.path.basename(path)}:{lineno}", f"bad JSON ({e.msg})")
                continue
            if not isinstance(rec, dict):
                report.bad(f"{os.path.basename(path)}:{lineno}", "line is not an object")
                continue
            rows.append(rec)
    return rows


def _read_json_or_jsonl(path: str, report: ReadReport) -> Any:
    """A JSON document, or a list of records when the file is JSON lines."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return _read_jsonl(path, report)


def read_table(path: str, report: ReadReport | None = None) -> list[dict[str, Any]]:
    """Rows of a `.tsv`/`.csv`/`.jsonl`/`.json`/`.parquet` table as dicts."""
    report = report or ReadReport("table", path)
    ext = os.path.splitext(path)[1].lower()
    if ext in (".tsv", ".csv"):
        csv.field_size_limit(sys.maxsize)  # base64 images are multi-megabyte cells
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ",")
            rows = []
            for i, row in enumerate(reader, 2):
                if None in row:  # more cells than header columns
                    report.bad(f"{os.path.basename(path)}:{i}", "extra cells in row")
                    continue
                rows.append(dict(row))
            return rows
    if ext == ".jsonl":
        return _read_jsonl(path, report)
    if ext == ".json":
        data = _read_json_or_jsonl(path, report)
        if isinstance(data, dict):
            for key in ("data", "questions", "rows"):
                if isinstance(data.get(key), list):
                    return data[key]
            return [dict(v, _key=k) if isinstance(v, dict) else {"_key": k, "value": v}
                    for k, v in data.items()]
        return list(data)
    if ext == ".parquet":
        try:
            import pandas as pd  # noqa: PLC0415  (optional dependency)
        except ImportError as e:
            raise ImportError(f"reading {path} needs pandas + pyarrow; or export it to TSV"
                              ) from e
        return pd.read_parquet(path).to_dict("records")
    raise ValueError(f"unsupported table format: {path}")


def _table_options(row: dict[str, Any]) -> tuple[str, ...]:
    """Options from `A`, `B`, ... columns, stopping at the first missing one."""
    opts = []
    for letter in LETTERS:
        if letter not in row or _is_missing(row[letter]):
            break
        opts.append(str(row[letter]).strip())
    return tuple(opts)


def _letter_answer(value: Any, options: Sequence[str]) -> str:
    """Normalises an answer given as a letter, an int/str index, or the option text."""
    if isinstance(value, bool) or _is_missing(value):
        raise _Malformed(f"missing answer ({value!r})")
    n = len(options)
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        idx = int(value)
        if not 0 <= idx < n:
            raise _Malformed(f"answer index {idx} out of range for {n} options")
        return LETTERS[idx]
    s = str(value).strip()
    m = re.fullmatch(r"\(?([A-Za-z])[\.\)]?", s)
    if m and (n == 0 or LETTERS.index(m.group(1).upper()) < n):
        return m.group(1).upper()
    for i, o in enumerate(options):
        if s.lower() == str(o).strip().lower():
            return LETTERS[i]
    raise _Malformed(f"answer {s!r} matches no option of {n}")


def _finish(name: str, examples: list[Example], report: ReadReport) -> BenchmarkData:
    seen: set[str] = set()
    unique = []
    for ex in examples:
        if ex.qid in seen:
            report.bad(ex.qid, "duplicate qid")
            continue
        seen.add(ex.qid)
        unique.append(ex)
    report.read = len(unique)
    return BenchmarkData(name, unique, report)


# --------------------------------------------------------------------------------------------
# GQA.
# --------------------------------------------------------------------------------------------
def read_gqa(path: str, image_dir: str | None = None, *, check_images: bool = True,
             limit: int | None = None) -> BenchmarkData:
    """GQA testdev-balanced: `{qid: {imageId, question, answer, types, ...}}` + images dir.

    Also accepts a JSON list / JSONL of `{question_id, image|imageId, question|text, answer}`.
    `image_dir` defaults to `<dir of path>/images`.
    """
    report = ReadReport("gqa", path)
    image_dir = image_dir or os.path.join(os.path.dirname(path), "images")
    data = _read_json_or_jsonl(path, report)
    items = (data.items() if isinstance(data, dict)
             else ((r.get("question_id", r.get("qid")), r) for r in data))
    examples = []
    for qid, rec in items:
        if limit is not None and len(examples) >= limit:
            break
        try:
            if not isinstance(rec, dict) or qid is None:
                raise _Malformed("record is not an object with a question id")
            question = rec.get("question", rec.get("text"))
            answer = rec.get("answer")
            image = rec.get("imageId", rec.get("image"))
            if _is_missing(question) or _is_missing(image):
                raise _Malformed("missing question or image")
            types = rec.get("types") or {}
            examples.append(Example(
                qid=str(qid), image=_path_image(image_dir, str(image), check_images),
                question=str(question), prompt=short_answer_prompt(str(question)),
                answer=None if _is_missing(answer) else str(answer),
                answers=() if _is_missing(answer) else (str(answer),),
                meta={k: types[k] for k in ("structural", "semantic", "detailed") if k in types},
            ))
        except _Malformed as e:
            report.bad(qid, str(e))
    return _finish("gqa", examples, report)


# --------------------------------------------------------------------------------------------
# MME.
# --------------------------------------------------------------------------------------------
def _mme_qa_lines(txt: str, report: ReadReport, n_fields: int) -> Iterator[list[str]]:
    with open(txt, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < n_fields:
                report.bad(f"{os.path.relpath(txt)}:{lineno}", f"expected {n_fields} tab fields")
                continue
            yield [x.strip() for x in fields[:n_fields]]


def _mme_example(task: str, image: ImageRef, image_key: str, question: str, answer: str,
                 n: int) -> Example:
    ans = answer.strip().lower()
    if ans not in ("yes", "no"):
        raise _Malformed(f"MME answer must be yes/no, got {answer!r}")
    return Example(
        qid=f"{task}/{image_key}/{n}", image=image, question=question,
        prompt=short_answer_prompt(question), answer=ans, answers=(ans,),
        meta={"category": task, "image_key": f"{task}/{image_key}"},
    )


def read_mme(path: str, *, check_images: bool = True, limit: int | None = None
             ) -> BenchmarkData:
    """MME from the official release folder, the eval_tool `<task>.txt` layout, or a flat TSV.

    Each image has two questions (one "yes", one "no"); `meta["image_key"]` groups them for
    acc+. Task names are the folder names (`OCR`, `commonsense_reasoning`, ...).
    """
    report = ReadReport("mme", path)
    examples: list[Example] = []

    def add(task: str, image: ImageRef, key: str, q: str, a: str) -> None:
        counts[(task, key)] += 1
        examples.append(_mme_example(task, image, key, q, a, counts[(task, key)] - 1))

    counts: collections.Counter = collections.Counter()
    if os.path.isfile(path):  # flat TSV / CSV / JSONL / parquet export
        rows = read_table(path, report)
        by_index = _resolve_tsv_images(rows)
        base = os.path.dirname(path)
        for i, row in enumerate(rows):
            try:
                task = row.get("category")
                q, a = row.get("question"), row.get("answer")
                if _is_missing(task) or _is_missing(q) or _is_missing(a):
                    raise _Malformed("missing category/question/answer")
                # acc+ groups the two questions of one image: by image path / question_id,
                # else by the index an image cell refers to, else by the row's own index.
                ipath = row.get("image_path", row.get("question_id"))
                cell = row.get("image")
                if not _is_missing(ipath):
                    key = os.path.basename(str(ipath))
                elif isinstance(cell, str) and cell.strip() in by_index:
                    key = cell.strip()
                else:
                    key = str(row.get("index", i))
                image = _tsv_image(row, by_index, base, check_images)
                add(str(task), image, key, str(q), str(a))
            except _Malformed as e:
                report.bad(row.get("index", i), str(e))
        return _finish("mme", examples[:limit] if limit else examples, report)

    for task in sorted(os.listdir(path)):
        tdir = os.path.join(path, task)
        if not os.path.isdir(tdir):
            continue
        summary_txt = os.path.join(tdir, f"{task}.txt")
        if os.path.isfile(summary_txt):  # eval_tool layout: image \t question \t answer
            img_dir = os.path.join(tdir, "images") if os.path.isdir(
                os.path.join(tdir, "images")) else tdir
            for name, q, a in _mme_qa_lines(summary_txt, report, 3):
                try:
                    add(task, _path_image(img_dir, name, check_images), name, q, a)
                except _Malformed as e:
                    report.bad(f"{task}/{name}", str(e))
            continue
        if os.path.isdir(os.path.join(tdir, "images")):
            img_dir = os.path.join(tdir, "images")
            qa_dir = next((os.path.join(tdir, d) for d in ("questions_answers_YN",
                                                           "questions_answer_YES_NO")
                           if os.path.isdir(os.path.join(tdir, d))), tdir)
        else:
            img_dir = qa_dir = tdir
        for txt in sorted(os.listdir(qa_dir)):
            if not txt.endswith(".txt"):
                continue
            stem = txt[:-4]
            img_path = _find_image(img_dir, stem)
            if img_path is None:
                report.bad(f"{task}/{txt}", "no image with this stem")
                continue
            for q, a in _mme_qa_lines(os.path.join(qa_dir, txt), report, 2):
                try:
                    add(task, ImageRef(path=img_path), os.path.basename(img_path), q, a)
                except _Malformed as e:
                    report.bad(f"{task}/{txt}", str(e))
    return _finish("mme", examples[:limit] if limit else examples, report)


# --------------------------------------------------------------------------------------------
# POPE.
# --------------------------------------------------------------------------------------------
def read_pope(path: str, image_dir: str | None = None, *,
              splits: Sequence[str] = POPE_SPLITS, check_images: bool = True,
              limit: int | None = None) -> BenchmarkData:
    """POPE: a folder with `*pope_<split>.json[l]` files (one JSON object per line:
    `question_id, image, text, label`), or one JSONL whose records carry `category`.

    `image_dir` (COCO val2014) defaults to `<path>/images`. qids are `<split>/<question_id>`.
    """
    report = ReadReport("pope", path)
    image_dir = image_dir or os.path.join(path if os.path.isdir(path)
                                          else os.path.dirname(path), "images")
    sources: list[tuple[str | None, str]] = []
    if os.path.isdir(path):
        names = sorted(os.listdir(path))
        for split in splits:
            match = [n for n in names if re.search(rf"pope_{split}\.jsonl?$", n)]
            if not match:
                report.skip(f"no file for split {split}")
            sources += [(split, os.path.join(path, n)) for n in match]
    else:
        sources.append((None, path))
    examples = []
    for split, file in sources:
        for rec in _read_jsonl(file, report):
            try:
                sp = split or rec.get("category")
                if _is_missing(sp):
                    raise _Malformed("no split: use per-split files or a category field")
                if sp not in splits:
                    report.skip(f"split {sp}")
                    continue
                label = str(rec.get("label", rec.get("answer", ""))).strip().lower()
                if label not in ("yes", "no"):
                    raise _Malformed(f"label must be yes/no, got {label!r}")
                text = rec.get("text", rec.get("question"))
                if _is_missing(text) or _is_missing(rec.get("image")):
                    raise _Malformed("missing text or image")
                examples.append(Example(
                    qid=f"{sp}/{rec.get('question_id')}",
                    image=_path_image(image_dir, str(rec["image"]), check_images),
                    question=str(text), prompt=short_answer_prompt(str(text)),
                    answer=label, answers=(label,), meta={"category": sp},
                ))
            except _Malformed as e:
                report.bad(f"{os.path.basename(file)}:{rec.get('question_id')}", str(e))
    return _finish("pope", examples[:limit] if limit else examples, report)


# --------------------------------------------------------------------------------------------
# TextVQA.
# --------------------------------------------------------------------------------------------
def read_textvqa(path: str, image_dir: str | None = None, *, ocr_json: str | None = None,
                 check_images: bool = True, limit: int | None = None) -> BenchmarkData:
    """TextVQA val: `TextVQA_0.5.1_val.json` + `train_images/` (val images live there).

    `ocr_json` (`TextVQA_Rosetta_OCR_v0.2_val.json`) adds LLaVA-1.5's
    "Reference OCR token: ..." line to the prompt, which LLaVA-1.5's reported 58.2 uses;
    without it the prompt is the plain short-answer one (lmms-eval's default).
    """
    report = ReadReport("textvqa", path)
    image_dir = image_dir or os.path.join(os.path.dirname(path), "train_images")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    records = data["data"] if isinstance(data, dict) else data
    ocr: dict[str, list[str]] = {}
    if ocr_json:
        with open(ocr_json, encoding="utf-8") as f:
            odata = json.load(f)
        for r in odata["data"] if isinstance(odata, dict) else odata:
            ocr[str(r.get("image_id"))] = list(r.get("ocr_tokens") or [])
    examples = []
    for i, rec in enumerate(records):
        if limit is not None and len(examples) >= limit:
            break
        try:
            q, image_id = rec.get("question"), rec.get("image_id")
            if _is_missing(q) or _is_missing(image_id) or "question_id" not in rec:
                raise _Malformed("missing question/image_id/question_id")
            answers = tuple(str(a) for a in rec.get("answers") or ())
            prompt_q = str(q)
            if ocr_json:
                toks = ocr.get(str(image_id), [])
                if toks:
                    prompt_q += "\nReference OCR token: " + ", ".join(toks)
            examples.append(Example(
                qid=str(rec["question_id"]),
                image=_path_image(image_dir, str(image_id), check_images),
                question=str(q), prompt=short_answer_prompt(prompt_q),
                answer=collections.Counter(answers).most_common(1)[0][0] if answers else None,
                answers=answers, meta={"image_id": str(image_id)},
            ))
        except _Malformed as e:
            report.bad(rec.get("question_id", i), str(e))
        except AttributeError:
            report.bad(i, "record is not an object")
    return _finish("textvqa", examples, report)


# --------------------------------------------------------------------------------------------
# ScienceQA-IMG.
# --------------------------------------------------------------------------------------------
def read_scienceqa(path: str, image_dir: str | None = None, *, split: str = "test",
                   check_images: bool = True, limit: int | None = None) -> BenchmarkData:
    """ScienceQA-IMG: `<path>/problems.json`, `<path>/pid_splits.json`, images under
    `<image_dir>/<split>/<pid>/<problem.image>` (default `<path>/images`). Only questions with
    an image are kept (the others are counted as filtered)."""
    report = ReadReport("scienceqa", path)
    image_dir = image_dir or os.path.join(path, "images")
    with open(os.path.join(path, "problems.json"), encoding="utf-8") as f:
        problems = json.load(f)
    with open(os.path.join(path, "pid_splits.json"), encoding="utf-8") as f:
        pids = json.load(f)[split]
    examples = []
    for pid in pids:
        if limit is not None and len(examples) >= limit:
            break
        try:
            prob = problems.get(str(pid))
            if not isinstance(prob, dict):
                raise _Malformed("pid not in problems.json")
            if not prob.get("image"):
                report.skip("no image")
                continue
            choices = tuple(str(c) for c in prob.get("choices") or ())
            if len(choices) < 2:
                raise _Malformed("fewer than 2 choices")
            answer = _letter_answer(prob.get("answer"), choices)
            hint = prob.get("hint") or ""
            question = str(prob["question"])
            examples.append(Example(
                qid=str(pid),
                image=_path_image(os.path.join(image_dir, split, str(pid)), prob["image"],
                                  check_images),
                question=question,
                prompt=mc_prompt(question, choices, hint=hint, hint_prefix="Context: "),
                answer=answer, answers=(answer,), options=choices,
                meta={k: prob.get(k) for k in ("subject", "topic", "category", "grade")
                      if prob.get(k) is not None},
            ))
        except (_Malformed, KeyError) as e:
            report.bad(pid, str(e))
    return _finish("scienceqa", examples, report)


# --------------------------------------------------------------------------------------------
# VLMEvalKit-style multiple-choice TSVs: MMBench, AI2D, MMStar.
# --------------------------------------------------------------------------------------------
def _resolve_tsv_images(rows: list[dict]) -> dict[str, Any]:
    """index -> image cell, for TSVs that store an image once and refer to it by index."""
    return {str(r.get("index")): r.get("image") for r in rows
            if isinstance(r.get("image"), str) and len(r["image"]) > 64}


def _tsv_image(row: dict, by_index: dict[str, Any], base: str, check: bool) -> ImageRef:
    img = row.get("image")
    if isinstance(img, str) and len(img.strip()) <= 64 and img.strip() in by_index:
        img = by_index[img.strip()]
    if _is_missing(img) and not _is_missing(row.get("image_path")):
        img = row["image_path"]
    return _coerce_image(img, base, check)


def read_mmbench(path: str, *, circular: bool = True, check_images: bool = True,
                 limit: int | None = None) -> BenchmarkData:
    """MMBench TSV (`index, question, hint, A, B, C, D, answer, category, l2-category, image`).

    With `circular=True` every question yields one example per rotation of its options
    (qid `<index>@<k>`; rotation 0 is the original order), as OpenCompass's CircularEval.
    TSVs that already hold the circular copies (`index + k * 1e6`) are grouped as they are.
    Rows without an answer (test split) are kept with `answer=None`.
    """
    report = ReadReport("mmbench", path)
    rows = read_table(path, report)
    by_index = _resolve_tsv_images(rows)
    base_dir = os.path.dirname(path)
    indices = set()
    for r in rows:
        try:
            indices.add(int(float(r.get("index"))))
        except (TypeError, ValueError):
            pass
    pre_circular = any(i >= MMBENCH_CIRCULAR_OFFSET and i % MMBENCH_CIRCULAR_OFFSET in indices
                       for i in indices)
    examples = []
    n_questions = 0
    for i, row in enumerate(rows):
        if limit is not None and n_questions >= limit:
            break
        try:
            idx = int(float(row.get("index")))
            options = _table_options(row)
            if len(options) < 2:
                raise _Malformed("fewer than 2 options")
            q = row.get("question")
            if _is_missing(q):
                raise _Malformed("missing question")
            answer = None if _is_missing(row.get("answer")) else _letter_answer(
                row["answer"], options)
            image = _tsv_image(row, by_index, base_dir, check_images)
            hint = None if _is_missing(row.get("hint")) else str(row["hint"])
            meta = {"category": row.get("category"),
                    "l2_category": row.get("l2-category", row.get("l2_category"))}
            if pre_circular or not circular:
                base = idx % MMBENCH_CIRCULAR_OFFSET
                rot = idx // MMBENCH_CIRCULAR_OFFSET
                shifts = [(rot, options, answer)]
            else:
                base = idx
                n = len(options)
                shifts = []
                for k in range(n):
                    rot_opts = options[k:] + options[:k]
                    rot_ans = None if answer is None else LETTERS[
                        (LETTERS.index(answer) - k) % n]
                    shifts.append((k, rot_opts, rot_ans))
            n_questions += 1
            for k, opts, ans in shifts:
                examples.append(Example(
                    qid=f"{base}@{k}", image=image, question=str(q),
                    prompt=mc_prompt(str(q), opts, hint=hint), answer=ans,
                    answers=() if ans is None else (ans,), options=tuple(opts),
                    meta=dict(meta, base_index=base, rotation=k),
                ))
        except _Malformed as e:
            report.bad(row.get("index", i), str(e))
        except (TypeError, ValueError) as e:
            report.bad(row.get("index", i), f"bad index: {e}")
    return _finish("mmbench", examples, report)


_MMSTAR_OPTS = re.compile(r"(?:^|[\s,])([A-F])\s*[:\.]\s*")


def _parse_inline_options(question: str) -> tuple[str, ...]:
    """`... Options: A: x, B: y, C: z` -> ("x", "y", "z") (MMStar's inline format)."""
    m = re.search(r"Options?\s*:\s*(.*)$", question, flags=re.S)
    if not m:
        return ()
    text = m.group(1)
    marks = list(_MMSTAR_OPTS.finditer(text))
    letters = [mk.group(1) for mk in marks]
    if not letters or letters != list(LETTERS[:len(letters)]):
        return ()
    opts = []
    for j, mk in enumerate(marks):
        end = marks[j + 1].start() if j + 1 < len(marks) else len(text)
        opts.append(text[mk.end():end].strip().rstrip(",").strip())
    return tuple(opts)


def read_mmstar(path: str, *, check_images: bool = True, limit: int | None = None
                ) -> BenchmarkData:
    """MMStar TSV: `index, question` (options inline: "Options: A: ..., B: ..."), `answer`
    (letter), `category`, `l2_category`, `image` (base64); `A..D` columns are used when present.
    The prompt is the question as given plus `MC_SUFFIX` (lmms-eval / VLMEvalKit)."""
    report = ReadReport("mmstar", path)
    rows = read_table(path, report)
    by_index = _resolve_tsv_images(rows)
    examples = []
    for i, row in enumerate(rows):
        if limit is not None and len(examples) >= limit:
            break
        try:
            q = row.get("question")
            if _is_missing(q):
                raise _Malformed("missing question")
            q = str(q)
            options = _table_options(row)
            inline = _parse_inline_options(q)
            prompt = (f"{q.strip()}\n{MC_SUFFIX}" if inline or not options
                      else mc_prompt(q, options))
            options = options or inline
            answer = None if _is_missing(row.get("answer")) else _letter_answer(
                row["answer"], options)
            examples.append(Example(
                qid=str(row.get("index", i)),
                image=_tsv_image(row, by_index, os.path.dirname(path), check_images),
                question=q, prompt=prompt, answer=answer,
                answers=() if answer is None else (answer,), options=options,
                meta={"category": row.get("category"),
                      "l2_category": row.get("l2_category", row.get("l2-category"))},
            ))
        except _Malformed as e:
            report.bad(row.get("index", i), str(e))
    return _finish("mmstar", examples, report)


def read_ai2d(path: str, image_dir: str | None = None, *, check_images: bool = True,
              limit: int | None = None) -> BenchmarkData:
    """AI2D test. Two accepted layouts:

    * JSONL / JSON list: `{"question_id"?, "image": path (relative to `image_dir`, default the
      file's folder) or base64, "question", "options": [...], "answer": index | letter | text}`
      (the lmms-lab/ai2d export has `answer` as an index string "0".."3").
    * VLMEvalKit TSV (`AI2D_TEST.tsv`): `index, question, A..D, answer` (letter), `image`
      (base64), optional `category`.
    """
    report = ReadReport("ai2d", path)
    rows = read_table(path, report)
    by_index = _resolve_tsv_images(rows)
    base_dir = image_dir or os.path.dirname(path)
    examples = []
    for i, row in enumerate(rows):
        if limit is not None and len(examples) >= limit:
            break
        try:
            q = row.get("question")
            if _is_missing(q):
                raise _Malformed("missing question")
            opts = row.get("options")
            if isinstance(opts, str):
                try:
                    opts = json.loads(opts)
                except json.JSONDecodeError:
                    opts = None
            options = tuple(str(o) for o in opts) if isinstance(opts, (list, tuple)) else (
                _table_options(row))
            if hasattr(opts, "tolist"):  # numpy array from a parquet export
                options = tuple(str(o) for o in opts.tolist())
            if len(options) < 2:
                raise _Malformed("fewer than 2 options")
            answer = None if _is_missing(row.get("answer")) else _letter_answer(
                row["answer"], options)
            qid = row.get("question_id", row.get("index", i))
            examples.append(Example(
                qid=str(qid), image=_tsv_image(row, by_index, base_dir, check_images),
                question=str(q), prompt=mc_prompt(str(q), options), answer=answer,
                answers=() if answer is None else (answer,), options=options,
                meta={"category": row.get("category")} if row.get("category") else {},
            ))
        except _Malformed as e:
            report.bad(row.get("question_id", row.get("index", i)), str(e))
    return _finish("ai2d", examples, report)


# --------------------------------------------------------------------------------------------
# SEED-Bench.
# --------------------------------------------------------------------------------------------
def read_seed(path: str, image_dir: str | None = None, *, check_images: bool = True,
              limit: int | None = None) -> BenchmarkData:
    """SEED-Bench(-1): `SEED-Bench.json` + `SEED-Bench-image/` (default next to the json).

    Image questions only (`data_type == "image"`); video questions are counted as filtered.
    `meta["category"]` is the question-type name from the file's `question_type` map.
    """
    report = ReadReport("seed", path)
    image_dir = image_dir or os.path.join(os.path.dirname(path), "SEED-Bench-image")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    questions = data["questions"] if isinstance(data, dict) else data
    type_names = {v: k for k, v in (data.get("question_type") or {}).items()} if isinstance(
        data, dict) else {}
    examples = []
    for i, rec in enumerate(questions):
        if limit is not None and len(examples) >= limit:
            break
        try:
            if rec.get("data_type", "image") != "image":
                report.skip(f"data_type {rec.get('data_type')}")
                continue
            options = tuple(str(rec.get(f"choice_{c}", "")) for c in "abcd")
            if any(_is_missing(o) for o in options):
                raise _Malformed("missing choice_a..choice_d")
            answer = _letter_answer(rec.get("answer"), options)
            q = rec.get("question")
            if _is_missing(q) or _is_missing(rec.get("data_id")):
                raise _Malformed("missing question or data_id")
            qtype = rec.get("question_type_id")
            examples.append(Example(
                qid=str(rec.get("question_id", i)),
                image=_path_image(image_dir, str(rec["data_id"]), check_images),
                question=str(q), prompt=mc_prompt(str(q), options), answer=answer,
                answers=(answer,), options=options,
                meta={"category": type_names.get(qtype, str(qtype))},
            ))
        except _Malformed as e:
            report.bad(rec.get("question_id", i) if isinstance(rec, dict) else i, str(e))
        except AttributeError:
            report.bad(i, "record is not an object")
    return _finish("seed", examples, report)


# --------------------------------------------------------------------------------------------
# Registry.
# --------------------------------------------------------------------------------------------
READERS: dict[str, Callable[..., BenchmarkData]] = {
    "gqa": read_gqa,
    "mme": read_mme,
    "pope": read_pope,
    "textvqa": read_textvqa,
    "scienceqa": read_scienceqa,
    "mmbench": read_mmbench,
    "seed": read_seed,
    "ai2d": read_ai2d,
    "mmstar": read_mmstar,
}
ALIASES = {"sqa": "scienceqa", "scienceqa_img": "scienceqa", "sqa_img": "scienceqa",
           "seedbench": "seed", "seed_bench": "seed", "mmb": "mmbench", "vqa_text": "textvqa"}
MULTIPLE_CHOICE = frozenset({"scienceqa", "mmbench", "seed", "ai2d", "mmstar"})


def canonical_name(name: str) -> str:
    key = name.lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in READERS:
        raise KeyError(f"unknown benchmark {name!r}; known: {sorted(READERS)}")
    return key


def load_benchmark(name: str, path: str, **kwargs: Any) -> BenchmarkData:
    """Reads benchmark `name` from `path` (see the module docstring for layouts)."""
    return READERS[canonical_name(name)](path, **kwargs)

