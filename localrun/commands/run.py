"""`localrun run MODEL PROMPT`: one prompt, one answer; scriptable (stdin, --json).

The context is a limit: a prompt that leaves no room in it is an error (or, with `--truncate
left`, loses its oldest tokens), and the reply stops with finish_reason "length" where it fills up.
"""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer

from ..errors import LocalrunError, UsageError
from ..thoughts import THOUGHT, Piece, ThoughtSplitter, joined
from . import _options as opt

TRUNCATE = ("left",)


def read_prompt(prompt: Optional[str]) -> str:
    """PROMPT as given; `-` or a missing PROMPT with piped stdin reads stdin. Never waits on a terminal."""
    if prompt is not None and prompt != "-":
        if not prompt.strip():
            raise UsageError("empty prompt")
        return prompt
    if sys.stdin is None:  # started with stdin closed (`<&-`)
        raise UsageError("no prompt: give PROMPT (stdin is closed)")
    if prompt is None and sys.stdin.isatty():
        raise UsageError("no prompt: give PROMPT, or pipe it on stdin (PROMPT '-')")
    text = sys.stdin.read()
    if not text.strip():
        raise UsageError("empty prompt on stdin")
    return text


def context_limit(positions: int, context: Optional[int], capacity: int) -> int:
    """Tokens the prompt and reply may fill together: what the loaded KV cache holds (--context, else
    the loader's default: 8192 or the model's positions if fewer); --context past the model's
    positions is a usage error."""
    if context is not None and context > positions:
        raise UsageError(f"--context {context} is more than the model's {positions} positions")
    return min(context or capacity, capacity)


def fit_prompt(engine, text: str, limit: int, max_tokens: int, truncate: Optional[str], *, system: Optional[str],
               raw: bool, think: bool) -> tuple[list[int], int]:
    """The prompt's token ids and how many of its oldest tokens were dropped to fit `limit`.

    A prompt needs room for at least one reply token. Without `truncate` one that has none is an
    error naming both numbers; with "left" its oldest tokens go until the reply has room for
    --max-tokens, or half the context if that is less.
    """
    ids = engine.encode_prompt(text, system=system, raw=raw, enable_thinking=think)
    if len(ids) < limit:
        return ids, 0
    if truncate is None:
        raise LocalrunError(f"the prompt is {len(ids)} tokens, the context {limit}: no room for a reply "
                            "(--truncate left drops its oldest tokens)")
    kept = engine.encode_truncated(text, limit - max(1, min(max_tokens, limit // 2)), system=system, raw=raw,
                                   enable_thinking=think)
    return kept, len(ids) - len(kept)


def run(
    model: str = typer.Argument(..., help="Model directory (HF checkpoint or localrun pre-quantized), HF repo id, or 'demo'."),
    prompt: Optional[str] = typer.Argument(None, help="The prompt; '-' or piped stdin reads it from stdin."),
    system: Optional[str] = opt.SYSTEM,
    raw: bool = typer.Option(False, "--raw", help="Skip the chat template; tokenize the prompt as-is (BOS added)."),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", min=1, help="Most tokens to generate."),
    temperature: float = opt.TEMPERATURE,
    top_k: int = opt.TOP_K,
    top_p: float = opt.TOP_P,
    min_p: float = opt.MIN_P,
    repeat_penalty: float = opt.REPEAT_PENALTY,
    seed: Optional[int] = opt.SEED,
    ignore_eos: bool = opt.IGNORE_EOS,
    think: bool = opt.THINK,
    device: str = opt.DEVICE,
    dtype: str = opt.DTYPE,
    experts: Optional[str] = opt.EXPERTS,
    vram: Optional[str] = opt.VRAM,
    resident_experts: Optional[float] = opt.RESIDENT_EXPERTS,
    context: Optional[int] = typer.Option(None, "--context", min=1, help="Context length in tokens, prompt and "
                                          "reply together (default: 8192, or the model's positions if fewer)."),
    truncate: Optional[str] = typer.Option(None, "--truncate", help="'left': drop the oldest prompt tokens when "
                                           "the prompt does not fit the context (default: an error)."),
    threads: Optional[int] = opt.THREADS,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming text."),
    logprobs: bool = typer.Option(False, "--logprobs", help="With --json: log-probability of each token."),
    quiet: bool = opt.QUIET,
) -> None:
    """Generate a reply to one prompt. Greedy unless sampling flags are given (reproducible for scripts;
    `chat` samples with the model's generation_config.json defaults)."""
    if truncate not in (None, *TRUNCATE):
        raise UsageError(f"--truncate can only be 'left', not {truncate!r}")
    opt.check_sampling(top_p, repeat_penalty)
    if logprobs and not as_json:
        raise UsageError("--logprobs goes into the --json output: add --json")
    opt.check_stdout("run", "its reply")
    load = opt.load_kwargs(device, dtype, experts, vram, resident_experts, context)
    idle_threads = threads is None  # then the thread count follows the idle cores during the reply too
    threads = opt.check_threads(threads)
    text_in = read_prompt(prompt)

    from ..engine import Engine
    from ..hardware import IdleCoreWatch
    from ..resolve import resolve_model
    from ..sampling import SamplingParams
    from ._progress import progress_bar

    params = SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, seed)
    opt.use_threads(threads)
    with progress_bar("loading", enabled=not quiet) as update:
        engine = Engine.load(resolve_model(model), progress=update, **load)
    limit = context_limit(engine.loaded.args.max_position_embeddings, context, engine.loaded.kv.capacity)
    ids, dropped = fit_prompt(engine, text_in, limit, max_tokens, truncate, system=system, raw=raw, think=think)
    if dropped and not quiet:
        print(f"note: the prompt is {len(ids) + dropped} tokens, the context {limit}: dropped its oldest "
              f"{dropped} tokens (--truncate left)", file=sys.stderr)
    between = IdleCoreWatch().poll if idle_threads else None  # prefill chunks and tokens follow the idle cores
    steps = engine.stream(ids, params, max_tokens=min(max_tokens, limit - len(ids)), ignore_eos=ignore_eos,
                          between=between)
    splitter, printer = ThoughtSplitter(engine.open_thought(ids)), ReplyPrinter(quiet)
    pieces, tokens, lps, last = [], [], [], None
    for text, step in engine.stream_text(steps):
        tokens.append(step.token)
        lps.append(step.logprob)
        last = step
        for piece in splitter.feed(text) + (splitter.flush() if step.finish_reason else []):
            pieces.append(piece)
            if not as_json:
                printer(piece)
    if not as_json:
        printer.end()
        return
    answer, thought = joined(pieces)
    result = {
        "text": answer,
        **({"reasoning_content": thought} if thought else {}),
        "tokens": tokens,
        "prompt_tokens": len(ids),
        "truncated_tokens": dropped,
        "context": limit,
        "threads": threads,
        "finish_reason": last.finish_reason,
        "timings": last.timings.to_dict(),
    }
    if logprobs:
        result["logprobs"] = lps
    cache = engine.loaded.expert_stats()
    result["expert_cache"] = cache or {"hits": 0, "misses": 0, "bytes_copied": 0, "cpu_experts": 0,
                                       "note": "every expert resident on the device"}
    from ..loader import memory_report

    result["memory"] = memory_report(engine.loaded)
    print(json.dumps(result))


class ReplyPrinter:
    """Streams a reply's pieces: the answer on stdout (all a pipe gets), a thought on stderr (not with
    --quiet), a blank line between the two."""

    def __init__(self, quiet: bool):
        self.quiet, self.thought, self.answered = quiet, False, False

    def __call__(self, piece: Piece) -> None:
        if piece.kind == THOUGHT:
            self.thought = True
            if not self.quiet:
                self._write(sys.stderr, piece.text)
            return
        text = piece.text
        if self.thought and not self.answered:  # the answer's first piece after a thought
            text = text.lstrip("\n")
            if not text:
                return
            if not self.quiet:
                self._write(sys.stderr, "\n\n")
        self.answered = True
        self._write(sys.stdout, text)

    def end(self) -> None:
        if self.thought and not self.answered and not self.quiet:
            self._write(sys.stderr, "\n")
        self._write(sys.stdout, "\n")

    @staticmethod
    def _write(stream, text: str) -> None:
        stream.write(text)
        stream.flush()


command = run
