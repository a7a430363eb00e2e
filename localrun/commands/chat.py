"""`localrun chat [MODEL]`: an interactive chat in the terminal. The logic lives in localrun/chat.py;
this module only reads lines (readline, with history) and prints what the session returns."""

from __future__ import annotations

import os
import re
import sys
import traceback
from pathlib import Path
from typing import Optional

import typer

from ..chat import (THOUGHT, ChatSession, MultilineInput, Reply, default_context, engine_stats, format_stats,
                    history_path, initial_settings, message_text, parse_command, rss_bytes)
from .. import errors
from ..errors import LocalrunError, UsageError
from . import _options as opt

PROMPT, MORE = ">>> ", "... "
MODEL_DEFAULT = "Default: the model's generation_config.json value, else off (greedy)."


class Terminal:
    """Prints for the REPL: dim for thoughts and stats, red for errors, nothing styled under NO_COLOR."""

    def __init__(self):
        from rich.console import Console

        self.plain = bool(os.environ.get("NO_COLOR"))
        self.console = Console(highlight=False, no_color=self.plain)

    def write(self, text: str, style: str | None = None, end: str = "") -> None:
        self.console.print(text, style=None if self.plain else style, end=end, markup=False, soft_wrap=True)

    def info(self, text: str) -> None:
        self.write(text, "dim", end="\n")

    def error(self, text: str) -> None:
        self.write(f"error: {text}", "red", end="\n")


def setup_history(path: Path) -> Optional[object]:
    """Arrow-key editing and history via stdlib readline, persisted at `path`; None where unavailable."""
    try:
        import readline
    except ImportError:  # Windows without pyreadline: plain input() still works
        return None
    readline.set_history_length(2000)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(exist_ok=True)
        readline.read_history_file(path)
    except OSError:
        return None  # unwritable home: the chat works, history just isn't kept
    return readline


def remember(readline, path: Path, line: str) -> None:
    """Add one input line to the history, and to the file at once so a crash loses nothing."""
    if readline is None or not line.strip():
        return
    try:
        readline.append_history_file(1, path)
    except OSError:
        pass


_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 but tab and newline, DEL, C1


def printable(text: str) -> str:
    """Model text as the terminal may show it: a control character (ESC starts sequences that clear the
    screen or retitle the window; a model emits one through byte-fallback tokens) reads U+FFFD, a
    carriage return is dropped (\\r\\n is a newline)."""
    return _CONTROLS.sub(lambda m: "" if m.group() == "\r" else "\ufffd", text)


def show_reply(session: ChatSession, term: Terminal) -> None:
    """Stream one reply; Ctrl-C stops it and keeps the partial reply (see localrun/chat.py). An
    unexpected failure (a bug) ends the reply, not the chat: one line says so, the message that
    could not be answered is dropped, and the conversation before it stays (to /save, or go on)."""
    try:
        _stream_reply(session, term)
    except LocalrunError as e:
        session.abandon()
        term.error(str(e))
    except Exception as e:  # noqa: BLE001 - one failed reply must not end the chat and lose the conversation
        if errors.TRACEBACKS:
            traceback.print_exc()
        session.abandon()
        term.error(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (that message was dropped; "
                   "the conversation is kept)")


def _stream_reply(session: ChatSession, term: Terminal) -> None:
    try:
        reply = session.respond()  # tokenizes and trims the conversation: seconds for a long one
    except KeyboardInterrupt:
        term.write("\n")
        term.info(interrupted_early(session.abandon()))
        return
    if reply.dropped:
        term.info(f"(context full: the model no longer sees the {reply.dropped} oldest messages; the system "
                  "prompt stays, /save keeps them all)")
    interrupted, kind = False, None
    try:
        for piece in reply:
            if piece.kind != kind:
                if piece.kind == THOUGHT:
                    term.write("thinking...\n", "dim")
                elif kind == THOUGHT:
                    term.write("\n\n")  # the answer starts apart from the thought
                kind = piece.kind
            term.write(printable(piece.text), "dim italic" if piece.kind == THOUGHT else None)
    except KeyboardInterrupt:
        interrupted = True
        reply.pieces.close()
    restored = session.commit(reply)
    term.write("\n")
    term.info(stats_line(session, reply, interrupted, restored))


def interrupted_early(restored: bool) -> str:
    return ("interrupted before the first token (the previous reply is kept)" if restored else
            "interrupted before the first token (the message was dropped; send it again)")


def stats_line(session: ChatSession, reply: Reply, interrupted: bool, restored: bool = False) -> str:
    if reply.timings is None:
        return interrupted_early(restored)
    return format_stats(reply.tokens, reply.timings, rss_bytes(), engine_stats(session.engine), interrupted=interrupted)


def repl(session: ChatSession, term: Terminal) -> None:
    """Read messages and commands until /exit, Ctrl-D, or Ctrl-C twice at the prompt."""
    path = history_path()
    readline = setup_history(path)
    block = MultilineInput()
    term.info('type a message, /help for commands, """ for a multi-line message')
    ctrl_c = False
    while True:
        try:
            line = input(MORE if block.open else PROMPT)
        except EOFError:
            term.write("\n")
            if block.open:  # the input ended inside a """ block: say so rather than drop it silently
                term.info('(multi-line message discarded: the input ended before its closing """)')
            return
        except KeyboardInterrupt:
            term.write("\n")
            if block.open:
                block.cancel()
                term.info("(multi-line message discarded)")
                continue
            if ctrl_c:
                return
            ctrl_c = True
            term.info("(Ctrl-C again or Ctrl-D to exit)")
            continue
        ctrl_c = False
        remember(readline, path, line)
        message = block.feed(line)
        if message is None or not message.strip():
            continue
        command = parse_command(message) if not block.from_block else None
        if command is None:
            session.ask(message if block.from_block else message_text(message))
            show_reply(session, term)
            continue
        try:
            outcome = session.command(*command)
        except KeyboardInterrupt:  # a command changes the conversation only once it is done: nothing half-done
            term.write("\n")
            term.info(f"(/{command[0]} interrupted)")
            continue
        if outcome.text:
            (term.error if outcome.error else term.info)(outcome.text)
        if outcome.exit:
            return
        if outcome.respond:
            show_reply(session, term)


def chat(
    model: str = typer.Argument("demo", help="Model directory, Hugging Face repo id, or 'demo'."),
    system: Optional[str] = opt.SYSTEM,
    max_tokens: int = typer.Option(1024, "--max-tokens", "-n", min=1, help="Most tokens per reply."),
    temperature: Optional[float] = typer.Option(None, "--temperature", "-t", min=0.0,
                                                help=f"0 = greedy. {MODEL_DEFAULT}"),
    top_k: Optional[int] = typer.Option(None, "--top-k", min=0,
                                        help=f"Keep the k most likely tokens (0 = off). {MODEL_DEFAULT}"),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling mass, more than 0 and at most 1 "
                                          f"(1 = off). {MODEL_DEFAULT}"),
    min_p: Optional[float] = typer.Option(None, "--min-p", min=0.0, max=1.0,
                                          help=f"Drop tokens below min_p x the top probability (0 = off). {MODEL_DEFAULT}"),
    repeat_penalty: Optional[float] = typer.Option(None, "--repeat-penalty", help="Penalize tokens already seen: more "
                                                   f"than 0 (1 = off). {MODEL_DEFAULT}"),
    seed: Optional[int] = opt.SEED,
    think: bool = opt.THINK,
    context: Optional[int] = typer.Option(None, "--context", min=16, help="Context length in tokens; oldest turns are "
                                          "dropped beyond it. Default: 4096, or the model's limit if smaller."),
    ignore_eos: bool = opt.IGNORE_EOS,
    device: str = opt.DEVICE,
    dtype: str = opt.DTYPE,
    experts: Optional[str] = opt.EXPERTS,
    vram: Optional[str] = opt.VRAM,
    resident_experts: Optional[float] = opt.RESIDENT_EXPERTS,
    threads: Optional[int] = opt.THREADS,
    quiet: bool = opt.QUIET,
) -> None:
    """Chat with a model in the terminal (/help inside for commands)."""
    if sys.stdin is None:  # started with stdin closed (`<&-`): nothing could ever be read
        raise UsageError("chat reads messages from stdin, which is closed")
    opt.check_stdout("chat", "its replies")
    opt.check_sampling(top_p, repeat_penalty)
    load = opt.load_kwargs(device, dtype, experts, vram, resident_experts, context)
    idle_threads = threads is None  # then each reply takes the cores idle at its start (ChatSession)
    threads = opt.check_threads(threads)
    flags = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p,
             "repeat_penalty": repeat_penalty}
    rest = {"max_tokens": max_tokens, "seed": seed, "think": think, "ignore_eos": ignore_eos}
    initial_settings({}, flags, **rest)  # a bad flag is a usage error before anything is read

    from ..config import load_config
    from ..engine import Engine, generation_defaults
    from ..resolve import resolve_model
    from ._progress import progress_bar

    model_dir = resolve_model(model)
    settings = initial_settings(generation_defaults(model_dir), flags, **rest)
    limit = default_context(load_config(model_dir).max_position_embeddings, context)
    load["context"] = limit  # the KV cache is planned for what the chat uses, no more
    opt.use_threads(threads)
    term = Terminal()
    if not quiet:
        term.info(f"loading {model_dir} ...")
    with progress_bar("loading", enabled=not quiet) as update:
        engine = Engine.load(model_dir, progress=update, **load)
    repl(ChatSession(engine, settings, system=system, context=limit, threads=threads, idle_threads=idle_threads), term)


command = chat
