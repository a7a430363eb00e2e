"""`localrun run MODEL PROMPT`: one prompt, one answer; scriptable (stdin, --json)."""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer

from ..engine import DTYPES, Engine
from ..hardware import parse_size
from ..resolve import resolve_model
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
    system: Optional[str] = typer.Option(None, "--system", help="System prompt."),
    raw: bool = typer.Option(False, "--raw", help="Skip the chat template; tokenize the prompt as-is (BOS added)."),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy."),
    top_k: int = typer.Option(0, "--top-k", help="Keep the k most likely tokens (0 = off)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (1 = off)."),
    min_p: float = typer.Option(0.0, "--min-p", help="Drop tokens below min_p x the top probability (0 = off)."),
    repeat_penalty: float = typer.Option(1.0, "--repeat-penalty", help="Penalize tokens already seen (1 = off)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for reproducible sampling."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Don't stop at end-of-turn tokens."),
    think: bool = typer.Option(False, "--think", help="Enable Gemma 4 thinking (enable_thinking)."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda or auto."),
    dtype: str = typer.Option("bfloat16", "--dtype", help="Compute dtype: bfloat16 or float32."),
    experts: Optional[str] = typer.Option(None, "--experts", help="Routed expert precision: nf4 (default), fp4 or bf16."),
    vram: Optional[str] = typer.Option(None, "--vram", help="GPU memory budget, e.g. 16GiB (default: free VRAM)."),
    resident_experts: Optional[float] = typer.Option(
        None, "--resident-experts", help="Force this fraction (0..1) of each layer's experts resident; the rest in RAM."),
    context: Optional[int] = typer.Option(None, "--context", help="Context length to plan for (default 8192)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming text."),
    logprobs: bool = typer.Option(False, "--logprobs", help="With --json: log-probability of each token."),
) -> None:
    """Generate a reply to one prompt."""
    if max_tokens < 1:
        raise UsageError("--max-tokens must be at least 1")
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be bfloat16 or float32, not {dtype!r}")
    params = SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, seed)
    text_in = read_prompt(prompt)
    engine = Engine.load(resolve_model(model), device=device, dtype=DTYPES[dtype], experts=experts,
                         vram=parse_size(vram) if vram else None, context=context,
                         resident_fraction=resident_experts)
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
    print(json.dumps(result))


command = run
