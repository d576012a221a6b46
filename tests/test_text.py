"""Tests for covipal_jax.data.text: tokenizers, chat templates, bucketing, loss masks."""
from __future__ import annotations

import json

import numpy as np
import pytest

from covipal_jax.data import text as tx

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

QUESTIONS = [
    "What color is the cube?",
    "How many red spheres are left of the small cylinder?",
    "Is there a dog?",
    "Describe the image in detail.",
]
ANSWERS = ["red", "2", "No, there is not.", "A small red cube next to a blue sphere."]


def _corpus():
    out = []
    for q, a in zip(QUESTIONS, ANSWERS):
        for t in tx.TEMPLATES.values():
            out.append(t(q, a))
    return out * 3


def _llama_like(tmp_path):
    """SentencePiece-style BPE (Metaspace, BOS post-processor), saved like a Llama checkpoint."""
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    tok.add_special_tokens(["<image>", "<pad>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    d = tmp_path / "llama"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": "<pad>", "add_bos_token": True}))
    (d / "config.json").write_text(json.dumps(
        {"model_type": "llava", "image_token_index": tok.token_to_id("<image>")}))
    return d


def _qwen_like(tmp_path):
    """Byte-level BPE with ChatML specials and no BOS, saved like a Qwen2 checkpoint."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_special_tokens(["<image>"])
    d = tmp_path / "qwen"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None,
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    (d / "config.json").write_text(json.dumps({
        "model_type": "llava_onevision", "image_token_index": tok.token_to_id("<image>"),
        "text_config": {"bos_token_id": tok.token_to_id("<|endoftext|>")}}))
    return d


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {"llama": _llama_like(root), "qwen": _qwen_like(root)}


# ---- HFTokenizer ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,template", [("llama", "llava15"), ("qwen", "qwen2")])
def test_hf_tokenizer_matches_transformers(hf_dirs, kind, template):
    transformers = pytest.importorskip("transformers")
    d = hf_dirs[kind]
    ours = tx.HFTokenizer.from_dir(d)
    ref_auto = transformers.AutoTokenizer.from_pretrained(str(d))
    ref_file = transformers.PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))
    texts = [tx.TEMPLATES[template](q, a) for q, a in zip(QUESTIONS, ANSWERS)]
    texts += QUESTIONS + ["", "unseen words zebra!", "<image>\nhi"]
    for t in texts:
        ids = ours.encode(t)
        assert ids == ref_auto.encode(t, add_special_tokens=False), t
        assert ids == ref_file.encode(t, add_special_tokens=False), t
        # Our default BOS behaviour equals transformers' add_special_tokens=True.
        assert ours.encode(t, add_bos=ours.add_bos_default) == ref_auto.encode(t), t
        assert ours.decode(ids) == ref_auto.decode(ids, skip_special_tokens=True), t
        assert (ours.decode(ids, skip_special_tokens=False)
                == ref_auto.decode(ids, skip_special_tokens=False)), t
    assert ours.vocab_size == len(ref_auto)
    assert ours.eos_id == ref_auto.eos_token_id and ours.pad_id == ref_auto.pad_token_id
    assert ours.bos_id == ref_auto.bos_token_id
    assert ours.image_token_id == ref_auto.convert_tokens_to_ids("<image>")


def test_hf_tokenizer_special_ids(hf_dirs):
    llama = tx.HFTokenizer.from_dir(hf_dirs["llama"])
    assert (llama.bos_id, llama.eos_id) == (1, 2) and llama.add_bos_default
    assert llama.pad_id == llama.token_to_id("<pad>")
    qwen = tx.HFTokenizer.from_dir(hf_dirs["qwen"])
    assert qwen.bos_id is None and not qwen.add_bos_default  # null bos_token beats config.json
    assert qwen.eos_id == qwen.token_to_id("<|im_end|>")
    assert qwen.pad_id == qwen.token_to_id("<|endoftext|>")
    with pytest.raises(ValueError, match="no BOS"):
        qwen.encode("hi", add_bos=True)
    assert isinstance(llama, tx.Tokenizer) and isinstance(qwen, tx.Tokenizer)


def test_hf_tokenizer_errors_and_missing_image_token(tmp_path, hf_dirs):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        tx.HFTokenizer.from_dir(tmp_path)
    with pytest.raises(FileNotFoundError):
        tx.load_tokenizer(tmp_path)
    # config.json disagreeing with the vocab about "<image>".
    d = tmp_path / "bad"
    d.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (d / f).write_text((hf_dirs["llama"] / f).read_text())
    (d / "config.json").write_text(json.dumps({"image_token_index": 7}))
    with pytest.raises(ValueError, match="image token"):
        tx.HFTokenizer.from_dir(d)
    # A vocab without "<image>" (original LLaVA, sentinel -200): added as a new special token.
    tok = tokenizers.Tokenizer.from_file(str(hf_dirs["llama"] / "tokenizer.json"))
    vocab = tok.get_vocab()
    m = tokenizers.Tokenizer(models.WordLevel({w: i for w, i in vocab.items() if w != "<image>"
                                               and i < tok.token_to_id("<image>")},
                                              unk_token="<unk>"))
    m.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    m.add_special_tokens(["<unk>", "<s>", "</s>"])
    d2 = tmp_path / "orig"
    d2.mkdir()
    m.save(str(d2 / "tokenizer.json"))
    (d2 / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": None}))
    (d2 / "config.json").write_text(json.dumps({"image_token_index": -200}))
    t2 = tx.HFTokenizer.from_dir(d2)
    n = m.get_vocab_size(with_added_tokens=True)
    assert t2.image_token_id == n and t2.vocab_size == n + 1
    assert t2.encode("<image>") == [n]
    assert t2.pad_id == t2.token_to_id("<unk>")  # no pad token: unk, like original LLaVA


# ---- BuiltinTokenizer ----------------------------------------------------------------------------
def test_builtin_tokenizer_roundtrip_and_ids():
    tok = tx.BuiltinTokenizer.from_texts(QUESTIONS + ANSWERS + [tx.LLAVA_SYSTEM, tx.QWEN_SYSTEM])
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.image_token_id) == (0, 1, 2, 4)
    assert tok.vocab_size == len(tok.vocab) == len(set(tok.vocab))
    for q, a in zip(QUESTIONS, ANSWERS):
        for t in tx.TEMPLATES.values():
            s = t(q, a)
            ids = tok.encode(s)
            assert tok.unk_id not in ids, s
            assert tok.decode(ids, skip_special_tokens=False) == s
        assert tok.decode(tok.encode(q)) == q
    assert tok.encode("hi", add_bos=True)[0] == tok.bos_id
    assert tok.encode("zebra") == [tok.unk_id]
    # skip_special_tokens drops <image>, </s>, ... (default True, as tokenizers' decode).
    assert tok.decode(tok.encode("<image> Is there a dog?</s>")) == "Is there a dog?"
    # Deterministic: same words, same ids; extra words only append.
    tok2 = tx.BuiltinTokenizer(list(tok.vocab) + ["zebra"])
    assert tok2.vocab[: tok.vocab_size] == tok.vocab and tok2.vocab_size == tok.vocab_size + 1
    with pytest.raises(ValueError):
        tx.BuiltinTokenizer(["two words"])


def test_builtin_tokenizer_save_load(tmp_path):
    tok = tx.BuiltinTokenizer(["cube", "sphere", "red"])
    f = tok.save(tmp_path)
    assert tx.BuiltinTokenizer.load(f) == tok
    assert tx.load_tokenizer(tmp_path) == tok
    assert tx.load_tokenizer(f) == tok
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="not a saved"):
        tx.BuiltinTokenizer.load(tmp_path / "x.json")


# ---- templates -----------------------------------------------------------------------------------
def test_template_strings():
    q = "What is this?"
    assert tx.llava15(q) == "USER: <image>\nWhat is this? ASSISTANT:"   # llava-hf's template
    assert tx.llava15(q, "A cat.") == tx.llava15(q) + " A cat.</s>"
    assert tx.llava15_vicuna(q) == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the user's questions. USER: <image>\n"
        "What is this? ASSISTANT:")
    assert tx.llava15_vicuna(q, "A cat.") == tx.llava15_vicuna(q) + " A cat.</s>"
    assert tx.qwen2(q) == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                           "<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n"
                           "<|im_start|>assistant\n")
    assert tx.qwen2(q, "A cat.") == tx.qwen2(q) + "A cat.<|im_end|>"
    assert tx.plain(q) == "<image> What is this? ANSWER:"
    assert tx.plain(q, "cat") == "<image> What is this? ANSWER: cat</s>"
    # A question that already places the image is used verbatim; image=False drops it.
    assert tx.plain("Look: <image> what?") == "Look: <image> what? ANSWER:"
    assert tx.plain(q, image=False) == "What is this? ANSWER:"
    assert set(tx.TEMPLATES) == {"llava15", "llava15_vicuna", "qwen2", "plain"}
    with pytest.raises(ValueError, match="unknown template"):
        tx.get_template("vicuna")


def test_llava15_matches_llava_conversation_rule():
    """LLaVA's SeparatorStyle.TWO `get_prompt` (conv_vicuna_v1), from llava/conversation.py."""
    system, roles, seps = tx.LLAVA_SYSTEM, ("USER", "ASSISTANT"), (" ", "</s>")
    q, a = "What is this?", "A cat."
    for messages, expect in [
        ([(roles[0], "<image>\n" + q), (roles[1], None)], tx.llava15_vicuna(q)),
        ([(roles[0], "<image>\n" + q), (roles[1], a)], tx.llava15_vicuna(q, a)),
    ]:
        ret = system + seps[0]
        for i, (role, message) in enumerate(messages):
            ret += role + ": " + message + seps[i % 2] if message else role + ":"
        assert ret == expect


def test_qwen2_matches_transformers_chatml_template(hf_dirs):
    """ChatML as rendered by transformers' default Qwen2 chat template (Qwen2AudioProcessor)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen2_audio.processing_qwen2_audio import Qwen2AudioProcessor

    chatml = Qwen2AudioProcessor.default_chat_template.fget(None)
    ref = transformers.AutoTokenizer.from_pretrained(str(hf_dirs["qwen"]))
    q, a = "What is this?", "A cat."
    user = [{"role": "user", "content": "<image>\n" + q}]
    rendered = ref.apply_chat_template(user, chat_template=chatml, tokenize=False,
                                       add_generation_prompt=True)
    assert rendered == tx.qwen2(q)
    full = ref.apply_chat_template(user + [{"role": "assistant", "content": a}],
                                   chat_template=chatml, tokenize=False)
    assert full == tx.qwen2(q, a) + "\n"


def test_stop_ids(hf_dirs):
    qwen = tx.HFTokenizer.from_dir(hf_dirs["qwen"])
    assert tx.qwen2.stop_ids(qwen) == (qwen.eos_id,)
    b = tx.BuiltinTokenizer()
    assert tx.qwen2.stop_ids(b) == (b.eos_id, b.token_to_id("<|im_end|>"))
    assert tx.plain.stop_ids(b) == (b.eos_id,)


# ---- encode_prompts ------------------------------------------------------------------------------
def test_encode_prompts_bucketing_and_left_padding():
    tok = tx.BuiltinTokenizer.from_texts(QUESTIONS)
    seqs = [tok.encode(tx.plain(q), add_bos=True) for q in QUESTIONS[:3]]
    lens = [len(s) for s in seqs]
    ids, mask = tx.encode_prompts(tok, QUESTIONS[:3], template="plain", buckets=(8, 16, 64, 32))
    assert max(lens) <= 16 and max(lens) > 8
    assert ids.shape == mask.shape == (3, 16) and ids.dtype == np.int32 and mask.dtype == bool
    for b, s in enumerate(seqs):
        assert mask[b].sum() == len(s)
        assert not mask[b, : 16 - len(s)].any() and mask[b, 16 - len(s):].all()  # left padded
        assert (ids[b, : 16 - len(s)] == tok.pad_id).all()
        assert ids[b, 16 - len(s):].tolist() == s
        assert ids[b, 16 - len(s)] == tok.bos_id
        assert (ids[b] == tok.image_token_id).sum() == 1
    # Every row ends at the same index (real tokens flush right).
    assert mask[:, -1].all()
    # Exact fit picks that bucket.
    ids2, _ = tx.encode_prompts(tok, QUESTIONS[:3], template="plain", buckets=(max(lens), 64))
    assert ids2.shape[1] == max(lens)
    ids3, _ = tx.encode_prompts(tok, QUESTIONS[:3], template="plain", buckets=(64,),
                                add_bos=False)
    assert ids3[0, -len(seqs[0]) + 1:].tolist() == seqs[0][1:] and tok.bos_id not in ids3


def test_encode_prompts_errors():
    tok = tx.BuiltinTokenizer.from_texts(QUESTIONS)
    with pytest.raises(ValueError, match="prompt 1 has .* longer than the largest bucket 8"):
        tx.encode_prompts(tok, ["Is there a dog?", QUESTIONS[1]], buckets=(4, 8))
    with pytest.raises(ValueError, match="no image placeholder"):
        tx.encode_prompts(tok, ["What color is the cube?"], template=None)
    with pytest.raises(ValueError, match="2 image placeholders"):
        tx.encode_prompts(tok, ["<image> <image> What color is the cube?"])
    ids, mask = tx.encode_prompts(tok, ["What color is the cube?"], template="plain",
                                  require_image=False)
    assert tok.image_token_id not in ids[mask]
    with pytest.raises(TypeError):
        tx.encode_prompts(tok, "one string")


@pytest.mark.parametrize("kind,template", [("llama", "llava15"), ("qwen", "qwen2")])
def test_encode_prompts_hf(hf_dirs, kind, template):
    tok = tx.HFTokenizer.from_dir(hf_dirs[kind])
    ids, mask = tx.encode_prompts(tok, QUESTIONS, template=template, buckets=(256, 128))
    assert ids.shape == (len(QUESTIONS), 128)
    for b, q in enumerate(QUESTIONS):
        want = tok.encode(tx.TEMPLATES[template](q), add_bos=tok.add_bos_default)
        assert ids[b][mask[b]].tolist() == want
        assert (ids[b] == tok.image_token_id).sum() == 1


# ---- encode_example ------------------------------------------------------------------------------
def _check_example(tok, ex, q, a, template, max_len):
    t = tx.TEMPLATES[template]
    assert {k: (v.shape, v.dtype) for k, v in ex.items()} == {
        "ids": ((max_len,), np.int32), "mask": ((max_len,), bool), "loss_mask": ((max_len,), bool)}
    p_ids = tok.encode(t.prompt(q), add_bos=tok.add_bos_default)
    real = ex["ids"][ex["mask"]].tolist()
    assert real == tok.encode(t(q, a), add_bos=tok.add_bos_default)
    assert ex["mask"][-len(real):].all() and not ex["mask"][: max_len - len(real)].any()
    assert not (ex["loss_mask"] & ~ex["mask"]).any()
    # The prompt part equals what encode_prompts feeds at inference; the loss is on the rest.
    assert real[: len(p_ids)] == p_ids
    tgt = ex["ids"][ex["loss_mask"]].tolist()
    assert len(tgt) == len(real) - len(p_ids) and tgt == real[len(p_ids):]
    assert tgt[-1] == tok.token_to_id(t.end)
    assert tok.decode(tgt).strip() == a


@pytest.mark.parametrize("kind,template", [("llama", "llava15"), ("qwen", "qwen2")])
def test_encode_example_hf(hf_dirs, kind, template):
    tok = tx.HFTokenizer.from_dir(hf_dirs[kind])
    for q, a in zip(QUESTIONS, ANSWERS):
        ex = tx.encode_example(tok, q, a, template=template, max_len=200)
        _check_example(tok, ex, q, a, template, 200)


def test_encode_example_builtin_and_overflow():
    tok = tx.BuiltinTokenizer.from_texts(QUESTIONS + ANSWERS)
    for q, a in zip(QUESTIONS, ANSWERS):
        ex = tx.encode_example(tok, q, a, template="plain", max_len=40)
        _check_example(tok, ex, q, a, "plain", 40)
    q, a = QUESTIONS[0], ANSWERS[0]
    n = len(tok.encode(tx.plain(q, a), add_bos=True))
    assert tx.encode_example(tok, q, a, template="plain", max_len=n) is not None
    assert tx.encode_example(tok, q, a, template="plain", max_len=n - 1) is None
    ex = tx.encode_example(tok, q, a, template="plain", max_len=n)
    assert ex["mask"].all() and ex["loss_mask"].sum() == 2  # "red", "</s>"
    with pytest.raises(ValueError, match="2 image placeholders"):
        tx.encode_example(tok, "<image> " + q, a, template=tx.ChatTemplate(
            "t", "<image> ", " ", " ANSWER:", " ", "</s>"), max_len=40)


def test_encode_example_end_token_must_be_in_vocab(hf_dirs):
    eot = tx.ChatTemplate("eot", "", " ", " ANSWER:", " ", "<eot>")
    for tok in (tx.HFTokenizer.from_dir(hf_dirs["llama"]), tx.BuiltinTokenizer()):
        with pytest.raises(ValueError, match="not in the vocabulary"):
            tx.encode_example(tok, QUESTIONS[0], ANSWERS[0], template=eot, max_len=200)
