"""Property tests: malformed inputs a user can hand localrun end in a load or a one-line error.

Random and mutated config.json files, safetensors headers, localrun_quant.json manifests,
`fit --host-bandwidth` rates and chat /load files go through the real command line (in-process)
or the library call behind it. Every case must finish with exit 0, 1 or 2 and at most one line on
stderr, never a traceback or the "unexpected error" line, and write nothing outside its own
directory. A model's text, cut anywhere, goes through the thought splitter. Seeded (derandomize), so each run of the suite tries the same ~3,900 cases.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from localrun.checkpoint import ITEMSIZE, Checkpoint
from localrun.errors import LocalrunError, UsageError
from localrun.hardware import MAX_SIZE, parse_rate, parse_size
from localrun.tiny import tiny_config

pytestmark = pytest.mark.filterwarnings("ignore")


def seeded(n: int):
    return settings(max_examples=n, derandomize=True, deadline=None, database=None, print_blob=True,
                    suppress_health_check=list(HealthCheck))


JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.sampled_from([0, -1, 2**31, 2**64, 10**30]),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
JSON = st.recursive(JSON_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=6),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=6)),
                    max_leaves=20)


def expect_clean_exit(code: int, out: str, err: str) -> None:
    """The contract: exit 0/1/2; on failure exactly one `error:` line that is not an unexpected exception."""
    assert code in (0, 1, 2), (code, err)
    assert "Traceback" not in err and "run with --verbose" not in err, err
    if code:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err


class Sandbox:
    """A fresh case directory per example inside one root; `untouched()` checks nothing appeared beside it."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def case(self) -> Path:
        for p in self.root.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        return Path(tempfile.mkdtemp(dir=self.root))

    def untouched(self, case: Path) -> None:
        assert [p.name for p in self.root.iterdir()] == [case.name]


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    root = tmp_path_factory.mktemp("props")
    cwd = os.getcwd()
    os.chdir(root)  # a stray relative write would land here and be seen
    try:
        yield Sandbox(root / "cases")
    finally:
        os.chdir(cwd)


# -- config.json ---------------------------------------------------------------------------------

BASE = tiny_config("moe")
KEYS = sorted(BASE)


@st.composite
def mutated_config(draw):
    """A valid tiny config with a few fields removed, retyped or resized, or an arbitrary JSON value."""
    if draw(st.integers(0, 9)) == 0:
        return draw(JSON)
    cfg = json.loads(json.dumps(BASE))
    if draw(st.booleans()):
        cfg = {"model_type": "gemma4", "text_config": cfg, "eos_token_id": [1, 106]}
        target = cfg["text_config"] if draw(st.integers(0, 4)) else cfg
    else:
        target = cfg
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(KEYS + ["text_config", "model_type"]))
        action = draw(st.sampled_from(["drop", "value", "list"]))
        if action == "drop":
            target.pop(key, None)
        elif action == "value":
            target[key] = draw(JSON)
        else:
            target[key] = draw(st.lists(st.sampled_from(["sliding_attention", "full_attention", "x", 1]),
                                        max_size=9))
    return cfg


@seeded(700)
@given(cfg=mutated_config())
def test_fit_on_any_config(cli, sandbox, cfg):
    case = sandbox.case()
    (case / "config.json").write_text(json.dumps(cfg))
    expect_clean_exit(*cli("fit", case, "--vram", "16GiB", "--ram", "64GiB", "--json"))
    sandbox.untouched(case)


@pytest.fixture(scope="module")
def weights(tiny_moe):
    return [p for p in tiny_moe.iterdir() if p.name != "config.json"]


@seeded(60)
@given(cfg=mutated_config())
def test_run_on_any_config_with_real_weights(cli, sandbox, weights, cfg):
    """The loader, not just the planner: what validation lets through must meet the weights cleanly."""
    case = sandbox.case()
    for p in weights:
        (case / p.name).symlink_to(p)
    (case / "config.json").write_text(json.dumps(cfg))
    expect_clean_exit(*cli("run", case, "hi", "-n", "1", "--device", "cpu", "--quiet", "--threads", "1"))
    sandbox.untouched(case)


# -- safetensors headers -------------------------------------------------------------------------

BIG = st.sampled_from([2**31, 2**40, 2**63 - 1, 2**64 - 1, 10**20])
NUMBER = st.one_of(st.integers(-4, 64), BIG)


@st.composite
def safetensors_file(draw) -> bytes:
    """Bytes of a safetensors file: real-looking entries with random dtypes, shapes and offsets
    (sized right or not, overlapping or not), random data length, and now and then a lying length
    prefix or a header that is not an object."""
    entries, at = {}, 0
    for i in range(draw(st.integers(0, 4))):
        dtype = draw(st.one_of(st.sampled_from(sorted(ITEMSIZE)), st.sampled_from(["Q4", "", None, 3])))
        shape = draw(st.one_of(st.lists(st.integers(0, 6), max_size=3), st.lists(NUMBER, max_size=3), JSON))
        if draw(st.booleans()) and isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape) \
                and isinstance(dtype, str) and dtype in ITEMSIZE:
            n = ITEMSIZE[dtype]
            for d in shape:
                n *= d
            begin = at if draw(st.integers(0, 3)) else max(0, at - draw(st.integers(1, 8)))  # overlap sometimes
            offsets = [begin, begin + n]
        else:
            offsets = draw(st.one_of(st.lists(NUMBER, min_size=2, max_size=2), JSON))
        entry = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
        if draw(st.integers(0, 9)) == 0:
            entry = draw(JSON)
        name = f"model.layers.{i}.w"
        entries[name] = entry
        if isinstance(offsets, list) and len(offsets) == 2 and isinstance(offsets[1], int) and offsets[1] < 4096:
            at = max(at, offsets[1])
    if draw(st.integers(0, 4)) == 0:
        entries["__metadata__"] = draw(JSON)
    header = draw(JSON) if draw(st.integers(0, 9)) == 0 else entries
    raw = json.dumps(header).encode()
    length = draw(st.one_of(st.just(len(raw)), NUMBER)) if draw(st.integers(0, 5)) == 0 else len(raw)
    data = bytes(max(0, min(at, 4096) + draw(st.integers(-8, 8))))  # the size the entries ask for, give or take
    return struct.pack("<Q", length % 2**64) + raw + data


@seeded(800)
@given(blob=safetensors_file())
def test_any_safetensors_header_reads_or_fails_in_one_line(sandbox, blob):
    case = sandbox.case()
    (case / "model.safetensors").write_bytes(blob)
    try:
        ckpt = Checkpoint(case)
        for name, info in ckpt.tensors.items():
            t = ckpt.read(name)
            assert tuple(t.shape) == info.shape
    except LocalrunError as e:
        assert "\n" not in str(e)
    sandbox.untouched(case)


@seeded(150)
@given(blob=safetensors_file())
def test_fit_reads_any_safetensors_header(cli, sandbox, blob):
    case = sandbox.case()
    (case / "config.json").write_text(json.dumps(BASE))
    (case / "model.safetensors").write_bytes(blob)
    expect_clean_exit(*cli("fit", case, "--vram", "16GiB", "--ram", "64GiB", "--json"))
    sandbox.untouched(case)


# -- localrun_quant.json -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quantized(tiny_moe, tmp_path_factory) -> Path:
    from localrun.prequant import quantize_checkpoint
    from quant.spec import QuantSpec

    return quantize_checkpoint(tiny_moe, tmp_path_factory.mktemp("q") / "out", QuantSpec("nf4"))


@st.composite
def mutated_manifest(draw, base: dict):
    if draw(st.integers(0, 9)) == 0:
        return draw(JSON)
    m = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(m) + ["expert_files.0", "expert_files.9"]))
        if key.startswith("expert_files.") and isinstance(m.get("expert_files"), dict):
            layer = key.split(".")[1]
            m["expert_files"][layer] = draw(st.one_of(
                JSON, st.sampled_from(["../config.json", "/etc/passwd", ".hidden.safetensors",
                                       "model-00001-of-00001.safetensors", "experts-000.safetensors"])))
        elif draw(st.booleans()):
            m.pop(key, None)
        else:
            m[key] = draw(JSON)
    return m


def manifest_case(sandbox, quantized: Path, manifest) -> Path:
    case = sandbox.case()
    for p in quantized.iterdir():
        if p.name != "localrun_quant.json":
            (case / p.name).symlink_to(p)
    (case / "localrun_quant.json").write_text(json.dumps(manifest))
    return case


def base_manifest(quantized: Path) -> dict:
    return json.loads((quantized / "localrun_quant.json").read_text())


@seeded(300)
@given(data=st.data())
def test_fit_on_any_manifest(cli, sandbox, quantized, data):
    case = manifest_case(sandbox, quantized, data.draw(mutated_manifest(base_manifest(quantized))))
    expect_clean_exit(*cli("fit", case, "--vram", "16GiB", "--ram", "64GiB", "--json"))
    sandbox.untouched(case)


@seeded(40)
@given(data=st.data())
def test_run_on_any_manifest(cli, sandbox, quantized, data):
    case = manifest_case(sandbox, quantized, data.draw(mutated_manifest(base_manifest(quantized))))
    expect_clean_exit(*cli("run", case, "hi", "-n", "1", "--device", "cpu", "--quiet", "--threads", "1"))
    sandbox.untouched(case)


# -- rates: fit --host-bandwidth ----------------------------------------------------------------

NUMBER_TEXT = st.one_of(st.integers(0, 400).map(str), st.integers(-5, 10**16).map(str), st.floats().map(repr),
                        st.sampled_from(["1e400", ".5", "5.", "1e-9", "08", "6e+10", "--1", "1..2", "١٢"]))
RATE_TEXT = st.one_of(
    st.text(max_size=16),
    st.builds("{}{}{}{}".format, NUMBER_TEXT, st.sampled_from(["", " "]),
              st.sampled_from(["", "B", "kb", "MB", "GB", "GiB", "tb", "TiB", "XB", "g", "Gbit"]),
              st.sampled_from(["", "/s", " / s", "/h", "ps", "/s/s"])))


@seeded(1000)
@given(text=RATE_TEXT)
def test_parse_rate_reads_a_rate_or_fails_in_one_line(text):
    """What the parser accepts is a real rate (finite, at least 1 MB/s); anything else is a one-line
    UsageError, never another exception."""
    try:
        rate = parse_rate(text)
    except UsageError as e:
        assert "\n" not in str(e)
    else:
        assert isinstance(rate, float) and math.isfinite(rate) and rate >= 1e6


@seeded(500)
@given(rate=st.floats(1e6, 1e15))
def test_parse_rate_reads_back_what_it_is_given(rate):
    assert parse_rate(repr(rate)) == rate
    assert parse_rate(f"{rate / 1e9!r}GB/s") == pytest.approx(rate, rel=1e-15)


SIZE_TEXT = st.one_of(
    st.text(max_size=16), st.integers(-10, 10**20),
    st.builds("{}{}{}".format, NUMBER_TEXT, st.sampled_from(["", " "]),
              st.sampled_from(["", "B", "k", "KiB", "MB", "M", "GB", "GiB", "g", "T", "TiB", "PB", "XB"])))


@seeded(1000)
@given(text=SIZE_TEXT)
def test_parse_size_reads_a_size_or_fails_in_one_line(text):
    """--vram / --ram: what the parser accepts is a whole positive byte count a machine could have (at
    most MAX_SIZE); anything else is a one-line UsageError, never another exception."""
    try:
        size = parse_size(text)
    except UsageError as e:
        assert "\n" not in str(e)
    else:
        assert isinstance(size, int) and 0 < size <= MAX_SIZE
        assert str(text).strip()[:1].isascii()  # "١٦GB" (Arabic-Indic digits) is no size


@pytest.mark.parametrize("text", ["١٦GB", "１６GB", "16\u0660GB"])
def test_sizes_and_rates_take_ascii_digits_only(text):
    with pytest.raises(UsageError, match="invalid size"):
        parse_size(text)
    with pytest.raises(UsageError, match="invalid rate"):
        parse_rate(text + "/s")


@seeded(100)
@given(text=RATE_TEXT)
def test_fit_on_any_host_bandwidth(cli, sandbox, text):
    """Half the experts offloaded and a GPU preset, so the estimate weighs copying against the CPU."""
    case = sandbox.case()
    (case / "config.json").write_text(json.dumps(BASE))
    code, out, err = cli("fit", case, "--gpu", "4060ti", "--ram", "64GiB", "--resident-experts", "0.5",
                         f"--host-bandwidth={text}", "--json")
    expect_clean_exit(code, out, err)
    assert code in (0, 2)
    if code == 0:
        assert json.loads(out)["cold_experts"] in ("copy", "cpu")
    sandbox.untouched(case)


# -- chat /load ----------------------------------------------------------------------------------

MESSAGE = st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["system", "user", "assistant"]), JSON_SCALARS),
                                 "content": st.one_of(st.text(max_size=20), JSON_SCALARS)})
CONVERSATION = st.one_of(st.lists(MESSAGE, max_size=6), JSON)


@pytest.fixture(scope="module")
def demo_engine():
    from localrun.engine import Engine
    from localrun.resolve import demo_model

    return Engine.load(demo_model(), device="cpu")


@seeded(300)
@given(doc=st.one_of(CONVERSATION.map(json.dumps), st.binary(max_size=40).map(lambda b: b.decode("latin-1"))))
def test_chat_load_any_file(sandbox, demo_engine, doc):
    """/load never raises; a conversation it accepts can be answered or is refused in one line."""
    from localrun.chat import ChatSession, Settings

    case = sandbox.case()
    (case / "saved.json").write_text(doc, encoding="utf-8", errors="surrogateescape")
    session = ChatSession(demo_engine, Settings(max_tokens=2), context=256)
    outcome = session.command("load", str(case / "saved.json"))
    assert "\n" not in outcome.text
    if not outcome.error and session.conversation.awaiting_reply:
        try:
            reply = session.respond()
            list(reply)
            session.commit(reply)
        except LocalrunError as e:
            assert "\n" not in str(e)
    sandbox.untouched(case)


MODEL_TEXT = st.lists(st.one_of(st.sampled_from(["<|channel>", "<channel|>", "<think>", "</think>", "thought\n",
                                                 "<|chan", "nel>", "</th", "<", "|", ">", "\n"]),
                                st.text(max_size=6)), max_size=14)


@seeded(400)
@given(parts=MODEL_TEXT, cuts=st.lists(st.integers(0, 80), max_size=6),
       opened=st.sampled_from([None, "<|channel>", "<think>"]))
def test_thought_splitter_any_model_text(parts, cuts, opened):
    """Whatever a model writes, however it is streamed: the pieces of the whole text at once; and where
    the markers come as tokens (not spelled out of pieces of text), no marker in the answer."""
    from localrun.thoughts import MARKERS

    text = "".join(parts)
    whole = _split([text], opened)
    bounds = sorted({0, len(text), *(c for c in cuts if c < len(text))})
    assert _split([text[a:b] for a, b in zip(bounds, bounds[1:])], opened) == whole
    if all(p in MARKERS or "<" not in p for p in parts):
        assert not any(m in whole[1] for m in MARKERS), whole


def _split(chunks: list[str], opened: str | None) -> list[str]:
    """[thought, answer] texts of a streamed reply."""
    from localrun.thoughts import ThoughtSplitter

    s = ThoughtSplitter(opened)
    pieces = [p for c in chunks for p in s.feed(c)] + s.flush()
    return ["".join(p.text for p in pieces if p.kind == kind) for kind in ("thought", "answer")]


CGROUP_WORDS = st.sampled_from(["max", "100000", "-1", "0", "250000", "1e5", "", " ", "\n", ":", "0::/", "cpu",
                                "cpu,cpuacct", "/docker/x", "..", "/../..", "\x00"])


@seeded(300)
@given(st.text(max_size=40) | st.lists(CGROUP_WORDS, max_size=6).map(" ".join),
       st.text(max_size=20) | st.lists(CGROUP_WORDS, max_size=3).map("".join))
def test_cgroup_quota_files_parse_to_a_positive_quota_or_none(text, other):
    """cpu.max, cpu.cfs_quota_us / cfs_period_us and /proc/self/cgroup as any text: a positive CPU
    count or None, and directories only under the cgroup root, never an exception."""
    from localrun.hardware import cgroup_dirs, parse_cfs, parse_cpu_max

    for got in (parse_cpu_max(text), parse_cfs(text, other), parse_cfs(other, text)):
        assert got is None or (isinstance(got, float) and got > 0)
    root = Path("/sys/fs/cgroup")
    for d in cgroup_dirs(text.replace(" ", ":") + "\n" + other, root):
        assert (d == root or root in d.parents) and ".." not in d.parts, d
    assert cgroup_dirs("0::/../..\n1:cpu:/a/../..\n", root) == []
