"""Instruction counts of localrun's 4-bit MoE decode kernels, compiled for a GPU on any machine.

    python scripts/sass_stats.py [--arch 90] [--json] [--compile-only] [--jobs N]

Triton compiles for a named target without a GPU (ptxas and nvdisasm ship in the triton wheel), so
this runs on the CPU machines too. For each kernel and tile config it prints the inner loop's
SASS instruction count per weight and per thread (the loop is the body of the one backward branch
the kernel has), the registers and any local-memory spills (cuobjdump -res-usage), and the top
opcodes. An SM issues ~128 lane-instructions a clock, so at ~8 instructions a weight the H200's
132 SMs stream at most ~2 TB/s of 4-bit codes: at batch 1 the count bounds these kernels about as
tightly as memory does, and it is what can be lowered between GPU sessions. The counts depend on
Triton's version (the header line names it): run it under the version the GPU has as well
(PYTHONPATH=<an unpacked triton wheel> python scripts/sass_stats.py).
Shapes: Gemma 4 26B-A4B's (gate_up 1408 x 2816, down 2816 x 704), NF4, blocksize 64, bf16 x.
--compile-only compiles the CUDA decode step's newer kernels in each variant the step launches, and the
prefill's flash attention kernel at each of its tiles (`--arch 89` for an RTX 4090: shared_bytes must
stay within its 99 KiB a block): what the interpreter cannot show (lowering to the GPU) before a GPU
session spends its minutes on it.
Its rows of the decode kernels with PDL on also count the global loads and writes issued before the
kernel's griddepcontrol.wait (`wait_order`): a prologue's loads of step constants, and nothing else
(`early` rows: the MoE kernels' opt-in EARLY prologue, expert rows at ids read again after the wait).
Kernels compile `--jobs` at once (a process each; default one a CPU).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

POINTERS = {"x_ptr": "*bf16", "ids_ptr": "*i64", "early_ids_ptr": "*i64", "order_ptr": "*i64", "h_ptr": "*fp32",
            "buf_i32": "*i32", "buf_u8": "*u8", "buf_f32": "*fp32", "code": "*fp32", "nested_code": "*fp32",
            "w_ptr": "*fp32", "y_ptr": "*bf16"}
TOP_K = 8


def _tool(name: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


# arguments that are multiples of 16 at 26B-A4B (expert rows, offsets, row lengths, strides) and the
# pointers (torch allocations): Triton specializes on that at run time, so the loads vectorize as there
DIVISIBLE = {"expert_bytes", "codes_off", "absmax_off", "H_Q", "I", "H", "stride_xt", "stride_yt"}


def compile_kernel(fn, constexprs: dict, num_warps: int, arch: int, pointers: dict = POINTERS, num_stages: int = 1,
                   divisible: set = DIVISIBLE):
    """triton.compile for cuda:`arch`: `pointers` typed as given, eps and scales fp32, every other
    non-constexpr argument an i32, with the divisibility by 16 Triton's run-time specialization sees
    for torch's allocations and for 26B-A4B's shapes (`divisible`)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    consts = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    for param in fn.params:  # a constexpr with a default (PDL, PROBE, EARLY, ...) left out takes its default: else
        if param.is_constexpr and param.has_default:  # it would be typed an i32 argument, its `if` a run-time
            consts.setdefault(param.name, param.default)  # branch (PDL's griddepcontrol: ptxas fails below sm_90)
    floats = {"eps", "scale", "router_scale", "qk_scale"}
    signature = {n: pointers.get(n, "constexpr" if n in consts else "fp32" if n in floats else "i32")
                 for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if n not in consts and (n in pointers or n in divisible)}
    source = ASTSource(fn, signature, consts, attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages})


def loop_counts(sass: str) -> collections.Counter:
    """Opcode counts of the longest loop (a label and a later branch back to it)."""
    instructions, labels = [], {}
    for line in sass.splitlines():
        label = re.match(r"^\s*\.(L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(instructions)
        ins = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?);", line)
        if ins:
            instructions.append(ins.group(1).strip())
    best = (0, 0)
    for i, text in enumerate(instructions):
        target = re.search(r"BRA.*`\(\.(L_x_\d+)\)", text)
        if target and labels.get(target.group(1), i + 1) <= i:
            start = labels[target.group(1)]
            if i - start > best[1] - best[0]:
                best = (start, i + 1)
    ops = collections.Counter()
    for text in instructions[best[0]:best[1]]:
        ops[opcode(text).split(".")[0]] += 1
    return ops


def _cubin_tool(kernel, *command: str, check: bool = False) -> str:
    """What `command` (a tool, its flags) prints for a compiled kernel's cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp, "k.cubin")
        cubin.write_bytes(kernel.asm["cubin"])
        return subprocess.run([_tool(command[0]), *command[1:], str(cubin)], capture_output=True, text=True,
                              check=check).stdout


def disassembly(kernel) -> str:
    """nvdisasm's text of a compiled kernel."""
    return _cubin_tool(kernel, "nvdisasm", "-c", check=True)


def instructions(sass: str) -> list[str]:
    """The instructions of nvdisasm's text, in order, predicates included."""
    return [m.group(1).strip() for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(.*?);", sass)]


def opcode(instruction: str) -> str:
    """An instruction's opcode with its modifiers (LDG.E.128), past its predicate."""
    return instruction.split()[1] if instruction.startswith("@") else instruction.split()[0]


def inspect(kernel, sass: bool = True) -> dict:
    """Registers, local-memory and stack (spill) bytes a thread, from cuobjdump; with `sass`, the loop's opcodes."""
    usage = _cubin_tool(kernel, "cuobjdump", "-res-usage")
    code = disassembly(kernel) if sass else ""
    regs = re.search(r"REG:(\d+)", usage)
    local = re.search(r"LOCAL:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)  # a thread's stack frame: where ptxas spills what 255 registers do not hold
    info = {"registers": int(regs.group(1)) if regs else None, "local_bytes": int(local.group(1)) if local else None,
            "stack_bytes": int(stack.group(1)) if stack else None}
    return {"ops": loop_counts(code), **info} if sass else info


GLOBAL_LOAD = re.compile(r"^(@!?U?P\w+\s+)?LDG\.")  # LDG.E..., not LDGSTS / LDGDEPBAR
GLOBAL_WRITE = re.compile(r"^(@!?U?P\w+\s+)?(STG|ST|ATOMG|ATOM|RED|REDG)\.")


def _before_wait(sass: list[str]) -> tuple[int, list[str]]:
    """(how many `griddepcontrol.wait`s (ACQBULK) a kernel's SASS instructions have, those before the first)."""
    waits = [i for i, text in enumerate(sass) if re.search(r"\bACQBULK\b", text)]
    return len(waits), sass[:waits[0]] if waits else []


def wait_order(sass: list[str]) -> dict:
    """Programmatic dependent launch in a kernel's SASS instructions: how many waits it has, and the global
    loads and writes issued before the first (its prologue: kernels/triton_pdl.py)."""
    waits, before = _before_wait(sass)
    return {"waits": waits, "loads_before_wait": sum(bool(GLOBAL_LOAD.match(t)) for t in before),
            "writes_before_wait": sum(bool(GLOBAL_WRITE.match(t)) for t in before)}


def cases():
    """(kernel name, function, constexprs, num_warps, weights a thread handles per loop step)."""
    from localrun.kernels import triton_moe as tm

    H, I, blocksize = 2816, 704, 64
    log_wpb = (blocksize // 8).bit_length() - 1
    for cfg in tm.GATE_UP_V4_CONFIGS:
        n, w, warps = cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_W"], cfg.num_warps
        yield (f"v4 gate_up n={n} w={w} warps={warps}", tm._gate_up_v4_kernel,
               dict(ACT=0, LOG_WPB=log_wpb, DOUBLE_QUANT=False, SORTED=False, LUT_SHFL=True, BLOCK_N=n, BLOCK_W=w),
               warps, 2 * n * w * 8 / (32 * warps))
    for cfg in tm.DOWN_V4_CONFIGS:
        n, w, warps = cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_W"], cfg.num_warps
        yield (f"v4 down n={n} w={w} warps={warps}", tm._down_v4_kernel,
               dict(LOG_WPB=log_wpb, DOUBLE_QUANT=False, KE=TOP_K, LUT_SHFL=True, BLOCK_N=n, BLOCK_W=w),
               warps, TOP_K * n * w * 8 / (32 * warps))
    picked = ((tm._gate_up_v2_kernel, "gate_up", (4, 128, 1), H // 2), (tm._down_v2_kernel, "down", (8, 64, 4), I // 2))
    for fn, name, (n, k, warps), row_bytes in picked:  # the H200's v2 autotune picks
        consts = dict(BLOCKSIZE=blocksize, DOUBLE_QUANT=False, BB=tm._gcd_pow2(row_bytes, blocksize), BLOCK_N=n,
                      BLOCK_K=k)
        consts.update(dict(ACT=0, SORTED=False) if name == "gate_up" else dict(KE=TOP_K))
        rows = 2 * n if name == "gate_up" else TOP_K * n
        yield f"v2 {name} n={n} k={k} warps={warps}", fn, consts, warps, rows * k * 2 / (32 * warps)


def compile_cases(arch: int = 90):
    """(name, kernel, pointer types, constexprs, warps[, stages[, divisible]]): the CUDA step's Triton
    kernels not yet run on a GPU (v4, v5, ...), in the variants it launches (dtypes, double quant, sorted
    pairs, rings, the next norm), each autotune config of the prefill's grouped 4-bit GEMMs and of the dense GEMV
    (opt-in), and the prefill's flash attention kernel at its tiles; from sm_90 (`arch` 90) also every
    decode kernel with programmatic dependent launch on."""
    from localrun.kernels import triton_attention, triton_fused, triton_gemv, triton_moe, triton_qkv_write

    for x in ("*bf16", "*fp32"):
        ptrs = dict(POINTERS, x_ptr=x, y_ptr=x)
        for dq in (False, True):
            yield from v4_cases(triton_moe, ptrs, x, dq)
            yield from fused_cases(triton_moe, ptrs, x, dq, triton_moe.FUSED_CONFIGS if (x, dq) == ("*bf16", False)
                                   else None)
        kv = {n: x for n in triton_qkv_write._qkv_write_kernel.arg_names if n.endswith("_ptr")}
        kv.update(pos_ptr="*i64", ring_ptr="*i64")
        for D, ring in ((256, False), (256, True), (512, False))[: 3 if x == "*bf16" else 2]:  # 26B-A4B's layers
            yield (f"qkv_write {x[1:]} D={D} ring={ring}", triton_qkv_write._qkv_write_kernel, kv,
                   dict(NORM_V=True, HAS_RING=ring, BLOCK=D), triton_qkv_write.num_warps(D))
        if x == "*bf16":  # Qwen3-30B-A3B's (v as projected)
            yield (f"qkv_write {x[1:]} D=128 ring=False norm_v=False", triton_qkv_write._qkv_write_kernel, kv,
                   dict(NORM_V=False, HAS_RING=False, BLOCK=128), triton_qkv_write.num_warps(128))
        glue = {n: x for n in triton_fused._ffn_residual_kernel.arg_names if n.endswith("_ptr")}
        yield f"ffn_residual {x[1:]} next", triton_fused._ffn_residual_kernel, glue, dict(NEXT=True, BLOCK=4096), 4
        route = {n: x for n in triton_fused._norms_route_kernel.arg_names if n.endswith("_ptr")}
        route.update(scale_ptr="*fp32", ids_ptr="*i64", w_ptr="*fp32", count_ptr="*i32")
        yield (f"norms_route {x[1:]}", triton_fused._norms_route_kernel, route,
               dict(BLOCK=4096, BLOCK_E=128, BLOCK_K=8), 4)
        rope = {"pos_ptr": "*i64", "inv_ptr": "*fp32", "cos_ptr": x, "sin_ptr": x}
        yield f"rope_rows {x[1:]}", triton_fused._rope_rows_kernel, rope, dict(BLOCK=128), 4
        attn = {"q_ptr": x, "k_ptr": x, "v_ptr": x, "vis_ptr": "*u8", "m_ptr": "*fp32", "l_ptr": "*fp32",
                "acc_ptr": "*fp32", "count_ptr": "*i32", "out_ptr": x}
        for D, G in ((256, 2), (512, 8), (128, 8)):  # 26B-A4B's sliding and full layers, Qwen3-30B-A3B's
            for in_place in (True, False):
                yield (f"decode_partial {x[1:]} D={D} combine_in_place={in_place}",
                       triton_attention._decode_partial_kernel, attn,
                       dict(HAS_MASK=True, PRECISION="ieee" if x == "*fp32" else "tf32", COMBINE=in_place, BLOCK_G=16,
                            BLOCK_S=triton_attention.partial_tile(D)[0], BLOCK_D=D,
                            **triton_attention.combine_tiles(G, 8, D)),
                       triton_attention.warps_for(D))
        fused = {n: x for n in triton_attention._qkv_attention_kernel.arg_names if n.endswith("_ptr")}
        fused.update(pos_ptr="*i64", ring_ptr="*i64", vis_ptr="*u8", m_ptr="*fp32", l_ptr="*fp32", acc_ptr="*fp32",
                     count_ptr="*i32")
        # 26B-A4B's sliding and full layers (the combine apart by default, in place opt-in), Qwen3-30B-A3B's
        # (v as projected)
        half = ((256, 2, True, True, True), (256, 2, True, False, True), (512, 8, False, True, True),
                (512, 8, False, False, True), (128, 8, False, False, False))
        for D, G, ring, in_place, norm_v in half if x == "*bf16" else ():  # (fp32 writes q/k/v with torch ops)
            yield (f"qkv_attention {x[1:]} D={D} ring={ring} combine_in_place={in_place} norm_v={norm_v}",
                   triton_attention._qkv_attention_kernel, fused,
                   dict(NORM_V=norm_v, HAS_RING=ring, HAS_MASK=True, PRECISION="ieee" if x == "*fp32" else "tf32",
                        COMBINE=in_place, BLOCK_G=16, BLOCK_S=triton_attention.partial_tile(D)[0], BLOCK_D=D,
                        **triton_attention.combine_tiles(G, 8, D)), triton_attention.warps_for(D))
    yield from _grouped_cases(triton_moe)
    yield from _gemv_cases(triton_gemv)
    yield from _gated_gemv_cases(triton_fused)
    yield from prefill_attention_cases()
    yield prefetch_case()
    yield from probe_cases(arch)
    yield from down_prefetch_cases()
    if arch >= 90:  # griddepcontrol (programmatic dependent launch) is sm_90's
        yield from _pdl_cases()
        yield from early_cases()
        yield from l1_prefetch_cases()


def l1_prefetch_cases():
    """The decode attention that writes q/k/v with its opt-in L1 prefetch (triton_attention.L1_PREFETCH) and
    PDL, at 26B-A4B's sliding and full layers: `compile_cases`' rows of it with PREFETCH (and PDL) on."""
    for name, fn, ptrs, consts, *rest in compile_cases(80):
        if name.startswith("qkv_attention bf16") and "D=128" not in name:
            yield "l1_prefetch" + name.removeprefix("qkv_attention"), fn, ptrs, dict(consts, PREFETCH=True, PDL=True), \
                *rest


def prefetch_case():
    """The compile_cases() row of the L2 prefetch kernel (kernels/triton_prefetch.py), as it launches."""
    from localrun.kernels import triton_prefetch as tp

    return ("l2_prefetch", tp._l2_prefetch_kernel, {"a_ptr": "*u8", "b_ptr": "*u8", "sink_ptr": "*i32"},
            dict(BLOCK=tp.BLOCK, LINE=tp.LINE), tp.BLOCK // 32)


def down_prefetch_cases():
    """compile_cases() rows of the v2 gate_up kernel (the H200's pick, `cases`) and the v4 one (bf16, its list's
    first config, `v4_cases`) with PREFETCH_DOWN's DOWN_OFF at 26B-A4B's NF4 layout (where an expert's down
    matrix starts), and without it."""
    import torch

    from localrun.kernels import triton_moe as tm
    from quant.nf4 import expert_layout
    from quant.spec import QuantSpec

    down = expert_layout((1408, 2816), (2816, 704), QuantSpec("nf4", 64, False), torch.bfloat16).down.codes.offset
    ptrs = dict(POINTERS, x_ptr="*bf16", y_ptr="*bf16")
    v2 = next((fn, consts, warps) for name, fn, consts, warps, _ in cases() if name.startswith("v2 gate_up "))
    v4 = next((fn, consts, warps) for name, fn, _, consts, warps in v4_cases(tm, ptrs, "*bf16", False)
              if name.startswith("v4 gate_up ") and "sorted=False" in name)
    for name, (fn, consts, warps) in (("v2", v2), ("v4", v4)):
        for off in (0, down):
            yield f"down_prefetch {name} gate_up down_off={off}", fn, ptrs, dict(consts, DOWN_OFF=off), warps


def probe_cases(arch: int):
    """compile_cases() rows of gpu_check's v4 probes (kernels/triton_moe_probe.py): both stages without the
    table's shuffles and with their loads alone (bf16, the first config of each list), the empty kernel."""
    from localrun.kernels import triton_moe as tm
    from localrun.kernels import triton_moe_probe as probe

    ptrs = dict(POINTERS, x_ptr="*bf16", y_ptr="*bf16")
    for name, value in probe.PROBES.items():
        if value:
            for row in v4_cases(tm, ptrs, "*bf16", False):
                if "sorted=True" not in row[0]:
                    yield (f"probe {name} {row[0]}", row[1], row[2], dict(row[3], PROBE=value), row[4])
    for pdl in (False, True) if arch >= 90 else (False,):
        yield f"probe empty pdl={pdl}", probe._empty_kernel, {"x_ptr": "*bf16"}, dict(PDL=pdl), 1


def opcodes(kernel) -> dict:
    """How many times each SASS opcode (with its modifiers) appears in a compiled kernel."""
    return dict(collections.Counter(opcode(text) for text in instructions(disassembly(kernel))))


def v4_cases(tm, ptrs: dict, x: str, dq: bool, configs: tuple | None = None):
    """compile_cases() rows of the v4 decode kernels (the table in the lanes) at one x dtype and double
    quant: gate_up with pairs in order and sorted, down; at the first config of each list, or each of
    `configs` ((gate_up configs, down configs))."""
    gate_up, down = configs or (tm.GATE_UP_V4_CONFIGS[:1], tm.DOWN_V4_CONFIGS[:1])
    for cfg in gate_up:
        n, w, warps = cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_W"], cfg.num_warps
        for sort in (False, True):
            yield (f"v4 gate_up {x[1:]} dq={dq} sorted={sort} n={n} w={w} warps={warps}", tm._gate_up_v4_kernel,
                   ptrs, dict(ACT=0, LOG_WPB=3, DOUBLE_QUANT=dq, SORTED=sort, LUT_SHFL=True, BLOCK_N=n, BLOCK_W=w),
                   warps)
    for cfg in down:
        n, w, warps = cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_W"], cfg.num_warps
        yield (f"v4 down {x[1:]} dq={dq} n={n} w={w} warps={warps}", tm._down_v4_kernel, ptrs,
               dict(LOG_WPB=3, DOUBLE_QUANT=dq, KE=TOP_K, LUT_SHFL=True, BLOCK_N=n, BLOCK_W=w), warps)


FUSED_DIVISIBLE = DIVISIBLE | {"dn_codes_off", "dn_absmax_off"}  # down's offsets in an expert, as v4's


def fused_cases(tm, ptrs: dict, x: str, dq: bool, configs: list | None = None):
    """compile_cases() rows of the one-launch v5 MoE kernel at one x dtype and double quant: at its list's first
    config, or at each of `configs`."""
    for cfg in configs or tm.FUSED_CONFIGS[:1]:
        j, w, r, warps = cfg.kwargs["BLOCK_J"], cfg.kwargs["BLOCK_W"], cfg.kwargs["BLOCK_R"], cfg.num_warps
        yield (f"v5 {x[1:]} dq={dq} j={j} w={w} r={r} warps={warps}", tm._moe_fused_kernel,
               dict(ptrs, acc_ptr="*fp32", acc_bits_ptr="*i32", count_ptr="*i32"),
               dict(ACT=0, LOG_WPB=3, DOUBLE_QUANT=dq, LUT_SHFL=True, BLOCK_J=j, BLOCK_W=w, BLOCK_R=r,
                    BLOCK_H=tm.FINAL_ROWS), warps, 1, FUSED_DIVISIBLE)


def _pdl_cases():
    """Every decode kernel once with programmatic dependent launch (PDL=True: griddepcontrol, sm_90 on),
    bf16, at one config each (compile_all adds where its prologue's loads stand: `wait_order`)."""
    from localrun.kernels import triton_attention, triton_fused, triton_gemv, triton_moe, triton_norm, triton_qkv_write

    b = "*bf16"
    ptrs = lambda fn, **types: {n: types.get(n, b) for n in fn.arg_names if n.endswith("_ptr")}  # noqa: E731
    moe = dict(POINTERS, x_ptr=b, y_ptr=b)
    v2 = dict(BLOCKSIZE=64, DOUBLE_QUANT=False, BB=32)
    v4 = dict(LOG_WPB=3, DOUBLE_QUANT=False, LUT_SHFL=True)
    kernels = [
        (triton_moe._gate_up_v4_kernel, moe, dict(v4, ACT=0, SORTED=False, BLOCK_N=4, BLOCK_W=128), 1),
        (triton_moe._down_v4_kernel, moe, dict(v4, KE=TOP_K, BLOCK_N=4, BLOCK_W=32), 1),
        (triton_moe._gate_up_v2_kernel, moe, dict(v2, ACT=0, SORTED=False, BLOCK_N=4, BLOCK_K=128), 1),
        (triton_moe._down_v2_kernel, moe, dict(v2, KE=TOP_K, BLOCK_N=8, BLOCK_K=64), 4),
        (triton_gemv._gemv_kernel, ptrs(triton_gemv._gemv_kernel), dict(BM=2, HAS_BIAS=True, BLOCK_N=4, BLOCK_K=512,
                                                                          TAIL=True), 4),
        (triton_attention._decode_partial_kernel,
         ptrs(triton_attention._decode_partial_kernel, vis_ptr="*u8", m_ptr="*fp32", l_ptr="*fp32", acc_ptr="*fp32",
              count_ptr="*i32"),
         dict(HAS_MASK=True, PRECISION="tf32", COMBINE=True, BLOCK_G=16, BLOCK_S=64, BLOCK_D=256,
              **triton_attention.combine_tiles(2, 8, 256)), 4),
        (triton_attention._qkv_attention_kernel,
         ptrs(triton_attention._qkv_attention_kernel, pos_ptr="*i64", ring_ptr="*i64", vis_ptr="*u8", m_ptr="*fp32",
              l_ptr="*fp32", acc_ptr="*fp32", count_ptr="*i32"),
         dict(NORM_V=True, HAS_RING=True, HAS_MASK=True, PRECISION="tf32", COMBINE=True, BLOCK_G=16, BLOCK_S=64,
              BLOCK_D=256, **triton_attention.combine_tiles(2, 8, 256)), 4),
        (triton_attention._decode_combine_kernel,
         ptrs(triton_attention._decode_combine_kernel, m_ptr="*fp32", l_ptr="*fp32", acc_ptr="*fp32"),
         dict(BLOCK_D=512, **triton_attention.combine_tiles(8, 64, 512)), 8),
        (triton_fused._attention_residual_norms_kernel, ptrs(triton_fused._attention_residual_norms_kernel),
         dict(BLOCK=4096), 4),
        (triton_fused._ffn_residual_kernel, ptrs(triton_fused._ffn_residual_kernel), dict(NEXT=True, BLOCK=4096), 4),
        (triton_fused._route_kernel, ptrs(triton_fused._route_kernel, ids_ptr="*i64", w_ptr="*fp32"),
         dict(BLOCK_E=128, BLOCK_K=8), 1),
        (triton_fused._gated_kernel, ptrs(triton_fused._gated_kernel), dict(ACT=0, BLOCK=1024), 4),
        (triton_fused._gated_route_kernel, ptrs(triton_fused._gated_route_kernel, ids_ptr="*i64", w_ptr="*fp32"),
         dict(ACT=0, BLOCK=256, BLOCK_E=128, BLOCK_K=8), 1),
        (triton_fused._norms_route_kernel,
         ptrs(triton_fused._norms_route_kernel, scale_ptr="*fp32", ids_ptr="*i64", w_ptr="*fp32", count_ptr="*i32"),
         dict(BLOCK=4096, BLOCK_E=128, BLOCK_K=8), 4),
        (triton_fused._gated_gemv_route_kernel, _gated_gemv_pointers(triton_fused),
         dict(ACT=0, BLOCK_N=4, BLOCK_K=512, TAIL=True, BLOCK_E=128, BLOCK_TOP=TOP_K), 4),
        (triton_fused._rope_rows_kernel, ptrs(triton_fused._rope_rows_kernel, pos_ptr="*i64", inv_ptr="*fp32"),
         dict(BLOCK=128), 4),
        (triton_norm._rms_norm_kernel, ptrs(triton_norm._rms_norm_kernel), dict(HAS_WEIGHT=True, BLOCK=4096), 4),
        (triton_norm._rms_norm_rope_kernel, ptrs(triton_norm._rms_norm_rope_kernel), dict(BLOCK=512), 4),
        (triton_qkv_write._qkv_write_kernel,
         ptrs(triton_qkv_write._qkv_write_kernel, pos_ptr="*i64", ring_ptr="*i64"),
         dict(NORM_V=True, HAS_RING=True, BLOCK=256), 4),
    ]
    fused = next(fused_cases(triton_moe, moe, b, False))
    kernels.append((triton_moe._moe_fused_kernel, fused[2], fused[3], fused[4]))
    for fn, pointers, consts, warps in kernels:
        # the GEMV's K and row strides: multiples of 16 at 26B-A4B's projections (its loads vectorize as there)
        divisible = DIVISIBLE | {"K", "stride_xm", "stride_ym"} if fn is triton_gemv._gemv_kernel else DIVISIBLE
        divisible = GATED_GEMV_DIVISIBLE if fn is triton_fused._gated_gemv_route_kernel else divisible
        divisible = FUSED_DIVISIBLE if fn is triton_moe._moe_fused_kernel else divisible
        yield f"pdl {fn.__name__}", fn, pointers, dict(consts, PDL=True), warps, 1, divisible


def early_cases():
    """The MoE decode kernels with PDL and EARLY (triton_moe.EARLY_LOADS: the first step requested before the
    wait): `_pdl_cases`' rows of them with EARLY on, to set beside theirs."""
    from localrun.kernels import triton_moe as tm

    moe = (tm._gate_up_v4_kernel, tm._down_v4_kernel, tm._gate_up_v2_kernel, tm._down_v2_kernel)
    for name, fn, ptrs, consts, *rest in _pdl_cases():
        if fn in moe:
            yield f"early {fn.__name__}", fn, ptrs, dict(consts, EARLY=True), *rest


# the prefill attention kernel's strides and head dim are multiples of 16 at 26B-A4B (torch's allocations)
PREFILL_DIVISIBLE = {"stride_qb", "stride_qh", "stride_qt", "stride_kb", "stride_kh", "stride_ks", "stride_vb",
                     "stride_vh", "stride_vs", "D"}


def prefill_attention_cases():
    """compile_cases() rows of the CUDA prefill's flash attention kernel at 26B-A4B's full layers
    (D = 512): the tiles it launches below and from sm_90 (bf16, fp16, fp32; full and sliding) and every TILE_CHOICES
    tile gpu_check times; each with PREFILL_DIVISIBLE as its divisibility."""
    import torch

    from localrun.kernels import triton_prefill_attention as tp

    dtypes = {"*bf16": torch.bfloat16, "*fp16": torch.float16, "*fp32": torch.float32}
    variants = []
    for capability in (None, (9, 0)):  # below sm_90, and from it
        variants += [(x, sliding, tp.tiles_for(512, dtype, capability)) for x, dtype in dtypes.items()
                     for sliding in (False, True)]
    variants += [("*bf16", False, tiles) for tiles in tp.TILE_CHOICES.values()]
    variants = list(dict.fromkeys(variants))  # each once
    for x, sliding, t in variants:
        ptrs = {"q_ptr": x, "k_ptr": x, "v_ptr": x, "out_ptr": x, "pos_t_ptr": "*i64", "pos_s_ptr": "*i64"}
        consts = dict(SLIDING=sliding, PRECISION="ieee" if x == "*fp32" else "tf32", WIDEN=False, BLOCK_M=t.BLOCK_M,
                      BLOCK_N=t.BLOCK_N, BLOCK_D=512, BLOCK_DK=t.BLOCK_DK, BLOCK_DV=t.BLOCK_DV)
        label = (f"m={t.BLOCK_M} n={t.BLOCK_N} dk={t.BLOCK_DK} dv={t.BLOCK_DV} warps={t.num_warps} "
                 f"stages={t.num_stages}")
        yield (f"prefill_attention {x[1:]} D=512 sliding={sliding} {label}", tp._causal_attention_kernel, ptrs,
               consts, t.num_warps, t.num_stages, PREFILL_DIVISIBLE)


def _grouped_cases(tm):
    """Every GROUPED_CONFIGS tile of both grouped GEMMs in bf16 (the CUDA model's dtype), then fp32
    (IEEE products) and double quant at the first tile."""
    variants = [("bf16", False, cfg, 64) for cfg in tm.GROUPED_CONFIGS]
    variants += [(dtype, dq, tm.GROUPED_CONFIGS[0], 16) for dtype, dq in (("fp32", False), ("bf16", True))]
    for dtype, dq, cfg, block_m in variants:
        yield from grouped_case(tm, dtype, dq, cfg, block_m)


def grouped_case(tm, dtype: str, dq: bool, cfg, block_m: int):
    """compile_cases() rows of both grouped GEMMs at one tile config, x dtype, double quant and BLOCK_M."""
    ptrs = dict(POINTERS, pairs_ptr="*i32", block_e_ptr="*i32", x_ptr=f"*{dtype}", h_ptr=f"*{dtype}",
                out_ptr=f"*{dtype}")
    tile = dict(BLOCKSIZE=64, DOUBLE_QUANT=dq, IEEE=dtype == "fp32", BLOCK_M=block_m, **cfg.kwargs)
    label = f"n={cfg.kwargs['BLOCK_N']} k={cfg.kwargs['BLOCK_K']} warps={cfg.num_warps} stages={cfg.num_stages}"
    for stage, fn, extra in (("gate_up", tm._gate_up_grouped_kernel, dict(ACT=0)), ("down", tm._down_grouped_kernel, {})):
        yield (f"grouped {stage} {dtype} dq={dq} m={block_m} {label}", fn, ptrs, dict(tile, **extra),
               cfg.num_warps, cfg.num_stages)


def _gemv_cases(tg):
    """Every GEMV autotune config the pruning keeps at one row with a partial last step (26B-A4B's dense
    MLP down: K = 2,112), and the 4-row variant with a bias and whole steps; K and the row strides multiples
    of 16, as at 26B-A4B's projections (the loads vectorize as there)."""
    ptrs = {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16"}
    for bm, bias, tail in ((1, False, True), (4, True, False)):
        for cfg in tg._prune(tg.CONFIGS, {"BM": bm}):
            yield (f"gemv bm={bm} bias={bias} tail={tail} n={cfg.kwargs['BLOCK_N']} k={cfg.kwargs['BLOCK_K']} "
                   f"warps={cfg.num_warps}", tg._gemv_kernel, ptrs, dict(BM=bm, HAS_BIAS=bias, TAIL=tail, **cfg.kwargs),
                   cfg.num_warps, 1, DIVISIBLE | {"K", "stride_xm", "stride_ym"})


GATED_GEMV_DIVISIBLE = DIVISIBLE | {"K", "stride_x"}  # 26B-A4B's H and the rows' stride: multiples of 16


def _gated_gemv_pointers(tf) -> dict:
    return {n: {"ids_ptr": "*i64", "wts_ptr": "*fp32", "count_ptr": "*i32"}.get(n, "*bf16")
            for n in tf._gated_gemv_route_kernel.arg_names if n.endswith("_ptr")}


def _gated_gemv_cases(tf):
    """Every autotune config of the dense MLP's gate / up + router kernel (kernels/triton_fused.py,
    `gated_gemv`, opt-in) at 26B-A4B (K = 2,816: a partial last step at 512, 1,024 and 2,048 a step)."""
    for cfg in tf.GATED_GEMV_CONFIGS:
        n, k = cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
        tail = 2816 > k and 2816 % k != 0
        yield (f"gated_gemv n={n} k={k} warps={cfg.num_warps} tail={tail}", tf._gated_gemv_route_kernel,
               _gated_gemv_pointers(tf), dict(ACT=0, TAIL=tail, BLOCK_E=128, BLOCK_TOP=TOP_K, **cfg.kwargs),
               cfg.num_warps, 1, GATED_GEMV_DIVISIBLE)


def row_sums(kernel) -> list[str]:
    """The layout of each sum over one row ([n] -> scalar: a head's RMSNorm) in a kernel's TTGIR, in
    order: the order a GPU adds the row's elements in (per thread, then across lanes and warps)."""
    ir = kernel.asm["ttgir"]
    layouts = dict(re.findall(r"^(#\w+) = (#ttg\.blocked<.*?>)", ir, re.M))
    sums = re.findall(r"\}\) : \(tensor<(\d+)xf32, (#\w+)>\) -> f32", ir)
    return [f"{n} {layouts.get(layout, layout)}" for n, layout in sums]


def key_loop(kernel) -> str:
    """A digest of the TTGIR loop that holds a kernel's tl.dot (decode attention's walk over its keys),
    its values' names dropped and its layouts spelled out: two kernels with the same digest run the
    same operations on the same layouts in that loop."""
    import hashlib

    ir = kernel.asm["ttgir"]
    layouts = dict(re.findall(r"^(#\w+) = (#[^\n]*?)(?: loc\(.*)?$", ir, re.M))
    lines = [re.sub(r"\s*loc\(.*$", "", line).strip() for line in ir.splitlines()]
    for i, line in enumerate(lines):
        if "scf.for" not in line:
            continue
        depth, body = 0, []
        for text in lines[i:]:
            body.append(re.sub(r"#\w+", lambda m: layouts.get(m.group(0), m.group(0)), re.sub(r"%[\w#]+", "%", text)))
            depth += text.count("{") - text.count("}")
            if depth <= 0 and len(body) > 1:
                break
        if any("tt.dot" in text for text in body):
            return hashlib.sha256("\n".join(body).encode()).hexdigest()[:16]
    return ""


def compile_row(case, arch: int) -> dict:
    """compile_all()'s row of one compile_cases() case."""
    name, fn, ptrs, consts, warps, *stages = case
    kernel = compile_kernel(fn, consts, warps, arch, ptrs, *stages)
    sass = instructions(disassembly(kernel)) if consts.get("PDL") or consts.get("PREFETCH") else []
    row = {"cubin_bytes": len(kernel.asm["cubin"]), "shared_bytes": kernel.metadata.shared,
           **inspect(kernel, sass=False), **(wait_order(sass) if consts.get("PDL") else {})}
    if name.split()[0] in ("qkv_write", "qkv_attention", "l1_prefetch"):
        row["row_sums"] = row_sums(kernel)
    if name.split()[0] in ("decode_partial", "qkv_attention", "l1_prefetch"):
        row["key_loop"] = key_loop(kernel)
    if consts.get("PREFETCH"):  # the L1 prefetches (CCTL.E.PF1), and how many come before the wait (none may)
        waits, before = _before_wait(sass)
        row.update(l1_prefetches=sum("CCTL.E.PF1" in t for t in sass),
                   l1_prefetches_before_wait=sum("CCTL.E.PF1" in t for t in before) if waits else None)
    return row


def loop_row(case, arch: int) -> dict:
    """main()'s row of one cases() case: the inner loop's instructions a weight, registers, spills, opcodes."""
    name, fn, consts, warps, weights = case
    info = inspect(compile_kernel(fn, consts, warps, arch))
    total = sum(info["ops"].values())
    return {"loop_instructions": total, "weights_per_thread_step": weights,
            "instructions_per_weight": round(total / weights, 2), "registers": info["registers"],
            "local_bytes": info["local_bytes"], "ops": dict(info["ops"].most_common())}


def _job(kind: str, arch: int, case: tuple) -> tuple[str, dict | str]:
    """(name, row) of one case whose kernel is named by module and name (a JITFunction does not pickle),
    compiled in a worker process: `compile_row` ("compile") or `loop_row` ("loop"); the row is the error's
    text where it did not compile (an exception may not pickle either)."""
    import importlib

    name, (module, attr), *rest = case
    try:
        fn = getattr(importlib.import_module(module), attr)
        return name, (compile_row if kind == "compile" else loop_row)((name, fn, *rest), arch)
    except Exception as e:  # noqa: BLE001 - reported by the parent with the case's name
        return name, f"{type(e).__name__}: {e}"


def compile_many(kind: str, arch: int, cases_: list, jobs: int | None = None) -> dict:
    """name -> row of each case (compile_cases() tuples for "compile", cases() tuples for "loop"), in their
    order, compiled in `jobs` processes (default: one a CPU; ptxas and Triton's front end each take one
    core, so on CI's two, two at once halve the wait). Raises where one did not compile."""
    jobs = (os.cpu_count() or 1) if jobs is None else jobs
    named = [(case[0], (case[1].fn.__module__, case[1].fn.__name__), *case[2:]) for case in cases_]
    if jobs <= 1 or len(named) <= 1:
        done = [_job(kind, arch, case) for case in named]
    else:
        import concurrent.futures
        import multiprocessing

        # spawn: each worker imports torch and triton afresh (no forked copy of a parent's threads)
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            done = list(pool.map(_job, [kind] * len(named), [arch] * len(named), named))
    failed = [f"{name}: {row}" for name, row in done if isinstance(row, str)]
    if failed:
        raise RuntimeError("did not compile: " + "; ".join(failed))
    return dict(done)


def compile_all(arch: int, jobs: int | None = None) -> dict:
    """name -> cubin bytes, shared memory bytes and registers of every compile_cases() kernel (an
    exception where one does not compile); for the q/k/v write and the attention that does it too, the
    layouts of their heads' norm sums (`row_sums`: the two must add in the same order), and for the two
    decode attention kernels their key loop's digest (`key_loop`: the same loop)."""
    return compile_many("compile", arch, list(compile_cases(arch)), jobs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100 / H200)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--compile-only", action="store_true",
                        help="compile the decode step's newer kernels in every variant it launches, and stop")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="kernels compiled at once, a process each (default: one a CPU)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if args.compile_only:
        print(json.dumps(compile_all(args.arch, args.jobs), indent=1))
        return 0
    import triton

    rows = {"triton": triton.__version__}
    if not args.json:
        print(f"triton {triton.__version__}, sm_{args.arch}")
    for name, row in compile_many("loop", args.arch, list(cases()), args.jobs).items():
        rows[name] = row
        if not args.json:
            ops = dict(collections.Counter(row["ops"]).most_common(5))
            print(f"{name:34s} {row['instructions_per_weight']:6.2f} instr/weight  {row['registers']} regs  "
                  f"local {row['local_bytes']}  {ops}", flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
