"""`localrun run MODEL PROMPT`: one prompt, one answer; scriptable (stdin, --json)."""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer

from ..engine import Engine
from ..loader import memory_report
from ..resolve import resolve_model
from . import _options as opt
from ._progress import progress_bar
from ..errors import UsageError
from ..sampling import SamplingParams


def read_prompt(prompt: Optional[str]) -> str:
    """PROMPT as given; `-` or a missing PROMPT with piped stdin reads stdin. Never waits on a terminal."""
    if prompt is not None and prompt != "-":
        return prompt
    if prompt is None and sys.stdin.isatty():
        raise UsageError("no prompt: give PROMPT, or pipe it on stdin (PROMPT '-')")
    text = sys.stdin.read()
    if not text.strip():
        raise UsageError("empty prompt on stdin")
    return text


def run(
    model: str = typer.Argument(..., help="Model directory (HF checkpoint or localrun pre-quantized), HF repo id, or 'demo'."),
    prompt: Optional[str] = typer.Argument(None, help="The prompt; '-' or piped stdin reads it from stdin."),
    system: Optional[str] = opt.SYSTEM,
    raw: bool = typer.Option(False, "--raw", help="Skip the chat template; tokenize the prompt as-is (BOS added)."),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", help="Most tokens to generate."),
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
    context: Optional[int] = typer.Option(None, "--context", help="Context length to plan for (default 8192)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming text."),
    logprobs: bool = typer.Option(False, "--logprobs", help="With --json: log-probability of each token."),
    quiet: bool = opt.QUIET,
) -> None:
    """Generate a reply to one prompt. Greedy unless sampling flags are given (reproducible for scripts;
    `chat` samples with the model's generation_config.json defaults)."""
    if max_tokens < 1:
        raise UsageError("--max-tokens must be at least 1")
    load = opt.load_kwargs(device, dtype, experts, vram, resident_experts, context)
    params = SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, seed)
    text_in = read_prompt(prompt)
    with progress_bar("loading", enabled=not quiet) as update:
        engine = Engine.load(resolve_model(model), progress=update, **load)
    ids = engine.encode_prompt(text_in, system=system, raw=raw, enable_thinking=think)
    pieces, tokens, lps, last = [], [], [], None
    for text, step in engine.stream_text(engine.stream(ids, params, max_tokens=max_tokens, ignore_eos=ignore_eos)):
        tokens.append(step.token)
        lps.append(step.logprob)
        pieces.append(text)
        last = step
        if not as_json and text:
            sys.stdout.write(text)
            sys.stdout.flush()
    if not as_json:
        sys.stdout.write("\n")
        return
    result = {
        "text": "".join(pieces),
        "tokens": tokens,
        "prompt_tokens": len(ids),
        "finish_reason": last.finish_reason,
        "timings": last.timings.to_dict(),
    }
    if logprobs:
        result["logprobs"] = lps
    cache = engine.loaded.expert_stats()
    result["expert_cache"] = cache or {"hits": 0, "misses": 0, "bytes_copied": 0, "cpu_experts": 0,
                                       "note": "every expert resident on the device"}
    result["memory"] = memory_report(engine.loaded)
    print(json.dumps(result))


command = run
