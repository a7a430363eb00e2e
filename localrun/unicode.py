"""Text as the tokenizers and UTF-8 files take it (a light module: the CLI imports it before any model)."""

from __future__ import annotations

import re

_SURROGATE = re.compile("[\ud800-\udfff]")


def valid_text(text: str) -> str:
    """`text` with each surrogate code point replaced by one U+FFFD, as a UTF-8 decoder shows the bytes
    they stand for: lone surrogates come from JSON's "\\ud800" and from non-UTF-8 input or argv
    (Python hands such bytes on as surrogates); the tokenizers take none, and UTF-8 files cannot hold them."""
    return _SURROGATE.sub("\ufffd", text)
