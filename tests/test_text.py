"""Tokenizer, chat template and streaming decode agree with transformers and the Gemma 4 format."""

from __future__ import annotations

import json
import shutil

import pytest

from localrun.errors import LocalrunError
from localrun.text import (StreamDecoder, Tokenizer, builtin_chat_template, encode_chat, load_chat_template,
                           render_chat)

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

TEXTS = [
    "What is 17 + 25?",
    "Hello world!  Two  spaces,   three.",
    "  leading and trailing  ",
    "line one\nline two\n\n\tindented",
    "digits 0123456789 and 3.14159",
    "héllo naïve café – “quotes” 世界 日本語",
    "emoji ✨🎉👍🏽 mixed👨‍👩‍👧 in",
    "<|turn>user\nhi<turn|>\n<bos><eos>",
    "",
]

MESSAGES = [
    [{"role": "user", "content": "What is 17 + 25?"}],
    [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 17 + 25?"},
     {"role": "assistant", "content": "<|channel>thought\nadd them<channel|>42"},
     {"role": "user", "content": [{"type": "text", "text": "And 1 + 1? ✨"}]}],
]


@pytest.fixture(scope="module")
def tokenizers(tiny_moe):
    return Tokenizer.from_dir(tiny_moe), transformers.AutoTokenizer.from_pretrained(tiny_moe)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tokenizers, text):
    ours, ref = tokenizers
    ids = ours.encode(text)
    assert ids == ref(text).input_ids
    assert ours.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False).input_ids
    assert ours.decode(ids) == ref.decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    assert ours.decode(ours.encode(text, add_special_tokens=False)) == text


@pytest.mark.parametrize("text, clean", [("hi \ud800 there", "hi \ufffd there"), ("What \udcff is", "What \ufffd is"),
                                         ("\udcc3\udca9 ok", "\ufffd\ufffd ok"), ("fine é 😀", "fine é 😀")])
def test_text_that_is_no_text_encodes_as_replacement_characters(tokenizers, text, clean):
    """A lone surrogate (JSON's "\\ud800"; the bytes of non-UTF-8 input or argv, which Python hands on
    as surrogates) reads as U+FFFD, one each, as a UTF-8 decoder shows such bytes: never an error."""
    ours, _ = tokenizers
    assert ours.encode(text) == ours.encode(clean)


def test_tokenizer_basics(tokenizers):
    ours, _ = tokenizers
    assert (ours.bos_token, ours.bos_id, ours.vocab_size) == ("<bos>", 2, 512)
    assert ours.token_id("<turn|>") == 106 and ours.token_id("<|channel>") == 100
    assert ours.token_id("no-such-token") is None
    assert "<0xE2>" in [ours.backend.id_to_token(i) for i in ours.encode("✨")]  # byte fallback in play


@pytest.mark.parametrize("thinking", [False, True])
@pytest.mark.parametrize("messages", MESSAGES)
def test_encode_chat_matches_apply_chat_template(tokenizers, tiny_moe, messages, thinking):
    ours, ref = tokenizers
    expected = ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, enable_thinking=thinking)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected  # BatchEncoding in transformers 5
    assert encode_chat(ours, load_chat_template(tiny_moe), messages, enable_thinking=thinking) == expected


def test_gemma4_format_exactly():
    t = builtin_chat_template()
    sys_user = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert render_chat(t, sys_user) == (
        "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n<|channel>thought\n<channel|>")
    assert render_chat(t, sys_user, enable_thinking=True) == (
        "<bos><|turn>system\n<|think|>\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n")
    user = [{"role": "user", "content": "Hi"}]
    assert render_chat(t, user) == "<bos><|turn>user\nHi<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    assert render_chat(t, user, enable_thinking=True) == (
        "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n")
    history = user + [{"role": "assistant", "content": "<|channel>thought\nsay hello<channel|>Hello!"},
                      {"role": "user", "content": "Bye"}]
    assert render_chat(t, history, add_generation_prompt=False) == (
        "<bos><|turn>user\nHi<turn|>\n<|turn>model\nHello!<turn|>\n<|turn>user\nBye<turn|>\n")


def test_load_chat_template_fallbacks(tiny_moe, tmp_path):
    assert load_chat_template(tiny_moe) == (tiny_moe / "chat_template.jinja").read_text() == builtin_chat_template()
    d = tmp_path / "m"
    d.mkdir()
    assert load_chat_template(d) == builtin_chat_template()  # nothing in the checkpoint: built-in Gemma 4
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": "A{{ bos_token }}"}))
    assert load_chat_template(d) == "A{{ bos_token }}"
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert load_chat_template(d) == "D"
    (d / "chat_template.jinja").write_text("J")
    assert load_chat_template(d) == "J"


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__ }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{% set x = messages.append(1) %}",
])
def test_unsafe_template_is_refused(template):
    with pytest.raises(LocalrunError, match="unsafe") as e:
        render_chat(template, [{"role": "user", "content": "hi"}])
    assert "\n" not in str(e.value)


def test_template_errors_are_one_line():
    with pytest.raises(LocalrunError, match="syntax error") as e:
        render_chat("{% for m in messages %}{{ m }}", [])
    assert "\n" not in str(e.value)
    with pytest.raises(LocalrunError, match="only text content"):
        render_chat(builtin_chat_template(), [{"role": "user", "content": [{"type": "image"}]}])


def test_stream_decoder_never_breaks_utf8(tokenizers):
    ours, _ = tokenizers
    text = "ok ✨ 世界🎉 héllo 👍🏽!"
    ids = ours.encode(text, add_special_tokens=False)
    dec = StreamDecoder(ours)
    pieces = [dec.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + dec.flush() == text
    assert pieces.count("") >= 10  # held back inside multi-byte characters
    assert pieces[:2] == ["o", "k"]  # but ASCII comes out at once

    dec = StreamDecoder(ours, skip_special_tokens=True)
    turn = ours.encode("<|turn>model\nHi<turn|>", add_special_tokens=False)
    assert "".join(dec.push(i) for i in turn) + dec.flush() == "model\nHi"


def test_stream_decoder_flush_returns_held_bytes(tokenizers):
    ours, _ = tokenizers
    dec = StreamDecoder(ours)
    half = ours.encode("🎉", add_special_tokens=False)[:2]
    assert [dec.push(i) for i in half] == ["", ""]
    assert "\ufffd" in dec.flush()
    assert dec.push(ours.token_id("a")) == "a"  # reset after flush


def test_without_tokenizer_config_a_vocabulary_without_bos_gets_none(tiny_moe, tmp_path):
    """No tokenizer_config.json to name the BOS, and a vocabulary without <bos> (Mixtral's is <s>):
    a template's {{ bos_token }} renders nothing, as transformers renders it, rather than the text
    "<bos>" split into plain tokens."""
    (tmp_path / "tokenizer.json").write_text((tiny_moe / "tokenizer.json").read_text().replace("<bos>", "<s>"))
    (tmp_path / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}[INST] {{ m.content }} [/INST]{% endfor %}")
    ours = Tokenizer.from_dir(tmp_path)
    assert (ours.bos_token, ours.bos_id) == ("", None)
    messages = [{"role": "user", "content": "What is 17 + 25?"}]
    expected = transformers.AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(messages, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert encode_chat(ours, load_chat_template(tmp_path), messages) == expected


def test_missing_or_corrupt_tokenizer(tiny_moe, tmp_path):
    with pytest.raises(LocalrunError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    shutil.copy(tiny_moe / "tokenizer.json", tmp_path / "tokenizer.json")
    assert Tokenizer.from_dir(tmp_path).bos_id == 2  # no tokenizer_config.json: BOS defaults to <bos>
    (tmp_path / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(LocalrunError, match="cannot read") as e:
        Tokenizer.from_dir(tmp_path)
    assert "\n" not in str(e.value)
