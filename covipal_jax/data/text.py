"""Tokenizers, chat templates and prompt bucketing (left padding, one image placeholder per prompt).

- `Tokenizer`: the protocol the rest of the package uses. `HFTokenizer` wraps a checkpoint's
  `tokenizer.json` with the `tokenizers` library (no transformers at runtime); `BuiltinTokenizer`
  is a deterministic word-level tokenizer defined in code (tiny model, synthetic demo).
- Chat templates: a checkpoint's own jinja template (`chat_template.py`, read by
  `HFTokenizer.from_dir` and used whenever the tokenizer has one), else a built-in `ChatTemplate`:
  `llava15` (llava-hf's LLaVA-1.5 template), `llava15_vicuna` (original LLaVA-1.5
  `conv_vicuna_v1`, with its system prompt), `qwen2` (ChatML, LLaVA-OneVision's `conv_qwen`),
  `plain` (tiny/synthetic). Registry `TEMPLATES`; `get_template(name, tokenizer)` resolves.
- `encode_prompts`: template + tokenize a batch, pick the smallest bucket that fits, left-pad:
  `ids i32[B, T]`, `mask bool[B, T]`.
- `encode_example`: one training example (prompt + answer), left-padded to `max_len`, with
  `loss_mask bool[max_len]` on the answer tokens (end token included).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
from absl import logging as absl_logging

from covipal_jax.data import chat_template as chat_template_lib
from covipal_jax.data.chat_template import (  # noqa: F401 (re-exported)
    BUILTIN_PREFIX, IMAGE_TOKEN, LLAVA_SYSTEM, QWEN_SYSTEM, TEMPLATES, ChatTemplate,
    describe_template, get_template, llava15, llava15_vicuna, plain, qwen2)

DEFAULT_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048)


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline, trainer and generator need from a tokenizer."""

    bos_id: int | None
    eos_id: int
    pad_id: int
    image_token_id: int
    vocab_size: int
    add_bos_default: bool  # whether prompts of this model start with BOS

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]: ...

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str: ...

    def token_to_id(self, token: str) -> int | None: ...


# ================================================================================================
# Hugging Face tokenizer.json
# ================================================================================================
def _token_str(v: Any) -> str | None:
    """A special-token entry of tokenizer_config.json: str, {"content": str}, or null."""
    if v is None:
        return None
    if isinstance(v, dict):
        return v.get("content")
    return str(v)


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _first_int(*vals: Any) -> int | None:
    for v in vals:
        if isinstance(v, list):
            v = v[0] if v else None
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


class HFTokenizer:
    """A checkpoint's fast tokenizer (`tokenizer.json`) through the `tokenizers` library.

    Special ids come from `tokenizer_config.json` / `special_tokens_map.json` (token strings),
    falling back to `config.json` ids. The image placeholder is "<image>": its vocab id, checked
    against `config.json` `image_token_index` / `image_token_id` when present; when the vocab has
    no "<image>" (original LLaVA checkpoints, which splice at a -200 sentinel), it is added as a
    special token at id `vocab_size`.
    """

    def __init__(self, tok, *, bos_id: int | None, eos_id: int, pad_id: int,
                 image_token_id: int, add_bos_default: bool,
                 chat_template: chat_template_lib.JinjaTemplate | None = None):
        self._tok = tok
        self.chat_template = chat_template  # the checkpoint's own template (or None)
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.image_token_id = image_token_id
        self.add_bos_default = add_bos_default

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self):
        """The underlying `tokenizers.Tokenizer`."""
        return self._tok

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> HFTokenizer:
        import tokenizers

        path = os.fspath(path)
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tj):
            raise FileNotFoundError(
                f"no tokenizer in {path!r}: expected tokenizer.json (a fast tokenizer; convert a "
                "sentencepiece-only checkpoint with transformers' save_pretrained first)")
        tok = tokenizers.Tokenizer.from_file(tj)
        tcfg = _read_json(os.path.join(path, "tokenizer_config.json"))
        smap = _read_json(os.path.join(path, "special_tokens_map.json"))
        mcfg = _read_json(os.path.join(path, "config.json"))
        text_cfg = mcfg.get("text_config") or {}

        def special(name: str) -> int | None:
            s = _token_str(tcfg.get(name)) if name in tcfg else _token_str(smap.get(name))
            return None if s is None else tok.token_to_id(s)

        bos = special("bos_token")
        if bos is None and "bos_token" not in tcfg and "bos_token" not in smap:
            bos = _first_int(mcfg.get("bos_token_id"), text_cfg.get("bos_token_id"))
        eos = special("eos_token")
        if eos is None:
            eos = _first_int(mcfg.get("eos_token_id"), text_cfg.get("eos_token_id"))
        if eos is None:
            raise ValueError(
                f"{path!r}: cannot determine the EOS token (no eos_token / eos_token_id)")
        pad = special("pad_token")
        if pad is None:
            pad = _first_int(mcfg.get("pad_token_id"), text_cfg.get("pad_token_id"))
        if pad is None:
            pad = special("unk_token")
        if pad is None:
            pad = eos  # padded positions are masked out: any valid id works

        cfg_image = _first_int(mcfg.get("image_token_index"), mcfg.get("image_token_id"))
        if cfg_image is not None and cfg_image < 0:
            cfg_image = None  # original LLaVA's IMAGE_TOKEN_INDEX = -200 sentinel
        image = tok.token_to_id(IMAGE_TOKEN)
        if image is None:
            tok.add_special_tokens([IMAGE_TOKEN])
            image = tok.token_to_id(IMAGE_TOKEN)
        if cfg_image is not None and cfg_image != image:
            raise ValueError(
                f"{path!r}: config.json image token index {cfg_image} != tokenizer id {image} of "
                f"{IMAGE_TOKEN!r}")

        # BOS by default when the post-processor adds it or tokenizer_config asks for it.
        with_specials = tok.encode("a", add_special_tokens=True).ids
        add_bos = bool(bos is not None and (
            tcfg.get("add_bos_token", False) or (with_specials and with_specials[0] == bos)))
        template = chat_template_lib.from_dir(path)
        absl_logging.info("%s: %s", path, f"chat template from {template.source}" if template
                          else "no chat template (the config's built-in template is used)")
        return cls(tok, bos_id=bos, eos_id=eos, pad_id=pad, image_token_id=image,
                   add_bos_default=add_bos, chat_template=template)

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos:
            if self.bos_id is None:
                raise ValueError("add_bos=True but this tokenizer has no BOS token")
            ids = [self.bos_id] + ids
        return list(ids)

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


# ================================================================================================
# Built-in word-level tokenizer
# ================================================================================================
BUILTIN_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN, "<|im_start|>", "<|im_end|>")
BUILTIN_WORDS = ("USER", "ASSISTANT", "ANSWER", "system", "user", "assistant")
BUILTIN_PUNCT = (".", ",", "?", "!", ":", ";", "'", '"', "-", "(", ")", "\n")
_NO_SPACE_BEFORE = frozenset({".", ",", "?", "!", ":", ";", ")", "'", "-", "\n", "</s>",
                              "<|im_end|>"})
_NO_SPACE_AFTER = frozenset({"(", "'", "-", "\n", "<s>", "<|im_start|>"})
_BUILTIN_FORMAT = "covipal_builtin_tokenizer"
BUILTIN_FILENAME = "tokenizer_builtin.json"


class BuiltinTokenizer:
    """Deterministic word-level tokenizer defined in code (no files needed).

    Vocabulary, in id order: `BUILTIN_SPECIALS` (`<pad>`=0, `<s>`=1, `</s>`=2, `<unk>`=3,
    `<image>`=4, `<|im_start|>`, `<|im_end|>`), the chat role words, punctuation (each mark is its
    own token; "\\n" too), then `words` in the given order (duplicates dropped). Case-sensitive;
    out-of-vocab words map to `<unk>`.

    `decode(encode(s)) == s` for in-vocab text in canonical form: single spaces between words,
    punctuation attached to the word before it (and `'`, `-`, `(` , "\\n" to the word after).
    """

    chat_template = None   # built-in templates only

    def __init__(self, words: Iterable[str] = ()):
        vocab: list[str] = []
        seen: set[str] = set()
        for w in (*BUILTIN_SPECIALS, *BUILTIN_WORDS, *BUILTIN_PUNCT, *words):
            if w in seen:
                continue
            if w not in BUILTIN_SPECIALS and w not in BUILTIN_PUNCT and not re.fullmatch(r"\w+", w):
                raise ValueError(f"BuiltinTokenizer words must match \\w+, got {w!r}")
            seen.add(w)
            vocab.append(w)
        self._vocab = tuple(vocab)
        self._ids = {w: i for i, w in enumerate(vocab)}
        specials = sorted(BUILTIN_SPECIALS, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, specials)) + r"|\n|\w+|[^\w\s]")
        self.pad_id = self._ids["<pad>"]
        self.bos_id = self._ids["<s>"]
        self.eos_id = self._ids["</s>"]
        self.unk_id = self._ids["<unk>"]
        self.image_token_id = self._ids[IMAGE_TOKEN]
        self.add_bos_default = True
        self._special_ids = frozenset(self._ids[s] for s in BUILTIN_SPECIALS)

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> BuiltinTokenizer:
        """Vocabulary = the words of `texts`, in order of first appearance."""
        pat = re.compile(r"\w+")
        words: list[str] = []
        for t in texts:
            words.extend(pat.findall(t))
        return cls(words)

    @property
    def vocab(self) -> tuple[str, ...]:
        return self._vocab

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    def tokenize(self, text: str) -> list[str]:
        return self._pattern.findall(text)

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        ids = [self._ids.get(p, self.unk_id) for p in self.tokenize(text)]
        return [self.bos_id] + ids if add_bos else ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        out: list[str] = []
        prev: str | None = None
        for i in ids:
            i = int(i)
            if skip_special_tokens and i in self._special_ids:
                continue
            piece = self._vocab[i] if 0 <= i < len(self._vocab) else "<unk>"
            if prev is not None and piece not in _NO_SPACE_BEFORE and prev not in _NO_SPACE_AFTER:
                out.append(" ")
            out.append(piece)
            prev = piece
        return "".join(out)

    def token_to_id(self, token: str) -> int | None:
        return self._ids.get(token)

    def save(self, path: str | os.PathLike) -> str:
        """Write the vocabulary as json; `path` is a file or a directory. Returns the file."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, BUILTIN_FILENAME)
        with open(path, "w") as f:
            json.dump({"format": _BUILTIN_FORMAT, "version": 1, "vocab": list(self._vocab)}, f,
                      indent=0, ensure_ascii=False)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> BuiltinTokenizer:
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, BUILTIN_FILENAME)
        d = _read_json(path)
        if d.get("format") != _BUILTIN_FORMAT:
            raise ValueError(f"{path!r} is not a saved BuiltinTokenizer")
        vocab = d["vocab"]
        n_fixed = len(BUILTIN_SPECIALS) + len(BUILTIN_WORDS) + len(BUILTIN_PUNCT)
        tok = cls(vocab[n_fixed:])
        if list(tok.vocab) != list(vocab):
            raise ValueError(f"{path!r}: vocabulary does not match this BuiltinTokenizer version")
        return tok

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BuiltinTokenizer) and self._vocab == other._vocab

    def __hash__(self) -> int:
        return hash(self._vocab)


def load_tokenizer(path: str | os.PathLike) -> HFTokenizer | BuiltinTokenizer:
    """A dir with tokenizer.json -> HFTokenizer; a saved BuiltinTokenizer (file or dir) -> it."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            return HFTokenizer.from_dir(path)
        if os.path.isfile(os.path.join(path, BUILTIN_FILENAME)):
            return BuiltinTokenizer.load(path)
        raise FileNotFoundError(f"no tokenizer in {path!r}: expected tokenizer.json or "
                                f"{BUILTIN_FILENAME}")
    if os.path.isfile(path):
        return BuiltinTokenizer.load(path)
    raise FileNotFoundError(f"no tokenizer at {path!r}")


# ================================================================================================
# Encoding, bucketing, left padding
# ================================================================================================
def pad_left(seqs: Sequence[Sequence[int]], length: int,
             pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad to `length`: `ids i32[B, length]`, `mask bool[B, length]` (True on real tokens)."""
    ids = np.full((len(seqs), length), pad_id, np.int32)
    mask = np.zeros((len(seqs), length), bool)
    for b, s in enumerate(seqs):
        if len(s) > length:
            raise ValueError(f"sequence {b} has {len(s)} tokens > length {length}")
        if len(s):
            ids[b, length - len(s):] = s
            mask[b, length - len(s):] = True
    return ids, mask


def pick_bucket(length: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= length; ValueError when none fits."""
    fits = [b for b in buckets if b >= length]
    if not fits:
        raise ValueError(f"{length} tokens do not fit the largest bucket {max(buckets)}")
    return min(fits)


def _check_image(ids: Sequence[int], image_token_id: int, require_image: bool, where: str,
                 max_images: int = 1):
    n = sum(1 for i in ids if i == image_token_id)
    if n > max_images:
        raise ValueError(f"{where} has {n} image placeholders ({IMAGE_TOKEN!r}); at most "
                         f"{max_images} supported here")
    if n == 0 and require_image:
        raise ValueError(f"{where} has no image placeholder ({IMAGE_TOKEN!r})")


def _resolve_bos(tokenizer: Tokenizer, add_bos: bool | None, template=None) -> bool:
    """None -> the tokenizer's default, unless the template writes BOS itself."""
    if add_bos is None:
        return tokenizer.add_bos_default and not getattr(template, "includes_bos", False)
    return add_bos


def encode_prompts(tokenizer: Tokenizer, prompts: Sequence[str], *,
                   template: str | ChatTemplate | None = "plain",
                   buckets: Sequence[int] = DEFAULT_BUCKETS, add_bos: bool | None = None,
                   require_image: bool = True, max_images: int = 1
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Template + tokenize + left-pad a batch of questions to the smallest fitting bucket.

    template: a name (the tokenizer's checkpoint template if it has one, else the built-in
    `TEMPLATES[name]`; see `get_template`), a template object, or None for formatted prompts.
    add_bos: None -> `tokenizer.add_bos_default`.
    Returns `ids i32[B, T]`, `mask bool[B, T]` with `T = min(b in buckets, b >= longest)`.
    Raises ValueError for a prompt longer than the largest bucket, a prompt with no image
    placeholder (when `require_image`) or with more than `max_images` (several images per
    prompt: `inference.sampler.Sampler` with a list of images per prompt).
    """
    if isinstance(prompts, str):
        raise TypeError("encode_prompts takes a list of prompts, not one string")
    if not prompts:
        raise ValueError("encode_prompts: empty batch")
    tmpl = get_template(template, tokenizer)
    bos = _resolve_bos(tokenizer, add_bos, tmpl)
    seqs = []
    for i, p in enumerate(prompts):
        text = tmpl.prompt(p, image=require_image) if tmpl is not None else p
        ids = tokenizer.encode(text, add_bos=bos)
        _check_image(ids, tokenizer.image_token_id, require_image, f"prompt {i}", max_images)
        seqs.append(ids)
    longest = max(len(s) for s in seqs)
    if longest > max(buckets):
        i = int(np.argmax([len(s) for s in seqs]))
        raise ValueError(f"prompt {i} has {longest} tokens, longer than the largest bucket "
                         f"{max(buckets)}")
    return pad_left(seqs, pick_bucket(longest, buckets), tokenizer.pad_id)


def encode_example(tokenizer: Tokenizer, question: str, answer: str, *,
                   template: str | ChatTemplate = "plain", max_len: int,
                   add_bos: bool | None = None, require_image: bool = True,
                   max_images: int = 1) -> dict[str, np.ndarray] | None:
    """One training example: prompt + answer, left-padded to exactly `max_len`.

    Returns {"ids": i32[max_len], "mask": bool[max_len], "loss_mask": bool[max_len]} where
    `loss_mask` is True on the answer tokens (the targets, end token included; the trainer
    predicts ids[t] from position t - 1), or None when the example does not fit (callers count
    the skipped ones).

    The sequence is the tokenization of the whole text (as LLaVA's training preprocessing), so
    the prompt part equals `encode_prompts`' ids whenever the tokenizer does not merge across
    the prompt/answer boundary (true for the three templates: each prompt ends at ':' or '\\n');
    answer tokens are those after the common prefix with the prompt alone.
    """
    tmpl = get_template(template, tokenizer)
    bos = _resolve_bos(tokenizer, add_bos, tmpl)
    prompt = tmpl.prompt(question, image=require_image)
    p_ids = tokenizer.encode(prompt, add_bos=bos)
    f_ids = tokenizer.encode(prompt + tmpl.answer(answer), add_bos=bos)
    _check_image(f_ids, tokenizer.image_token_id, require_image, "example", max_images)
    n = 0
    for a, b in zip(p_ids, f_ids):
        if a != b:
            break
        n += 1
    n_answer = len(f_ids) - n
    end_id = tokenizer.token_to_id(tmpl.end)
    if end_id is None:
        raise ValueError(f"template {tmpl.name!r} end token {tmpl.end!r} is not in the vocabulary")
    if n_answer == 0 or f_ids[-1] != end_id:
        raise ValueError(f"answer {answer!r} did not tokenize to tokens ending with {tmpl.end!r}")
    if len(f_ids) > max_len:
        return None
    ids, mask = pad_left([f_ids], max_len, tokenizer.pad_id)
    loss_mask = np.zeros(max_len, bool)
    loss_mask[max_len - n_answer:] = True
    return {"ids": ids[0], "mask": mask[0], "loss_mask": loss_mask}
