"""`localrun serve` (localrun/server.py) on 127.0.0.1, talked to by the official `openai` client and
by httpx: greedy replies, streaming, stop strings across tokens, usage, bad requests, the queue
bound, the API key, 50 concurrent streams over 2 slots, a client that leaves mid-stream, Ctrl-C."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from localrun.engine import Engine  # noqa: E402
from localrun.resolve import resolve_model  # noqa: E402
from localrun.server import ServerConfig, StopStrings, make_app  # noqa: E402
from localrun.text import StreamDecoder  # noqa: E402

torch.set_num_threads(1)
CONTEXT = 256
MESSAGES = [{"role": "user", "content": "Hello"}]


class Running:
    """A uvicorn server in a thread of this process, on a free 127.0.0.1 port."""

    def __init__(self, app):
        self.app = app
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    @property
    def scheduler(self):
        return self.app.state.server.scheduler

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def engine():
    return Engine.load(resolve_model("demo"), device="cpu", dtype=torch.float32, context=CONTEXT, parallel=2)


@pytest.fixture(scope="module")
def server(engine):
    running = Running(make_app(engine, ServerConfig("demo", step="eager")))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", timeout=60, max_retries=0)


def reference(engine, ids, max_tokens):
    """Greedy tokens straight from the model into buffers of their own (no server, no prefix cache;
    called while the server is idle, since the scheduler thread owns the model otherwise)."""
    from localrun.generate import generate
    from localrun.sampling import SamplingParams, make_sampler

    return [s.token for s in generate(engine.model, ids, make_sampler(SamplingParams()), max_tokens=max_tokens,
                                      stop_ids=engine.eos_ids)]


def test_stop_strings_across_pieces():
    stops = StopStrings(["END", "xy"])
    assert stops.feed("abcE") == ("abc", False)  # "E" may start "END"
    assert stops.feed("N") == ("", False)
    assert stops.feed("Dtail") == ("", True)
    stops = StopStrings(["END"])
    assert stops.feed("aE") == ("a", False) and stops.feed("x") == ("Ex", False) and stops.flush() == ""


def test_openai_client_chat_stream_models_usage(engine, server, client):
    assert [m.id for m in client.models.list()] == ["demo"]
    reply = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=24, temperature=0)
    text = reply.choices[0].message.content
    ids = engine.encode_messages(MESSAGES)
    expected = reference(engine, ids, 24)
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.usage.completion_tokens == len(expected) == server.scheduler.done[-1].tokens
    assert reply.usage.total_tokens == len(ids) + len(expected)
    assert reply.choices[0].finish_reason == ("stop" if expected[-1] in engine.eos_ids else "length")
    assert text and text == engine.tokenizer.decode([t for t in expected if t not in engine.eos_ids])

    chunks = list(client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [reply.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    assert [c for c in chunks[:-1] if c.usage is not None] == []  # usage once: a client summing it counts it once
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # the slot's prefix cache held the prompt

    length = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=3, temperature=0,
                                            extra_body={"ignore_eos": True})
    assert length.choices[0].finish_reason == "length" and length.usage.completion_tokens == 3

    done = client.completions.create(model="demo", prompt="The answer is", max_tokens=5, temperature=0,
                                     extra_body={"ignore_eos": True, "top_k": 1})
    assert done.usage.completion_tokens == 5 and done.choices[0].finish_reason == "length"


def test_stop_string_spanning_two_tokens(engine, client):
    ids = engine.encode_messages(MESSAGES)
    tokens = [t for t in reference(engine, ids, 24) if t not in engine.eos_ids]
    decoder = StreamDecoder(engine.tokenizer)
    pieces = [decoder.push(t) for t in tokens]
    full = "".join(pieces)
    k = next(i for i in range(1, len(pieces) - 1) if pieces[i] and pieces[i + 1] and "".join(pieces[:i]))
    stop = pieces[k][-1] + pieces[k + 1][0]  # the end of one token and the start of the next
    reply = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=24, temperature=0, stop=[stop])
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content == full[: full.find(stop)]
    streamed = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=24, temperature=0,
                                              stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == full[: full.find(stop)]


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    (b"[1, 2]", None),
    (b'{"messages": ' + b"[" * 100000 + b"]" * 100000 + b"}", None),  # RecursionError in json: was a 500
    ({"messages": MESSAGES, "max_tokens": -1}, "max_tokens"),
    ({"messages": MESSAGES, "max_tokens": "ten"}, "max_tokens"),
    ({"messages": MESSAGES, "temperature": "hot"}, "temperature"),
    (b'{"messages": [{"role": "user", "content": "Hello"}], "repetition_penalty": Infinity}', "repetition_penalty"),
    ({"messages": MESSAGES, "stop": 5}, "stop"),
    ({"messages": MESSAGES, "stream": "yes"}, "stream"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0]"),
    ({"messages": [{"role": "user", "content": "word " * 400}]}, "messages"),  # over the context
    ({"messages": MESSAGES, "seed": 99999999999999999999999}, "seed"),  # past what torch seeds with: hung the server
    ({"messages": MESSAGES, "seed": -(1 << 64)}, "seed"),
    ({"messages": MESSAGES, "chat_template_kwargs": {"enable_thinking": "no"}}, "chat_template_kwargs.enable_thinking"),
    ({"messages": MESSAGES, "stream": True, "stream_options": {"include_usage": "no"}}, "stream_options.include_usage"),
    ({"messages": MESSAGES, "max_completion_tokens": None, "max_tokens": "ten"}, "max_tokens"),
    # what localrun does not implement is refused by name, never silently ignored
    ({"messages": MESSAGES, "logit_bias": {"383": -100}}, "logit_bias"),
    ({"messages": MESSAGES, "presence_penalty": 0.5}, "presence_penalty"),
    ({"messages": MESSAGES, "frequency_penalty": 1}, "frequency_penalty"),
    ({"messages": MESSAGES, "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"messages": MESSAGES, "logprobs": True, "top_logprobs": 2}, "logprobs"),
    ({"messages": MESSAGES, "echo": True}, "echo"),
])
def test_bad_requests_get_400_and_the_server_keeps_serving(server, body, param):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + "/v1/chat/completions", content=data, headers={"Content-Type": "application/json"},
                   timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"] and error["param"] == param
    if param == "messages" and "word" in data.decode():
        assert error["code"] == "context_length_exceeded"
    ok = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}, timeout=30)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 1


def test_fields_that_ask_for_nothing_are_fine_and_completions_logprobs_is_an_integer(server):
    """The unimplemented fields at the values that ask for nothing (what clients send by default) pass;
    /v1/completions' logprobs is an integer (0-5): a positive one is refused as unsupported, by name."""
    body = {"messages": MESSAGES, "max_tokens": 1, "logit_bias": {}, "presence_penalty": 0, "frequency_penalty": 0.0,
            "tools": [], "tool_choice": "auto", "response_format": {"type": "text"}, "logprobs": False}
    assert httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30).status_code == 200
    ok = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1, "logprobs": 0}, timeout=30)
    assert ok.status_code == 200, ok.text
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1, "logprobs": 2}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
    assert "not supported" in r.json()["error"]["message"]


def test_null_means_unset(server):
    """OpenAI takes an explicit null as the field left out: max_completion_tokens null leaves max_tokens in force,
    and every other optional field null is its default (clients send them all, unset ones as null)."""
    body = {"prompt": "hi", "max_completion_tokens": None, "max_tokens": 2, "ignore_eos": True}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text
    nulls = dict.fromkeys(["model", "n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed",
                           "stop", "stream", "stream_options", "ignore_eos", "echo", "logprobs", "chat_template_kwargs",
                           "max_completion_tokens"])
    body = {**nulls, "messages": MESSAGES, "max_tokens": 1}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1, r.text
    r = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                   json={"messages": MESSAGES, "max_tokens": 1, "chat_template_kwargs": {"enable_thinking": None}})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path, raw", [
    ("/v1/chat/completions", rb'{"messages": [{"role": "user", "content": "hi \ud800"}], "max_tokens": 1}'),
    ("/v1/completions", rb'{"prompt": "\ud800 x", "max_tokens": 1}'),
])
def test_a_lone_surrogate_in_the_text_is_answered(server, path, raw):
    """A lone surrogate escape is valid JSON but no character: the tokenizer gets text it can encode
    (localrun/text.py replaces it), not a 500."""
    r = httpx.post(server.url + path, content=raw, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 200, r.text


def test_fifty_concurrent_streams_on_two_slots(engine, server):
    async def one(client, i):
        prompt = [{"role": "user", "content": f"Count to {i % 5}"}]
        text, usage = "", None
        stream = await client.chat.completions.create(
            model="demo", messages=prompt, max_tokens=4, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage is not None:
                usage = chunk.usage
        return len(engine.encode_messages(prompt)), usage

    async def main():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", timeout=120, max_retries=0) as client:
            return await asyncio.gather(*(one(client, i) for i in range(50)))

    results = asyncio.run(main())
    assert len(results) == 50
    for prompt_tokens, usage in results:
        assert usage.completion_tokens == 4 and usage.prompt_tokens == prompt_tokens
        assert usage.total_tokens == prompt_tokens + 4


def _open_stream(url, max_tokens):
    client = httpx.Client(timeout=30)
    body = {"messages": MESSAGES, "max_tokens": max_tokens, "stream": True, "ignore_eos": True, "temperature": 0}
    response = client.send(client.build_request("POST", url + "/v1/chat/completions", json=body), stream=True)
    lines = response.iter_lines()
    got = 0
    for line in lines:
        if line.startswith("data: "):
            got += 1
            if got == 3:
                break
    return client, response, lines  # the line iterator too: dropping it closes the response


def slow_down(monkeypatch, sched, seconds=0.01):
    """Each decode step takes at least `seconds`: the tiny model would finish a long reply before
    the test could act on it."""
    advance = sched._advance

    def slow(*args):
        time.sleep(seconds)
        return advance(*args)

    monkeypatch.setattr(sched, "_advance", slow)


def test_a_client_that_leaves_frees_its_slot(server, monkeypatch):
    """Both slots busy with long streams, a third request waiting: killing one stream hands its
    slot to the waiting request, and the killed generation stops early."""
    sched = server.scheduler
    slow_down(monkeypatch, sched)
    a = _open_stream(server.url, 200)
    b = _open_stream(server.url, 200)
    waiting = {}

    def third():
        waiting["r"] = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)

    t = threading.Thread(target=third)
    t.start()
    deadline = time.monotonic() + 20
    while not sched.waiting and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sched.waiting and len(sched.running) == 2
    before = {id(j) for j in sched.done}
    a[1].close()
    a[0].close()  # the client goes away mid-stream
    t.join(30)
    assert waiting["r"].status_code == 200
    killed = [j for j in sched.done if id(j) not in before and j.finish == "cancelled"]
    assert killed and killed[0].tokens < 200
    b[1].close()
    b[0].close()
    deadline = time.monotonic() + 20
    while sched.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not sched.running


def test_queue_bound_and_api_key(engine, monkeypatch):
    running = Running(make_app(engine, ServerConfig("demo", api_key="sekret", max_queue=0, step="eager")))
    slow_down(monkeypatch, running.scheduler)
    try:
        assert httpx.get(running.url + "/health").status_code == 200  # no key needed
        r = httpx.get(running.url + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(running.url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(running.url + "/v1/models", headers={"Authorization": "sekret"}).status_code == 401
        # the scheme is case-insensitive (RFC 9110); the key is not
        assert httpx.get(running.url + "/v1/models", headers={"Authorization": "bearer sekret"}).status_code == 200
        assert httpx.get(running.url + "/v1/models", headers={"Authorization": "Bearer SEKRET"}).status_code == 401
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="sekret", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list()] == ["demo"]
        streams = [client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=200, stream=True,
                                                  extra_body={"ignore_eos": True}) for _ in range(2)]
        for s in streams:
            next(iter(s))
        with pytest.raises(openai.RateLimitError) as e:  # both slots busy, no room to wait
            client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=2)
        assert e.value.status_code == 429 and e.value.body["code"] == "rate_limit_exceeded"
        for s in streams:
            s.close()
    finally:
        running.stop()


@pytest.mark.parametrize("signals", [[signal.SIGINT], [signal.SIGINT, signal.SIGINT], [signal.SIGTERM]],
                         ids=["ctrl-c", "ctrl-c-twice", "sigterm"])
def test_serve_command_binds_loopback_and_stops_on_ctrl_c(tmp_path, signals):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    # bf16 compute (torch's CPU path, far slower than fp32's C path): the 900-token stream below is
    # still going when the signal comes
    proc = subprocess.Popen([sys.executable, "-m", "localrun.cli", "serve", "demo", "--port", str(port),
                             "--device", "cpu", "-q", "--dtype", "bfloat16"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "serve did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
        assert r.status_code == 200
        # Ctrl-C while a stream is in flight: it ends with an error event, the server exits 0 quietly
        client, response, lines = _open_stream(f"http://127.0.0.1:{port}", 900)
        for sig in signals:  # twice: uvicorn's force exit, which skipped the lifespan's end (a traceback)
            proc.send_signal(sig)
            time.sleep(0.05)
        rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]" and any("shutting down" in line for line in rest)
        client.close()
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err.decode()
        assert b"Traceback" not in err and b"ERROR" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()



def test_port_0_names_the_port_it_took_even_when_quiet():
    """`serve --port 0` takes a free port; with -q too, stderr still names it, or no client could find the server."""
    import re

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "localrun.cli", "serve", "demo", "--port", "0", "--device", "cpu",
                             "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        found = threading.Event()
        lines = []

        def read():
            for line in proc.stderr:
                lines.append(line)
                if "http://127.0.0.1:" in line:
                    found.set()

        threading.Thread(target=read, daemon=True).start()
        assert found.wait(90), "".join(lines)
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)/v1", lines[-1]).group(1))
        assert port != 0 and httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

def test_a_request_that_fails_to_start_gets_500_and_the_server_keeps_serving(engine, server, monkeypatch):
    """A request whose generation cannot even start (here: the engine raises) is answered with an error;
    the scheduler thread lives on for the next one."""
    real = engine.stream
    calls = []

    def failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "stream", failing_once)
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
    assert r.status_code == 500 and "boom" in r.json()["error"]["message"]
    ok = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}, timeout=30)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 1


def test_control_tokens_never_reach_the_reply(engine, server, monkeypatch):
    """As `run` prints it: <turn|>, <unused..> and the like add no text (OpenAI and vLLM skip special
    tokens); the words around them come through."""
    from localrun.generate import Step, Timings

    tok = engine.tokenizer
    words = tok.encode("What is", add_special_tokens=False)
    special = sorted(engine.hidden_ids)[:3]
    ids = [words[0], *special, *words[1:]]

    def scripted(prompt_ids, params, max_tokens, **kwargs):
        for i, t in enumerate(ids):
            yield Step(t, torch.zeros(8), "length" if i == len(ids) - 1 else None, Timings())

    monkeypatch.setattr(engine, "stream", scripted)
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": len(ids)}, timeout=30)
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["text"]
    assert text == tok.decode(words) and not any(tok.decode([t]) in text for t in special if tok.decode([t]))


def test_serve_on_a_busy_port_fails_at_once_in_one_line():
    """The port is taken before the model loads: one line naming it, exit 1 (uvicorn's own exit 3
    came after loading and after announcing the address)."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    try:
        proc = subprocess.run([sys.executable, "-m", "localrun.cli", "serve", "demo", "--port", str(port),
                               "--device", "cpu"], capture_output=True, text=True, env=env, timeout=120)
    finally:
        busy.close()
    assert proc.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert "serving" not in proc.stderr and "Traceback" not in proc.stderr
    assert "loading" not in proc.stderr  # refused before the model loads


def test_thought_markers_never_reach_the_content(engine, server, monkeypatch):
    """A chat reply's thought comes back as reasoning_content, streamed or not; a close marker that
    closes nothing (Gemma 4 primes an empty thought when thinking is off) is dropped; a prompt that
    leaves a thought open (Qwen3's thinking templates) starts the reply inside it."""
    from localrun.generate import Step, Timings

    tok = engine.tokenizer
    replies = {
        "think": [tok.token_id("<|channel>"), *tok.encode("thought\nhm", add_special_tokens=False),
                  tok.token_id("<channel|>"), *tok.encode("ok", add_special_tokens=False)],
        "stray": [tok.token_id("<channel|>"), *tok.encode("ok", add_special_tokens=False)],
        "opened": [*tok.encode("hm", add_special_tokens=False), tok.token_id("<channel|>"),
                   *tok.encode("ok", add_special_tokens=False)],
    }
    ids = []

    def scripted(prompt_ids, params, max_tokens, **kwargs):
        for i, t in enumerate(ids):
            yield Step(t, torch.zeros(8), "length" if i == len(ids) - 1 else None, Timings())

    monkeypatch.setattr(engine, "stream", scripted)
    for case, (content, thought) in {"think": ("ok", "hm"), "stray": ("ok", None), "opened": ("ok", "hm")}.items():
        ids[:] = replies[case]
        monkeypatch.setattr(engine, "open_thought", lambda prompt_ids: "<|channel>" if case == "opened" else None)
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": len(ids)}
        message = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30).json()["choices"][0]["message"]
        assert (message["content"], message.get("reasoning_content")) == (content, thought), case
        deltas = {"content": "", "reasoning_content": ""}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    for choice in json.loads(line[6:])["choices"]:
                        for key in deltas:
                            deltas[key] += choice["delta"].get(key) or ""
        assert deltas == {"content": content, "reasoning_content": thought or ""}, case


def test_models_retrieve_one_model(server):
    """GET /v1/models/{id} (openai's `client.models.retrieve`): the served model's card, 404 for another."""
    card = httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0]
    r = httpx.get(server.url + f"/v1/models/{card['id']}", timeout=30)
    assert r.status_code == 200 and r.json() == card
    r = httpx.get(server.url + "/v1/models/no-such-model", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_a_slot_is_reused_where_it_holds_most_of_the_prompt():
    from localrun.server import pick_slot

    free = [0, 1, 2]
    # slot 0 holds this conversation: it continues there (or the same prompt again, its reply thrown away)
    assert pick_slot(free, 950, {0: 900, 1: 20, 2: 0}, {0: 1000, 1: 2000, 2: 0}, {}) == 0
    assert pick_slot(free, 20, {0: 20, 1: 0, 2: 0}, {0: 44, 1: 0, 2: 0}, {}) == 0
    # a new conversation sharing only the system prompt takes the empty slot, not slot 1's long cache
    assert pick_slot(free, 60, {0: 20, 1: 20, 2: 0}, {0: 1000, 1: 2000, 2: 0}, {}) == 2
    # no empty slot: the least recently used cache goes
    assert pick_slot(free, 60, {0: 20, 1: 20, 2: 20}, {0: 1000, 1: 2000, 2: 500}, {0: 5, 1: 3, 2: 9}) == 1
    # a slot never used before counts as the oldest
    assert pick_slot([0, 1], 8, {0: 0, 1: 0}, {0: 10, 1: 10}, {0: 4}) == 1
    # a system prompt longer than a new conversation's first message: slot 0's 3000 tokens stay
    assert pick_slot([0, 1], 250, {0: 200, 1: 0}, {0: 3000, 1: 0}, {0: 1}) == 1
    # ... unless no slot is empty: the shared system prompt is still worth more than the oldest cache
    assert pick_slot([0, 1], 250, {0: 200, 1: 0}, {0: 3000, 1: 100}, {0: 1, 1: 0}) == 0


def test_without_threads_work_after_an_idle_spell_takes_the_idle_cores(engine, monkeypatch):
    """serve without --threads re-counts the idle cores when work starts after an idle spell (each of two
    requests one after the other), and polls the watch while it lasts, in the scheduler thread that runs
    the model; with --threads, never."""
    from localrun import server as server_module

    calls, polls = [], []

    class Watch:  # hardware.IdleCoreWatch: polled while the work lasts, in the same thread
        def poll(self):
            polls.append(threading.current_thread().name)

    monkeypatch.setattr(server_module, "use_idle_cores", lambda: calls.append(threading.current_thread().name) or 1)
    monkeypatch.setattr(server_module, "IdleCoreWatch", Watch)
    for idle_threads, expected in ((True, ["localrun-scheduler"] * 2), (False, [])):
        calls.clear(), polls.clear()
        running = Running(make_app(engine, ServerConfig("demo", step="eager", idle_threads=idle_threads)))
        try:
            client = openai.OpenAI(base_url=running.url + "/v1", api_key="none", timeout=60, max_retries=0)
            for _ in range(2):
                client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=4, temperature=0)
        finally:
            running.stop()
        assert calls == expected
        assert set(polls) == set(expected) and (len(polls) >= 2 * 3) == idle_threads  # 4 tokens a request
