"""Checkpoint chat templates (covipal_jax.data.chat_template) against transformers'
`apply_chat_template`, for llava-hf's LLaVA-1.5 and LLaVA-OneVision templates."""
from __future__ import annotations

import json

import pytest

from covipal_jax.data import chat_template as ct
from covipal_jax.data import text as tx

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

# llava-hf/llava-1.5-7b-hf chat_template.json (also transformers'
# tests/models/llava/test_processor_llava.py).
LLAVA15_HF = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() "
    "+ ': '}}{% endif %}{# Render all images first #}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text "
    "next #}{% if message['role'] != 'assistant' %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}{% "
    "for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation "
    "%}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}{% if "
    "add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
# llava-hf/llava-onevision-qwen2-7b-ov-hf chat_template.json (also transformers'
# tests/models/llava_onevision/test_processor_llava_onevision.py).
ONEVISION_HF = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}{# Render all images "
    "first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ "
    "'<image>' }}{% endfor %}{# Render all video then #}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}{# Render all text next "
    "#}{% if message['role'] != 'assistant' %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}{% endfor %}{% else %}{% "
    "for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation "
    "%}{{ '\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>'}}{% "
    "endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# A tokenizer-style template (string contents, BOS written by the template, raise_exception).
VICUNA_STR = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ raise_exception('no system prompt here') }}{% elif message['role'] == 'user' %}"
    "{{ 'USER: ' + message['content'] + ' ' }}{% else %}{{ 'ASSISTANT: ' + message['content'] "
    "+ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}"
    "{% endif %}")
QUESTIONS = ["What is shown in this image?", "How many cats?", "Look: <image> what is it?"]
ANSWER = "Two cats."


def _tokenizer(kind: str):
    """A small word-level fast tokenizer with the model family's special tokens."""
    from tokenizers import models, pre_tokenizers

    words = sorted({w for q in QUESTIONS + [ANSWER, "USER ASSISTANT user assistant"]
                    for w in q.replace("?", " ").replace(".", " ").replace(":", " ").split()})
    specials = (["<unk>", "<s>", "</s>", "<image>", "<pad>"] if kind == "llama" else
                ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"])
    vocab = {t: i for i, t in enumerate(specials + words + ["?", ".", ":", "\n"])}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.add_special_tokens(specials)
    if kind == "llama":
        return transformers.PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
            pad_token="<pad>")
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<unk>")


def _messages(q: str, answer: str | None = None):
    content = ([] if "<image>" in q else [{"type": "image"}]) + [{"type": "text", "text": q}]
    msgs = [{"role": "user", "content": content}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return msgs


def test_llava15_processor_template_matches_transformers(tmp_path):
    """A LlavaProcessor saved with llava-hf's template: same prompt text and ids."""
    from transformers import AutoProcessor, LlavaProcessor
    from transformers.models.clip.image_processing_clip import CLIPImageProcessor

    tok = _tokenizer("llama")
    proc = LlavaProcessor(image_processor=CLIPImageProcessor(), tokenizer=tok, patch_size=14,
                          vision_feature_select_strategy="default", chat_template=LLAVA15_HF)
    proc.save_pretrained(tmp_path)
    ref = AutoProcessor.from_pretrained(tmp_path)
    ours = ct.from_dir(tmp_path)
    assert ours is not None and ours.source.startswith(str(tmp_path))
    for q in QUESTIONS:
        want = ref.apply_chat_template(_messages(q), add_generation_prompt=True, tokenize=False)
        assert ours.prompt(q) == want
        full = ref.apply_chat_template(_messages(q, ANSWER), tokenize=False)
        assert ours(q, ANSWER) == full.rstrip(" ") + "</s>"   # + EOS, the training target
        # The fixed built-in equals llava-hf's template.
        assert tx.llava15(q) == want
    assert ours.end == "</s>" and ours.answer_prefix == " " and not ours.includes_bos
    # Through our tokenizer loader and encode_prompts: the config's name resolves to the
    # checkpoint's template; ids equal the processor's tokenizer with its default BOS.
    tok.save_pretrained(tmp_path)
    hf = tx.HFTokenizer.from_dir(tmp_path)
    assert hf.chat_template is not None
    assert "checkpoint" in tx.describe_template("llava15", hf)
    assert tx.describe_template("builtin:llava15", hf) == "built-in 'llava15'"
    ids, mask = tx.encode_prompts(hf, QUESTIONS[:2], template="llava15", buckets=(64,))
    for b, q in enumerate(QUESTIONS[:2]):
        want = ref.apply_chat_template(_messages(q), add_generation_prompt=True, tokenize=False)
        assert ids[b][mask[b]].tolist() == ref.tokenizer(want)["input_ids"]


def test_onevision_template_matches_transformers(tmp_path):
    tok = _tokenizer("qwen")
    tok.chat_template = ONEVISION_HF
    tok.save_pretrained(tmp_path)
    # transformers writes the template beside the tokenizer; also test the json form.
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = ct.from_dir(tmp_path)
    assert ours is not None
    for q in QUESTIONS:
        want = ref.apply_chat_template(_messages(q), add_generation_prompt=True, tokenize=False)
        assert ours.prompt(q) == want
    q = QUESTIONS[0]
    assert ours.prompt(q) == ("<|im_start|>user <image>\nWhat is shown in this image?<|im_end|>"
                              "<|im_start|>assistant\n")
    # The assistant header is "<|im_start|>assistant \n" (a space): the answer follows the cue.
    assert ours.answer_prefix == "" and ours.end == "<|im_end|>"
    assert ours(q, ANSWER) == ours.prompt(q) + ANSWER + "<|im_end|>"
    # The built-in qwen2 (LLaVA-OneVision's original conv_qwen) differs: system prompt, "\n".
    assert tx.qwen2(q) != ours.prompt(q)
    js = tmp_path / "json_form"
    js.mkdir()
    (js / "chat_template.json").write_text(json.dumps({"chat_template": ONEVISION_HF}))
    assert ct.from_dir(js).prompt(q) == ours.prompt(q)
    assert ct.from_dir(js).source.endswith("chat_template.json")


def test_string_template_with_bos_and_raise_exception(tmp_path):
    tok = _tokenizer("llama")
    tok.chat_template = VICUNA_STR
    tok.save_pretrained(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = ct.from_dir(tmp_path)
    q = QUESTIONS[0]
    msgs = [{"role": "user", "content": "<image>\n" + q}]
    assert ours.prompt(q) == ref.apply_chat_template(msgs, add_generation_prompt=True,
                                                     tokenize=False)
    assert ours.includes_bos and ours.end == "</s>"
    # BOS is written by the template: encode_prompts does not add a second one.
    hf = tx.HFTokenizer.from_dir(tmp_path)
    ids, mask = tx.encode_prompts(hf, [q], template="llava15", buckets=(64,))
    real = ids[0][mask[0]].tolist()
    assert real.count(hf.bos_id) == 1 and real[0] == hf.bos_id
    jinja2 = pytest.importorskip("jinja2")
    with pytest.raises(jinja2.exceptions.TemplateError, match="no system prompt"):
        ours.render([{"role": "system", "content": "x"}], add_generation_prompt=True)


def test_fallback_and_sources(tmp_path):
    assert ct.from_dir(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>",
                                                                "chat_template": [
        {"name": "tool_use", "template": "x"}, {"name": "default", "template": LLAVA15_HF}]}))
    assert ct.from_dir(tmp_path).prompt("hi") == "USER: <image>\nhi ASSISTANT:"
    (tmp_path / "chat_template.jinja").write_text(ONEVISION_HF)   # .jinja comes first
    assert ct.from_dir(tmp_path).source.endswith("chat_template.jinja")
    b = tx.BuiltinTokenizer()
    assert tx.get_template("plain", b) is tx.plain
    assert tx.describe_template("plain", b) == "built-in 'plain'"
    with pytest.raises(ValueError, match="unknown template"):
        tx.get_template("vicuna", b)
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['role'] }}")
    with pytest.raises(ValueError, match="does not continue the generation prompt"):
        ct.from_dir(tmp_path)
