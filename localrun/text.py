"""Text in and out: the checkpoint's tokenizer, its chat template (sandboxed), streaming decode.

Behaves like transformers' `AutoTokenizer` + `apply_chat_template` without importing it:
`encode(text)` adds BOS as `tokenizer(text)` does, `encode_chat` renders the template (which
writes `<bos>` itself) and encodes with no special tokens added, as `apply_chat_template(tokenize=True)`.
"""

from __future__ import annotations

import json
from datetime import datetime
from importlib import resources
from pathlib import Path

import jinja2
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

from .errors import LocalrunError
from .unicode import valid_text

REPLACEMENT = "\ufffd"  # what a decoder writes for bytes that are not (yet) valid UTF-8


class Tokenizer:
    """A checkpoint's `tokenizer.json` (Hugging Face tokenizers), plus its BOS token."""

    def __init__(self, backend: _HFTokenizer, bos_token: str | None = "<bos>"):
        self.backend = backend
        self.bos_token = bos_token or ""  # Qwen and others have none: templates then render it as ""
        self.bos_id = self.token_id(bos_token) if bos_token else None

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "Tokenizer":
        """Load `tokenizer.json` (and the BOS token from `tokenizer_config.json`) from a model directory."""
        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise LocalrunError(f"no tokenizer.json in {Path(model_dir)}")
        try:
            backend = _HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise LocalrunError(f"cannot read {path}: {reason}") from None
        # without tokenizer_config.json's word, Gemma's <bos> where the vocabulary has it (Mixtral's is <s>,
        # Qwen3 has none): a template's {{ bos_token }} must not render a string the tokenizer splits into text
        default = "<bos>" if backend.token_to_id("<bos>") is not None else None
        bos = _read_tokenizer_config(Path(model_dir)).get("bos_token", default)
        if isinstance(bos, dict):  # serialized AddedToken
            bos = bos.get("content", "<bos>")
        if not isinstance(bos, str):  # null: the model has no BOS (Qwen3)
            bos = None
        return cls(backend, bos)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with add_special_tokens, BOS first (like transformers' `tokenizer(text)`).
        Characters that are no text (lone surrogates: JSON's "\\ud800", or the bytes of non-UTF-8
        input, which Python hands on as surrogates) read as U+FFFD, as a UTF-8 decoder shows them."""
        return self.backend.encode(valid_text(text), add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        """The id of one token string (e.g. "<turn|>"), or None if the vocabulary lacks it."""
        return self.backend.token_to_id(token)

    def special_ids(self) -> set[int]:
        """Ids of the special added tokens (<eos>, <turn|>, <unused91>, ...): control tokens, not text."""
        return {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)


def _read_tokenizer_config(model_dir: Path) -> dict:
    path = model_dir / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LocalrunError(f"invalid JSON in {path}: {e}") from None
    return data if isinstance(data, dict) else {}


# Chat template -----------------------------------------------------------------------------

def load_chat_template(model_dir: str | Path, builtin: bool = True) -> str | None:
    """The checkpoint's chat template: chat_template.jinja, else tokenizer_config.json's (Qwen3 and
    Mixtral ship it there), else Gemma 4's built-in when `builtin` (None otherwise)."""
    model_dir = Path(model_dir)
    path = model_dir / "chat_template.jinja"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    template = _read_tokenizer_config(model_dir).get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str) and template:
        return template
    return builtin_chat_template() if builtin else None


def builtin_chat_template() -> str:
    """localrun's own Gemma 4 template (templates/gemma4.jinja), for checkpoints that ship none."""
    return (resources.files("localrun") / "templates" / "gemma4.jinja").read_text(encoding="utf-8")


class _Sandbox(ImmutableSandboxedEnvironment):
    """Reaching for Python internals fails at once, instead of rendering as an empty Undefined."""

    def unsafe_undefined(self, obj, attribute):
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")


def _raise_exception(message):
    raise TemplateError(message)


def _environment() -> jinja2.Environment:
    # The same settings transformers renders chat templates with.
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    return env


def render_chat(
    template: str,
    messages: list[dict],
    *,
    add_generation_prompt: bool = True,
    enable_thinking: bool = False,
    bos_token: str = "<bos>",
    **extra,
) -> str:
    """Render `messages` ([{"role", "content"}]) with a Jinja chat template in a sandbox."""
    try:
        compiled = _environment().from_string(template)
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               enable_thinking=enable_thinking, bos_token=bos_token, **extra)
    except SecurityError as e:
        raise LocalrunError(f"chat template is unsafe: {e}") from None
    except TemplateSyntaxError as e:
        raise LocalrunError(f"chat template syntax error (line {e.lineno}): {e.message}") from None
    except TemplateError as e:
        raise LocalrunError(f"chat template error: {e}") from None


def encode_chat(tokenizer: Tokenizer, template: str | None, messages: list[dict], **kw) -> list[int]:
    """Render then encode without adding BOS: the rendered text already starts with it."""
    if template is None:
        raise LocalrunError("the model ships no chat template (chat_template.jinja or tokenizer_config.json's "
                            "chat_template); give the prompt as-is with --raw")
    text = render_chat(template, messages, bos_token=tokenizer.bos_token, **kw)
    return tokenizer.encode(text, add_special_tokens=False)


# Streaming ---------------------------------------------------------------------------------

class StreamDecoder:
    """Turns token ids into text as they arrive, never emitting half a UTF-8 character.

    A character split into byte-fallback tokens (<0xE2><0x9C><0xA8>) decodes to U+FFFD until
    its last byte arrives, so text is held back while the decoded tail ends in U+FFFD. Only a
    short window of ids is re-decoded per token: from the last point where the text was whole.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # ids before this are behind us; [prefix, read) is context already emitted
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token id; return the text it completes (possibly "")."""
        self._ids.append(token_id)
        done = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        if len(text) <= len(done) or text.endswith(REPLACEMENT):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(done):]

    def flush(self) -> str:
        """Return whatever is still held back (an incomplete character decodes as U+FFFD) and reset."""
        done = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        self._ids, self._prefix, self._read = [], 0, 0
        return text[len(done):]
