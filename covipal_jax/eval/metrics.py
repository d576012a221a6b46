"""Benchmark metrics with the official definitions (answer parsing included).

All accuracies are percentages (0-100), as papers report them. Per benchmark:

* GQA: exact match after normalisation (lower case, punctuation removed, trailing period,
  whitespace collapsed), as lmms-eval's `exact_match(ignore_case, ignore_punctuation)` and
  LLaVA's `convert_gqa_for_eval` (`rstrip('.').lower()`).
* MME: the official `eval_tool/calculation.py`: the answer is "yes"/"no" when it is exactly
  that, else the first 4 characters are searched for "yes", then "no", else "other". Per task
  `acc` = % questions correct, `acc+` = % images with both questions correct,
  score = acc + acc+. Perception = sum over the 10 perception tasks, cognition = sum over the
  4 cognition tasks, total = both (max 2800).
* POPE: LLaVA's `eval_pope.py`: keep the first sentence, drop commas, "no" if the words contain
  "No"/"no"/"not", else "yes". Positive = "yes". accuracy, precision, recall, F1, yes-ratio per
  split; the headline is the mean F1 over the splits.
* TextVQA: VQA accuracy with EvalAI answer normalisation (MMF's `EvalAIAnswerProcessor`):
  for each of the 10 leave-one-out subsets of the human answers, min(#matches / 3, 1), averaged.
* ScienceQA-IMG, SEED-Bench (image), AI2D, MMStar: option-letter accuracy (+ per category).
* MMBench: CircularEval accuracy (a question counts only if every rotation of its options is
  answered correctly) and plain accuracy (original option order only).

Records are the JSON lines the harness writes: `{"qid", "pred", "answer", "answers", "options",
"meta", ["choice"], ["error"]}`; `choice` (a letter) takes precedence over parsing `pred` for
multiple-choice benchmarks (it is set when the predictor scored the options).
"""
from __future__ import annotations

import collections
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from covipal_jax.eval.benchmarks import (LETTERS, MME_COGNITION, MME_PERCEPTION, MULTIPLE_CHOICE,
                                         canonical_name)

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
def _pct(num: float, den: float) -> float:
    return 100.0 * num / den if den else 0.0


def _scored(records: Iterable[Record]) -> tuple[list[Record], dict[str, int]]:
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


def _category(r: Record, key: str = "category") -> str:
    v = (r.get("meta") or {}).get(key)
    return "unknown" if v is None else str(v)


def mc_choice(r: Record) -> str | None:
    """The letter a record chose: its `choice` (option scoring) or parsed from `pred`."""
    if r.get("choice"):
        return str(r["choice"])
    return extract_choice(r.get("pred") or "", r.get("options") or ())


def _by_category(records: Sequence[Record], correct: Sequence[bool], key: str = "category"
                 ) -> dict[str, float]:
    tot: collections.Counter = collections.Counter()
    hit: collections.Counter = collections.Counter()
    for r, c in zip(records, correct):
        cat = _category(r, key)
        tot[cat] += 1
        hit[cat] += int(c)
    return {k: _pct(hit[k], tot[k]) for k in sorted(tot)}


# --------------------------------------------------------------------------------------------
# Per-benchmark metrics.
# --------------------------------------------------------------------------------------------
def gqa_metrics(records: Iterable[Record]) -> dict[str, Any]:
    recs, left_out = _scored(records)
    correct = [normalize_short_answer(r.get("pred") or "") == normalize_short_answer(
        r["answer"]) for r in recs]
    acc = _pct(sum(correct), len(recs))
    return {"score": acc, "accuracy": acc, "n": len(recs), **left_out,
            "by_structural": _by_category(recs, correct, "structural")}


def mme_metrics(records: Iterable[Record]) -> dict[str, Any]:
    recs, left_out = _scored(records)
    tasks: dict[str, list[bool]] = collections.defaultdict(list)
    images: dict[str, dict[str, list[bool]]] = collections.defaultdict(
        lambda: collections.defaultdict(list))
    for r in recs:
        task = _category(r)
        ok = parse_mme_answer(r.get("pred") or "") == str(r["answer"]).strip().lower()
        tasks[task].append(ok)
        images[task][(r.get("meta") or {}).get("image_key", r["qid"])].append(ok)
    per_task = {}
    for task, oks in sorted(tasks.items()):
        acc = _pct(sum(oks), len(oks))
        acc_plus = _pct(sum(all(v) for v in images[task].values()), len(images[task]))
        per_task[task] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus,
                          "n": len(oks), "n_images": len(images[task])}
    lower = {t.lower(): s["score"] for t, s in per_task.items()}
    perception = sum(lower.get(t.lower(), 0.0) for t in MME_PERCEPTION)
    cognition = sum(lower.get(t.lower(), 0.0) for t in MME_COGNITION)
    known = {t.lower() for t in MME_PERCEPTION + MME_COGNITION}
    return {
        "score": perception + cognition, "total": perception + cognition,
        "perception": perception, "cognition": cognition, "tasks": per_task,
        "missing_tasks": [t for t in MME_PERCEPTION + MME_COGNITION if t.lower() not in lower],
        "unknown_tasks": sorted(t for t in per_task if t.lower() not in known),
        "n": len(recs), **left_out,
    }


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
    return {"accuracy": _pct(tp + tn, n), "precision": 100 * precision,
            "recall": 100 * recall, "f1": 100 * f1, "yes_ratio": _pct(tp + fp, n),
            "tp": tp, "fp": fp, "tn": tn, "fn": fn, "n": n}


def pope_metrics(records: Iterable[Record]) -> dict[str, Any]:
    recs, left_out = _scored(records)
    by_split: dict[str, tuple[list[str], list[str]]] = collections.defaultdict(
        lambda: ([], []))
    for r in recs:
        preds, labels = by_split[_category(r)]
        preds.append(parse_pope_answer(r.get("pred") or ""))
        labels.append(str(r["answer"]).strip().lower())
    splits = {s: binary_metrics(p, y) for s, (p, y) in sorted(by_split.items())}
    mean = {k: sum(m[k] for m in splits.values()) / len(splits) if splits else 0.0
            for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")}
    return {"score": mean["f1"], **mean, "splits": splits, "n": len(recs),
            **left_out}


def textvqa_metrics(records: Iterable[Record]) -> dict[str, Any]:
    recs, left_out = _scored(records)
    accs = [vqa_accuracy(r.get("pred") or "", r.get("answers") or [r["answer"]]) for r in recs]
    acc = 100.0 * sum(accs) / len(accs) if accs else 0.0
    return {"score": acc, "accuracy": acc, "n": len(recs), **left_out}


def mc_metrics(records: Iterable[Record]) -> dict[str, Any]:
    """Option-letter accuracy (+ per category, + how many answers had no parsable letter)."""
    recs, left_out = _scored(records)
    choices = [mc_choice(r) for r in recs]
    correct = [c is not None and c == r["answer"] for c, r in zip(choices, recs)]
    acc = _pct(sum(correct), len(recs))
    return {"score": acc, "accuracy": acc, "n": len(recs), **left_out,
            "unparsed": sum(c is None for c in choices),
            "by_category": _by_category(recs, correct)}


def mmbench_metrics(records: Iterable[Record]) -> dict[str, Any]:
    """CircularEval (all rotations right) and plain (rotation 0) accuracy, per category too."""
    recs, left_out = _scored(records)
    groups: dict[Any, list[bool]] = collections.defaultdict(list)
    first: dict[Any, Record] = {}
    plain_recs, plain_ok = [], []
    for r in recs:
        meta = r.get("meta") or {}
        base = meta.get("base_index", r["qid"])
        ok = mc_choice(r) == r["answer"]
        groups[base].append(ok)
        first.setdefault(base, r)
        if meta.get("rotation", 0) == 0:
            plain_recs.append(r)
            plain_ok.append(ok)
    bases = sorted(groups, key=str)
    circ_ok = [all(groups[b]) for b in bases]
    circ = _pct(sum(circ_ok), len(bases))
    return {
        "score": circ, "circular": circ, "plain": _pct(sum(plain_ok), len(plain_recs)),
        "n_questions": len(bases), "n": len(recs), **left_out,
        "by_category": _by_category([first[b] for b in bases], circ_ok),
        "by_l2_category": _by_category([first[b] for b in bases], circ_ok, "l2_category"),
    }


METRICS = {
    "gqa": gqa_metrics,
    "mme": mme_metrics,
    "pope": pope_metrics,
    "textvqa": textvqa_metrics,
    "scienceqa": mc_metrics,
    "mmbench": mmbench_metrics,
    "seed": mc_metrics,
    "ai2d": mc_metrics,
    "mmstar": mc_metrics,
}
assert set(METRICS) >= MULTIPLE_CHOICE


def compute_metrics(benchmark: str, records: Iterable[Record]) -> dict[str, Any]:
    """The benchmark's metrics from prediction records; `["score"]` is the headline number."""
    return METRICS[canonical_name(benchmark)](list(records))


def headline_score(benchmark: str, metrics: Mapping[str, Any], mme: str = "total") -> float:
    """The number a results table shows. `mme="perception"` gives MME-P (CoViPAL's Table 1
    most likely and VisPruner/CDPruner), `"total"` perception + cognition (VisionZip/DART)."""
    if canonical_name(benchmark) == "mme":
        return float(metrics[mme])
    return float(metrics["score"])
