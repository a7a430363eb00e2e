"""`localrun serve`: the OpenAI HTTP API over one loaded model (Starlette + uvicorn, the `serve` extra).

The HTTP layer parses, queues and streams; the generation loop is the one `run` and `chat` use.
One scheduler thread owns the model: it gives each of `--parallel` slots a request, and steps the
running ones one token each in turn, so a slot freed by a finished or disconnected request takes
the next one within one decode step. Every slot is a `Session` (localrun/session.py): its KV
cache keeps the last conversation, and a request goes to the free slot whose cache shares the
longest prefix with its prompt, so a client that resends a growing conversation prefills only
what is new; a request that shares less than half its prompt with any cache (a new conversation
with the same system prompt) takes an empty slot, else the least recently used one (`pick_slot`, as
llama.cpp's server), so the other conversations keep their caches.

The API is the subset vLLM and SGLang accept as well: `/v1/chat/completions`, `/v1/completions`,
`/v1/models`, `/health`; `top_k`, `min_p`, `repetition_penalty`, `ignore_eos` and
`chat_template_kwargs` are optional extensions named as vLLM names them. Errors use OpenAI's body:
{"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import math
import secrets
import threading
import time
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from .thoughts import ANSWER, ThoughtSplitter, split_thinking
from .engine import Engine
from .errors import LocalrunError
from .hardware import IdleCoreWatch, use_idle_cores
from .sampling import SEED_MAX, SEED_MIN, SamplingParams
from .text import StreamDecoder


def error_message(e: Exception) -> str:
    """What a request that failed inside the scheduler is told: a LocalrunError's own words, else the type too."""
    return str(e) if isinstance(e, LocalrunError) else f"{type(e).__name__}: {e}"


DEFAULT_MAX_QUEUE = 64  # requests waiting for a slot; one more answers 429


class APIError(Exception):
    """An OpenAI-style error: HTTP status and the body's message, type, param and code."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


# Stop strings ----------------------------------------------------------------------------------

class StopStrings:
    """Cuts streamed text at the first stop string, which may arrive split over several tokens:
    a tail that could still become one is held back until the next piece settles it."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._buf = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text now safe to emit, whether a stop string ended the reply)."""
        self._buf += text
        hits = [i for i in (self._buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self._buf = self._buf[: min(hits)], ""
            return out, True
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self._buf)), hold, -1):
                if self._buf.endswith(s[:n]):
                    hold = n
                    break
        out, self._buf = self._buf[: len(self._buf) - hold], self._buf[len(self._buf) - hold:]
        return out, False

    def flush(self) -> str:
        out, self._buf = self._buf, ""
        return out


# Requests --------------------------------------------------------------------------------------

def _get(body: dict, name: str, kinds, default=None, *, check=None, what: str = "", param: str | None = None):
    """body[name] when of one of `kinds` (bool is never a number) and `check` passes; APIError 400 otherwise.

    An explicit null is `default`, as OpenAI takes it (clients send every optional field, unset ones as null).
    `param`: the field's name in the error, when it sits inside another object ("stream_options.include_usage").
    """
    value = body.get(name, default)
    if value is None:
        return default
    name = param or name
    number = kinds in (int, float) or (isinstance(kinds, tuple) and float in kinds)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and kinds is not bool)
    if number and kinds is float and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if not ok:
        kind = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "an array",
                dict: "an object"}.get(kinds, "of another type")
        raise APIError(400, f"'{name}' must be {kind}, not {json.dumps(value)[:60]}", param=name,
                       code="invalid_type")
    if check is not None and not check(value):
        raise APIError(400, f"'{name}' {what}, not {value!r}", param=name, code="invalid_value")
    return value


@dataclass
class Job:
    """One request as the scheduler sees it; events go back to the request's asyncio queue."""

    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    stops: list[str]
    ignore_eos: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    cancelled: bool = False
    tokens: int = 0  # generated so far
    cached: int = 0  # prompt tokens the slot's prefix cache held
    slot: int | None = None
    finish: str | None = None

    def emit(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (shutdown): nobody listens any more
            pass


def pick_slot(free: list[int], prompt_len: int, shared: dict[int, int], held: dict[int, int],
              last_used: dict[int, int]) -> int:
    """The free slot for a prompt of `prompt_len` tokens: the one whose cache shares the most tokens with
    it (`shared`) when that is at least half the prompt; otherwise one whose cache costs nothing to
    overwrite: an empty one (`held`: tokens cached), else the least recently used (`last_used`). A cache
    that shares half the prompt but not half of itself (a new conversation's short first message after
    the same long system prompt) is another conversation's: an empty slot comes first."""
    def worth(i: int) -> tuple[int, int]:
        if 2 * shared[i] >= prompt_len:
            same = 2 * shared[i] >= held[i] or shared[i] == prompt_len  # or the same prompt again
            return (2 if same else 0), shared[i]
        return (1 if held[i] == 0 else -1), 0  # a small overlap is not worth another conversation's cache

    return max(free, key=lambda i: (worth(i), -last_used.get(i, -1)))


class Scheduler:
    """The thread that owns the model (see the module docstring)."""

    def __init__(self, engine: Engine, *, max_queue: int = DEFAULT_MAX_QUEUE, step: str = "auto",
                 idle_threads: bool = False):
        self.engine, self.step, self.max_queue = engine, step, max_queue
        # no --threads: work after an idle spell takes the cores idle then (hardware.use_idle_cores), and
        # while it lasts the count follows what other processes take (hardware.IdleCoreWatch, which leaves
        # this process's own threads out), polled between each job's prefill chunks and tokens
        self.idle_threads = idle_threads
        self.watch: IdleCoreWatch | None = None
        self.slots = engine.sessions
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: dict[int, tuple[Job, object, StreamDecoder, StopStrings]] = {}
        self.done: collections.deque[Job] = collections.deque(maxlen=256)  # recent jobs, for tests and stats
        self.admissions = itertools.count()
        self.last_used: dict[int, int] = {}  # slot -> when it last took a job (its admission's number)
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="localrun-scheduler", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def shutdown(self) -> None:
        """Stop taking requests and end every job, waiting or running, with a 503 (no join: safe
        from a signal handler; the condition's lock is reentrant)."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()

    def stop(self) -> None:
        self.shutdown()
        if self.thread.is_alive():
            self.thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        with self.cond:
            if self.stopping:
                raise APIError(503, "the server is shutting down", type="server_error")
            free = len(self.slots) - len(self.running)
            if len(self.waiting) >= self.max_queue + free:  # beyond the free slots, `max_queue` may wait
                raise APIError(429, f"too many requests: {self.max_queue} already wait for a slot", type="requests",
                               code="rate_limit_exceeded")
            self.waiting.append(job)
            self.cond.notify_all()

    def cancel(self, job: Job) -> None:
        """Stop a job: a waiting one leaves the queue, a running one frees its slot before its next token."""
        with self.cond:
            job.cancelled = True
            if job in self.waiting:
                self.waiting.remove(job)
                self._finish(job, None)
            self.cond.notify_all()

    def _admit(self) -> None:
        """Give waiting jobs (oldest first) the free slot sharing the longest prefix with their prompt."""
        while self.waiting and len(self.running) < len(self.slots):
            job = self.waiting.popleft()
            if job.cancelled:
                self._finish(job, None)
                continue
            free = [i for i in range(len(self.slots)) if i not in self.running]
            job.slot = pick_slot(free, len(job.prompt_ids), {i: self.slots[i].common_prefix(job.prompt_ids) for i in free},
                                 {i: len(self.slots[i].tokens) for i in free}, self.last_used)
            self.last_used[job.slot] = next(self.admissions)
            try:
                steps = self.engine.stream(job.prompt_ids, job.params, max_tokens=job.max_tokens,
                                           ignore_eos=job.ignore_eos, step=self.step, session=self.slots[job.slot],
                                           between=self._follow_idle_cores if self.idle_threads else None)
            except Exception as e:  # noqa: BLE001 - one request's failure never stops the scheduler
                job.emit("error", 500, error_message(e))
                self._finish(job, "error")
                continue
            self.running[job.slot] = (job, steps, StreamDecoder(self.engine.tokenizer), StopStrings(job.stops))

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.stopping and not self.waiting and not self.running:
                    self.cond.wait()
                if self.stopping:
                    break
                idle = not self.running
            if idle and self.idle_threads:  # this thread runs the model: torch's count and its OpenMP threads
                use_idle_cores()
                self.watch = IdleCoreWatch()  # polled by each job's prefill chunks and tokens while work lasts
            with self.cond:
                self._admit()
                batch = list(self.running.items())
            for slot, (job, steps, decoder, stops) in batch:
                if job.cancelled:
                    self._release(slot, None)
                    continue
                try:
                    self._advance(slot, job, steps, decoder, stops)
                except Exception as e:  # noqa: BLE001 - one request's failure never stops the server
                    job.emit("error", 500, error_message(e))
                    self._release(slot, "error")
        with self.cond:
            for slot in list(self.running):
                self.running[slot][0].emit("error", 503, "the server is shutting down")
                self._release(slot, None)
            for job in self.waiting:
                job.emit("error", 503, "the server is shutting down")
            self.waiting.clear()

    def _follow_idle_cores(self) -> None:
        """Between a job's prefill chunks and tokens (in this thread): the cores other processes leave."""
        if self.watch is not None:
            self.watch.poll()

    def _advance(self, slot, job: Job, steps, decoder: StreamDecoder, stops: StopStrings) -> None:
        """One token of one job: text out, and the job's end when it came."""
        step = next(steps)
        if job.tokens == 0:
            job.cached = step.timings.cached_tokens
        job.tokens += 1
        hide = step.finish_reason == "stop" or step.token in self.engine.hidden_ids  # as Engine.stream_text
        text = "" if hide else decoder.push(step.token)
        if step.finish_reason:
            text += decoder.flush()
        out, hit = stops.feed(text)
        if not hit and step.finish_reason:
            out += stops.flush()
        if out:
            job.emit("text", out)
        if hit or step.finish_reason:
            job.finish = "stop" if hit else step.finish_reason
            job.emit("done", job.finish, self.usage(job))
            self._release(slot, job.finish)

    def _release(self, slot, finish) -> None:
        job, steps, _, _ = self.running.pop(slot)
        steps.close()  # the session keeps what the cache holds (see Session.sync)
        self._finish(job, finish)

    def _finish(self, job: Job, finish) -> None:
        job.finish = job.finish or finish or "cancelled"
        self.done.append(job)

    @staticmethod
    def usage(job: Job) -> dict:
        return {"prompt_tokens": len(job.prompt_ids), "completion_tokens": job.tokens,
                "total_tokens": len(job.prompt_ids) + job.tokens,
                "prompt_tokens_details": {"cached_tokens": job.cached}}


# The app ---------------------------------------------------------------------------------------

@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_queue: int = DEFAULT_MAX_QUEUE
    step: str = "auto"
    defaults: dict = field(default_factory=dict)  # sampling defaults (generation_config.json)
    idle_threads: bool = False  # no --threads: the cores idle when work starts after an idle spell (Scheduler)


class OpenAIServer:
    def __init__(self, engine: Engine, config: ServerConfig):
        self.engine, self.config = engine, config
        self.context = engine.session.cache.capacity
        self.scheduler = Scheduler(engine, max_queue=config.max_queue, step=config.step,
                                   idle_threads=config.idle_threads)
        self.created = int(time.time())

    # Parsing

    def sampling(self, body: dict) -> tuple[SamplingParams, int, list[str], bool]:
        d = self.config.defaults
        n = _get(body, "n", int, 1, check=lambda v: v == 1, what="must be 1 (one choice per request)")
        del n
        temperature = _get(body, "temperature", float, d.get("temperature", 1.0), check=lambda v: 0 <= v <= 2,
                           what="must be between 0 and 2")
        top_p = _get(body, "top_p", float, d.get("top_p", 1.0), check=lambda v: 0 < v <= 1, what="must be in (0, 1]")
        top_k = _get(body, "top_k", int, d.get("top_k", 0), check=lambda v: v >= -1, what="must be -1, 0 (off) or more")
        min_p = _get(body, "min_p", float, d.get("min_p", 0.0), check=lambda v: 0 <= v <= 1, what="must be in [0, 1]")
        penalty = _get(body, "repetition_penalty", float, d.get("repeat_penalty", 1.0),
                       check=lambda v: 0 < v < math.inf, what="must be > 0 and finite")
        seed = _get(body, "seed", int, check=lambda v: SEED_MIN <= v <= SEED_MAX,
                    what=f"must be an integer from {SEED_MIN} to {SEED_MAX}")
        # the newer name wins, unless null: a client that sets max_tokens may send max_completion_tokens: null
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _get(body, name, int, None, check=lambda v: v >= 1, what="must be at least 1")
        stop = body.get("stop")
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None and not (isinstance(stop, list) and len(stop) <= 16 and all(isinstance(s, str) for s in stop)):
            raise APIError(400, "'stop' must be a string or an array of at most 16 strings", param="stop",
                           code="invalid_type")
        ignore_eos = _get(body, "ignore_eos", bool, False)
        for flag in ("stream", "echo"):
            _get(body, flag, bool, False)
        refuse_unsupported(body)
        stream_options = _get(body, "stream_options", dict, {})
        _get(stream_options, "include_usage", bool, False, param="stream_options.include_usage")  # bool("no") is True
        _get(body, "model", str)
        params = SamplingParams(temperature, max(top_k, 0), top_p, min_p, penalty, seed)
        return params, max_tokens, stop or [], ignore_eos

    def chat_prompt(self, body: dict) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' must be a non-empty array", param="messages",
                           code="invalid_type" if not isinstance(messages, list) else "invalid_value")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
                raise APIError(400, f"messages[{i}] must be an object with role system, user or assistant",
                               param=f"messages[{i}]")
            content = m.get("content")
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise APIError(400, f"messages[{i}].content: only text parts are supported",
                                   param=f"messages[{i}].content")
                content = "".join(p["text"] for p in content)
            if content is None and m["role"] == "assistant":
                content = ""
            if not isinstance(content, str):
                raise APIError(400, f"messages[{i}].content must be a string or an array of text parts",
                               param=f"messages[{i}].content", code="invalid_type")
            out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
        kwargs = _get(body, "chat_template_kwargs", dict, {})
        # a JSON boolean only: bool("no") would turn thinking on
        thinking = _get(kwargs, "enable_thinking", bool, False, param="chat_template_kwargs.enable_thinking")
        try:
            return self.engine.encode_messages(out, enable_thinking=thinking)
        except LocalrunError as e:
            raise APIError(400, str(e), param="messages") from None

    def completion_prompt(self, body: dict) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            if not all(0 <= t < self.engine.loaded.args.vocab_size for t in prompt):
                raise APIError(400, "'prompt' holds a token id outside the vocabulary", param="prompt")
            return list(prompt)
        if not isinstance(prompt, str) or not prompt:
            raise APIError(400, "'prompt' must be a non-empty string (or one array of token ids)", param="prompt",
                           code="invalid_type")
        return self.engine.tokenizer.encode(prompt)

    def job(self, ids: list[int], body: dict) -> Job:
        params, max_tokens, stops, ignore_eos = self.sampling(body)
        if len(ids) >= self.context:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens. However, your "
                           f"prompt has {len(ids)} tokens, leaving no room for a reply.",
                           param="messages" if "messages" in body else "prompt", code="context_length_exceeded")
        room = self.context - len(ids)
        max_tokens = room if max_tokens is None else min(max_tokens, room)
        return Job(ids, params, max_tokens, stops, ignore_eos, asyncio.get_running_loop(), asyncio.Queue())

    # Endpoints

    async def health(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> JSONResponse:
        """GET /v1/models/{id}: the served model's card; another id is a 404, as OpenAI answers it."""
        name = request.path_params["model"]
        if name != self.config.model_name:
            raise APIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
        return JSONResponse(self._model_card())

    def _model_card(self) -> dict:
        return {"id": self.config.model_name, "object": "model", "created": self.created, "owned_by": "localrun",
                "max_model_len": self.context}

    async def chat_completions(self, request: Request):
        body = await _json_body(request)
        ids = self.chat_prompt(body)
        return await self._respond(request, body, self.job(ids, body), chat=True, opened=self.engine.open_thought(ids))

    async def completions(self, request: Request):
        body = await _json_body(request)
        return await self._respond(request, body, self.job(self.completion_prompt(body), body), chat=False)

    async def _respond(self, request: Request, body: dict, job: Job, *, chat: bool, opened: str | None = None):
        """A chat reply's thought (its markers never shown) comes back as `reasoning_content`, apart from
        the answer; `opened`: the thought marker the prompt left open. A completion is the raw text."""
        self.scheduler.submit(job)
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": body.get("model") or self.config.model_name}
        if body.get("stream"):
            usage_chunk = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(self._stream(job, head, chat, opened, usage_chunk), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text, finish, usage = [], None, None

        async def gone():  # the body is read: the next message can only be the client leaving
            while (await request.receive())["type"] != "http.disconnect":
                pass

        watcher = asyncio.ensure_future(gone())
        try:
            while True:
                getter = asyncio.ensure_future(job.events.get())
                await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    return JSONResponse({}, status_code=499)  # nobody reads it; the job is cancelled below
                event = getter.result()
                if event[0] == "text":
                    text.append(event[1])
                elif event[0] == "error":
                    raise APIError(event[1], event[2], type="server_error")
                else:
                    finish, usage = event[1], event[2]
                    break
        finally:
            watcher.cancel()
            if finish is None:
                self.scheduler.cancel(job)
        full = "".join(text)
        if chat:
            answer, thought = split_thinking(full, opened)
            message = {"role": "assistant", "content": answer}
            if thought:
                message["reasoning_content"] = thought
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": full, "logprobs": None, "finish_reason": finish}
        return JSONResponse({**head, "choices": [choice], "usage": usage})

    async def _stream(self, job: Job, head: dict, chat: bool, opened: str | None, usage_chunk: bool):
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        splitter = ThoughtSplitter(opened) if chat else None
        finished = False

        def chunk(delta: dict | str, finish=None, usage=None) -> str:
            choice = ({"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish} if chat else
                      {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish})
            data = {**head, "choices": [choice]}
            if usage_chunk or usage is not None:
                data["usage"] = usage
            return f"data: {json.dumps(data)}\n\n"

        def deltas(pieces) -> list[str]:
            return [chunk({"content" if p.kind == ANSWER else "reasoning_content": p.text} if chat else p.text)
                    for p in pieces if p.text]

        try:
            if chat:
                yield chunk({"role": "assistant", "content": ""})
            while True:
                event = await job.events.get()
                if event[0] == "text":
                    pieces = splitter.feed(event[1]) if splitter else [_Piece(event[1])]
                    for line in deltas(pieces):
                        yield line
                elif event[0] == "error":
                    error = {"message": event[2], "type": "server_error", "param": None, "code": None}
                    yield f"data: {json.dumps({'error': error})}\n\n"
                    finished = True
                    break
                else:
                    for line in deltas(splitter.flush() if splitter else []):
                        yield line
                    # without include_usage, usage rides on the finishing chunk (every final response carries
                    # it); with it, only on OpenAI's extra chunk after it (a client summing usage counts it once)
                    yield chunk({} if chat else "", event[1], None if usage_chunk else event[2])
                    if usage_chunk:
                        yield f"data: {json.dumps({**head, 'choices': [], 'usage': event[2]})}\n\n"
                    finished = True
                    break
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # the client went away (or the server stops): free the slot now
                self.scheduler.cancel(job)


@dataclass
class _Piece:
    text: str
    kind: str = ANSWER


# Fields of the OpenAI API localrun does not implement, and the values that ask for nothing: any other
# value is a 400 naming the field (a silently ignored logit_bias, penalty, JSON mode or tool list
# would hand the client something else than it asked for).
UNSUPPORTED = {"echo": (False,), "logprobs": (False, 0), "top_logprobs": (0,), "logit_bias": ({},), "presence_penalty": (0, 0.0),
               "frequency_penalty": (0, 0.0), "best_of": (1,), "suffix": ("",), "tools": ([],), "functions": ([],),
               "tool_choice": ("none", "auto"), "function_call": ("none", "auto"),
               "response_format": ({"type": "text"},)}


def refuse_unsupported(body: dict) -> None:
    """APIError 400 for a field of UNSUPPORTED set to anything but null or a value that asks for nothing."""
    for name, off in UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and not any(value == v and type(value) is type(v) for v in off):
            raise APIError(400, f"'{name}' is not supported by this server", param=name)


async def _json_body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
    except RecursionError:  # arrays or objects nested thousands deep
        raise APIError(400, "the request body is not valid JSON (nested too deep)", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return body


class _Guard:
    """ASGI middleware: the API key on every endpoint but /health, and OpenAI error bodies for
    APIError, unknown routes and anything unexpected (never a traceback)."""

    def __init__(self, app, api_key: str | None = None):
        self.app, self.api_key = app, api_key

    def authorized(self, scope) -> bool:
        """'Authorization: Bearer KEY', the scheme in any case (RFC 9110), the key as the bytes sent (UTF-8 for
        a non-ASCII one)."""
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, key = given.partition(b" ")
        return scheme.lower() == b"bearer" and secrets.compare_digest(key, self.api_key.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            if self.api_key and scope["path"] != "/health" and not self.authorized(scope):
                raise APIError(401, "Incorrect API key provided: send 'Authorization: Bearer KEY'",
                               code="invalid_api_key")
            await self.app(scope, receive, tracked)
        except APIError as e:
            if not started:
                await e.response()(scope, receive, send)
        except Exception as e:  # noqa: BLE001
            if not started:
                await APIError(500, f"internal error: {type(e).__name__}", type="server_error").response()(
                    scope, receive, send)


def make_app(engine: Engine, config: ServerConfig) -> Starlette:
    """The ASGI app; its lifespan starts and stops the scheduler thread."""
    server = OpenAIServer(engine, config)

    async def not_found(request: Request, exc):
        status = getattr(exc, "status_code", 404)
        return APIError(status, f"{request.method} {request.url.path}: "
                        f"{'no such endpoint' if status == 404 else 'method not allowed'}",
                        code="not_found" if status == 404 else "method_not_allowed").response()

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        server.scheduler.start()
        try:
            yield
        finally:
            server.scheduler.stop()

    routes = [
        Route("/health", server.health, methods=["GET"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/v1/models/{model:path}", server.model, methods=["GET"]),
        Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
        Route("/v1/completions", server.completions, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: not_found},
                    middleware=[Middleware(_Guard, api_key=config.api_key)])
    app.state.server = server
    return app
