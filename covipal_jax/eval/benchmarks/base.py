"""What every benchmark shares: examples, read reports, the row loop, and the registry.

A benchmark is one module (`gqa.py`, `mme.py`, ...) holding its reader and its metric, and
registering one `Benchmark` value:

    BENCHMARK = register(Benchmark(
        name="gqa", read=read_gqa, score=gqa_metrics, protocol="exact match after ..."))

A reader turns a user path into raw rows (dicts, one per question) and hands them, with a
`convert(row) -> Example | list[Example]` function, to `collect`: the one row loop that
applies `limit`, counts malformed rows (`Malformed`, or a missing key / wrong type) and
filtered ones (`Skip`), and drops duplicate qids. A metric takes the harness's prediction
records and returns a dict whose `"score"` is the headline number; `Benchmark.columns` says
which numbers a results table shows (MME shows two: perception and total).
"""
from __future__ import annotations

import collections
import dataclasses
import io
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from PIL import Image

from covipal_jax import paths
from covipal_jax.eval.metrics import LETTERS  # noqa: F401  (re-exported)

SHORT_ANSWER_SUFFIX = "Answer the question using a single word or phrase."
MC_SUFFIX = "Answer with the option's letter from the given choices directly."

Record = Mapping[str, Any]


# --------------------------------------------------------------------------------------------
# Examples.
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ImageRef:
    """A lazily loaded image: a file path (local or `gs://`), raw encoded bytes, or base64."""

    path: str | None = None
    data: bytes | None = None
    b64: str | None = None

    def load(self) -> Image.Image:
        """Decodes the image into an RGB `PIL.Image` (raises on unreadable data)."""
        if self.path is not None:
            raw = paths.as_path(self.path).read_bytes()
        elif self.data is not None:
            raw = self.data
        elif self.b64 is not None:
            import base64  # noqa: PLC0415
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


@dataclasses.dataclass(frozen=True)
class VideoRef:
    """A video file (local or `gs://`); decoding is the predictor's (see `eval/video.py`)."""

    path: str

    def describe(self) -> str:
        return self.path


@dataclasses.dataclass
class Example:
    """One benchmark question.

    `answer` is the canonical reference: an option letter for multiple choice, "yes"/"no" for
    MME/POPE, the answer string for GQA, the most common human answer for TextVQA (whose full
    list is in `answers`). It is None where the split has no public labels. `image` is an
    `ImageRef`, or a `VideoRef` for video benchmarks.
    """

    qid: str
    image: ImageRef | VideoRef
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


class Malformed(ValueError):
    """Raised by a `convert` function: the row is counted as malformed, the read goes on."""


class Skip(Exception):  # noqa: N818
    """Raised by a `convert` function: the row is filtered out on purpose (reason counted)."""


# --------------------------------------------------------------------------------------------
# The row loop.
# --------------------------------------------------------------------------------------------
def collect(name: str, rows: Iterable[Any], convert: Callable[[Any], Example | list[Example]],
            report: ReadReport, *, limit: int | None = None,
            where: Callable[[int, Any], Any] | None = None) -> BenchmarkData:
    """Converts `rows` into examples: the one loop every reader uses.

    Args:
      rows: raw records (usually dicts).
      convert: row -> an `Example` or a list of them (one question expanded, e.g. MMBench's
        option rotations); raises `Malformed` (or KeyError / TypeError / AttributeError) for a
        bad row, `Skip(reason)` for one left out on purpose.
      limit: stop after this many converted rows (questions).
      where: (index, row) -> the row's name in error messages (default: its question id).
    Returns:
      `BenchmarkData` with duplicate qids dropped (counted as malformed).
    """
    def default_where(i: int, row: Any) -> Any:
        if isinstance(row, dict):
            for key in ("question_id", "qid", "index", "_key"):
                if row.get(key) is not None:
                    return row[key]
        return i

    where = where or default_where
    examples: list[Example] = []
    n_rows = 0
    for i, row in enumerate(rows):
        if limit is not None and n_rows >= limit:
            break
        try:
            out = convert(row)
        except Skip as s:
            report.skip(str(s))
            continue
        except Malformed as e:
            report.bad(where(i, row), str(e))
            continue
        except KeyError as e:
            report.bad(where(i, row), f"missing field {e}")
            continue
        except (TypeError, AttributeError) as e:
            report.bad(where(i, row), f"record is not an object with the expected fields ({e})")
            continue
        n_rows += 1
        examples += out if isinstance(out, list) else [out]
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
# The registry.
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Benchmark:
    """A benchmark: how to read it, how to score it, and what a table shows.

    Attributes:
      name: canonical name (lower case), the key of results files.
      read: `(path, **kw) -> BenchmarkData`.
      score: `(records) -> metrics dict` with the headline number under `"score"`.
      protocol: one line naming the metric as tables print it (footnote of every table).
      aliases: other accepted names.
      multiple_choice: options as letters (option scoring allowed).
      kind: "image" or "video" (video examples hold a `VideoRef`).
      columns: `(metrics) -> {column: value}`; default `{name: metrics["score"]}`.
      column_protocols: `{column: protocol}` when `columns` gives several.
    """

    name: str
    read: Callable[..., BenchmarkData]
    score: Callable[[list[Record]], dict[str, Any]]
    protocol: str
    aliases: tuple[str, ...] = ()
    multiple_choice: bool = False
    kind: str = "image"
    columns: Callable[[Mapping[str, Any]], dict[str, float]] | None = None
    column_protocols: Mapping[str, str] | None = None

    def table_columns(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        if self.columns is None:
            return {self.name: float(metrics["score"])}
        return self.columns(metrics)

    def protocols(self) -> dict[str, str]:
        return dict(self.column_protocols or {self.name: self.protocol})


REGISTRY: dict[str, Benchmark] = {}
_ALIASES: dict[str, str] = {}


def register(bench: Benchmark) -> Benchmark:
    """Adds `bench` to the registry (its name and aliases must be new)."""
    for key in (bench.name, *bench.aliases):
        if key in REGISTRY or key in _ALIASES:
            raise ValueError(f"benchmark name {key!r} is already registered")
    REGISTRY[bench.name] = bench
    for a in bench.aliases:
        _ALIASES[a] = bench.name
    return bench


def canonical_name(name: str) -> str:
    key = name.lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in REGISTRY:
        raise KeyError(f"unknown benchmark {name!r}; known: {sorted(REGISTRY)}")
    return key


def column_protocol(column: str) -> str | None:
    """The protocol of a results-table column (`mme_p`, `gqa`, ...), or None if unknown."""
    for bench in REGISTRY.values():
        if column in bench.protocols():
            return bench.protocols()[column]
    return None


def get(name: str) -> Benchmark:
    """The registered `Benchmark` for `name` or one of its aliases (KeyError otherwise)."""
    return REGISTRY[canonical_name(name)]
