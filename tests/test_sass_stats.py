"""scripts/sass_stats.py: localrun's MoE decode kernels compiled for sm_90 on this (CPU) machine.

What it checks is static, not a timing: every tile config the autotuner may pick compiles for
sm_90 without spilling registers, each weight costs a shift, its shuffle from the lanes' table and its
FMA and little else, and v4 issues under half of v2's instructions a weight. It skips where triton or its
bundled ptxas is absent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ptxas() -> Path | None:
    try:
        import triton
    except ImportError:
        return None
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return path if path.exists() else None


@pytest.mark.skipif(_ptxas() is None, reason="triton with its NVIDIA backend tools is not installed")
def compiled_in_child(script: str):
    """What `script` (run as `python -c`, scripts/ as its argv[1]) prints as JSON: it compiles kernels
    for a GPU in a process of its own, where TRITON_INTERPRET is unset."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_DEFAULT_FP_FUSION="1", PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", script, str(ROOT / "scripts")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout)


def test_v4_loops_issue_fewer_instructions_than_v2_and_never_spill():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "sass_stats.py"), "--json"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(run.stdout)
    rows.pop("triton")
    v2 = {name: row for name, row in rows.items() if name.startswith("v2 ")}
    assert len(v2) == 2
    for name, row in rows.items():
        assert row["loop_instructions"] > 0 and row["local_bytes"] == 0, (name, row)  # a loop found, no spills
    v4 = {name: row for name, row in rows.items() if name.startswith("v4 ")}
    assert len(v4) == 21  # GATE_UP_V4_CONFIGS and DOWN_V4_CONFIGS
    for name, row in v4.items():  # each weight: a shift, its shuffle from the lanes' table and its FMA
        ops = row["ops"]
        assert ops.get("SHFL", 0) >= row["weights_per_thread_step"] >= ops.get("FFMA", 0) * 0.9, (name, row)
        assert ops.get("LDG", 0) <= row["weights_per_thread_step"] / 2, (name, row)  # codes, absmax, x / h only
        assert row["instructions_per_weight"] < 7, (name, row)
    for stage in ("gate_up", "down"):  # the first config of each list, the shape v4 is built for: under 4.5 a
        name = next(n for n in v4 if n.startswith(f"v4 {stage} "))  # weight, no x / h / codes through shared
        row = v4[name]  # memory (an absmax a chunk at most: one value per 32 weights)
        shared = sum(row["ops"].get(op, 0) for op in ("LDS", "STS", "STSM", "LDSM"))
        assert row["instructions_per_weight"] < 4.5 and shared <= row["weights_per_thread_step"] / 8, (name, row)
        best_v2 = min(r["instructions_per_weight"] for n, r in rows.items() if n.startswith(f"v2 {stage} "))
        assert v4[name]["instructions_per_weight"] < best_v2 / 1.9, (name, best_v2)


@pytest.mark.skipif(_ptxas() is None, reason="triton with its NVIDIA backend tools is not installed")
def test_the_decode_steps_newer_kernels_compile_for_sm90():
    """Each variant the CUDA step launches lowers to a cubin (the interpreter never lowers anything);
    with PDL, each kernel's SASS issues its prologue's loads (kernels/triton_pdl.py) before its
    griddepcontrol.wait, no write, and no load at all where it has no prologue."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "sass_stats.py"), "--compile-only"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(run.stdout)
    assert len(rows) >= 60 and all(row["cubin_bytes"] > 1000 and row["local_bytes"] == 0 for row in rows.values()), rows
    assert {"grouped", "gemv", "gated_gemv", "v4", "v5", "qkv_write", "ffn_residual", "norms_route", "rope_rows", "decode_partial",
            "qkv_attention", "pdl", "prefill_attention", "l2_prefetch", "probe", "down_prefetch", "early",
            "l1_prefetch"} == {
        name.split()[0] for name in rows}
    for name, row in rows.items():  # the attention that writes q/k/v sums each head's squares as qkv_write does,
        if name.startswith("qkv_attention"):  # and walks the keys in the plain kernel's loop: the same bits
            x, D, _, in_place, norm_v = name.split()[1:]  # (v as projected: Qwen3-MoE's, one sum fewer)
            write = rows[f"qkv_write {x} {D} ring=False" + ("" if norm_v == "norm_v=True" else f" {norm_v}")]
            assert row["row_sums"] == write["row_sums"] and len(row["row_sums"]) == (3 if norm_v == "norm_v=True" else 2)
            assert row["key_loop"] and row["key_loop"] == rows[f"decode_partial {x} {D} {in_place}"]["key_loop"], name
    prefetching = {name: row for name, row in rows.items() if name.startswith("l1_prefetch")}
    assert len(prefetching) == 4, list(prefetching)  # triton_attention.L1_PREFETCH: the same sums and key loop,
    for name, row in prefetching.items():  # a line prefetch a row of each tile at least, none before the wait
        plain = rows["qkv_attention" + name.removeprefix("l1_prefetch")]
        assert row["row_sums"] == plain["row_sums"] and row["key_loop"] == plain["key_loop"], name
        assert row["l1_prefetches"] >= 5 and row["l1_prefetches_before_wait"] == 0 and row["waits"] == 1, (name, row)
    fused = {name: row for name, row in rows.items() if name.startswith("v5 ")}  # the one-launch MoE kernel: every
    assert len(fused) == 9, fused  # config in bf16 (the decode step's activations) with no stack (fp32 with double
    assert all(row["stack_bytes"] == 0 for name, row in fused.items() if " bf16 " in name), fused  # quant keeps
    # 16-32 bytes at the first config, Triton 3.9 and 3.6)
    pdl = {name.removeprefix("pdl "): row for name, row in rows.items() if name.startswith("pdl ")}
    assert len(pdl) == 20  # every decode kernel with PDL on
    for name, row in pdl.items():  # the wait is there, nothing is written before it, and only a prologue's
        least = PROLOGUE_LOADS.get(name, 0)  # loads (all of them, at least) come before it
        assert row["waits"] >= 1 and row["writes_before_wait"] == 0, (name, row)
        assert row["loads_before_wait"] >= least and (least > 0 or row["loads_before_wait"] == 0), (name, row)
    early = {name.removeprefix("early "): row for name, row in rows.items() if name.startswith("early ")}
    assert set(early) == {"_gate_up_v4_kernel", "_down_v4_kernel", "_gate_up_v2_kernel", "_down_v2_kernel"}
    for name, row in early.items():  # EARLY (triton_moe.EARLY_LOADS): the first step's codes and absmax and the
        assert row["waits"] >= 1 and row["writes_before_wait"] == 0, (name, row)  # ids before the wait, in the
        assert row["loads_before_wait"] >= 4, (name, row)  # registers the step takes without it (the step again,
        assert row["registers"] <= pdl[name]["registers"] + 8, (name, row, pdl[name])  # for stale ids: a branch)


# Global loads a thread issues before griddepcontrol.wait at the `_pdl_cases` config, at least: each
# prologue vector's bytes a thread / 16 (the widest load), one where it holds less (4 warps = 128 threads
# each; tests/test_triton_pdl.py names the pointers). Fewer: the compiler moved a load past the wait.
PROLOGUE_LOADS = {
    "_gemv_kernel": 2 + 2 + 1,  # the first tile and the partial last one, 4 x 512 bf16 (32 bytes a thread) each,
    # and the bias
    "_attention_residual_norms_kernel": 4 * 4,  # four norm weights of 4096 bf16 (64 bytes a thread)
    "_ffn_residual_kernel": 4 * 4 + 1,  # w1, w2, w, w_next as above, and the layer scalar
    "_norms_route_kernel": 3 * 4,  # the router's row and two norm weights, 4096 bf16 each
    "_gated_gemv_route_kernel": 4 + 4,  # the first tile and the partial last one, 8 x 512 bf16 (64 bytes a thread)
    "_rope_rows_kernel": 1,  # 128 fp32 inverse frequencies
    "_rms_norm_kernel": 4,  # the weight, 4096 bf16
    "_rms_norm_rope_kernel": 2,  # the weight (512 bf16) at the columns and at their partners
    "_qkv_write_kernel": 2,  # the head norm's weight (256 bf16), the same two
    "_qkv_attention_kernel": 4,  # q_norm's and k_norm's weights (256 bf16), each at the columns and partners
}


def test_pdl_variants_only_from_sm90():
    """griddepcontrol is sm_90's: an older target (`--arch 86`) compiles everything else."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import sass_stats

    assert not [case[0] for case in sass_stats.compile_cases(86) if case[0].startswith("pdl ")]
    assert len([case[0] for case in sass_stats.compile_cases(90) if case[0].startswith("pdl ")]) == 20


GROUPED_FIT = """
import json, sys
sys.path.insert(0, sys.argv[1])
import sass_stats
from localrun.kernels import triton_moe as tm
cases = [case for cfg in tm.GROUPED_CONFIGS[:tm.GROUPED_FIT_ANYWHERE] for dtype in ("bf16", "fp32")
         for dq in (False, True) for block_m in (16, 64) for case in sass_stats.grouped_case(tm, dtype, dq, cfg, block_m)]
rows = sass_stats.compile_many("compile", 86, cases)
print(json.dumps({name: row["shared_bytes"] for name, row in rows.items()}))
"""


@pytest.mark.skipif(_ptxas() is None, reason="triton with its NVIDIA backend tools is not installed")
def test_every_gpu_has_a_grouped_prefill_tile_that_launches():
    """The prefill's grouped GEMMs: the first GROUPED_FIT_ANYWHERE autotune configs fit 48 KiB of shared
    memory on an RTX 3090 (sm_86) in every variant (dtype, double quant, BLOCK_M), so the autotuner
    always has one to launch where the larger pipelined tiles do not fit (99 KiB a block there)."""
    shared = compiled_in_child(GROUPED_FIT)
    assert len(shared) == 32
    assert max(shared.values()) <= 48 << 10, {k: v for k, v in shared.items() if v > 48 << 10}


PREFILL_FIT = """
import json, sys
sys.path.insert(0, sys.argv[1])
import sass_stats
shared = {}
for arch in (89, 90):
    for name, row in sass_stats.compile_many("compile", arch, list(sass_stats.prefill_attention_cases())).items():
        shared[f"sm_{arch} {name}"] = [row["shared_bytes"], row["local_bytes"]]
print(json.dumps(shared))
"""


@pytest.mark.skipif(_ptxas() is None, reason="triton with its NVIDIA backend tools is not installed")
def test_every_prefill_attention_tile_fits_a_consumer_gpu_block():
    """The CUDA prefill's flash attention kernel at D = 512, every tile it launches or gpu_check times:
    within the 99 KiB of shared memory a block of an RTX 4090 (sm_89) or 3090 has, and of an H100
    (sm_90, where Triton's pipelining and wgmma lay memory out differently), without spilling."""
    rows = compiled_in_child(PREFILL_FIT)
    assert len(rows) == 28  # 14 tiles and variants at each arch
    assert all(shared <= 99 << 10 and local == 0 for shared, local in rows.values()), rows


DECODE_FIT = """
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
import sass_stats
from localrun.kernels import triton_attention as ta

launches = []


class Recorder:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: launches.append(kwargs)


kernel = ta._decode_partial_kernel
ta._decode_partial_kernel = Recorder()
cases = []
for dtype, x in ((torch.float32, "*fp32"), (torch.bfloat16, "*bf16")):
    for D in (128, 256, 512):
        launches.clear()
        q, k = torch.zeros(1, 16, 1, D, dtype=dtype), torch.zeros(1, 2, 1024, D, dtype=dtype)
        ta.decode_attention_triton(q, k, k, torch.ones(1, 1024, dtype=torch.bool), 1.0, in_place=True)
        meta = dict(launches[0])
        warps, stages = meta.pop("num_warps", 4), meta.pop("num_stages", 3)  # Triton's defaults (CUDA)
        ptrs = {n: x for n in ("q_ptr", "k_ptr", "v_ptr", "out_ptr")}
        ptrs.update(vis_ptr="*u8", m_ptr="*fp32", l_ptr="*fp32", acc_ptr="*fp32", count_ptr="*i32")
        cases.append((f"{x[1:]} D={D} stages={stages}", kernel, ptrs, dict(meta, PDL=False), warps, stages))
shared = {}
for arch in (86, 89):
    for name, row in sass_stats.compile_many("compile", arch, cases).items():
        shared[f"sm_{arch} {name}"] = row["shared_bytes"]
print(json.dumps(shared))
"""


@pytest.mark.skipif(_ptxas() is None, reason="triton with its NVIDIA backend tools is not installed")
def test_decode_attention_launch_fits_a_consumer_gpu_block():
    """The split-key decode attention kernel as decode_attention_triton launches it (its num_stages and
    num_warps, Triton's defaults where it names none), fp32 and bf16, head dims 128 / 256 / 512: within
    the 99 KiB of shared memory a block of an RTX 3090 (sm_86) or 4090 (sm_89) may have. At Triton's
    default 3 stages the fp32 K/V tiles (which feed tl.dot directly) are pipelined: 143-297 KiB, which
    no consumer GPU, and at D >= 256 not even an H100, can launch."""
    shared = compiled_in_child(DECODE_FIT)
    assert len(shared) == 12
    assert all(v <= 99 << 10 for v in shared.values()), {k: v for k, v in shared.items() if v > 99 << 10}


OLDER_ARCH = """
import json, sys
sys.path.insert(0, sys.argv[1])
import sass_stats
out = {}
for name, fn, ptrs, consts, warps, *rest in sass_stats.compile_cases(86):
    if "PDL" in fn.arg_names and name.split()[0] in ("v4", "qkv_write", "rope_rows"):
        out[name] = sass_stats.compile_kernel(fn, consts, warps, 86, ptrs, *rest).metadata.shared
        if len(out) == 3:
            break
print(json.dumps(out))
"""


@pytest.mark.skipif(_ptxas() is None, reason="triton with its NVIDIA backend tools is not installed")
def test_decode_kernels_compile_for_sm86():
    """`--compile-only --arch 86` (or 89): a kernel whose PDL constexpr the case leaves at its default
    compiles without griddepcontrol, which ptxas refuses below sm_90."""
    assert len(compiled_in_child(OLDER_ARCH)) == 3


V4_FIT = """
import json, sys
sys.path.insert(0, sys.argv[1])
import sass_stats
from localrun.kernels import triton_moe as tm
configs = (tm.GATE_UP_V4_CONFIGS, tm.DOWN_V4_CONFIGS)
cases = [case for case in sass_stats.v4_cases(tm, dict(sass_stats.POINTERS), "*bf16", False, configs)
         if " sorted=True " not in case[0]]
rows = sass_stats.compile_many("compile", 89, cases)
print(json.dumps({name: [row["shared_bytes"], row["local_bytes"]] for name, row in rows.items()}))
"""


@pytest.mark.skipif(_ptxas() is None, reason="triton with its NVIDIA backend tools is not installed")
def test_every_v4_config_fits_a_consumer_gpu_block():
    """The v4 decode kernels (a warp shuffle reads the table: any NVIDIA GPU) at every autotune config,
    compiled for an RTX 4090 (sm_89): within its 99 KiB of shared memory a block, no spills."""
    rows = compiled_in_child(V4_FIT)
    assert len(rows) == 21
    assert all(shared <= 99 << 10 and local == 0 for shared, local in rows.values()), rows


PREFETCH_OPS = """
import json, sys
sys.path.insert(0, sys.argv[1])
import sass_stats
rows = {}
for arch in (89, 90):
    name, fn, ptrs, consts, warps = sass_stats.prefetch_case()
    kernel = sass_stats.compile_kernel(fn, consts, warps, arch, ptrs)
    rows[f"sm_{arch}"] = sass_stats.opcodes(kernel)
print(json.dumps(rows))
"""


@pytest.mark.skipif(_ptxas() is None, reason="triton with its NVIDIA backend tools is not installed")
def test_the_l2_prefetch_kernel_prefetches_and_reads_nothing():
    """kernels/triton_prefetch.py at sm_89 and sm_90: its asm survives as L2 prefetches (CCTL.E.PML2,
    evict-last), and it loads nothing into registers."""
    rows = compiled_in_child(PREFETCH_OPS)
    for arch, ops in rows.items():
        assert ops.get("CCTL.E.PML2", 0) >= 2, (arch, ops)  # the two ranges' loops
        assert not [op for op in ops if op.startswith(("LDG", "LD."))], (arch, ops)


DOWN_PREFETCH_OPS = """
import json, sys
sys.path.insert(0, sys.argv[1])
import sass_stats
rows = {}
for name, fn, ptrs, consts, warps in sass_stats.down_prefetch_cases():
    kernel = sass_stats.compile_kernel(fn, consts, warps, 90, ptrs)
    rows[name] = {"ops": sass_stats.opcodes(kernel), **sass_stats.inspect(kernel, sass=False)}
print(json.dumps(rows))
"""


@pytest.mark.skipif(_ptxas() is None, reason="triton with its NVIDIA backend tools is not installed")
def test_gate_up_asks_the_l2_for_the_down_matrix_only_with_down_off():
    """triton_moe.PREFETCH_DOWN's DOWN_OFF (sm_90): the v2 and v4 gate_up kernels issue L2 prefetches
    (CCTL.E.PML2) and no load more than without it, and spill nothing; without it, no prefetch."""
    rows = compiled_in_child(DOWN_PREFETCH_OPS)
    assert len(rows) == 4
    for kind in ("v2", "v4"):
        plain, asking = (row for name, row in rows.items() if name.startswith(f"down_prefetch {kind} "))
        loads = lambda row: sum(n for op, n in row["ops"].items() if op.startswith("LDG"))  # noqa: E731
        assert "CCTL.E.PML2" not in plain["ops"] and asking["ops"].get("CCTL.E.PML2", 0) >= 1, (kind, asking)
        assert loads(asking) == loads(plain) and asking["stack_bytes"] == 0, (kind, plain, asking)


MANY = """
import json, sys
sys.path.insert(0, sys.argv[1])
import sass_stats
from localrun.kernels import triton_moe_probe as probe
good = [(f"empty pdl={pdl}", probe._empty_kernel, {"x_ptr": "*fp32"}, {"PDL": pdl}, 1) for pdl in (False, True)]
rows = sass_stats.compile_many("compile", 90, good, jobs=2)
try:
    sass_stats.compile_many("compile", 90, good[:1] + [("bad", probe._empty_kernel, {"x_ptr": "*nothing"}, {}, 1)], 1)
    error = None
except RuntimeError as e:
    error = str(e)
print(json.dumps({"rows": rows, "error": error}))
"""


@pytest.mark.skipif(_ptxas() is None, reason="triton with its NVIDIA backend tools is not installed")
def test_compile_many_compiles_in_worker_processes_and_names_what_failed():
    """compile_many: kernels named by module and name reach the worker processes (spawn), rows come back in
    the cases' order; a case that does not compile fails the call with its name, the others' rows unneeded."""
    out = compiled_in_child(MANY)
    assert list(out["rows"]) == ["empty pdl=False", "empty pdl=True"]
    assert out["rows"]["empty pdl=True"]["waits"] == 1 and "waits" not in out["rows"]["empty pdl=False"]
    assert out["error"].startswith("did not compile: bad: ") and "empty" not in out["error"], out["error"]
