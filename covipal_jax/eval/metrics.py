"""Scoring functions shared by the benchmarks (answer normalisation, parsing, accuracies).

Each benchmark's own metric lives in its module (`covipal_jax/eval/benchmarks/<name>.py`)
and is built from these. All accuracies are percentages (0-100), as papers report them.

* `normalize_vqa_answer` / `vqa_accuracy`: the VQA / TextVQA accuracy with EvalAI answer
  normalisation (MMF's `EvalAIAnswerProcessor`): for each of the 10 leave-one-out subsets of
  the human answers, min(#matches / 3, 1), averaged.
* `anls`: average normalized Levenshtein similarity (InfoVQA / DocVQA), threshold 0.5.
* `normalize_short_answer`: lower case, strip, trailing period, punctuation, whitespace (GQA).
* `parse_mme_answer`, `parse_pope_answer`: the official parsers of MME and POPE.
* `extract_choice`, `mc_metrics`: option letters from free-form answers; option accuracy.

Records are the JSON lines the harness writes: `{"qid", "pred", "answer", "answers", "options",
"meta", ["choice"], ["error"]}`; `choice` (a letter) takes precedence over parsing `pred` for
multiple-choice benchmarks (it is set when the predictor scored the options).
`compute_metrics(name, records)` and `headline_score` dispatch through the benchmark registry.
"""
from __future__ import annotations

import collections
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

Record = Mapping[str, Any]


# --------------------------------------------------------------------------------------------
# EvalAI / VQA answer normalisation (MMF's EvalAIAnswerProcessor, the TextVQA evaluator).
# --------------------------------------------------------------------------------------------
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
            "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
_PUNCT = (";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
          "@", "`", ",", "?", "!")


def _vqa_punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _vqa_digit_article(text: str) -> str:
    words = []
    for w in text.lower().split():
        w = _NUMBERS.get(w, w)
        if w not in _ARTICLES:
            words.append(w)
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(answer: str) -> str:
    """EvalAI answer normalisation ("Two dogs." -> "2 dogs", "the cat" -> "cat")."""
    s = str(answer).lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    s = s.replace("\n", " ").replace("\t", " ").strip()
    return _vqa_digit_article(_vqa_punctuation(s))


def vqa_accuracy(pred: str, gt_answers: Sequence[str]) -> float:
    """VQA accuracy in [0, 1]: mean over leave-one-out subsets of min(#matches / 3, 1)."""
    if not gt_answers:
        raise ValueError("VQA accuracy needs the human answers")
    p = normalize_vqa_answer(pred)
    gts = [normalize_vqa_answer(a) for a in gt_answers]
    total = 0.0
    for i in range(len(gts)):
        matches = sum(1 for j, g in enumerate(gts) if j != i and g == p)
        total += min(1.0, matches / 3.0)
    return total / len(gts)


# --------------------------------------------------------------------------------------------
# Answer parsing.
# --------------------------------------------------------------------------------------------
_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def normalize_short_answer(text: str) -> str:
    """GQA-style normalisation: lower, strip, trailing '.', punctuation, whitespace."""
    s = str(text).strip().lower().rstrip(".")
    return " ".join(s.translate(_PUNCT_TABLE).split())


def parse_mme_answer(pred: str) -> str:
    """Official MME parsing: "yes" / "no" / "other"."""
    p = str(pred).strip().lower()
    if p in ("yes", "no"):
        return p
    prefix = p[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def parse_pope_answer(pred: str) -> str:
    """LLaVA's POPE parsing: first sentence, no commas; "no" if it holds no/No/not."""
    text = str(pred).strip()
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


_ANSWER_PHRASE = re.compile(
    r"(?i:answer)\s*(?i:is|would be|should be|will be)?\s*[:\-]?\s*"
    r"(?i:option\s*|choice\s*)?[\(\[]?([A-Z])(?![A-Za-z0-9'])")
_OPTION_PHRASE = re.compile(r"(?i:choice|option)\s*[:\-]?\s*[\(\[]?([A-Z])(?![A-Za-z0-9'])")
_LEADING = re.compile(r"^[\(\[]?([A-Z])(?:[\)\]\.:,]|\s*$)")
_LEADING_SPACE = re.compile(r"^([A-Z])\s+\S")
_BRACKETED = re.compile(r"[\(\[]([A-Z])[\)\]]")
_STANDALONE = re.compile(r"(?<![A-Za-z0-9'])([A-Z])(?![A-Za-z0-9'])")


def extract_choice(text: str, options: Sequence[str] = (), num_options: int | None = None
                   ) -> str | None:
    """The option letter a free-form answer picks, or None.

    Handles "B", "(B)", "B.", "B) cat", "[B]", "The answer is B", "Answer: (C)", "option D",
    and, failing those, a unique standalone capital letter or a unique option text match.
    Letters beyond the number of options are ignored. "A"/"I" followed by a lower-case word
    ("A dog ...", "I think ...") are read as words, not options.
    """
    n = num_options if num_options is not None else (len(options) or len(LETTERS))
    valid = LETTERS[:n]
    s = str(text).strip().strip("*_`\"' \n\t")
    if not s:
        return None
    m = _LEADING.match(s)
    if m and m.group(1) in valid:
        return m.group(1)
    for phrase in (_ANSWER_PHRASE, _OPTION_PHRASE):
        for m in phrase.finditer(s):
            if m.group(1) in valid:
                return m.group(1)
    m = _LEADING_SPACE.match(s)
    if m and m.group(1) in valid and m.group(1) not in "AI":
        return m.group(1)
    found = {g for g in _BRACKETED.findall(s) if g in valid}
    if len(found) == 1:
        return found.pop()
    found = set()
    for m in _STANDALONE.finditer(s):
        letter = m.group(1)
        if letter not in valid:
            continue
        if letter in "AI" and re.match(r"\s+[a-z]", s[m.end():]):
            continue  # article / pronoun
        found.add(letter)
    if len(found) == 1:
        return found.pop()
    if options:
        norm = normalize_short_answer(s)
        opts = [normalize_short_answer(o) for o in options[:n]]
        exact = [i for i, o in enumerate(opts) if o and o == norm]
        if len(exact) == 1:
            return valid[exact[0]]
        contained = [i for i, o in enumerate(opts)
                     if o and re.search(rf"(?<!\w){re.escape(o)}(?!\w)", norm)]
        if len(contained) == 1:
            return valid[contained[0]]
    return None


# --------------------------------------------------------------------------------------------
# Metric helpers.
# --------------------------------------------------------------------------------------------
def pct(num: float, den: float) -> float:
    return 100.0 * num / den if den else 0.0


def scored(records: Iterable[Record]) -> tuple[list[Record], dict[str, int]]:
    """Records that can be scored, and counts of those left out: `unscored` (no reference
    answer, e.g. a test split) and `errors` (the harness could not run them, e.g. an
    unreadable image; they are retried on the next run)."""
    out, counts = [], {"unscored": 0, "errors": 0}
    for r in records:
        if r.get("error"):
            counts["errors"] += 1
        elif r.get("answer") is None and not r.get("answers"):
            counts["unscored"] += 1
        else:
            out.append(r)
    return out, counts


def category(r: Record, key: str = "category") -> str:
    v = (r.get("meta") or {}).get(key)
    return "unknown" if v is None else str(v)


def mc_choice(r: Record) -> str | None:
    """The letter a record chose: its `choice` (option scoring) or parsed from `pred`."""
    if r.get("choice"):
        return str(r["choice"])
    return extract_choice(r.get("pred") or "", r.get("options") or ())


def by_category(records: Sequence[Record], correct: Sequence[bool], key: str = "category"
                 ) -> dict[str, float]:
    tot: collections.Counter = collections.Counter()
    hit: collections.Counter = collections.Counter()
    for r, c in zip(records, correct):
        cat = category(r, key)
        tot[cat] += 1
        hit[cat] += int(c)
    return {k: pct(hit[k], tot[k]) for k in sorted(tot)}


# --------------------------------------------------------------------------------------------
# Per-benchmark metrics.
# --------------------------------------------------------------------------------------------
def binary_metrics(preds: Sequence[str], labels: Sequence[str], positive: str = "yes"
                   ) -> dict[str, float]:
    """accuracy / precision / recall / F1 / yes-ratio in percent (positive class `positive`)."""
    tp = sum(p == positive and y == positive for p, y in zip(preds, labels))
    fp = sum(p == positive and y != positive for p, y in zip(preds, labels))
    tn = sum(p != positive and y != positive for p, y in zip(preds, labels))
    fn = sum(p != positive and y == positive for p, y in zip(preds, labels))
    n = len(labels)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": pct(tp + tn, n), "precision": 100 * precision,
            "recall": 100 * recall, "f1": 100 * f1, "yes_ratio": pct(tp + fp, n),
            "tp": tp, "fp": fp, "tn": tn, "fn": fn, "n": n}


def mc_metrics(records: Iterable[Record]) -> dict[str, Any]:
    """Option-letter accuracy (+ per category, + how many answers had no parsable letter)."""
    recs, left_out = scored(records)
    choices = [mc_choice(r) for r in recs]
    correct = [c is not None and c == r["answer"] for c, r in zip(choices, recs)]
    acc = pct(sum(correct), len(recs))
    return {"score": acc, "accuracy": acc, "n": len(recs), **left_out,
            "unparsed": sum(c is None for c in choices),
            "by_category": by_category(recs, correct)}




def mean_metric(records: Iterable[Record], per_record, **extra: Any) -> dict[str, Any]:
    """`score` = 100 x the mean of `per_record(record)` (each in [0, 1]) over scorable records,
    with per-category means."""
    recs, left_out = scored(records)
    vals = [float(per_record(r)) for r in recs]
    acc = 100.0 * sum(vals) / len(vals) if vals else 0.0
    tot: collections.Counter = collections.Counter()
    hit: collections.Counter = collections.Counter()
    for r, v in zip(recs, vals):
        tot[category(r)] += 1
        hit[category(r)] += v
    return {"score": acc, "accuracy": acc, "n": len(recs), **left_out,
            "by_category": {k: pct(hit[k], tot[k]) for k in sorted(tot)}, **extra}


# --------------------------------------------------------------------------------------------
# ANLS (InfoVQA, DocVQA).
# --------------------------------------------------------------------------------------------
ANLS_THRESHOLD = 0.5


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(pred: str, gt_answers: Sequence[str], threshold: float = ANLS_THRESHOLD) -> float:
    """ANLS of one question in [0, 1] (the official InfographicVQA / DocVQA evaluation, also
    lmms-eval's `anls`): both strings stripped, lower-cased and whitespace-collapsed; the
    normalized distance is dist / max(len); the best answer's similarity 1 - NL counts only
    when it is >= `threshold` (0.5), else 0."""
    if not gt_answers:
        raise ValueError("ANLS needs the reference answers")
    det = " ".join(str(pred).strip().lower().split())
    dists = []
    for gt in gt_answers:
        g = " ".join(str(gt).strip().lower().split())
        length = max(len(g), len(det))
        dists.append(0.0 if length == 0 else levenshtein(g, det) / length)
    sim = 1.0 - min(dists)
    return 0.0 if sim < threshold else sim


# --------------------------------------------------------------------------------------------
# Dispatch through the benchmark registry.
# --------------------------------------------------------------------------------------------
def compute_metrics(benchmark: str, records: Iterable[Record]) -> dict[str, Any]:
    """The benchmark's metrics from prediction records; `["score"]` is the headline number."""
    from covipal_jax.eval import benchmarks  # noqa: PLC0415  (the registry imports us)

    return benchmarks.get(benchmark).score(list(records))


def headline_score(benchmark: str, metrics: Mapping[str, Any], mme: str = "total") -> float:
    """The number a results table shows. `mme="perception"` gives MME-P (CoViPAL's Table 1
    most likely and VisPruner/CDPruner), `"total"` perception + cognition (VisionZip/DART)."""
    from covipal_jax.eval import benchmarks  # noqa: PLC0415

    if benchmarks.canonical_name(benchmark) == "mme":
        return float(metrics[mme])
    return float(metrics["score"])
