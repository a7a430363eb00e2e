"""Thoughts and answers: a reply's text split at the model's thought markers.

Gemma 4 thinks as `<|channel>thought\n...<channel|>`, Qwen3 as `<think>...</think>`. chat shows
the two apart, `run` prints the answer on stdout and the thought on stderr, the server returns the
thought as `reasoning_content`; none of them ever shows a marker.
"""

from __future__ import annotations

from dataclasses import dataclass

THOUGHT, ANSWER = "thought", "answer"
OPEN_THOUGHT, CLOSE_THOUGHT = "<|channel>", "<channel|>"
# open -> (close, whether a channel label line follows the open marker): Gemma 4's, Qwen3's
THOUGHT_MARKERS = {OPEN_THOUGHT: (CLOSE_THOUGHT, True), "<think>": ("</think>", False)}
CLOSE_MARKERS = tuple(close for close, _ in THOUGHT_MARKERS.values())
MARKERS = (*THOUGHT_MARKERS, *CLOSE_MARKERS)


@dataclass(frozen=True)
class Piece:
    kind: str  # THOUGHT or ANSWER
    text: str


def open_thought(text: str) -> str | None:
    """The open marker of a thought `text` (a rendered prompt, or its end) leaves open; None if none."""
    best = None  # (where, open marker)
    for opener, (close, _) in THOUGHT_MARKERS.items():
        at = text.rfind(opener)
        if at >= 0 and text.rfind(close) < at and (best is None or at > best[0]):
            best = (at, opener)
    return best[1] if best else None


def _partial_marker_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker` (it may complete later)."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ThoughtSplitter:
    """Routes streamed text into thought and answer pieces.

    Gemma 4 thinks as `<|channel>thought\\n...<channel|>` before answering, Qwen3 as
    `<think>...</think>`. Markers (and the channel label line) may arrive split over several
    pieces, so a tail that could be the start of a marker is held back until the next `feed` or
    `flush` settles it.

    A prompt can leave a thought open (Qwen3's thinking templates end the generation prompt with
    `<think>\n`): `opened` is that open marker, and the reply starts inside the thought. A close
    marker in the answer closes nothing (a model primed with an empty thought may close it again):
    it is dropped, never shown.
    """

    LABEL_MAX = 32  # a channel label is one short word ("thought"); longer means there is none

    def __init__(self, opened: str | None = None):
        self.kind = THOUGHT if opened else ANSWER
        self._buf = ""
        self._in_label = False
        self._close = THOUGHT_MARKERS[opened][0] if opened else CLOSE_THOUGHT  # the thought's close marker

    def feed(self, text: str) -> list[Piece]:
        """Add streamed text; return the pieces that are now certain (possibly none)."""
        self._buf += text
        out: list[Piece] = []
        while self._buf:
            if self._in_label:
                if not self._take_label():
                    break
                continue
            markers = [self._close] if self.kind == THOUGHT else list(MARKERS)
            found = [(self._buf.find(m), m) for m in markers if m in self._buf]
            if found:
                at, marker = min(found)
                self._emit(out, self._buf[:at])
                self._buf = self._buf[at + len(marker):]
                if self.kind == ANSWER and marker in CLOSE_MARKERS:
                    continue  # a stray close: dropped
                self.kind = ANSWER if self.kind == THOUGHT else THOUGHT
                self._close, self._in_label = THOUGHT_MARKERS[marker] if self.kind == THOUGHT else (self._close, False)
                continue
            keep = max(_partial_marker_suffix(self._buf, m) for m in markers)
            self._emit(out, self._buf[:len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep:]
            break
        return out

    def flush(self) -> list[Piece]:
        """End of stream: whatever is held back is text of the current kind."""
        out: list[Piece] = []
        self._emit(out, self._buf)
        self._buf, self._in_label = "", False
        return out

    def _take_label(self) -> bool:
        """Drop the channel label line after `<|channel>`; False while it may still be arriving."""
        newline = self._buf.find("\n")
        if newline < 0:
            if len(self._buf) <= self.LABEL_MAX and self._close not in self._buf:
                return False
            self._in_label = False  # no label line: it is all thought text
            return True
        if newline <= self.LABEL_MAX and " " not in self._buf[:newline]:
            self._buf = self._buf[newline + 1:]
        self._in_label = False
        return True

    def _emit(self, out: list[Piece], text: str) -> None:
        if not text:
            return
        if out and out[-1].kind == self.kind:
            out[-1] = Piece(self.kind, out[-1].text + text)
        else:
            out.append(Piece(self.kind, text))


def split_thinking(text: str, opened: str | None = None) -> tuple[str, str]:
    """(answer, thought) of a whole reply, `opened` as for ThoughtSplitter (see `joined`)."""
    splitter = ThoughtSplitter(opened)
    return joined(splitter.feed(text) + splitter.flush())


def joined(pieces: list[Piece]) -> tuple[str, str]:
    """(answer, thought) of a reply's pieces. Where there was a thought, both are stripped (of the blank
    lines around the markers); else the answer is the text as it came."""
    answer = "".join(p.text for p in pieces if p.kind == ANSWER)
    thought = "".join(p.text for p in pieces if p.kind != ANSWER)
    return (answer.strip(), thought.strip()) if thought else (answer, "")
