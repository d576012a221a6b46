"""A checkpoint's own chat template (jinja), rendered exactly as transformers renders it.

Where it is read from, first found (transformers' order for a LLaVA processor, then its
tokenizer): `chat_template.jinja`, `chat_template.json` (`{"chat_template": str}`),
`tokenizer_config.json` `chat_template` (a string, or a list of `{"name", "template"}` of which
`default` is used). Rendering: jinja2's `ImmutableSandboxedEnvironment(trim_blocks=True,
lstrip_blocks=True)` with the loop-controls extension, a no-op `{% generation %}` block, the
globals `raise_exception`, `strftime_now`, `dict` and `namespace` and a non-escaping `tojson`
(transformers' `utils/chat_template_utils.py`), called with `messages`, `tools=None`,
`documents=None`, `add_generation_prompt` and the checkpoint's special-token strings
(`bos_token`, `eos_token`, ...).

A single turn is `[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]`
(processor templates; a template written for string contents gets `"<image>\\n" + q`).
`JinjaTemplate` has the interface of `text.ChatTemplate` (`prompt`, `answer`, `answer_prefix`,
`end`, `stop_ids`), the training answer being what the template renders for an assistant turn,
ended by the end-of-turn token it writes (or EOS when it writes none).
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import json
from typing import Any

from etils import epath

IMAGE_TOKEN = "<image>"
FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")
_PROBE = "\x1fCOVIPAL_ANSWER\x1f"


@functools.lru_cache(maxsize=16)
def _compile(text: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` renders its body (assistant-mask marker)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body
                                          ).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    env.globals["dict"] = dict
    env.globals["namespace"] = jinja2.utils.Namespace
    return env.from_string(text)


class _PromptText:
    """What both template kinds derive from `prompt`, `answer_prefix` and `end`."""

    def answer(self, answer: str) -> str:
        """The text after the prompt for a training example (end token included)."""
        return self.answer_prefix + answer + self.end

    def __call__(self, question: str, answer: str | None = None, *, image: bool = True) -> str:
        text = self.prompt(question, image=image)
        return text if answer is None else text + self.answer(answer)

    def stop_ids(self, tokenizer) -> tuple[int, ...]:
        """Token ids that end generation: EOS and the template's end token."""
        ids = [tokenizer.eos_id]
        end = tokenizer.token_to_id(self.end)
        if end is not None and end not in ids:
            ids.append(end)
        return tuple(ids)


class JinjaTemplate(_PromptText):
    """A jinja chat template with the single-turn interface of `text.ChatTemplate`.

    source: where it was read (shown to the user); special_tokens: {"bos_token": "<s>", ...}.
    """

    def __init__(self, text: str, *, source: str = "<string>",
                 special_tokens: dict[str, str] | None = None):
        self.text = text
        self.source = source
        self.name = f"checkpoint ({source})"
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self._template = _compile(text)
        self._list_content = self._accepts_content_lists()
        user = self._messages("q", True)
        prompt = self.render(user, add_generation_prompt=True)
        turn = self.render(user, add_generation_prompt=False)
        full = self.render(user + [self._assistant(_PROBE)], add_generation_prompt=False)
        if full.startswith(prompt) and _PROBE in full[len(prompt):]:
            rest = full[len(prompt):]
            self.answer_prefix = rest[:rest.index(_PROBE)]
        elif (full.startswith(turn) and _PROBE in full[len(turn):] and prompt.startswith(turn)
              and full[len(turn):].split(_PROBE)[0].strip() == prompt[len(turn):].strip()):
            # The assistant header differs from the generation cue in whitespace only
            # (llava-hf OneVision: "<|im_start|>assistant \n" vs "<|im_start|>assistant\n"):
            # the answer follows the cue directly.
            rest = full[len(turn):]
            self.answer_prefix = ""
        else:
            raise ValueError(f"chat template {source}: an assistant turn does not continue "
                             "the generation prompt; it cannot be used for single-turn VQA")
        after = rest[rest.index(_PROBE) + len(_PROBE):].strip()
        eos = self.special_tokens.get("eos_token")
        self.end = after.split()[0] if after else (eos or "")
        if not self.end:
            raise ValueError(f"chat template {source}: no end-of-turn token and no eos_token")
        bos = self.special_tokens.get("bos_token")
        self.includes_bos = bool(bos) and prompt.startswith(bos)

    # ------------------------------------------------------------------ rendering
    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool) -> str:
        """The template applied to `messages` (transformers' `apply_chat_template(...,
        tokenize=False)`)."""
        return self._template.render(messages=messages, tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt,
                                     **self.special_tokens)

    def _accepts_content_lists(self) -> bool:
        msgs = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": _PROBE}]}]
        try:
            out = self.render(msgs, add_generation_prompt=True)
        except Exception:   # noqa: BLE001 - a template for string contents fails on lists
            return False
        return _PROBE in out

    def _messages(self, question: str, image: bool) -> list[dict[str, Any]]:
        with_image = image and IMAGE_TOKEN not in question
        if self._list_content:
            content = ([{"type": "image"}] if with_image else []) + [
                {"type": "text", "text": question}]
        else:
            content = (IMAGE_TOKEN + "\n" if with_image else "") + question
        return [{"role": "user", "content": content}]

    def _assistant(self, answer: str) -> dict[str, Any]:
        content = [{"type": "text", "text": answer}] if self._list_content else answer
        return {"role": "assistant", "content": content}

    # ------------------------------------------------------------------ ChatTemplate interface
    def prompt(self, question: str, *, image: bool = True) -> str:
        """The user turn + generation cue. A question containing "<image>" is used as is."""
        return self.render(self._messages(question, image), add_generation_prompt=True)


    def __repr__(self) -> str:
        return f"JinjaTemplate(source={self.source!r})"


def _read_json(path: epath.Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _token_str(v: Any) -> str | None:
    return v.get("content") if isinstance(v, dict) else (None if v is None else str(v))


def special_tokens(directory: str | epath.PathLike) -> dict[str, str]:
    """{"bos_token": ..., "eos_token": ..., ...} from tokenizer_config / special_tokens_map."""
    d = epath.Path(directory)
    out: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (d / name).exists():
            cfg = _read_json(d / name)
            for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
                tok = _token_str(cfg.get(key))
                if tok is not None:
                    out[key] = tok
    return out


def find(directory: str | epath.PathLike) -> tuple[str, str] | None:
    """(template text, source file) of a checkpoint directory, or None when it has none."""
    d = epath.Path(directory)
    jinja = d / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text(), str(jinja)
    js = d / "chat_template.json"
    if js.exists():
        t = _read_json(js).get("chat_template")
        if isinstance(t, str) and t:
            return t, str(js)
    tc = d / "tokenizer_config.json"
    if tc.exists():
        t = _read_json(tc).get("chat_template")
        if isinstance(t, list):   # named templates: the default one
            t = next((x.get("template") for x in t if x.get("name") == "default"), None)
        if isinstance(t, str) and t:
            return t, str(tc)
    return None


def from_dir(directory: str | epath.PathLike) -> JinjaTemplate | None:
    """The checkpoint's chat template, or None when the directory has none."""
    found = find(directory)
    if found is None:
        return None
    text, source = found
    return JinjaTemplate(text, source=source, special_tokens=special_tokens(directory))


# ----------------------------------------------------------------------------- built-ins
LLAVA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the user's "
                "questions.")
QWEN_SYSTEM = "You are a helpful assistant."


@dataclasses.dataclass(frozen=True)
class ChatTemplate(_PromptText):
    """Single-turn prompt format: `prefix + [<image> + image_sep] + question + suffix`.

    The training target is `answer_prefix + answer + end`; `end` is the end-of-turn token string
    (a single token of the model's vocabulary; generation stops there or at EOS).
    """

    name: str
    prefix: str
    image_sep: str
    suffix: str
    answer_prefix: str
    end: str

    def prompt(self, question: str, *, image: bool = True) -> str:
        """Prompt ending with the generation cue. A question that already contains "<image>" is
        used as is; otherwise "<image>" + image_sep is put in front when `image`."""
        if IMAGE_TOKEN not in question and image:
            question = IMAGE_TOKEN + self.image_sep + question
        return self.prefix + question + self.suffix



# llava-hf/llava-1.5-*-hf chat_template.json: "USER: <image>\n{q} ASSISTANT:", no system prompt
# (what transformers and lmms-eval's llava_hf feed the checkpoint).
llava15 = ChatTemplate(name="llava15", prefix="USER: ", image_sep="\n",
                       suffix=" ASSISTANT:", answer_prefix=" ", end="</s>")
# The original LLaVA-1.5 conv_vicuna_v1 (SeparatorStyle.TWO, sep=" ", sep2="</s>"): the same
# with LLaVA's system prompt in front (the original repository's evaluation prompts).
llava15_vicuna = ChatTemplate(name="llava15_vicuna", prefix=LLAVA_SYSTEM + " USER: ",
                              image_sep="\n", suffix=" ASSISTANT:", answer_prefix=" ",
                              end="</s>")
# LLaVA-OneVision conv_qwen (ChatML, SeparatorStyle.CHATML, sep="<|im_end|>").
qwen2 = ChatTemplate(
    name="qwen2", prefix=f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\n",
    image_sep="\n", suffix="<|im_end|>\n<|im_start|>assistant\n", answer_prefix="",
    end="<|im_end|>")
# Tiny / synthetic model: short, all in BuiltinTokenizer's fixed vocabulary.
plain = ChatTemplate(name="plain", prefix="", image_sep=" ", suffix=" ANSWER:",
                     answer_prefix=" ", end="</s>")

TEMPLATES: dict[str, ChatTemplate] = {"llava15": llava15, "llava15_vicuna": llava15_vicuna,
                                      "qwen2": qwen2, "plain": plain}
BUILTIN_PREFIX = "builtin:"


def get_template(template: str | ChatTemplate | JinjaTemplate | None,
                 tokenizer: Any = None):
    """The template to apply: None (prompts used as they are), a template object as is, or a
    name. A name means the tokenizer's checkpoint template when it has one, else the built-in
    `TEMPLATES[name]`; `"builtin:<name>"` always the built-in one."""
    if template is None or isinstance(template, (ChatTemplate, JinjaTemplate)):
        return template
    forced = template.startswith(BUILTIN_PREFIX)
    name = template.removeprefix(BUILTIN_PREFIX)
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; one of {sorted(TEMPLATES)} "
                         f"(or {BUILTIN_PREFIX}<name>)")
    own = getattr(tokenizer, "chat_template", None)
    return own if own is not None and not forced else TEMPLATES[name]


def describe_template(template, tokenizer: Any = None) -> str:
    """Which template `get_template(template, tokenizer)` uses, in words (for logs, outputs)."""
    t = get_template(template, tokenizer)
    if t is None:
        return "none (raw prompts)"
    if isinstance(t, JinjaTemplate):
        return f"the checkpoint's chat template ({t.source})"
    return f"built-in {t.name!r}"
