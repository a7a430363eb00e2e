"""`localrun run` end to end: JSON output, stdin, --raw, and every bad input as a one-line error."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch



def run_json(cli, model_dir, *extra, stdin=None):
    code, out, err = cli("run", model_dir, *extra, "--json", "--device", "cpu", stdin=stdin)
    assert code == 0, err
    return json.loads(out)


@pytest.fixture
def broken(tiny_moe, tmp_path):
    """A writable copy of the tiny checkpoint."""
    return shutil.copytree(tiny_moe, tmp_path / "m")


def test_json_output(cli, tiny_moe):
    res = run_json(cli, tiny_moe, "What is 17 + 25?", "-n", "5", "--ignore-eos", "--logprobs", "--dtype", "float32")
    assert set(res) >= {"text", "tokens", "prompt_tokens", "finish_reason", "timings", "logprobs"}
    assert len(res["tokens"]) == 5 and len(res["logprobs"]) == 5 and res["finish_reason"] == "length"
    assert all(lp <= 0 for lp in res["logprobs"])
    assert set(res["timings"]) >= {"ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s"}
    assert res["prompt_tokens"] > 10  # went through the chat template


def test_raw_tokenizes_like_transformers_and_stdin_reads_the_prompt(cli, tiny_moe):
    transformers = pytest.importorskip("transformers")
    text = "The quick brown fox"
    res = run_json(cli, tiny_moe, text, "--raw", "-n", "3", "--ignore-eos")
    assert res["prompt_tokens"] == len(transformers.AutoTokenizer.from_pretrained(tiny_moe)(text).input_ids)
    piped = run_json(cli, tiny_moe, "-", "--raw", "-n", "3", "--ignore-eos", stdin=text)
    assert piped["tokens"] == res["tokens"]
    code, _, err = cli("run", str(tiny_moe), "-", stdin="  ")
    assert code == 2 and "empty prompt" in err


def test_seed_reproduces_sampling(cli, tiny_moe):
    args = ("hello", "-n", "8", "--ignore-eos", "--temperature", "1.0", "--top-k", "50")
    a = run_json(cli, tiny_moe, *args, "--seed", "3")["tokens"]
    assert a == run_json(cli, tiny_moe, *args, "--seed", "3")["tokens"]
    assert a != run_json(cli, tiny_moe, *args, "--seed", "4")["tokens"]


def test_plain_output_streams_text(cli, tiny_moe):
    code, out, err = cli("run", str(tiny_moe), "hello", "-n", "4", "--ignore-eos")
    assert code == 0 and out.endswith("\n") and len(out) > 1


def one_line_error(cli, *argv, expect_code=1):
    code, out, err = cli(*argv)
    assert code == expect_code, (code, err)
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_missing_path(cli, tmp_path):
    assert "not found" in one_line_error(cli, "run", str(tmp_path / "nope"), "hi")


def test_directory_without_config(cli, tmp_path):
    assert "no config.json" in one_line_error(cli, "run", str(tmp_path), "hi")


def test_other_model_type_names_the_supported_ones(cli, broken):
    (broken / "config.json").write_text(json.dumps({"model_type": "llama"}))
    line = one_line_error(cli, "run", str(broken), "hi")
    assert "llama" in line and "gemma4" in line and "gemma4_text" in line


def test_invalid_json_config(cli, broken):
    (broken / "config.json").write_text("{not json")
    assert "invalid JSON" in one_line_error(cli, "run", str(broken), "hi")


def test_missing_shard(cli, broken):
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    shard.unlink()
    line = one_line_error(cli, "run", str(broken), "hi")
    assert "missing shard" in line and shard.name in line


def test_truncated_safetensors(cli, broken):
    shard = sorted(broken.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    line = one_line_error(cli, "run", str(broken), "hi")
    assert "truncated" in line and shard.name in line


def test_corrupt_safetensors_header(cli, broken):
    shard = sorted(broken.glob("model-*.safetensors"))[0]
    shard.write_bytes(b"\xff" * 64)
    assert "corrupt safetensors" in one_line_error(cli, "run", str(broken), "hi")


def test_pickle_weights_are_never_loaded(cli, broken):
    for f in broken.glob("model*.safetensors*"):
        f.unlink()
    torch.save({"x": torch.zeros(1)}, broken / "pytorch_model.bin")
    line = one_line_error(cli, "run", str(broken), "hi")
    assert "no safetensors" in line and "pickle" in line


def test_missing_tokenizer(cli, broken):
    (broken / "tokenizer.json").unlink()
    assert "tokenizer.json" in one_line_error(cli, "run", str(broken), "hi")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_but_absent(cli, tiny_moe):
    assert "no CUDA" in one_line_error(cli, "run", str(tiny_moe), "hi", "--device", "cuda")


@pytest.mark.parametrize("flags, word", [
    (["--top-p", "0"], "top-p"), (["--temperature", "-1"], "temperature"), (["--max-tokens", "0"], "max-tokens"),
    (["--dtype", "int8"], "dtype"), (["--bogus"], "bogus"), (["--top-k", "x"], "top-k"),
    (["--temperature", "1", "--seed", str(1 << 64)], "seed"), (["--device", "tpu"], "device"),
    (["--top-p", "1.5"], "top-p"), (["--repeat-penalty", "-1"], "repeat-penalty"), (["--logprobs"], "--json"),
    (["--temperature", "inf"], "temperature"), (["--repeat-penalty", "inf"], "penalty"),
])
def test_invalid_options_are_usage_errors(cli, tiny_moe, flags, word):
    assert word in one_line_error(cli, "run", str(tiny_moe), "hi", *flags, expect_code=2)


def test_no_traceback_from_a_real_process(broken):
    shard = sorted(broken.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    res = subprocess.run([sys.executable, "-m", "localrun.cli", "run", str(broken), "hi"],
                         capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.startswith("error: truncated") and "Traceback" not in res.stderr


# -- the context is a limit ----------------------------------------------------------------------

LONG = "What is 17 + 25? " * 400  # ~4,400 tokens through the template


def test_prompt_over_the_context_is_an_error_with_both_numbers(cli, tiny_moe):
    line = one_line_error(cli, "run", str(tiny_moe), LONG, "--context", "512", "--device", "cpu")
    numbers = [int(n) for n in re.findall(r"\d+", line)]
    assert 512 in numbers and any(n > 512 for n in numbers), line


def test_truncate_left_drops_the_oldest_tokens_and_says_so(cli, tiny_moe):
    code, out, err = cli("run", tiny_moe, LONG, "--context", "512", "--truncate", "left", "-n", "4",
                         "--ignore-eos", "--json", "--device", "cpu")
    assert code == 0, err
    res = json.loads(out)
    assert res["truncated_tokens"] > 0 and "dropped" in err and str(res["truncated_tokens"]) in err
    assert res["prompt_tokens"] + len(res["tokens"]) <= 512 and len(res["tokens"]) == 4


def test_generation_ends_with_length_at_the_context(cli, tiny_moe):
    res = run_json(cli, tiny_moe, "hello", "--raw", "-n", "500", "--ignore-eos", "--context", "20")
    assert res["finish_reason"] == "length"
    assert res["prompt_tokens"] + len(res["tokens"]) == 20


def test_context_beyond_the_model_is_a_usage_error(cli, tiny_moe):
    assert "4096" in one_line_error(cli, "run", str(tiny_moe), "hi", "--context", "99999", expect_code=2)


def test_empty_prompt_argument_is_an_error(cli, tiny_moe):
    assert "empty prompt" in one_line_error(cli, "run", str(tiny_moe), "", expect_code=2)


def test_control_tokens_never_reach_the_output(tiny_moe):
    from localrun.engine import Engine
    from localrun.generate import Step, Timings

    engine = Engine.load(tiny_moe, device="cpu")
    tok = engine.tokenizer
    ids = [tok.token_id("<unused91>") or tok.token_id("<unused0>"), tok.token_id("<turn|>")]
    ids += tok.encode("hi", add_special_tokens=False) + [tok.token_id("<|channel>")]
    steps = [Step(i, torch.zeros(1), None, Timings()) for i in ids if i is not None]
    text = "".join(t for t, _ in engine.stream_text(iter(steps)))
    assert "unused" not in text and "<turn|>" not in text
    assert "hi" in text and "<|channel>" in text  # the thought marker stays: the chat splits on it


@pytest.fixture
def scripted(monkeypatch):
    """A list to fill with text pieces ("<...>": one special token): every Engine.stream then replays
    their token ids, the last with finish "length"."""
    from localrun.engine import Engine
    from localrun.generate import Step, Timings

    script = []

    def stream(self, ids, params, *, max_tokens, ignore_eos=False, **kw):
        t = Timings(prompt_tokens=len(ids))
        tokens = [i for piece in script for i in ([self.tokenizer.token_id(piece)] if piece.startswith("<") else
                                                   self.tokenizer.encode(piece, add_special_tokens=False))]
        for n, token in enumerate(tokens, 1):
            t.generated_tokens = n
            yield Step(token, torch.zeros(self.loaded.args.vocab_size), "length" if n == len(tokens) else None, t)

    monkeypatch.setattr(Engine, "stream", stream)
    return script


THINKING_REPLY = ["<|channel>", "thought", "\n", "hm", "<channel|>", "\n", "\n", "ok"]


def test_thought_goes_to_stderr_and_the_answer_alone_to_stdout(cli, tiny_moe, scripted):
    scripted += THINKING_REPLY
    code, out, err = cli("run", str(tiny_moe), "hi", "--think", "--device", "cpu", "--quiet")
    assert code == 0 and out == "ok\n" and "hm" not in err, (code, out, err)  # --quiet: no thought shown
    code, out, err = cli("run", str(tiny_moe), "hi", "--think", "--device", "cpu")
    assert code == 0 and out == "ok\n", out
    assert "hm" in err and "channel" not in err and "thought\n" not in err
    res = run_json(cli, tiny_moe, "hi", "--think")
    assert (res["text"], res["reasoning_content"]) == ("ok", "hm")


def test_a_close_marker_that_closes_nothing_is_not_printed(cli, tiny_moe, scripted):
    # Gemma 4's template primes an empty thought when thinking is off; a model may close it again
    scripted += ["<channel|>", "ok"]
    code, out, err = cli("run", str(tiny_moe), "hi", "--device", "cpu", "--quiet")
    assert code == 0 and out == "ok\n"
    res = run_json(cli, tiny_moe, "hi")
    assert res["text"] == "ok" and "reasoning_content" not in res


def test_open_thought_reads_the_end_of_the_prompt(tiny_moe):
    from localrun.engine import Engine

    engine = Engine.load(tiny_moe, device="cpu")
    tok = engine.tokenizer
    base = engine.encode_prompt("hi")
    assert engine.open_thought(base) is None  # the tiny template primes an empty thought
    assert engine.open_thought(base + [tok.token_id("<|channel>")] + tok.encode("thought\n", add_special_tokens=False)) \
        == "<|channel>"


def test_a_missing_untied_lm_head_is_named_as_stored(cli, tmp_path):
    """lm_head lives outside the multimodal prefix (model.language_model.): the error names it as stored."""
    from localrun.tiny import tiny_config, write_checkpoint

    model_dir = write_checkpoint(tmp_path / "m", tiny_config("moe"), layout="multimodal")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    line = one_line_error(cli, "run", model_dir, "hi", "--device", "cpu")
    assert line == "error: checkpoint is missing 1 tensor(s), e.g. lm_head.weight", line


def test_the_default_context_is_the_kv_cache_the_loader_planned(cli, tmp_path):
    """A model with more positions than the default context (8192): the limit is what the KV cache
    holds, so --truncate left fits the prompt into it and --json reports it."""
    from localrun.tiny import tiny_config, write_checkpoint

    model_dir = write_checkpoint(tmp_path / "long", tiny_config("moe", max_position_embeddings=32768))
    prompt = "hello world " * 2000  # ~12K tokens: past 8192, inside 32768
    code, out, err = cli("run", model_dir, "-", "--truncate", "left", "-n", "2", "--ignore-eos", "--json",
                         "--device", "cpu", stdin=prompt)
    assert code == 0, err
    res = json.loads(out)
    assert res["context"] == 8192 and res["truncated_tokens"] > 0
    assert res["prompt_tokens"] + 2 <= 8192 and len(res["tokens"]) == 2


def test_a_prompt_of_bytes_that_are_no_utf8_still_runs(cli, tiny_moe):
    """Non-UTF-8 bytes in argv or stdin reach Python as surrogates: they read as U+FFFD, no crash."""
    res = run_json(cli, tiny_moe, "What \udcff is 1 + 2?", "-n", "2", "--ignore-eos")
    assert len(res["tokens"]) == 2
    assert len(run_json(cli, tiny_moe, "-", "-n", "2", "--ignore-eos", stdin="hi \ud800 there")["tokens"]) == 2


def test_a_tiny_temperature_samples_like_greedy(cli, tiny_moe):
    greedy = run_json(cli, tiny_moe, "hello", "-n", "6", "--ignore-eos")["tokens"]
    assert run_json(cli, tiny_moe, "hello", "-n", "6", "--ignore-eos", "-t", "1e-38", "--seed", "1")["tokens"] == greedy


@pytest.mark.parametrize("command", ["run", "chat"])
def test_closed_stdin_is_a_usage_error_before_loading(command, tiny_moe, tmp_path):
    """`localrun run MODEL <&-` / `localrun chat MODEL <&-`: one line, exit 2 (nothing is loaded)."""
    res = subprocess.run(f"{sys.executable} -m localrun.cli {command} {tiny_moe} --device cpu <&-", shell=True,
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and "stdin" in res.stderr and "Traceback" not in res.stderr



@pytest.mark.parametrize("command", ["run MODEL hi", "run MODEL hi --json", "chat MODEL"])
def test_closed_stdout_is_a_usage_error_before_loading(command, tiny_moe, tmp_path):
    """`localrun run MODEL hi >&-`: the reply could go nowhere; one line, exit 2, not an AttributeError (run,
    chat: after loading) or exit 0 with the reply silently lost (--json)."""
    command = command.replace("MODEL", str(tiny_moe))
    res = subprocess.run(f"{sys.executable} -m localrun.cli {command} --device cpu </dev/null >&-", shell=True,
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and "stdout" in res.stderr and "Error" not in res.stderr, res.stderr


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="/dev/full is Linux's")
@pytest.mark.parametrize("extra", ["", "--json"])
def test_a_write_the_system_refuses_is_said_as_the_system_says_it(extra, tiny_moe, tmp_path):
    """stdout on a full disk (/dev/full): the system's reason in one line, exit 1, not a Python exception's
    name and a hint to --verbose as if localrun had failed."""
    res = subprocess.run(f"{sys.executable} -m localrun.cli run {tiny_moe} hi -n 2 --device cpu {extra} </dev/null "
                         ">/dev/full", shell=True, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert res.returncode == 1, res.stderr
    assert res.stderr == "error: No space left on device\n", res.stderr


def test_more_threads_than_cpus_is_a_warning_once(tiny_moe, tmp_path):
    import os

    many = len(os.sched_getaffinity(0)) + 3
    res = subprocess.run([sys.executable, "-m", "localrun", "run", str(tiny_moe), "hi", "-n", "1", "--device", "cpu",
                          "--threads", str(many), "-q"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("warning: --threads") == 1 and "CPUs this process may use" in res.stderr, res.stderr


def test_vram_on_the_cpu_is_a_warning(tiny_moe, tmp_path):
    res = subprocess.run([sys.executable, "-m", "localrun", "run", str(tiny_moe), "hi", "-n", "1", "--device", "cpu",
                          "--vram", "100MiB", "-q"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 0 and res.stderr.count("warning: --vram plans GPU memory") == 1, res.stderr


def test_without_threads_the_reply_follows_the_idle_cores(cli, tiny_moe, monkeypatch):
    """run without --threads polls hardware.IdleCoreWatch between tokens (and prefill chunks), and what it
    sets is the count the rest of the reply runs on; --threads pins the count, with no watch."""
    from localrun import hardware

    polls = []

    class Watch:
        def poll(self):
            polls.append(torch.get_num_threads())
            if len(polls) == 2:
                torch.set_num_threads(1)
                return 1
            return None

    before = torch.get_num_threads()
    monkeypatch.setattr(hardware, "IdleCoreWatch", Watch)
    monkeypatch.setattr(hardware, "default_threads", lambda: 2)  # the count at the start, whatever this machine runs
    try:
        res = run_json(cli, tiny_moe, "hi", "-n", "4", "--ignore-eos")
        assert len(res["tokens"]) == 4 and polls == [2, 2, 1]  # before tokens 2, 3, 4
        polls.clear()
        run_json(cli, tiny_moe, "hi", "-n", "4", "--ignore-eos", "--threads", "1")
        assert polls == []
    finally:
        torch.set_num_threads(before)
