"""The bench machinery on the tiny model: result structure, table rendering, the transformers side.
No timing is asserted: speed is what `localrun bench` reports, not what a unit test checks."""

from __future__ import annotations

import json
import math

import pytest
import torch

from localrun import bench
from localrun.cli import main
from localrun.config import ModelArgs
from localrun.models.gemma4 import checkpoint_shapes

pytest.importorskip("transformers")


def test_bench_config_has_26b_a4b_proportions():
    cfg = bench.bench_config()
    args = ModelArgs.from_dict(cfg)
    params = sum(math.prod(s) for s in checkpoint_shapes(args).values())
    assert 50e6 <= params <= 150e6
    assert cfg["attention_k_eq_v"] and cfg["global_head_dim"] == 2 * cfg["head_dim"]
    assert (cfg["num_experts"], cfg["top_k_experts"]) == (32, 8)
    assert cfg["layer_types"][:6] == ["sliding_attention"] * 5 + ["full_attention"]
    assert cfg["rope_parameters"]["full_attention"]["rope_type"] == "proportional"


def test_run_bench_measures_both_sides_and_renders_a_table(tiny_moe):
    report = bench.run_bench(tiny_moe, [(8, 3)], dtype=torch.float32, repeat=1, compare="transformers")
    ours, theirs = report.measurements
    assert (ours.engine, theirs.engine) == ("localrun", "transformers")
    for m in (ours, theirs):
        assert (m.prompt_tokens, m.gen_tokens) == (8, 3)
        assert m.ttft_s > 0 and m.prefill_tokens_per_s > 0
        assert m.decode_tokens_per_s >= 0  # 0 when noise made t(N) <= t(1): shown as '-'
        assert m.peak_vram_bytes is None
    table = bench.markdown(report)
    rows = [line for line in table.splitlines() if line.startswith("| 8 | 3 |")]
    assert len(rows) == 1 and rows[0].count(" / ") >= 3 and len(rows[0].split("|")) == 10
    assert report.to_dict()["measurements"][1]["engine"] == "transformers"


def test_bench_command_writes_the_table(tiny_moe, tmp_path, capsys):
    out = tmp_path / "bench.md"
    main(["bench", str(tiny_moe), "--prompt-tokens", "5", "--gen-tokens", "2", "--repeat", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert out.read_text() == printed
    assert "| 5 | 2 |" in printed and "prefill tok/s" in printed


def test_bench_command_rejects_a_non_model(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", str(tmp_path), "--repeat", "1"])
    assert e.value.code != 0 and "config.json" in capsys.readouterr().err


def test_rounds_alternate_the_engines_and_keep_each_ones_best(monkeypatch):
    calls = []
    # scripted rounds: (ttft, prefill, decode, peak) per engine and round; round 2 is slow for
    # localrun's prefill but fast for its decode, so the best comes from different rounds
    script = {("localrun", 0): (0.2, 40.0, 9.0, 100), ("transformers", 0): (0.4, 20.0, 3.0, 300),
              ("localrun", 1): (0.3, 30.0, 12.0, 150), ("transformers", 1): (0.5, 16.0, 4.0, 200)}

    def fake(engine):
        def measure(model_dir, cases, **kwargs):
            rnd = sum(1 for e in calls if e == engine)
            calls.append(engine)
            ttft, prefill, decode, peak = script[engine, rnd]
            return [bench.Measurement(engine, p, g, ttft, prefill, decode, peak_rss_bytes=peak) for p, g in cases]
        return measure

    monkeypatch.setattr(bench, "bench_localrun", fake("localrun"))
    monkeypatch.setattr(bench, "bench_transformers", fake("transformers"))
    report = bench.run_bench("unused", [(8, 3)], compare="transformers", rounds=2)
    assert calls == ["localrun", "transformers", "localrun", "transformers"]
    ours, theirs = report.measurements
    assert (ours.engine, ours.ttft_s, ours.prefill_tokens_per_s, ours.decode_tokens_per_s, ours.peak_rss_bytes) == \
        ("localrun", 0.2, 40.0, 12.0, 100)  # memory: the first round's (later ones inherit leftovers)
    assert (theirs.engine, theirs.ttft_s, theirs.prefill_tokens_per_s, theirs.decode_tokens_per_s,
            theirs.peak_rss_bytes) == ("transformers", 0.4, 20.0, 4.0, 300)
    assert "in each of 2 alternating rounds" in bench.markdown(report)


@pytest.mark.parametrize("vocab", [4, 107, 108, 16384])
def test_bench_prompt_ids_fit_any_vocab(vocab):
    """Ids past Gemma's special tokens where the vocab has them; a vocab of at most 107 ids has no such ids."""
    ids = bench.bench_prompt(50, vocab)
    assert len(ids) == 50 and ids[0] == 2 and all(0 <= i < vocab for i in ids)
    if vocab > 107:
        assert min(ids[1:]) >= 107


def test_a_case_given_twice_is_measured_once(monkeypatch):
    """`--prompt-tokens 8 --prompt-tokens 8` is one case: one row, and no per-round table from one round."""
    calls = []

    def measure(model_dir, cases, **kwargs):
        calls.append(list(cases))
        return [bench.Measurement("localrun", p, g, 0.1, 80.0, 9.0, variant="bf16") for p, g in cases]

    monkeypatch.setattr(bench, "bench_localrun", measure)
    report = bench.run_bench("unused", [(8, 3), (8, 3), (16, 3)], rounds=1)
    assert calls == [[(8, 3), (16, 3)]]
    assert [(m.prompt_tokens, m.gen_tokens) for m in report.measurements] == [(8, 3), (16, 3)]
    assert all(m.rounds_prefill is None for m in report.measurements)
    assert "per round" not in bench.markdown(report)


def test_bench_command_rejects_zero_rounds(tiny_moe, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", str(tiny_moe), "--rounds", "0"])
    assert e.value.code != 0 and "--rounds" in capsys.readouterr().err


def test_graphs_option_is_checked_and_the_step_recorded(tiny_moe, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", str(tiny_moe), "--graphs", "on", "--device", "cpu"])
    assert e.value.code == 2 and "--graphs on needs --device cuda" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["bench", str(tiny_moe), "--graphs", "sometimes"])
    assert e.value.code == 2
    report = bench.run_bench(tiny_moe, [(8, 3)], dtype=torch.float32, repeat=1, graphs="off")
    (m,) = report.measurements
    assert m.step == "eager" and m.floor_tokens_per_s is None  # the floor is a GPU figure
    assert m.bytes_per_token > 0


def test_decode_bytes_per_token_counts_weights_experts_and_kv(tiny_moe):
    from localrun.loader import load_model

    plan = load_model(tiny_moe, dtype=torch.float32).plan
    expected = plan.decode_weight_bytes + plan.active_expert_bytes + plan.kv_bytes
    assert bench.decode_bytes_per_token(plan) == expected
    assert plan.active_expert_bytes > 0 and plan.kv_bytes > 0


def test_decode_is_timed_within_a_generation_so_a_slow_prefill_does_not_inflate_it(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    prefills = iter([0.5, 0.9, 0.6, 0.5])  # warm-up, then three generations; the second prefill is slow

    def generate_n(n, tick):
        clock[0] += next(prefills)
        for i in range(n):
            if i:
                clock[0] += 0.01  # one decode step
            tick()

    m = bench.measure("x", generate_n, 100, 11, repeat=3)
    assert (m.ttft_s, m.prefill_tokens_per_s) == (0.5, 200.0)
    assert m.decode_tokens_per_s == pytest.approx(100.0)


def test_a_generation_that_stops_short_is_an_error_not_a_rate():
    """Tokens that never came cannot be divided by the time (a case past the context once reported
    millions of tokens a second)."""
    def generate_n(n, tick):
        for _ in range(min(n, 3)):
            tick()

    with pytest.raises(RuntimeError, match="generated 3 of the 10 tokens"):
        bench.measure("x", generate_n, 5, 10, repeat=1)


@pytest.mark.parametrize("args, message", [
    (["--prompt-tokens", "8", "--gen-tokens", "100000000"], "is more than the model's"),
    (["--prompt-tokens", "99999999999999999999"], "is more than the model's"),
    (["--device", "tpu"], "--device must be cpu, cuda, cuda:N or auto, not 'tpu'"),
    (["--device", "CPU"], "--device must be"),
    (["--graphs", "both", "--device", "cpu"], "--graphs both needs --device cuda"),
    (["--experts", "bf16", "--resident-experts", "0.5"], "need 4-bit experts"),
])
def test_bench_refuses_cases_it_cannot_measure_before_measuring_any(tiny_moe, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(["bench", str(tiny_moe), "--repeat", "1", "--prompt-tokens", "4", "--gen-tokens", "2", *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err, err


def test_bench_out_is_checked_first_and_written_whole_after_the_table_prints(tiny_moe, tmp_path, capsys):
    for target, message in ((tmp_path, "is a directory"), (tmp_path / "no" / "x.md", "does not exist")):
        with pytest.raises(SystemExit) as e:
            main(["bench", str(tiny_moe), "--repeat", "1", "--out", str(target)])
        assert e.value.code == 2 and message in capsys.readouterr().err
    out = tmp_path / "b.md"
    out.write_text("old")
    out.chmod(0o640)
    main(["bench", str(tiny_moe), "--prompt-tokens", "5", "--gen-tokens", "2", "--repeat", "1", "--dtype", "auto",
          "--out", str(out)])
    assert out.read_text() == capsys.readouterr().out and (out.stat().st_mode & 0o777) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["b.md"]  # no temporary file left beside it


def test_bench_out_that_links_into_a_missing_folder_is_refused_first(tiny_moe, tmp_path, capsys, monkeypatch):
    """A symlink is written where it points: a link into a folder that does not exist is refused before any
    measuring, not found after it as a FileNotFoundError."""
    def no_run(*args, **kwargs):
        raise AssertionError("measured before checking --out")

    monkeypatch.setattr(bench, "run_bench", no_run)
    link = tmp_path / "b.md"
    link.symlink_to(tmp_path / "missing" / "b.md")
    with pytest.raises(SystemExit) as e:
        main(["bench", str(tiny_moe), "--repeat", "1", "--out", str(link)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "does not exist" in err and err.count("\n") == 1, err


def test_the_floor_counts_the_keys_a_token_attends_to(tiny_moe):
    """bench's floor per case: a full layer's keys up to the token, a sliding layer's window; layers
    sharing another's KV add nothing. By hand from the config: 2 (K and V) x heads x head dim x 4 bytes."""
    from localrun.loader import load_model

    loaded = load_model(tiny_moe, dtype=torch.float32, context=300)
    args, cache = loaded.args, loaded.kv
    layers = [i for i in range(args.num_hidden_layers) if args.kv_source_layer(i) == i]

    def by_hand(position):
        total = 0
        for i in layers:
            keys = min(position + 1, args.sliding_window) if args.is_sliding(i) else position + 1
            total += 2 * args.layer_kv_heads(i) * args.layer_head_dim(i) * 4 * keys
        return total

    assert any(args.is_sliding(i) for i in layers) and not all(args.is_sliding(i) for i in layers)
    for position in (0, 5, args.sliding_window - 1, args.sliding_window + 40, 299):
        assert bench.kv_bytes_read(cache, position) == by_hand(position)
    plan = loaded.plan
    assert bench.decode_bytes_at(plan, cache, 299) <= bench.decode_bytes_per_token(plan)


def test_random_weights_bench_a_model_from_its_config_alone(tiny_moe, tmp_path, capsys):
    """--random-weights measures a directory holding only config.json (what `fit` reads) with weights drawn
    in its shapes: the same plan, placed bytes and bytes a token as the checkpoint itself; no tokenizer."""
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text((tiny_moe / "config.json").read_text())
    argv = ["--prompt-tokens", "6", "--gen-tokens", "3", "--repeat", "1", "--rounds", "1", "--experts", "nf4", "--json"]
    with pytest.raises(SystemExit) as e:  # no weights: the error says what would measure it
        main(["bench", str(config_only), *argv])
    assert e.value.code == 1 and "--random-weights" in capsys.readouterr().err
    main(["bench", str(config_only), "--random-weights", *argv])
    random = json.loads(capsys.readouterr().out)
    main(["bench", str(tiny_moe), *argv])
    real = json.loads(capsys.readouterr().out)
    assert random["info"]["weights"] == "random" and "weights" not in real["info"]
    (r,), (c,) = random["measurements"], real["measurements"]
    assert r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0
    assert r["bytes_per_token"] == c["bytes_per_token"]
    for key in ("planned_device_bytes", "device_bytes", "planned_kv_bytes", "kv_bytes"):
        assert r["memory"][key] == c["memory"][key], key
    table = bench.markdown(bench.BenchReport(random["info"], [bench.Measurement(**m) for m in random["measurements"]]))
    assert "random weights" in table.splitlines()[0]


def test_random_weights_are_localrun_alone(tiny_moe, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", str(tiny_moe), "--random-weights", "--compare", "transformers"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--random-weights" in err and "Traceback" not in err
    with pytest.raises(ValueError, match="random weights"):
        bench.run_bench(tiny_moe, [(4, 2)], compare="transformers", random_weights=True)


def test_random_weights_are_drawn_in_the_dtype_config_json_names(tmp_path, capsys):
    """An fp32 release's config: the random weights are fp32 as its checkpoint's are, so the CPU keeps
    the same bytes (fp32 matrices stay fp32 there, bf16 ones bf16)."""
    from localrun.tiny import tiny_config, write_checkpoint

    real = write_checkpoint(tmp_path / "fp32", tiny_config("moe"), dtype=torch.float32)
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text((real / "config.json").read_text())
    argv = ["--prompt-tokens", "6", "--gen-tokens", "3", "--repeat", "1", "--rounds", "1", "--experts", "nf4", "--json"]
    main(["bench", str(config_only), "--random-weights", *argv])
    random = json.loads(capsys.readouterr().out)
    main(["bench", str(real), *argv])
    checkpoint = json.loads(capsys.readouterr().out)
    (r,), (c,) = random["measurements"], checkpoint["measurements"]
    assert r["bytes_per_token"] == c["bytes_per_token"]
    for key in ("planned_device_bytes", "device_bytes"):
        assert r["memory"][key] == c["memory"][key], key
