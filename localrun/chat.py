"""The chat's logic, free of terminal I/O: conversation state, slash commands, context trimming,
thought/answer splitting and the stats line. `localrun/commands/chat.py` is the thin REPL on top.

Interrupting a reply (Ctrl-C) keeps what was generated so far as the assistant's message, so
the conversation stays user/assistant alternating and the model sees what the user saw;
`/retry` replaces it with a fresh reply to the same user message.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import resource
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

from .atomic import write_text_atomic
from .errors import LocalrunError, UsageError
from .hardware import IdleCoreWatch, use_idle_cores
from .unicode import valid_text
from .thoughts import ANSWER, THOUGHT, Piece, ThoughtSplitter

BLOCK = '"""'


# Settings --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    """What `/set` changes: sampling, reply length, thinking."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    max_tokens: int = 1024
    seed: int | None = None
    think: bool = False
    ignore_eos: bool = False
    from_model: tuple[str, ...] = ()  # the settings that are the model's generation_config.json defaults

    def __post_init__(self):
        if self.max_tokens < 1:
            raise UsageError("max_tokens must be at least 1")
        self.sampling()  # validates the sampling values (UsageError)

    def sampling(self):
        from .sampling import SamplingParams  # torch: not needed to parse the command line

        return SamplingParams(self.temperature, self.top_k, self.top_p, self.min_p, self.repeat_penalty, self.seed)


SAMPLING = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty")


def initial_settings(model_defaults: dict, flags: dict, **rest) -> Settings:
    """Sampling as the flags say (None: not given), else as the model's generation_config.json
    says (`model_defaults`, see engine.generation_defaults), else greedy."""
    taken = {k: v for k, v in model_defaults.items() if k in SAMPLING and flags.get(k) is None}
    given = {k: v for k, v in flags.items() if v is not None}
    return Settings(**taken, **given, **rest, from_model=tuple(k for k in SAMPLING if k in taken))


SETTABLE = {"temperature": float, "top_p": float, "top_k": int, "min_p": float,
            "repeat_penalty": float, "max_tokens": int, "seed": int}


def apply_setting(settings: Settings, name: str, value: str) -> Settings:
    """A copy of `settings` with `name` set from the text `value`; UsageError when either is bad."""
    key = name.replace("-", "_")
    if key not in SETTABLE:
        raise UsageError(f"unknown setting {name!r}; one of: {', '.join(SETTABLE)}")
    if key == "seed" and value.lower() in ("none", "off", "random"):
        return replace(settings, seed=None)
    try:
        parsed = SETTABLE[key](value)
    except ValueError:
        kind = "an integer" if SETTABLE[key] is int else "a number"
        raise UsageError(f"{key} must be {kind}, not {value!r}") from None
    return replace(settings, **{key: parsed}, from_model=tuple(k for k in settings.from_model if k != key))


# Conversation ----------------------------------------------------------------------------------

ROLES = ("system", "user", "assistant")


@dataclass
class Conversation:
    """The system prompt and the user/assistant messages after it.

    `hidden`: how many of the oldest turns no longer fit the context. The model stops seeing them
    (`messages`), the conversation keeps them (`saved`): /save writes everything that was said.
    """

    system: str | None = None
    turns: list[dict] = field(default_factory=list)
    hidden: int = 0

    def messages(self) -> list[dict]:
        """What goes through the chat template: [system] + the visible turns, as {role, content} dicts
        (a reply's thought stays out: templates drop past thinking, and some would show it)."""
        return self._head() + [{"role": m["role"], "content": m["content"]} for m in self.turns[self.hidden:]]

    def saved(self) -> list[dict]:
        """What /save writes: [system] + every turn, a reply's thought as its `reasoning_content`."""
        return self._head() + [dict(m) for m in self.turns]

    def _head(self) -> list[dict]:
        return [{"role": "system", "content": self.system}] if self.system else []

    def add(self, role: str, content: str, thought: str | None = None) -> None:
        turn = {"role": role, "content": valid_text(content)}  # /save writes UTF-8
        if thought:
            turn["reasoning_content"] = valid_text(thought)
        self.turns.append(turn)

    def hide_oldest(self, n: int) -> None:
        """The n oldest visible turns no longer fit the context."""
        self.hidden = min(self.hidden + n, len(self.turns))

    @property
    def awaiting_reply(self) -> bool:
        return bool(self.turns) and self.turns[-1]["role"] == "user"

    def undo(self) -> int:
        """Drop the last exchange (the last user message and the reply after it); number of messages dropped."""
        for i in range(len(self.turns) - 1, -1, -1):
            if self.turns[i]["role"] == "user":
                dropped = len(self.turns) - i
                del self.turns[i:]
                self.hidden = min(self.hidden, len(self.turns))
                return dropped
        return 0

    def drop_reply(self) -> bool:
        """For /retry: drop the last assistant reply so the user message before it is answered again
        (False, and nothing dropped, where no user message precedes it)."""
        if self.turns[-2:-1] and self.turns[-1]["role"] == "assistant" and self.turns[-2]["role"] == "user":
            self.turns.pop()
        return self.awaiting_reply

    def clear(self) -> None:
        self.turns.clear()
        self.hidden = 0


def save_conversation(messages: list[dict], path: str | Path) -> Path:
    """Write messages as a JSON list, atomically (temp file in the same directory, then rename). An existing
    file is replaced only when it is empty or an earlier save: anything else is the user's, and kept."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise LocalrunError(f"cannot save to {path}: it is a directory")
    if path.is_file() and path.stat().st_size:
        try:
            load_conversation(path)
        except LocalrunError:
            raise LocalrunError(f"cannot save to {path}: it exists and is not a saved conversation (it is kept; "
                                "name another file)") from None
    try:
        write_text_atomic(path, json.dumps(messages, indent=2, ensure_ascii=False) + "\n")
    except OSError as e:
        raise LocalrunError(f"cannot save to {path}: {e.strerror or e}") from None
    return path


def load_conversation(path: str | Path) -> Conversation:
    """Read a saved JSON list of {role, content} (an assistant's `reasoning_content` kept when it is
    text); a leading system message becomes the system prompt."""
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise LocalrunError(f"cannot read {path}: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise LocalrunError(f"cannot load {path}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise LocalrunError(f"cannot load {path}: expected a JSON list of {{role, content}} messages")
    for i, m in enumerate(data):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise LocalrunError(f"cannot load {path}: message {i} is not a {{role, content}} object "
                                f"with role in {'/'.join(ROLES)}")
        if m["role"] == "system" and i > 0:
            raise LocalrunError(f"cannot load {path}: only the first message may be a system message")
    system = valid_text(data[0]["content"]) if data and data[0]["role"] == "system" else None
    conversation = Conversation(system)
    for m in data[1 if system is not None else 0:]:
        thought = m.get("reasoning_content") if m["role"] == "assistant" else None
        conversation.add(m["role"], m["content"], thought if isinstance(thought, str) else None)
    return conversation


# Context trimming ------------------------------------------------------------------------------

def trim_to_fit(messages: list[dict], count: Callable[[list[dict]], int], budget: int) -> tuple[list[dict], int]:
    """Drop the oldest exchanges until `count(messages) <= budget`.

    A system message (first) and the last message are never dropped; a user message takes the
    reply after it along, so what is left never opens with an assistant turn. Returns the kept
    messages and how many were dropped; the result may still be over budget.
    """
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    body = messages[len(head):]
    dropped = 0
    while len(body) > 1 and count(head + body) > budget:
        n = 1
        while n < len(body) - 1 and body[n]["role"] == "assistant":
            n += 1
        body, dropped = body[n:], dropped + n
    return head + body, dropped


# Slash commands --------------------------------------------------------------------------------

COMMANDS = {
    "/help": "this list",
    "/system TEXT": "set the system prompt (no TEXT: clear it)",
    "/clear": "forget the conversation (the system prompt stays)",
    "/undo": "drop the last exchange",
    "/retry": "answer the last message again",
    "/think on|off": "let the model think first, or not (the chat template's enable_thinking)",
    "/set NAME VALUE": "set " + "|".join(SETTABLE),
    "/save FILE": "save the conversation as JSON",
    "/load FILE": "load a conversation saved with /save",
    "/stats": "settings, context use and the last reply's timings",
    "/exit": "leave (also Ctrl-D, or Ctrl-C twice)",
}


def help_text() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"{name.ljust(width)}  {what}" for name, what in COMMANDS.items()]
    lines.append(f'{BLOCK.ljust(width)}  start a multi-line message; end it with {BLOCK}')
    return "\n".join(lines)


def parse_command(line: str) -> tuple[str, str] | None:
    """`/name rest` -> ("name", "rest"); None for an ordinary message (`message_text` gives its text)."""
    text = line.strip()
    if not text.startswith("/") or text == "/" or text.startswith("//"):
        return None
    name, _, arg = text[1:].partition(" ")
    return name.lower(), arg.strip()


def message_text(line: str) -> str:
    """What an ordinary message sends: a leading `//` is the escape for a one-line message that starts
    with `/` (a multi-line block is sent as typed: it may open with a `//` comment)."""
    return line.lstrip()[1:] if "\n" not in line and line.lstrip().startswith("//") else line


@dataclass
class Outcome:
    """What a command asks the REPL to do: show `text` (as an error?), start a reply, exit."""

    text: str = ""
    error: bool = False
    respond: bool = False
    exit: bool = False


def _on_off(arg: str) -> bool | None:
    return {"on": True, "true": True, "1": True, "off": False, "false": False, "0": False}.get(arg.lower())


# Multi-line input ------------------------------------------------------------------------------

class MultilineInput:
    """Collects one message from input lines: a line starting with \"\"\" opens a block that a line
    ending with \"\"\" closes (text on those lines counts), so pasted paragraphs stay one message."""

    def __init__(self):
        self._lines: list[str] | None = None
        self.from_block = False  # whether the last finished message was a block: sent as typed, never a command

    @property
    def open(self) -> bool:
        return self._lines is not None

    def feed(self, line: str) -> str | None:
        """The finished message, or None while a block is still open."""
        if self._lines is None:
            self.from_block = line.lstrip().startswith(BLOCK)
            if not self.from_block:
                return line
            line = line.lstrip()[len(BLOCK):]
            self._lines = []
            if line.rstrip().endswith(BLOCK):  # """one line"""
                return self._close(line)
            self._lines.append(line)
            return None
        if line.rstrip().endswith(BLOCK):
            return self._close(line)
        self._lines.append(line)
        return None

    def _close(self, line: str) -> str:
        self._lines.append(line.rstrip()[:-len(BLOCK)])
        text = "\n".join(self._lines).strip("\n")
        self._lines = None
        return text

    def cancel(self) -> None:
        self._lines = None


# Stats -----------------------------------------------------------------------------------------

def rss_bytes() -> int:
    """Resident memory of this process (peak RSS where the current one can't be read)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


_LIBC: ctypes.CDLL | None | bool = False  # False: not looked up yet


def release_free_memory() -> bool:
    """Hand the heap's free pages back to the OS (glibc `malloc_trim`); False where there is none.

    Each turn of a chat allocates and frees activations of a new size, and glibc keeps the freed
    pages of its arenas: without this, RSS ratchets up turn after turn although nothing is in use.
    """
    global _LIBC
    if _LIBC is False:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes, _LIBC.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        except (OSError, AttributeError):  # not glibc (macOS, musl, Windows)
            _LIBC = None
    if _LIBC is None:
        return False
    _LIBC.malloc_trim(0)
    return True


def _gb(n: float) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


def format_stats(tokens: int, timings, memory: int, extra: dict | None = None, *, interrupted: bool = False) -> str:
    """The dim line after a reply: tokens, time to first token, decode speed, memory, then `extra` items."""
    speed = [f"{timings.decode_tokens_per_s:.1f} tok/s"] if tokens > 1 else []  # decode speed needs two tokens
    parts = [f"{tokens} token{'s' if tokens != 1 else ''}", f"ttft {timings.ttft_s:.2f} s", *speed,
             f"RSS {_gb(memory)}"]
    parts += [f"{k} {v}" for k, v in (extra or {}).items()]
    if interrupted:
        parts.append("interrupted")
    return " · ".join(parts)


def engine_stats(engine) -> dict:
    """Optional extra figures an engine may expose (e.g. expert cache hit rate) as `engine.stats() -> dict`."""
    stats = getattr(engine, "stats", None)
    if not callable(stats):
        return {}
    try:
        return dict(stats() or {})
    except Exception:  # a figure is never worth breaking the chat for
        return {}


# The session -----------------------------------------------------------------------------------

@dataclass
class Reply:
    """One reply as it streams: iterate for pieces; `answer`, `tokens`, `timings` fill in as it goes."""

    pieces: Iterator[Piece]
    prompt_tokens: int
    dropped: int  # messages trimmed from the front to fit the context
    answer: str = ""
    thought: str = ""
    tokens: int = 0
    timings: object = None
    finish_reason: str | None = None

    def __iter__(self) -> Iterator[Piece]:
        return self.pieces


class ChatSession:
    """A conversation with one engine: commands in, outcomes and streamed replies out. Never prints."""

    def __init__(self, engine, settings: Settings, *, system: str | None = None, context: int = 4096,
                 threads: int | None = None, idle_threads: bool = False):
        if context < 16:
            raise UsageError("--context must be at least 16 tokens")
        self.engine = engine
        self.settings = settings
        self.context = context
        self.threads = threads  # CPU compute threads, shown by /stats
        # no --threads: before each reply, the cores other processes leave idle now (hardware.use_idle_cores),
        # and during it (between prefill chunks and tokens) every half second (hardware.IdleCoreWatch), since
        # a thread on a core another program took stalls every parallel step (26B-A4B on 2 cores with one
        # taken: 0.8-2.6 tok/s on two threads, 5 on one)
        self.idle_threads = idle_threads
        self.conversation = Conversation(valid_text(system) if system else None)
        self.last: Reply | None = None
        self._retried: dict | None = None  # the reply /retry took away, until its new one is kept
        self._awaiting: dict | None = None  # a loaded message that awaited a reply: kept when none comes

    # Commands

    def command(self, name: str, arg: str) -> Outcome:
        """Run one slash command (parsed by `parse_command`)."""
        handler = getattr(self, f"_cmd_{name}", None)
        if handler is None:
            return Outcome(f"unknown command /{name} (try /help)", error=True)
        try:
            return handler(arg)
        except LocalrunError as e:  # bad /set value, unreadable file: one line, conversation untouched
            return Outcome(str(e), error=True)

    def _cmd_help(self, arg: str) -> Outcome:
        return Outcome(help_text())

    def _cmd_exit(self, arg: str) -> Outcome:
        return Outcome(exit=True)

    _cmd_quit = _cmd_bye = _cmd_exit

    def _cmd_system(self, arg: str) -> Outcome:
        self.conversation.system = valid_text(arg) if arg else None
        return Outcome("system prompt set" if arg else "system prompt cleared")

    def _cmd_clear(self, arg: str) -> Outcome:
        self.conversation.clear()
        return Outcome("conversation cleared")

    def _cmd_undo(self, arg: str) -> Outcome:
        n = self.conversation.undo()
        return Outcome(f"dropped the last exchange ({n} message{'s' * (n != 1)})" if n else "nothing to undo",
                       error=not n)

    def _cmd_retry(self, arg: str) -> Outcome:
        turns = self.conversation.turns
        previous = turns[-1] if turns and turns[-1]["role"] == "assistant" else None
        if not self.conversation.drop_reply():
            return Outcome("nothing to retry", error=True)
        self._retried = previous
        self._awaiting = None if previous else turns[-1]  # a loaded message that awaits its reply
        return Outcome(respond=True)

    def _cmd_think(self, arg: str) -> Outcome:
        on = _on_off(arg) if arg else not self.settings.think
        if on is None:
            return Outcome("usage: /think on|off", error=True)
        self.settings = replace(self.settings, think=on)
        return Outcome(f"thinking {'on' if on else 'off'}")

    def _cmd_set(self, arg: str) -> Outcome:
        name, _, value = arg.partition(" ")
        if not name or not value.strip():
            return Outcome(f"usage: /set {'|'.join(SETTABLE)} VALUE", error=True)
        self.settings = apply_setting(self.settings, name, value.strip())
        key = name.replace("-", "_")
        return Outcome(f"{key} = {getattr(self.settings, key)}")

    def _cmd_save(self, arg: str) -> Outcome:
        if not arg:
            return Outcome("usage: /save FILE", error=True)
        messages = self.conversation.saved()
        path = save_conversation(messages, arg)
        return Outcome(f"saved {messages_count(len(messages))} to {path}")

    def _cmd_load(self, arg: str) -> Outcome:
        if not arg:
            return Outcome("usage: /load FILE", error=True)
        self.conversation = load_conversation(arg)
        pending = "; its last message awaits a reply (/retry answers it)" if self.conversation.awaiting_reply else ""
        return Outcome(f"loaded {messages_count(len(self.conversation.saved()))} from {arg}{pending}")

    def _cmd_stats(self, arg: str) -> Outcome:
        s = self.settings
        used = self.count_tokens(self.conversation.messages()) if self.conversation.turns else 0
        lines = [
            f"messages  {len(self.conversation.turns)} (context {used} / {self.context} tokens"
            + (f"; the oldest {self.conversation.hidden} no longer fit it)" if self.conversation.hidden else ")"),
            f"sampling  temperature {s.temperature}, top_k {s.top_k}, top_p {s.top_p}, min_p {s.min_p}, "
            f"repeat_penalty {s.repeat_penalty}, seed {s.seed}",
            f"reply     max_tokens {s.max_tokens}, thinking {'on' if s.think else 'off'}",
        ]
        if s.from_model:
            lines.insert(2, f"          {', '.join(s.from_model)} from the model's generation_config.json")
        if self.last is not None and self.last.timings is not None:
            t = self.last.timings
            lines.append(f"last      {self.last.prompt_tokens} prompt tokens, prefill {t.prefill_tokens_per_s:.1f} "
                         f"tok/s, {self.last.tokens} generated, {t.decode_tokens_per_s:.1f} tok/s")
        lines.append(f"memory    RSS {_gb(rss_bytes())}")
        if self.threads is not None:
            lines.append(f"threads   {self.threads}")
        lines += [f"{k:<9} {v}" for k, v in engine_stats(self.engine).items()]
        return Outcome("\n".join(lines))

    # Replies

    def count_tokens(self, messages: list[dict]) -> int:
        return len(self.engine.encode_messages(messages, enable_thinking=self.settings.think))

    def ask(self, text: str) -> None:
        """Add a user message; `respond()` answers it. After a message still awaiting its reply (a
        /load that ends with one) it joins that message: templates want user and assistant in turn."""
        turns = self.conversation.turns
        if self.conversation.awaiting_reply:
            self._awaiting = turns[-1]
            turns[-1] = {"role": "user", "content": f"{turns[-1]['content']}\n\n{valid_text(text)}"}
            return
        self.conversation.add("user", text)

    def respond(self) -> Reply:
        """Start the reply to the last user message, trimming the oldest turns if the context is full.

        Iterate the result for pieces, then call `commit(reply)`, also after an interruption.
        """
        s = self.settings
        reserve = min(s.max_tokens, self.context // 2)  # room kept for the reply itself
        messages, dropped = trim_to_fit(self.conversation.messages(), self.count_tokens, self.context - reserve)
        ids = self.engine.encode_messages(messages, enable_thinking=s.think)
        if len(ids) >= self.context:
            self.conversation.turns.pop()  # unanswerable as it is: don't let it block the next one
            self._awaiting = None
            if self.conversation.system:  # the message alone may fit: say what /system can change
                raise LocalrunError(f"the system prompt and the message are too long: {len(ids)} tokens, the "
                                    f"context holds {self.context} (--context; /system changes the prompt)")
            raise LocalrunError(f"the message is too long: {len(ids)} tokens, the context holds {self.context} "
                                "(--context)")
        self.conversation.hide_oldest(dropped)
        max_tokens = min(s.max_tokens, self.context - len(ids))
        prefix = getattr(self.engine, "session", None)  # the prefix cache: only the new turns are prefilled
        follow = {}
        if self.idle_threads:
            self.threads, watch = use_idle_cores(), IdleCoreWatch()
            follow["between"] = lambda: self._count_threads(watch.poll())  # prefill chunks and tokens
        steps = self.engine.stream(ids, s.sampling(), max_tokens=max_tokens, ignore_eos=s.ignore_eos,
                                   **({"session": prefix} if prefix is not None else {}), **follow)
        reply = Reply(iter(()), prompt_tokens=len(ids), dropped=dropped)
        reply.pieces = self._pieces(reply, self.engine.stream_text(steps), self.engine.open_thought(ids))
        return reply

    def _count_threads(self, changed: int | None) -> None:
        self.threads = changed or self.threads

    def _pieces(self, reply: Reply, texts, opened: str | None) -> Iterator[Piece]:
        splitter = ThoughtSplitter(opened)
        for text, step in texts:
            reply.tokens, reply.timings, reply.finish_reason = step.timings.generated_tokens, step.timings, \
                step.finish_reason
            for piece in splitter.feed(text):
                yield self._record(reply, piece)
        for piece in splitter.flush():
            yield self._record(reply, piece)

    @staticmethod
    def _record(reply: Reply, piece: Piece) -> Piece:
        if piece.kind == ANSWER:
            reply.answer += piece.text
        else:
            reply.thought += piece.text
        return piece

    def commit(self, reply: Reply) -> bool:
        """Keep the reply (whole or interrupted) as the assistant's message.

        A reply interrupted before its first token has nothing to keep (`abandon`): the question goes
        too, or a /retry's previous reply comes back (then True), so no empty assistant turn is ever
        saved or replayed.
        """
        if reply.tokens == 0:
            return self.abandon()
        self._retried = self._awaiting = None
        self.conversation.add("assistant", reply.answer.strip(), reply.thought.strip())
        self.last = reply
        release_free_memory()
        return False

    def abandon(self) -> bool:
        """No reply to the last user message will be kept (interrupted before its first token, or
        failed): a /retry gets back the reply it took away (True); a new message is dropped (the user
        saw no answer to it), so no unanswered message is ever saved or followed by another."""
        if self._retried is not None:
            self.conversation.turns.append(self._retried)
            self._retried = None
            return True
        if self.conversation.awaiting_reply:
            self.conversation.turns.pop()
            if self._awaiting is not None:  # only what was typed goes: the loaded message still awaits its reply
                self.conversation.turns.append(self._awaiting)
                self._awaiting = None
        return False


def messages_count(n: int) -> str:
    """ "1 message", "2 messages" """
    return f"{n} message" + ("" if n == 1 else "s")


def history_path() -> Path:
    """Where input history lives: $LOCALRUN_HOME/history, else $XDG_DATA_HOME or ~/.local/share /localrun/history."""
    if os.environ.get("LOCALRUN_HOME"):
        return Path(os.environ["LOCALRUN_HOME"]).expanduser() / "history"
    data = os.environ.get("XDG_DATA_HOME")
    base = Path(data).expanduser() if data else Path.home() / ".local" / "share"
    return base / "localrun" / "history"


def default_context(max_position_embeddings: int, requested: int | None) -> int:
    """--context as given, else 4096 or the model's own limit if smaller; never above the model's limit."""
    limit = max_position_embeddings or 4096
    if requested is None:
        return min(4096, limit)
    if requested > limit:
        raise UsageError(f"--context {requested} is more than the model's {limit} positions")
    return requested

