"""A loaded model ready to talk: weights, tokenizer, chat template and stop ids in one place.

`run`, `chat` and `bench` all go through an Engine; it returns token streams and text, and
never prints.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterator

import torch

from .config import load_config
from .errors import LocalrunError, UsageError
from .generate import Step, generate
from .loader import LoadedModel, load_model
from .models import family
from .sampling import SamplingParams, make_sampler
from .session import Session
from .text import StreamDecoder, Tokenizer, encode_chat, load_chat_template
from .thoughts import MARKERS, open_thought

PROMPT_TAIL = 16  # prompt tokens that can hold a thought the generation prompt leaves open

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}


def generation_eos_ids(model_dir: Path, config_eos: list[int]) -> list[int]:
    """Stop ids: config.json's eos ids plus generation_config.json's (Gemma 4: 1 and 106)."""
    ids = list(config_eos)
    path = model_dir / "generation_config.json"
    if path.is_file():
        try:
            eos = json.loads(path.read_text()).get("eos_token_id")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            eos = None
        for i in eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else []:
            if i not in ids:
                ids.append(i)
    return ids


# generation_config.json's sampling fields -> localrun's setting names
SAMPLING_FIELDS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                   "repetition_penalty": "repeat_penalty"}


def generation_defaults(model_dir: Path) -> dict:
    """The sampling defaults generation_config.json names ({"temperature": 1.0, "top_k": 64, "top_p": 0.95}
    for Gemma 4), by localrun's setting names; {} when it names none or says `do_sample: false`. A value
    sampling could not take (top_k -5, a negative temperature) is no default: it is left out, so the
    user's own settings are never blamed for the file's."""
    path = Path(model_dir) / "generation_config.json"
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    if not isinstance(data, dict) or data.get("do_sample") is False:
        return {}
    kinds = {"top_k": int, "temperature": float, "top_p": float, "min_p": float, "repeat_penalty": float}
    out = {}
    for field_name, name in SAMPLING_FIELDS.items():
        value = data.get(field_name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and _takes(field_name, value):
            out[name] = kinds[name](value)
    return out


def _takes(field_name: str, value) -> bool:
    """Whether SamplingParams takes `value` for its field `field_name`."""
    try:
        SamplingParams(**{field_name: value})
    except (UsageError, OverflowError, ValueError, TypeError):
        return False
    return True


@dataclass
class Engine:
    loaded: LoadedModel
    tokenizer: Tokenizer
    template: str | None  # None: the model ships none, only raw prompts
    eos_ids: list[int]
    _sessions: list[Session] | None = field(default=None, repr=False)

    @property
    def sessions(self) -> list[Session]:
        """One prefix cache (localrun/session.py) per KV cache the loader allocated (serve --parallel)."""
        if self._sessions is None:
            caches = getattr(self.loaded, "kv_slots", None) or [self.loaded.kv]
            self._sessions = [Session(kv) for kv in caches]
        return self._sessions

    @property
    def session(self) -> Session:
        """The prefix cache over the loaded model's KV: chat's conversation, serve's first slot."""
        return self.sessions[0]

    def stats(self) -> dict:
        """Figures for a status line: the expert cache hit rate when experts live in host RAM."""
        cache = self.loaded.expert_stats()
        return {"expert hit rate": f"{cache['hit_rate']:.0%}"} if cache else {}

    @classmethod
    def load(cls, model_dir: str | Path, **load_kwargs) -> "Engine":
        """Load weights (see `load_model` for the options), tokenizer and chat template of a model directory."""
        args = load_config(model_dir)  # a path that is no model fails here, before anything else is read
        tokenizer = Tokenizer.from_dir(model_dir)  # text first: a missing tokenizer fails before minutes of weights
        template = load_chat_template(model_dir, builtin=family(args.model_type).BUILTIN_CHAT_TEMPLATE)
        loaded = load_model(model_dir, **load_kwargs)
        return cls(loaded, tokenizer, template, generation_eos_ids(loaded.model_dir, loaded.args.eos_ids))

    @property
    def model(self):
        return self.loaded.model

    def encode_messages(self, messages: list[dict], *, enable_thinking: bool = False) -> list[int]:
        return encode_chat(self.tokenizer, self.template, messages, add_generation_prompt=True,
                           enable_thinking=enable_thinking)

    def encode_prompt(self, prompt: str, *, system: str | None = None, raw: bool = False,
                      enable_thinking: bool = False) -> list[int]:
        """Token ids of a one-shot prompt: through the chat template, or exactly as the tokenizer reads it (raw)."""
        if raw:
            return self.tokenizer.encode(prompt)
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return self.encode_messages(messages, enable_thinking=enable_thinking)

    def encode_truncated(self, prompt: str, keep: int, *, system: str | None = None, raw: bool = False,
                         enable_thinking: bool = False) -> list[int]:
        """`encode_prompt` with the oldest tokens of `prompt` dropped until at most `keep` ids remain.

        What frames the prompt (BOS, the template's turn markers, the system prompt) stays, so the
        model still reads a well-formed turn; LocalrunError when the frame alone needs `keep` ids.
        """
        def encode(text: str) -> list[int]:
            return self.encode_prompt(text, system=system, raw=raw, enable_thinking=enable_thinking)

        ids = encode(prompt)
        body = self.tokenizer.encode(prompt, add_special_tokens=False)
        room = keep - (len(ids) - len(body))
        if room < 1:
            raise LocalrunError(f"the context leaves {keep} tokens for the prompt, too few for the chat "
                                f"template around it ({len(ids) - len(body)} tokens)")
        drop = max(0, len(body) - room)
        while True:
            # Decoding a tail and encoding it again can merge tokens differently at the cut: re-check.
            ids = encode(self.tokenizer.decode(body[drop:]))
            if len(ids) <= keep or drop >= len(body):
                return ids
            drop = min(len(body), drop + len(ids) - keep)

    def stream(self, prompt_ids: list[int], params: SamplingParams, *, max_tokens: int,
               ignore_eos: bool = False, step: str = "auto", session: Session | None = None,
               between: Callable[[], object] | None = None) -> Iterator[Step]:
        """Generated steps for a prompt, in the loaded model's KV buffers (allocated once for the
        planned context: a reply ends with finish_reason "length" when it fills them). step: the
        decode step, see localrun/step.py (`resolve_mode`; "auto" on CUDA: graphs where every expert
        routes on the device, else graphs between the experts where the model has them, else eager).
        session: a prefix cache (`self.session`, one of `self.sessions`) that keeps what the prompt
        shares with its last sequence; None prefills the whole prompt (one-shot runs, benchmarks).
        between: called between prefill chunks and decoded tokens (`generate`)."""
        sampler = make_sampler(params, device=self.loaded.device)
        stop = () if ignore_eos else self.eos_ids
        if session is None:  # the buffers are reset: no prefix cache over them holds anything now
            for s in self.sessions:
                if s.cache is self.loaded.kv:
                    s.tokens = []
            return generate(self.model, prompt_ids, sampler, max_tokens=max_tokens, stop_ids=stop,
                            cache=self.loaded.kv, step=step, between=between)
        return generate(self.model, prompt_ids, sampler, max_tokens=max_tokens, stop_ids=stop,
                        session=session, step=step, between=between)

    @cached_property
    def hidden_ids(self) -> set[int]:
        """Control tokens that never reach the screen; the thought markers stay, the chat splits on them."""
        return self.tokenizer.special_ids() - {self.tokenizer.token_id(t) for t in MARKERS}

    def open_thought(self, prompt_ids: list[int]) -> str | None:
        """The thought marker the prompt leaves open (the reply starts inside a thought), or None."""
        return open_thought(self.tokenizer.decode(prompt_ids[-PROMPT_TAIL:]))

    def stream_text(self, steps: Iterator[Step]) -> Iterator[tuple[str, Step]]:
        """(new text, step) per step; the stop token and other control tokens (<turn|>, <unused91>) add no text."""
        decoder = StreamDecoder(self.tokenizer)
        for step in steps:
            hide = step.finish_reason == "stop" or step.token in self.hidden_ids
            text = "" if hide else decoder.push(step.token)
            if step.finish_reason:
                text += decoder.flush()
            yield text, step
