"""`localrun chat`: the pure pieces (thought splitting, trimming, commands, save/load) and a real
session driven through a pseudo-terminal with pexpect on the tiny random checkpoint."""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass

import pytest
import torch

from localrun.chat import (ANSWER, THOUGHT, ChatSession, Conversation, MultilineInput, Piece, Settings,
                           ThoughtSplitter, apply_setting, default_context, format_stats, history_path,
                           initial_settings, load_conversation, message_text, parse_command, save_conversation,
                           trim_to_fit)
from localrun import chat as chat_module
from localrun.chat import release_free_memory
from localrun.thoughts import open_thought
from localrun.engine import generation_defaults
from localrun.errors import LocalrunError, UsageError
from localrun.generate import Step, Timings


# Thought splitter ------------------------------------------------------------------------------

def split_all(chunks: list[str]) -> tuple[str, str, list[str]]:
    """Feed chunks; (thought text, answer text, kinds in order of appearance)."""
    s = ThoughtSplitter()
    pieces = [p for c in chunks for p in s.feed(c)] + s.flush()
    kinds = [k for i, k in enumerate(p.kind for p in pieces) if i == 0 or pieces[i - 1].kind != k]
    return ("".join(p.text for p in pieces if p.kind == THOUGHT),
            "".join(p.text for p in pieces if p.kind == ANSWER), kinds)


RAW = "<|channel>thought\nadd 17 and 25 < 50 <channel|>The answer is 42."


def test_splitter_routes_thought_and_answer():
    assert split_all([RAW]) == ("add 17 and 25 < 50 ", "The answer is 42.", [THOUGHT, ANSWER])
    assert split_all(["plain answer, no thinking"]) == ("", "plain answer, no thinking", [ANSWER])


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7])
def test_splitter_markers_split_across_pieces(size):
    chunks = [RAW[i:i + size] for i in range(0, len(RAW), size)]
    assert split_all(chunks) == split_all([RAW])


def test_splitter_every_two_way_cut():
    for cut in range(len(RAW) + 1):
        assert split_all([RAW[:cut], RAW[cut:]]) == split_all([RAW]), cut


def test_splitter_holds_back_only_a_possible_marker():
    s = ThoughtSplitter()
    assert s.feed("a <|chan") == [Piece(ANSWER, "a ")]  # "<|chan" may become "<|channel>"
    assert s.feed("ge") == [Piece(ANSWER, "<|change")]  # it did not
    assert s.feed("x < y") == [Piece(ANSWER, "x < y")]


QWEN = "<think>\nadd 17 and 25\n</think>\n\nThe answer is 42."


def test_splitter_qwen3_think_blocks():
    assert split_all([QWEN]) == ("\nadd 17 and 25\n", "\n\nThe answer is 42.", [THOUGHT, ANSWER])
    for cut in range(len(QWEN) + 1):
        assert split_all([QWEN[:cut], QWEN[cut:]]) == split_all([QWEN]), cut



def test_splitter_drops_a_close_marker_that_closes_nothing():
    # Gemma 4's templates prime an empty thought; a model may close it again: never shown
    assert split_all(["<channel|>The answer is 42."]) == ("", "The answer is 42.", [ANSWER])
    assert split_all(["a <channel|> b </think> c"]) == ("", "a  b  c", [ANSWER])
    for cut in range(len("x</think>y") + 1):
        assert split_all(["x</think>y"[:cut], "x</think>y"[cut:]]) == ("", "xy", [ANSWER]), cut


def test_splitter_starts_inside_a_thought_the_prompt_opened():
    # Qwen3's thinking templates end the generation prompt with "<think>\n": the reply starts thinking
    text = "add 17 and 25\n</think>\n\nThe answer is 42."
    for cut in range(len(text) + 1):
        s = ThoughtSplitter("<think>")
        pieces = s.feed(text[:cut]) + s.feed(text[cut:]) + s.flush()
        assert "".join(p.text for p in pieces if p.kind == THOUGHT) == "add 17 and 25\n", cut
        assert "".join(p.text for p in pieces if p.kind == ANSWER) == "\n\nThe answer is 42.", cut


@pytest.mark.parametrize("prompt, opened", [
    ("<|im_start|>assistant\n<think>\n", "<think>"),
    ("<|im_start|>assistant\n<think>\n\n</think>\n\n", None),  # Qwen3, thinking off
    ("<|turn>model\n<|channel>thought\n<channel|>", None),  # Gemma 4 26B, thinking off
    ("<|turn>model\n", None),
    ("<think>a</think> then <|channel>", "<|channel>"),
    ("<|channel>x<channel|><think>", "<think>"),
])
def test_open_thought_of_a_prompt(prompt, opened):
    assert open_thought(prompt) == opened


def test_splitter_unterminated_thought_and_no_label():
    assert split_all(["<|channel>thought\nstill thinking"]) == ("still thinking", "", [THOUGHT])
    # No label line: the text right after the marker is thought, not dropped.
    assert split_all(["<|channel>a long thought with spaces\nmore<channel|>ok"]) == \
        ("a long thought with spaces\nmore", "ok", [THOUGHT, ANSWER])


# Context trimming ------------------------------------------------------------------------------

def words(messages):
    return sum(len(m["content"].split()) for m in messages)


def convo(n: int, system: bool = True) -> list[dict]:
    head = [{"role": "system", "content": "be brief"}] if system else []
    body = []
    for i in range(n):
        body += [{"role": "user", "content": f"question {i} a b"}, {"role": "assistant", "content": f"answer {i} c"}]
    return head + body + [{"role": "user", "content": "last one"}]


def test_trim_keeps_everything_that_fits():
    msgs = convo(3)
    assert trim_to_fit(msgs, words, 1000) == (msgs, 0)


def test_trim_drops_oldest_exchanges_keeps_system_and_last():
    msgs = convo(3)  # 2 + 3 * (4 + 3) + 2 = 25 words
    kept, dropped = trim_to_fit(msgs, words, 12)
    assert dropped == 4 and kept[0]["role"] == "system" and kept[-1]["content"] == "last one"
    assert [m["content"] for m in kept[1:]] == ["question 2 a b", "answer 2 c", "last one"]
    assert words(kept) <= 12


def test_trim_never_drops_the_last_message_nor_starts_with_a_reply():
    kept, dropped = trim_to_fit(convo(2, system=False), words, 1)
    assert kept == [{"role": "user", "content": "last one"}] and dropped == 4
    msgs = [{"role": "assistant", "content": "x y z"}, {"role": "user", "content": "q"}]
    assert trim_to_fit(msgs, words, 1) == ([{"role": "user", "content": "q"}], 1)


def test_default_context():
    assert default_context(131072, None) == 4096
    assert default_context(2048, None) == 2048
    assert default_context(131072, 512) == 512
    with pytest.raises(UsageError):
        default_context(2048, 4096)


# Commands, settings, input ---------------------------------------------------------------------

def test_a_double_slash_sends_a_message_that_starts_with_a_slash():
    assert parse_command("//etc/hosts is empty?") is None
    assert message_text("//etc/hosts is empty?") == "/etc/hosts is empty?"
    assert message_text("  //x") == "/x" and message_text("a // b") == "a // b"
    assert message_text("// a comment\nint x;") == "// a comment\nint x;"  # a pasted block is sent as typed


def test_parse_command():
    assert parse_command("/set temperature 0.5") == ("set", "temperature 0.5")
    assert parse_command("  /HELP ") == ("help", "")
    assert parse_command("/system You are terse.  ") == ("system", "You are terse.")
    assert parse_command("hello /help") is None
    assert parse_command("/") is None and parse_command("//not a command") is None


def test_apply_setting_validates():
    s = Settings()
    assert apply_setting(s, "temperature", "0.5").temperature == 0.5
    assert apply_setting(s, "top-k", "40").top_k == 40
    assert apply_setting(apply_setting(s, "seed", "7"), "seed", "none").seed is None
    for name, value, message in [("temperature", "hot", "must be a number"), ("top_k", "1.5", "must be an integer"),
                                 ("top_p", "2", "top_p"), ("temperature", "-1", "temperature"),
                                 ("max_tokens", "0", "max_tokens"), ("colour", "red", "unknown setting"),
                                 ("seed", str(1 << 64), "seed must be an integer from")]:  # torch cannot take it
        with pytest.raises(UsageError, match=message):
            apply_setting(s, name, value)


def test_multiline_block():
    m = MultilineInput()
    assert m.feed("just one line") == "just one line"
    assert m.feed('"""first') is None and m.open
    assert m.feed("  indented") is None
    assert m.feed("") is None
    assert m.feed('last"""') == "first\n  indented\n\nlast" and not m.open
    assert m.feed('"""one-liner"""') == "one-liner"
    assert m.feed('"""') is None and m.feed('"""') == "" and not m.open
    assert m.feed('"""/save x.json"""') == "/save x.json" and m.from_block  # a block is a message, not a command
    assert m.feed("/save x.json") == "/save x.json" and not m.from_block


def test_conversation_undo_and_retry():
    c = Conversation("sys")
    assert c.undo() == 0 and not c.drop_reply()
    c.add("user", "a"), c.add("assistant", "A"), c.add("user", "b"), c.add("assistant", "B")
    assert c.drop_reply() and c.turns[-1] == {"role": "user", "content": "b"}
    assert c.undo() == 1 and c.undo() == 2 and c.turns == []
    assert c.messages() == [{"role": "system", "content": "sys"}]


def test_format_stats_takes_extra_figures():
    t = Timings(prompt_tokens=10, generated_tokens=11, ttft_s=0.25, decode_s=2.0)
    line = format_stats(11, t, 3 * 2**30, {"expert hits": "93%"})
    assert line == "11 tokens · ttft 0.25 s · 5.0 tok/s · RSS 3.00 GB · expert hits 93%"
    assert format_stats(1, t, 2**20, interrupted=True) == "1 token · ttft 0.25 s · RSS 1 MB · interrupted"


def test_history_path(monkeypatch, tmp_path):
    monkeypatch.setenv("LOCALRUN_HOME", str(tmp_path))
    assert history_path() == tmp_path / "history"
    monkeypatch.delenv("LOCALRUN_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert history_path() == tmp_path / "xdg" / "localrun" / "history"


# Save / load -----------------------------------------------------------------------------------

def test_save_load_round_trip(tmp_path):
    msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": "héllo ✨"},
            {"role": "assistant", "content": "hi"}]
    path = save_conversation(msgs, tmp_path / "c.json")
    assert json.loads(path.read_text(encoding="utf-8")) == msgs
    assert load_conversation(path).messages() == msgs
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]  # no temp file left behind


def test_save_replaces_an_earlier_save_but_never_another_file(tmp_path):
    """/save onto an earlier /save (or an empty file) replaces it; onto anything else (`/save notes.txt`, a
    typo for the file just loaded's neighbour) it is an error that keeps that file as it was."""
    first, second = [{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]
    save_conversation(first, tmp_path / "c.json")
    save_conversation(second, tmp_path / "c.json")
    assert json.loads((tmp_path / "c.json").read_text()) == second
    (tmp_path / "empty.json").touch()
    save_conversation(first, tmp_path / "empty.json")
    assert json.loads((tmp_path / "empty.json").read_text()) == first
    for name, text in (("notes.txt", "my notes\n"), ("config.json", '{"hidden_size": 8}')):
        (tmp_path / name).write_text(text)
        with pytest.raises(LocalrunError, match="not a saved conversation"):
            save_conversation(first, tmp_path / name)
        assert (tmp_path / name).read_text() == text


def test_save_through_a_symlink_writes_where_it_points(tmp_path):
    """/save onto a link (chats/current.json -> a synced folder) updates the file it points to and keeps the
    link, as the shell's `>` does; the atomic rename must not put a new file in the link's place."""
    (tmp_path / "synced").mkdir()
    target = tmp_path / "synced" / "chat.json"
    target.write_text("[]\n")
    link = tmp_path / "current.json"
    link.symlink_to(target)
    msgs = [{"role": "user", "content": "hi"}]
    save_conversation(msgs, link)
    assert link.is_symlink() and json.loads(target.read_text()) == msgs
    assert sorted(p.name for p in (tmp_path / "synced").iterdir()) == ["chat.json"]


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"role": "user"}', "expected a JSON list"),
    ('[{"role": "robot", "content": "x"}]', "message 0"),
    ('[{"role": "user", "content": 3}]', "message 0"),
    ('[{"role": "user", "content": "x"}, {"role": "system", "content": "y"}]', "only the first"),
])
def test_load_rejects_bad_files(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(LocalrunError, match=message):
        load_conversation(path)


def test_load_missing_and_save_failure_leave_state(tmp_path):
    with pytest.raises(LocalrunError, match="cannot read"):
        load_conversation(tmp_path / "missing.json")
    with pytest.raises(LocalrunError, match="cannot save"):
        save_conversation([], tmp_path / "no-such-dir" / "c.json")
    with pytest.raises(LocalrunError, match="directory"):
        save_conversation([], tmp_path)


# ChatSession on a fake engine ------------------------------------------------------------------

@dataclass
class FakeEngine:
    """One token per word of the rendered conversation; replies with a scripted text, one char a step."""

    reply: str = "<|channel>thought\nhm<channel|>ok"

    def encode_messages(self, messages, enable_thinking=False):
        return [0] * (2 + sum(len(m["content"].split()) + 2 for m in messages))

    def stream(self, ids, params, *, max_tokens, ignore_eos=False, between=None):
        self.max_tokens = max_tokens
        t = Timings(prompt_tokens=len(ids))
        for i, ch in enumerate(self.reply[:max_tokens]):
            if between is not None and i:  # as generate: before each decoded token after the first
                between()
            t.generated_tokens = i + 1
            yield Step(ord(ch), torch.zeros(256), "stop" if i == len(self.reply) - 1 else None, t)

    def stream_text(self, steps):
        return ((chr(s.token), s) for s in steps)

    opened = None  # the thought marker the prompt leaves open

    def open_thought(self, ids):
        return self.opened


def test_session_reply_keeps_answer_only():
    session = ChatSession(FakeEngine(), Settings(max_tokens=100), system="sys", context=200)
    session.ask("hi there")
    reply = session.respond()
    pieces = list(reply)  # one character a step: streamed as they come
    assert "".join(p.text for p in pieces if p.kind == THOUGHT) == "hm" == reply.thought
    assert [p.kind for p in pieces] == [THOUGHT, THOUGHT, ANSWER, ANSWER] and reply.answer == "ok"


def test_session_reply_starts_inside_a_thought_the_prompt_opened():
    engine = FakeEngine()
    engine.reply, engine.opened = "hm</think>ok", "<think>"
    session = ChatSession(engine, Settings(max_tokens=100), context=200)
    session.ask("hi")
    reply = session.respond()
    list(reply)
    assert (reply.thought, reply.answer) == ("hm", "ok")
    session.commit(reply)
    assert session.conversation.turns[-1] == {"role": "assistant", "content": "ok", "reasoning_content": "hm"}
    assert session.conversation.messages()[-1] == {"role": "assistant", "content": "ok"}  # templates see the answer


def exchange(session: ChatSession, text: str):
    """One message and its whole reply, kept."""
    session.ask(text)
    reply = session.respond()
    list(reply)
    session.commit(reply)
    return reply


def test_a_reply_that_is_all_thought_keeps_its_thought_for_save(tmp_path):
    """max_tokens can end a reply inside its thought: the answer is empty, the thought is still what was said."""
    session = ChatSession(FakeEngine("<|channel>thought\nstill thinking"), Settings(max_tokens=100), context=200)
    exchange(session, "hi")
    assert session.conversation.messages()[-1] == {"role": "assistant", "content": ""}
    assert session.command("save", str(tmp_path / "c.json")).text.startswith("saved 2 messages")
    one = ChatSession(FakeEngine("ok"), Settings(max_tokens=8), context=200)
    one.ask("hi")
    assert one.command("save", str(tmp_path / "one.json")).text.startswith("saved 1 message to")
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved[-1] == {"role": "assistant", "content": "", "reasoning_content": "still thinking"}
    assert load_conversation(tmp_path / "c.json").saved() == saved  # and it comes back from /load


def test_session_trims_oldest_turns_to_the_context():
    session = ChatSession(FakeEngine("ok"), Settings(max_tokens=8), system="be brief", context=40)
    for i in range(6):
        session.ask(f"message number {i} with some words")
        reply = session.respond()
        list(reply)
        session.commit(reply)
        if reply.dropped:
            break
    assert reply.dropped and i > 0
    msgs = session.conversation.messages()
    assert msgs[0] == {"role": "system", "content": "be brief"} and msgs[1]["role"] == "user"
    assert msgs[-2]["content"] == f"message number {i} with some words"
    assert session.count_tokens(msgs[:-1]) <= 40 - 8


def test_turns_beyond_the_context_are_kept_for_save(tmp_path):
    """Trimming hides the oldest turns from the model; /save still writes every one of them."""
    session = ChatSession(FakeEngine("ok"), Settings(max_tokens=8), system="be brief", context=40)
    for i in range(6):
        exchange(session, f"message number {i} with some words")
    visible = session.conversation.messages()
    assert visible[1]["content"] != "message number 0 with some words"  # the model no longer sees it
    assert "no longer fit it" in session.command("stats", "").text
    assert session.command("save", str(tmp_path / "c.json")).text.startswith("saved 13 messages")
    saved = json.loads((tmp_path / "c.json").read_text())
    assert [m["content"] for m in saved if m["role"] == "user"] == [f"message number {i} with some words"
                                                                   for i in range(6)]
    assert saved[-len(visible) + 1:] == visible[1:]  # what the model sees is the saved tail
    assert session.command("undo", "").text and session.conversation.hidden <= len(session.conversation.turns)
    session.command("clear", "")
    assert session.conversation.hidden == 0


def test_session_hands_free_heap_back_after_each_reply(monkeypatch):
    calls = []
    monkeypatch.setattr(chat_module, "release_free_memory", lambda: calls.append(1) or True)
    session = ChatSession(FakeEngine("ok"), Settings(max_tokens=8), context=200)
    for i in range(3):
        session.ask(f"message {i}")
        reply = session.respond()
        list(reply)
        session.commit(reply)
    assert len(calls) == 3
    assert chat_module.release_free_memory.__module__  # the real one still importable
    assert isinstance(release_free_memory(), bool)


def test_onednn_shape_caches_are_bounded():
    """Each chat turn prefills a new length; oneDNN's and ideep's per-shape caches must not keep
    1024 GEMMs each (issue 15). The kernels module sets both bounds unless the user did."""
    from localrun import kernels
    for var in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        assert int(os.environ[var]) <= 1024
    assert kernels.ONEDNN_CACHE_CAPACITY <= 128


def test_session_too_long_message_is_an_error_and_dropped():
    session = ChatSession(FakeEngine(), Settings(max_tokens=8), context=16)
    session.ask("word " * 50)
    with pytest.raises(LocalrunError, match="too long"):
        session.respond()
    assert session.conversation.turns == []


def test_session_commands():
    session = ChatSession(FakeEngine(), Settings(), context=200)
    assert session.command("nope", "").error
    assert session.command("set", "temperature 0.5").text == "temperature = 0.5"
    bad = session.command("set", "temperature warm")
    assert bad.error and "must be a number" in bad.text and session.settings.temperature == 0.5
    assert session.command("think", "on").text == "thinking on" and session.settings.think
    assert session.command("think", "maybe").error
    assert session.command("retry", "").error
    assert session.command("load", "/no/such/file.json").error
    assert session.command("exit", "").exit


def test_model_sampling_defaults_unless_a_flag_or_set_says_otherwise(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 1.0, "top_k": 64, "top_p": 0.95, "eos_token_id": [1, 106]}))
    defaults = generation_defaults(tmp_path)
    assert defaults == {"temperature": 1.0, "top_k": 64, "top_p": 0.95}
    s = initial_settings(defaults, {"temperature": None, "top_p": 0.5}, max_tokens=9)
    assert (s.temperature, s.top_k, s.top_p, s.max_tokens) == (1.0, 64, 0.5, 9)
    assert s.from_model == ("temperature", "top_k")
    session = ChatSession(FakeEngine(), s, context=200)
    assert "temperature, top_k from the model's generation_config.json" in session.command("stats", "").text
    session.command("set", "top_k 5")
    assert session.settings.from_model == ("temperature",)
    assert initial_settings({}, {"temperature": None}).temperature == 0.0  # nothing named: greedy
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.7}))
    assert generation_defaults(tmp_path) == {}
    # values sampling cannot take are no defaults (never blamed on the user's flags or a client)
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"top_k": -5, "temperature": -1, "top_p": 1e400, "min_p": 0.05, "repetition_penalty": 0}))
    assert generation_defaults(tmp_path) == {"min_p": 0.05}


# The real thing in a pseudo-terminal -----------------------------------------------------------

pexpect = pytest.importorskip("pexpect")

STATS = r"(\d+) tokens? · ttft [\d.]+ s · (?:[\d.]+ tok/s · )?RSS [\d.]+ [MG]B([^\r\n]*)\r?\n"


def spawn_chat(model, home, *args):
    env = dict(os.environ, NO_COLOR="1", TERM="dumb", LOCALRUN_HOME=str(home),
               # One thread: on a busy shared CPU, torch's spinning thread pool is ~10x slower.
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    child = pexpect.spawn(sys.executable, ["-m", "localrun.cli", "chat", str(model), "--device", "cpu",
                                           "--dtype", "float32", *args],
                          env=env, encoding="utf-8", timeout=60, dimensions=(40, 200))
    child.expect(">>> ")
    return child


def say(child, line: str) -> str:
    """Send a line; return what was printed before the next prompt."""
    child.sendline(line)
    child.expect(">>> ")
    return child.before


def reply_tokens(out: str) -> tuple[int, str]:
    m = re.search(STATS, out)
    assert m, f"no stats line in {out!r}"
    return int(m.group(1)), m.group(2)


def test_chat_session_in_a_pty(tiny_moe, tmp_path):
    # bf16 compute (torch's CPU path, ~20x slower than fp32's C path): a 2000-token reply is still
    # streaming when the Ctrl-C below comes, where fp32 would have finished it in half a second
    child = spawn_chat(tiny_moe, tmp_path, "--max-tokens", "8", "--ignore-eos", "--system", "be brief",
                       "--dtype", "bfloat16")
    try:
        out = say(child, "hello")
        assert reply_tokens(out) == (8, "")
        assert "temperature = 0.5" in say(child, "/set temperature 0.5")
        assert "error: temperature must be a number, not 'hot'" in say(child, "/set temperature hot")
        assert "error: top_p must be in (0, 1]" in say(child, "/set top_p 2")
        assert "unknown command /bogus" in say(child, "/bogus")
        reply_tokens(say(child, "second message"))
        assert "dropped the last exchange (2 messages)" in say(child, "/undo")
        reply_tokens(say(child, "/retry"))  # answers "hello" again
        say(child, f"/save {tmp_path / 'one.json'}")
        one = json.loads((tmp_path / "one.json").read_text())
        assert [(m["role"], m["content"]) for m in one][:2] == [("system", "be brief"), ("user", "hello")]
        assert [m["role"] for m in one] == ["system", "user", "assistant"]

        # Ctrl-C mid-reply: generation stops, the chat goes on.
        say(child, "/set max_tokens 2000")
        child.sendline("tell me a long story")
        child.expect("tell me a long story\r\n")
        child.expect(r"\S")  # the first streamed text
        child.sendintr()
        child.expect(">>> ")
        n, tail = reply_tokens(child.before)
        assert n < 2000 and "interrupted" in tail
        say(child, "/set max_tokens 8")
        assert reply_tokens(say(child, "still there?")) == (8, "")

        say(child, f"/save {tmp_path / 'two.json'}")
        two = json.loads((tmp_path / "two.json").read_text())
        assert [m["content"] for m in two if m["role"] == "user"] == ["hello", "tell me a long story", "still there?"]
        assert [m["role"] for m in two] == ["system"] + ["user", "assistant"] * 3

        assert "loaded 3 messages" in say(child, f"/load {tmp_path / 'one.json'}")
        (tmp_path / "bad.json").write_text("[1, 2")
        assert re.search(r"error: cannot load \S+bad.json: not valid JSON[^\r\n]*\r?\n$", say(child, f"/load {tmp_path / 'bad.json'}"))
        say(child, f"/save {tmp_path / 'three.json'}")
        assert json.loads((tmp_path / "three.json").read_text()) == one  # round trip; the bad load changed nothing

        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    assert "/set temperature 0.5" in (tmp_path / "history").read_text().splitlines()


def test_chat_history_recall_and_ctrl_c_exit(tiny_moe, tmp_path):
    (tmp_path / "history").write_text("/set temperature 0.25\n")
    child = spawn_chat(tiny_moe, tmp_path)
    try:
        child.sendcontrol("p")  # readline: previous history line, from the file of an earlier session
        child.sendline("")
        child.expect("temperature = 0.25")
        child.expect(">>> ")
        child.sendintr()
        child.expect("Ctrl-C again")
        child.sendintr()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_chat_missing_demo_is_one_line_error(monkeypatch, tmp_path, capsys):
    from localrun import cli, resolve

    monkeypatch.setattr(resolve, "DEMO_DIR", tmp_path / "nothing")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["chat"])
    assert exit_.value.code == 1
    assert capsys.readouterr().err == "error: the demo model is not built: run scripts/train_demo_model.py\n"


def test_reply_interrupted_before_its_first_token_leaves_no_empty_turn(tmp_path):
    session = ChatSession(FakeEngine("ok"), Settings(max_tokens=8), context=200)
    session.ask("first")
    reply = session.respond()
    list(reply)
    session.commit(reply)
    session.ask("second")
    reply = session.respond()
    reply.pieces.close()  # Ctrl-C before any token
    session.commit(reply)
    session.command("save", str(tmp_path / "c.json"))
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved == [{"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"}]


def test_stats_shows_threads():
    session = ChatSession(FakeEngine(), Settings(), context=200, threads=3)
    assert "threads   3" in session.command("stats", "").text


def test_chat_plans_its_kv_cache_for_the_context_it_uses(monkeypatch, tmp_path, capsys):
    """chat keeps 4096 tokens (or --context, or the model's positions if fewer): the loader plans the KV
    cache for exactly that, not for the loader's own 8192 default."""
    from localrun import cli
    from localrun.engine import Engine
    from localrun.errors import LocalrunError
    from localrun.tiny import tiny_config, write_checkpoint

    model_dir = write_checkpoint(tmp_path / "m", tiny_config("moe", max_position_embeddings=32768))
    asked = []

    def load(cls, model_dir, **kwargs):
        asked.append(kwargs["context"])
        raise LocalrunError("stop here")

    monkeypatch.setattr(Engine, "load", classmethod(load))
    for argv, context in (([], 4096), (["--context", "100"], 100)):
        with pytest.raises(SystemExit):
            cli.main(["chat", str(model_dir), "-q", *argv])
        assert asked[-1] == context
    with pytest.raises(SystemExit) as exit_:  # past the model's positions: refused before loading
        cli.main(["chat", str(model_dir), "-q", "--context", "40000"])
    assert exit_.value.code == 2 and len(asked) == 2
    capsys.readouterr()


def test_text_that_is_no_text_is_saved_and_answered(tmp_path):
    """A message (or /load, /system) holding lone surrogates (non-UTF-8 bytes from the terminal, JSON's
    "\\ud800") is kept with U+FFFD in their place: it is answered and /save writes it."""
    session = ChatSession(FakeEngine("ok"), Settings(max_tokens=8), system="be \udcff brief", context=200)
    session.ask("hi \ud800")
    reply = session.respond()
    list(reply)
    session.commit(reply)
    (tmp_path / "in.json").write_text('[{"role": "user", "content": "a \\ud800"}]')
    assert not session.command("save", str(tmp_path / "c.json")).error
    saved = json.loads((tmp_path / "c.json").read_text(encoding="utf-8"))
    assert saved[0]["content"] == "be \ufffd brief" and saved[1]["content"] == "hi \ufffd"
    assert not session.command("load", str(tmp_path / "in.json")).error
    assert session.conversation.turns == [{"role": "user", "content": "a \ufffd"}]


def test_a_reply_that_fails_does_not_end_the_chat(capsys):
    """A bug inside one reply (here the engine raises mid-stream) is one error line: the message it
    could not answer is dropped, the conversation before it is kept, and the next message is answered."""
    from localrun.commands.chat import Terminal, show_reply

    class Flaky(FakeEngine):
        calls = 0

        def stream(self, ids, params, *, max_tokens, ignore_eos=False):
            Flaky.calls += 1
            for i, step in enumerate(super().stream(ids, params, max_tokens=max_tokens)):
                if Flaky.calls == 2 and i == 1:
                    raise RuntimeError("boom\nsecond line")
                yield step

    session = ChatSession(Flaky("ok"), Settings(max_tokens=8), context=200)
    term = Terminal()
    for text in ("first", "second", "third"):
        session.ask(text)
        show_reply(session, term)
    out = capsys.readouterr().out
    assert "error: RuntimeError: boom (that message was dropped; the conversation is kept)" in out
    assert session.conversation.turns == [{"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"},
                                          {"role": "user", "content": "third"}, {"role": "assistant", "content": "ok"}]


def test_a_retry_that_gives_nothing_keeps_the_previous_reply(capsys):
    """/retry takes the last reply away to answer its question again; interrupted before its first
    token (or failing), that question keeps its previous reply, not nothing."""
    from localrun.commands.chat import Terminal, show_reply

    session = ChatSession(FakeEngine("ok"), Settings(max_tokens=8), context=200)
    session.ask("first")
    reply = session.respond()
    list(reply)
    session.commit(reply)
    kept = list(session.conversation.turns)
    assert session.command("retry", "").respond
    reply = session.respond()
    reply.pieces.close()  # Ctrl-C before any token
    assert session.commit(reply) is True and session.conversation.turns == kept

    class Failing(FakeEngine):
        def stream(self, ids, params, *, max_tokens, ignore_eos=False):
            raise RuntimeError("boom")
            yield

    session.engine = Failing("ok")
    assert session.command("retry", "").respond
    show_reply(session, Terminal())
    assert session.conversation.turns == kept and "error: RuntimeError: boom" in capsys.readouterr().out
    session.engine = FakeEngine("fine")
    session.ask("second")  # a new message that gets no reply is dropped, the earlier reply stays
    reply = session.respond()
    reply.pieces.close()
    assert session.commit(reply) is False and session.conversation.turns == kept


def test_model_text_cannot_drive_the_terminal(capsys, monkeypatch):
    """A model's control characters (ESC through byte-fallback tokens: clear screen, window title) reach
    the terminal as U+FFFD; newlines stay (and tabs, as spaces)."""
    from localrun.commands.chat import Terminal, show_reply

    monkeypatch.setenv("NO_COLOR", "1")  # no escapes of the chat's own styling either

    session = ChatSession(FakeEngine("A\x1b]0;TITLE\x07B\x1b[2JC\r\nok\tx"), Settings(max_tokens=64), context=200)
    session.ask("hi")
    show_reply(session, Terminal())
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "A\ufffd]0;TITLE\ufffdB\ufffd[2JC\nok" in out, repr(out)


def test_a_loaded_conversation_that_awaits_a_reply(tmp_path):
    """/load of a file ending with a user message says so (/retry answers it); a message typed then
    joins it, so the template still sees user and assistant in turn."""
    (tmp_path / "c.json").write_text(json.dumps([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                                 {"role": "user", "content": "c"}]))
    session = ChatSession(FakeEngine("ok"), Settings(max_tokens=8), context=200)
    outcome = session.command("load", str(tmp_path / "c.json"))
    assert "awaits a reply (/retry answers it)" in outcome.text
    session.ask("d")
    assert session.conversation.turns[-1] == {"role": "user", "content": "c\n\nd"} and len(session.conversation.turns) == 3


def test_repl_sends_a_double_slash_line_as_a_message(monkeypatch, tmp_path, capsys):
    from localrun.commands.chat import Terminal, repl

    monkeypatch.setenv("LOCALRUN_HOME", str(tmp_path))
    lines = iter(["//etc/hosts is empty?", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    session = ChatSession(FakeEngine("ok"), Settings(max_tokens=8), context=200)
    repl(session, Terminal())
    assert session.conversation.turns[0] == {"role": "user", "content": "/etc/hosts is empty?"}
    assert "unknown command" not in capsys.readouterr().out


def test_each_reply_takes_the_cores_idle_at_its_start_unless_threads_were_given(monkeypatch):
    """Without --threads, every reply re-reads which cores other processes leave idle (a program that
    took a core since the last reply would stall every parallel step of two threads); with --threads,
    the count never changes."""
    from localrun import hardware

    before = torch.get_num_threads()
    idle = iter([2, 1, 2])
    monkeypatch.setattr(hardware, "default_threads", lambda: next(idle))
    try:
        session = ChatSession(FakeEngine("ok"), Settings(max_tokens=8), context=200, threads=2, idle_threads=True)
        seen = []
        for _ in range(3):
            session.ask("hi")
            reply = session.respond()
            seen.append((torch.get_num_threads(), session.threads))
            list(reply)
            session.commit(reply)
        assert seen == [(2, 2), (1, 1), (2, 2)]
        assert "threads   2" in session.command("stats", "").text
        pinned = ChatSession(FakeEngine("ok"), Settings(max_tokens=8), context=200, threads=1)
        torch.set_num_threads(1)
        pinned.ask("hi")
        list(pinned.respond())
        assert torch.get_num_threads() == 1 and pinned.threads == 1  # default_threads is never asked
    finally:
        torch.set_num_threads(before)


def test_during_a_reply_without_threads_the_count_follows_the_idle_cores(monkeypatch):
    """Without --threads a reply polls hardware.IdleCoreWatch between its prefill chunks and tokens (it
    looks every half second), so a program that takes a core mid-reply costs that reply a thread, not a
    stall; /stats shows the count. With --threads there is no watch."""
    from localrun import chat as chat_module

    polls = []

    class Watch:
        def __init__(self):
            self.answers = iter([None, 1, None, None, 2, None, None, None, None])

        def poll(self):
            polls.append(len(polls))
            return next(self.answers)

    monkeypatch.setattr(chat_module, "IdleCoreWatch", Watch)
    monkeypatch.setattr(chat_module, "use_idle_cores", lambda: 2)
    session = ChatSession(FakeEngine("abcdef"), Settings(max_tokens=8), context=200, threads=2, idle_threads=True)
    session.ask("hi")
    seen = [session.threads for _ in session.respond()]
    assert len(polls) == 5 and seen == [2, 2, 1, 1, 1, 2]
    pinned = ChatSession(FakeEngine("abcdef"), Settings(max_tokens=8), context=200, threads=2)
    pinned.ask("hi")
    assert [pinned.threads for _ in pinned.respond()] == [2] * 6 and len(polls) == 5


def test_ctrl_c_before_a_reply_starts_or_during_a_command_keeps_the_chat(monkeypatch, tmp_path, capsys):
    """Ctrl-C while a message is tokenized and trimmed (seconds for a long conversation or a pasted
    document), before any token, stops that reply as it stops one mid-stream: the message is dropped,
    the conversation before it stays and the chat goes on. During a slash command (/stats counts the
    conversation's tokens) it stops the command."""
    from localrun.commands.chat import Terminal, repl

    class Slow(FakeEngine):
        interrupt = False

        def encode_messages(self, messages, enable_thinking=False):
            if self.interrupt:
                raise KeyboardInterrupt  # what SIGINT raises inside the tokenizer
            return super().encode_messages(messages, enable_thinking)

    engine = Slow("ok")
    session = ChatSession(engine, Settings(max_tokens=8), context=200)
    monkeypatch.setenv("LOCALRUN_HOME", str(tmp_path))

    def typed(line):
        engine.interrupt = line in ("second", "/stats")
        return line

    lines = iter(["first", "second", "/stats", "third", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": typed(next(lines)))
    try:
        repl(session, Terminal())
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C before the reply's first token ended the chat")
    out = capsys.readouterr().out
    assert "interrupted before the first token (the message was dropped; send it again)" in out
    assert [m["content"] for m in session.conversation.turns] == ["first", "ok", "third", "ok"]


def test_a_retry_with_nothing_to_answer_drops_nothing(tmp_path):
    """/retry answers the user message before the last reply again; where there is none (a loaded file that
    ends with two replies, or holds replies only) it is an error that leaves every message in place."""
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
             {"role": "assistant", "content": "c"}]
    (tmp_path / "c.json").write_text(json.dumps(turns))
    session = ChatSession(FakeEngine("ok"), Settings(max_tokens=8), context=200)
    session.command("load", str(tmp_path / "c.json"))
    outcome = session.command("retry", "")
    assert outcome.error and not outcome.respond
    assert session.conversation.turns == turns


def test_a_system_prompt_that_fills_the_context_is_named_as_the_cause():
    """A short message after a system prompt longer than the context: the error names the system prompt
    (what /system can fix), not only the message, which alone would fit."""
    session = ChatSession(FakeEngine("ok"), Settings(max_tokens=8), system="word " * 50, context=30)
    session.ask("hi")
    with pytest.raises(LocalrunError, match="the system prompt and the message are too long: .*/system"):
        session.respond()
    session.command("system", "")
    exchange(session, "hi")
    assert session.conversation.turns[-1]["content"] == "ok"


def test_a_message_that_joined_a_loaded_one_and_got_no_reply_leaves_the_loaded_one(tmp_path):
    """A message typed after a /load that awaits a reply joins that message; interrupted before its first
    token (or failing), only what was typed is dropped: the loaded message still awaits its reply. So it does
    after a /retry that answers the loaded message itself."""
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    (tmp_path / "c.json").write_text(json.dumps(turns))
    session = ChatSession(FakeEngine("ok"), Settings(max_tokens=8), context=200)
    session.command("load", str(tmp_path / "c.json"))
    session.ask("d")
    reply = session.respond()
    reply.pieces.close()  # Ctrl-C before any token
    session.commit(reply)
    assert session.conversation.turns == turns
    exchange(session, "e")
    assert session.conversation.turns[2:] == [{"role": "user", "content": "c\n\ne"},
                                              {"role": "assistant", "content": "ok"}]
    # /retry answers the loaded message itself: interrupted, the message still awaits its reply
    session = ChatSession(FakeEngine("ok"), Settings(max_tokens=8), context=200)
    session.command("load", str(tmp_path / "c.json"))
    assert session.command("retry", "").respond
    reply = session.respond()
    reply.pieces.close()
    session.commit(reply)
    assert session.conversation.turns == turns
