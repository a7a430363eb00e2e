"""Matmuls for the CPU path: bf16-stored weights computed in fp32, and oneDNN for fp32 GEMMs.

A bf16 checkpoint run in fp32 on the CPU keeps its matrices in bf16: widening bf16 to fp32 is
exact, so `linear(x_fp32, w_bf16)` computes the very products of an fp32 model (only the order
of the fp32 sums differs) while reading half the bytes, and one-token decode is bound by those
bytes. Few tokens go through `cpu_bf16.c` (built once per machine with the system C compiler,
loaded with ctypes); many tokens widen the weight and run oneDNN's fp32 GEMM, which on AVX-512
machines is ~2x MKL's (what `F.linear` calls). Without a C compiler (or with
LOCALRUN_CPU_KERNELS=0) `storage_dtype` keeps fp32 weights and everything is plain torch.

Every function here returns what `F.linear` / the expert FFN would, so callers never branch.
`prefill_attention` (fp32) runs its two GEMMs per KV head through oneDNN too; the caller asks
`prefill_attention_applies` first, since it takes its mask in a form of its own.

oneDNN keeps every GEMM it has built (JIT code and buffers, ~0.3 MB each) in two caches keyed by
shape, 1024 entries each: oneDNN's primitive cache and ideep's LRU cache in front of it. A chat
prefills a conversation of a new length every turn, so with the defaults each turn added
~10 MB for hundreds of turns (issue 15). Both are read at the first GEMM, so importing this
module bounds them (ONEDNN_CACHE_CAPACITY entries each) unless the environment already says.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

SOURCE = Path(__file__).with_name("cpu_bf16.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
C_KERNEL_MAX_ROWS = 128  # up to this many rows the C kernel is as fast as widening + oneDNN (measured)
ACTIVATION_CODES = {"gelu_pytorch_tanh": 0, "gelu": 1, "silu": 2}
_PTR, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int

ONEDNN_CACHE_CAPACITY = 64  # a few prefills' shapes: decode never reaches oneDNN (C kernel up to 128 rows)
for _var in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
    os.environ.setdefault(_var, str(ONEDNN_CACHE_CAPACITY))

_lib: ctypes.CDLL | None = None
_tried = False
_lock = threading.Lock()
_local = threading.local()  # per-thread scratch for the expert kernel


def enabled() -> bool:
    return os.environ.get("LOCALRUN_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "localrun" / "kernels"


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's feature flags (a cache shared by several machines
    must not hand one machine's build to another)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build(compiler: str | None = None, cache_dir: Path | None = None, extra_flags: tuple[str, ...] = ()) -> Path:
    """Compile cpu_bf16.c for this machine (once; the file name hashes source, flags, compiler and
    CPU) and return the shared library's path. Raises OSError / CalledProcessError on failure."""
    cc = compiler or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise OSError("no C compiler (cc or gcc) on PATH")
    source = SOURCE.read_bytes()
    flags = [*FLAGS, *extra_flags]  # extra: e.g. -mno-avx512f, to build (and test) the AVX2 path
    key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), cc.encode(),
                                     _cpu_signature().encode()])).hexdigest()[:16]
    out_dir = cache_dir or _cache_dir()
    out = out_dir / f"cpu_bf16-{key}.so"
    if out.is_file():
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".cpu_bf16-", suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        subprocess.run([cc, *flags, str(SOURCE), "-o", tmp, "-lm"], check=True, capture_output=True, timeout=120)
        os.replace(tmp, out)  # atomic: a concurrent builder or a killed one never leaves half a library
    finally:
        Path(tmp).unlink(missing_ok=True)
    return out


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.lr_linear.argtypes = [_PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64]
    lib.lr_linear.restype = None
    lib.lr_moe_one_token.argtypes = [_PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, _INT, _PTR, _PTR, _I64]
    lib.lr_moe_one_token.restype = _INT
    lib.lr_moe_tokens.argtypes = [_PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, _I64, _INT, _PTR, _PTR, _PTR,
                                  _PTR]
    lib.lr_moe_tokens.restype = _INT
    lib.lr_rms_norm.argtypes = [_PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, ctypes.c_float]
    lib.lr_rms_norm.restype = None
    lib.lr_rms_norm_rope.argtypes = [_PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, _I64, ctypes.c_float]
    lib.lr_rms_norm_rope.restype = None
    lib.lr_moe_4bit.argtypes = [_PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, _I64, _I64, _INT,
                                _INT, _PTR, _PTR, _PTR, _PTR, _I64]
    lib.lr_moe_4bit.restype = _INT
    lib.lr_moe_4bit_scratch.argtypes = [_I64, _I64, _I64, _I64, _I64, _INT, _INT]
    lib.lr_moe_4bit_scratch.restype = _I64
    lib.lr_attention_residual_norms.argtypes = [_PTR] * 10 + [_I64, _I64, ctypes.c_float, ctypes.c_float]
    lib.lr_attention_residual_norms.restype = None
    lib.lr_ffn_residual.argtypes = [_PTR] * 6 + [ctypes.c_float, _PTR, _PTR, _I64, _I64, ctypes.c_float]
    lib.lr_ffn_residual.restype = None
    lib.lr_route.argtypes = [_PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _PTR]
    lib.lr_route.restype = None
    lib.lr_decode_attention.argtypes = [_PTR] * 6 + [_I64] * 13 + [ctypes.c_float]
    lib.lr_decode_attention.restype = None
    lib.lr_decode_attention_scratch.argtypes = [_I64, _I64, _I64, _I64, _INT]
    lib.lr_decode_attention_scratch.restype = _I64
    lib.lr_gated.argtypes = [_PTR, _PTR, _I64, _I64, _INT]
    lib.lr_gated.restype = None
    lib.lr_decode_layer_scratch.argtypes = [_PTR, _I64, _INT]
    lib.lr_decode_layer_scratch.restype = _I64
    lib.lr_decode_layer.argtypes = [_PTR] * 6 + [_PTR] + [_I64] * 5 + [_PTR] * 6 + [_I64, _INT]
    lib.lr_decode_layer.restype = _INT
    lib.lr_decode_layer_full_scratch.argtypes = [_PTR, _PTR, _I64, _INT]
    lib.lr_decode_layer_full_scratch.restype = _I64
    lib.lr_decode_layer_full.argtypes = [_PTR] * 7 + [_PTR] + [_I64] * 5 + [_PTR, _PTR, _I64, _INT]
    lib.lr_decode_layer_full.restype = _INT
    lib.lr_route_top_k.argtypes = [_PTR, _PTR, _PTR, _I64, _I64, _I64, _INT, _PTR]
    lib.lr_route_top_k.restype = None
    lib.lr_moe_decode_layer_scratch.argtypes = [_PTR, _I64, _INT]
    lib.lr_moe_decode_layer_scratch.restype = _I64
    lib.lr_moe_decode_layer.argtypes = [_PTR] * 6 + [_PTR] + [_I64] * 5 + [_PTR] * 5 + [_I64, _INT]
    lib.lr_moe_decode_layer.restype = _INT
    lib.lr_moe_decode_layer_full_scratch.argtypes = [_PTR, _PTR, _I64, _INT]
    lib.lr_moe_decode_layer_full_scratch.restype = _I64
    lib.lr_moe_decode_layer_full.argtypes = [_PTR] * 7 + [_PTR] + [_I64] * 5 + [_PTR, _PTR, _I64, _INT]
    lib.lr_moe_decode_layer_full.restype = _INT
    lib.lr_logits.argtypes = [_PTR, _PTR, _PTR, _I64, _I64, _I64, ctypes.c_float]
    lib.lr_logits.restype = None
    lib.lr_rope_row.argtypes = [_PTR, _I64, _I64, _PTR, _PTR]
    lib.lr_rope_row.restype = None
    lib.lr_embed.argtypes = [_PTR, _PTR, _I64, _I64, _I64, ctypes.c_float, _PTR]
    lib.lr_embed.restype = _INT
    lib.lr_quantize_4bit.argtypes = [_PTR, _INT, _I64, _I64, _PTR, _PTR, _PTR, _PTR]
    lib.lr_quantize_4bit.restype = None
    lib.lr_q4_isa.argtypes = []
    lib.lr_q4_isa.restype = ctypes.c_char_p
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (disabled, no compiler, build failed); built on first use."""
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            try:
                _lib = _load(build()) if enabled() else None
            except (OSError, subprocess.SubprocessError):
                _lib = None  # plain torch it is; same results, fp32 weights
            _tried = True
    return _lib


def reset() -> None:
    """Forget the loaded library's state so the next call re-reads LOCALRUN_CPU_KERNELS (tests)."""
    global _lib, _tried
    with _lock:
        _lib, _tried = None, False


def _tracing() -> bool:
    """True inside torch.compile's tracing: the C kernels (ctypes) are opaque to it, so the traced
    graph takes the plain torch path (same math, the compiler's own kernels)."""
    return torch.compiler.is_compiling()


def storage_dtype(compute: torch.dtype, device: torch.device, stored: torch.dtype) -> torch.dtype:
    """The dtype a matrix stored as `stored` in the checkpoint is kept in, to compute in `compute`.

    bf16 matrices of an fp32 CPU run stay bf16 when the kernels are available (exactly the same
    values, half the bytes); everything else is converted to the compute dtype as usual.
    """
    if (compute == torch.float32 and stored == torch.bfloat16 and torch.device(device).type == "cpu"
            and library() is not None):
        return torch.bfloat16
    return compute


def _scratch(name: str, numel: int) -> torch.Tensor:
    """A per-thread fp32 buffer of at least `numel` elements, reused across calls."""
    buf = getattr(_local, name, None)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=torch.float32)
        setattr(_local, name, buf)
    return buf[:numel]


def _onednn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    shape = x.shape
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]), w, b, "none", [], "")
    return y.reshape(*shape[:-1], w.shape[0])


_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, b), with w possibly bf16 under an fp32 x (see the module docstring)."""
    if x.device.type != "cpu" or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)):
        return F.linear(x, w, b)
    if _tracing():
        return F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))
    if w.dtype == x.dtype:
        if x.dtype == torch.float32 and _ONEDNN and w.is_contiguous():
            return _onednn(x, w, b)
        return F.linear(x, w, b)
    if not (x.dtype == torch.float32 and w.dtype == torch.bfloat16):
        raise TypeError(f"linear: {x.dtype} input with {w.dtype} weight")
    rows = x.numel() // x.shape[-1]
    lib = library()
    if lib is not None and rows <= C_KERNEL_MAX_ROWS and w.is_contiguous():
        x2 = x.contiguous()
        O, I = w.shape
        y = torch.empty(*x.shape[:-1], O, dtype=torch.float32)
        bias = None if b is None else b.float().contiguous()
        lib.lr_linear(x2.data_ptr(), w.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(),
                      rows, I, O)
        return y
    if _ONEDNN and w.is_contiguous() and w.numel() > WIDEN_WHOLE_MAX:
        return _widened_linear(x, w, b)
    w32, b32 = w.float(), None if b is None else b.float()
    return _onednn(x, w32, b32) if _ONEDNN else F.linear(x, w32, b32)


WIDEN_ROWS = 256  # weight rows widened at a time for a many-row GEMM: 2.75 MiB of fp32 at 26B-A4B's 2816 columns
WIDEN_WHOLE_MAX = 1 << 20  # weights up to 4 MiB in fp32 are widened whole, one GEMM (the bench model's, all)


def _widened_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x @ w^T (+ b) for fp32 x of many rows and a bf16 w: WIDEN_ROWS rows of w at a time widened (exact)
    and multiplied by oneDNN, each block's outputs written into their columns.
    The same values as widening w whole (oneDNN sums each output alike), without allocating and
    faulting in a new fp32 copy of every matrix for every prefill chunk: a 512-token chunk through a
    4096 x 2816 matrix took 26 ms instead of 38 on two Zen 5 cores, 129 tokens 7.4 instead of 20.9;
    26B-A4B prefilled 512 tokens at 49.5-50.6 tok/s instead of 46.6-47.1."""
    O, I = w.shape
    x2 = x.reshape(-1, I)
    y = torch.empty(x2.shape[0], O, dtype=torch.float32)
    for r0 in range(0, O, WIDEN_ROWS):  # each block's fp32 copy reuses the last one's freed heap memory
        r1 = min(O, r0 + WIDEN_ROWS)
        y[:, r0:r1] = _onednn(x2, w[r0:r1].float(), None if b is None else b[r0:r1].float())
    return y.reshape(*x.shape[:-1], O)


PREFILL_ATTENTION_MIN_WORK = 1 << 21  # q k^T multiply-adds per KV head from which it beats SDPA's kernel (measured)
PREFILL_ATTENTION_CHUNK_SCORES = 1 << 20  # fp32 scores it holds at a time (4 MiB): >= 64 rows per GEMM to S = 16K


def prefill_attention_applies(q_BNTD: torch.Tensor, k_BKSD: torch.Tensor) -> bool:
    """Whether `prefill_attention` computes this call: fp32 on the CPU with oneDNN, outside autograd
    and tracing, with enough work per KV head ((N / KV) * T * S * D) to pay for its per-head calls."""
    B, N, T, D = q_BNTD.shape
    KV, S = k_BKSD.shape[1], k_BKSD.shape[2]
    return (_ONEDNN and q_BNTD.device.type == "cpu" and q_BNTD.dtype == k_BKSD.dtype == torch.float32
            and N % KV == 0 and N // KV * T * S * D >= PREFILL_ATTENTION_MIN_WORK
            and not (torch.is_grad_enabled() and q_BNTD.requires_grad) and not _tracing())


def prefill_attention(q_BNTD: torch.Tensor, k_BKSD: torch.Tensor, v_BKSD: torch.Tensor,
                      visible_TM: torch.Tensor | None, scale: float = 1.0) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v with grouped-query heads (head n reads KV head n // G), as two
    oneDNN GEMMs per KV head, for fp32 on the CPU (see `prefill_attention_applies`). SDPA's fused
    CPU kernel runs its GEMMs through MKL, which on AVX-512 machines is about half oneDNN's speed.
    This is the math of SDPA's math backend and of transformers' eager attention; the scores are
    materialized, PREFILL_ATTENTION_CHUNK_SCORES at most (whole queries, all G heads of each, per
    GEMM), and the softmax runs in place. visible_TM: bool, True where a query sees a key, over the
    *last* M keys only: the keys before those are visible to every query (attend's full-layer
    blocks mask only their own new keys, not the history). Every query must see at least one key."""
    B, N, T, D = q_BNTD.shape
    KV, S, Dv = k_BKSD.shape[1], k_BKSD.shape[2], v_BKSD.shape[-1]
    G = N // KV
    q_BTKGD = q_BNTD.transpose(1, 2).unflatten(2, (KV, G))  # a KV head's rows: query t's G heads together
    out_BTKGD = q_BNTD.new_empty(B, T, KV, G, Dv)
    hidden_TM = None if visible_TM is None or visible_TM.shape[-1] == 0 else ~visible_TM
    step = max(1, min(T, PREFILL_ATTENTION_CHUNK_SCORES // (G * S)))  # queries per GEMM
    for b in range(B):
        for h in range(KV):
            k_SD, vt_DS = k_BKSD[b, h].contiguous(), v_BKSD[b, h].T
            for t0 in range(0, T, step):
                t1 = min(t0 + step, T)
                s_RS = _onednn(q_BTKGD[b, t0:t1, h].reshape(-1, D), k_SD, None)  # rows (t, g)
                if scale != 1.0:
                    s_RS.mul_(scale)
                if hidden_TM is not None:
                    s_RS.view(t1 - t0, G, S)[:, :, S - hidden_TM.shape[-1]:].masked_fill_(
                        hidden_TM[t0:t1, None], float("-inf"))
                torch.ops.aten._softmax.out(s_RS, -1, False, out=s_RS)  # in place: softmax's values, one buffer
                out_BTKGD[b, t0:t1, h] = _onednn(s_RS, vt_DS, None).view(t1 - t0, G, Dv)
    return out_BTKGD.flatten(2, 3).transpose(1, 2)


def moe(x_TH: torch.Tensor, gate_up_E2IH: torch.Tensor, down_EHI: torch.Tensor, ids_TK: torch.Tensor,
        w_TK: torch.Tensor, act: str) -> torch.Tensor | None:
    """sum_k w[t,k] * expert_{ids[t,k]}(x[t]) in one call (fp32 x, bf16 experts), or None when the
    kernels don't apply (other dtypes/devices, no library, unknown activation): the caller then
    dispatches expert by expert. Each token's K contributions are summed in fp32."""
    if _tracing():
        return None
    lib = library()
    if (lib is None or act not in ACTIVATION_CODES or x_TH.dtype != torch.float32
            or gate_up_E2IH.dtype != torch.bfloat16 or down_EHI.dtype != torch.bfloat16
            or any(t.device.type != "cpu" for t in (x_TH, gate_up_E2IH, down_EHI, ids_TK, w_TK))
            or not (gate_up_E2IH.is_contiguous() and down_EHI.is_contiguous())):
        return None
    E, F2, H = gate_up_E2IH.shape
    T, K = ids_TK.shape
    x = x_TH.contiguous()
    ids = ids_TK.to(torch.int64).contiguous()
    w = w_TK.float().contiguous()
    out = torch.empty(T, H, dtype=torch.float32)
    if T == 1:  # decode: threads split the K experts
        scratch = _scratch("moe", torch.get_num_threads() * (2 * H + F2))
        status = lib.lr_moe_one_token(x.data_ptr(), gate_up_E2IH.data_ptr(), down_EHI.data_ptr(), ids.data_ptr(),
                                      w.data_ptr(), K, E, H, F2 // 2, ACTIVATION_CODES[act], out.data_ptr(),
                                      scratch.data_ptr(), scratch.numel())
    else:
        scratch = _scratch("moe", T * (2 * H + 3 * F2 // 2))
        order = torch.empty(T * K, dtype=torch.int64)
        starts = torch.empty(E + 1, dtype=torch.int64)
        status = lib.lr_moe_tokens(x.data_ptr(), gate_up_E2IH.data_ptr(), down_EHI.data_ptr(), ids.data_ptr(),
                                   w.data_ptr(), T, K, E, H, F2 // 2, ACTIVATION_CODES[act], out.data_ptr(),
                                   order.data_ptr(), starts.data_ptr(), scratch.data_ptr())
    if status != 0:
        raise ValueError(f"expert ids must be in [0, {E})")
    return out


def quantize_4bit(w: torch.Tensor, blocksize: int, bounds: torch.Tensor,
                  order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(packed codes [ceil(n / 2), 1] uint8, absmax [blocks] fp32) of w's values in order, blocks of
    `blocksize`, as bitsandbytes' CPU quantize_4bit computes them (`lr_quantize_4bit`: the same
    values, one pass), given its 15 sorted midpoints `bounds` and the code of each bucket `order`;
    None when the kernels don't apply (not the CPU, no library, another dtype: fp16 widens first)."""
    lib = library()
    if lib is None or w.device.type != "cpu" or _tracing() or blocksize < 2 or blocksize % 2:
        return None
    if w.dtype == torch.float16:
        w = w.float()  # exact
    if w.dtype not in (torch.float32, torch.bfloat16):
        return None
    w = w.contiguous()
    n = w.numel()
    packed = torch.empty((n + 1) // 2, 1, dtype=torch.uint8)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
    b32 = bounds.to(torch.float32).contiguous()
    codes = order.to(torch.uint8).contiguous()
    lib.lr_quantize_4bit(w.data_ptr(), int(w.dtype == torch.bfloat16), n, blocksize, b32.data_ptr(), codes.data_ptr(),
                         packed.data_ptr(), absmax.data_ptr())
    return packed, absmax


def isa() -> str | None:
    """The instruction set the 4-bit expert kernel was built for ("avx512", "avx2", "scalar"), or None."""
    lib = library()
    return None if lib is None else lib.lr_q4_isa().decode()


def moe_q4_applies(x_TH: torch.Tensor, hidden: int, inter: int, blocksize: int, act: str) -> bool:
    """Whether `moe_q4` computes this call (else the caller takes its torch path): fp32 x on the CPU
    outside autograd and tracing, a known activation, and a power-of-two blocksize >= 32 that divides
    both matmul input sizes (what QuantSpec.check_kernel_sizes asks of a model: rows then hold whole
    blocks, where bitsandbytes' CPU and CUDA dequantize agree, and no 32-value chunk straddles two)."""
    return (x_TH.device.type == "cpu" and x_TH.dtype == torch.float32 and act in ACTIVATION_CODES
            and blocksize >= 32 and blocksize & (blocksize - 1) == 0 and hidden % blocksize == 0
            and inter % blocksize == 0
            and not (torch.is_grad_enabled() and x_TH.requires_grad) and not _tracing() and library() is not None)


def moe_q4(x_TH: torch.Tensor, rows_E: torch.Tensor, offsets: torch.Tensor, code: torch.Tensor,
             nested_code: torch.Tensor, ids_TK: torch.Tensor, w_TK: torch.Tensor, hidden: int, inter: int,
             blocksize: int, double_quant: bool, act: str, lib: ctypes.CDLL | None = None) -> torch.Tensor | None:
    """sum_k w[t,k] * expert_{ids[t,k]}(x[t]) over 4-bit packed experts in one C call, or None when the
    kernel doesn't apply (see moe_q4_applies). rows_E: int64 [E], the address of each expert's packed
    bytes (0: not available; the caller keeps those buffers alive); offsets: int64 [8], the byte offsets
    of codes / absmax / nested absmax / nested offset of gate_up then down in a row; code: the 16
    NF4/FP4 values, nested_code the 256 dynamic values (fp32, CPU). Each token's K contributions are
    summed in fp32 in expert id order (moe.dispatch's order and arithmetic); see cpu_bf16.c.
    lib: another build of the library (tests of the AVX2 and scalar paths)."""
    if not moe_q4_applies(x_TH, hidden, inter, blocksize, act):
        return None
    lib = lib or library()
    T, K = ids_TK.shape
    E = rows_E.numel()
    x = x_TH.contiguous()
    ids = ids_TK.to(torch.int64).contiguous()
    w = w_TK.float().contiguous()
    out = torch.empty(T, hidden, dtype=torch.float32)
    n = lib.lr_moe_4bit_scratch(T, K, hidden, inter, blocksize, int(double_quant), torch.get_num_threads())
    scratch = _scratch("moe4", n)
    order = torch.empty(T * K, dtype=torch.int64)
    starts = torch.empty(E + 1, dtype=torch.int64)
    status = lib.lr_moe_4bit(x.data_ptr(), rows_E.data_ptr(), offsets.data_ptr(), code.data_ptr(),
                             nested_code.data_ptr(), ids.data_ptr(), w.data_ptr(), T, K, E, hidden, inter, blocksize,
                             int(double_quant), ACTIVATION_CODES[act], out.data_ptr(), order.data_ptr(),
                             starts.data_ptr(), scratch.data_ptr(), n)
    if status == -1:
        raise ValueError(f"expert ids must be in [0, {E}) and name an available expert")
    if status != 0:
        raise RuntimeError(f"lr_moe_4bit failed ({status})")
    return out


def _head_rows(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(x or a contiguous copy, rows per token, floats between tokens) for the C norms, which read
    rows of the last dim with a token's rows adjacent and tokens evenly spaced. Head views of the
    fused q/k/v projection ([B, T, N, D] columns of [B, T, width]) qualify without a copy."""
    if x.dim() < 2:
        x = x.reshape(1, -1)
    n, d = x.shape[-2:]
    sizes, strides = x.shape[:-2], x.stride()[:-2]
    flat = all(sizes[i] == 1 or strides[i] == sizes[i + 1] * strides[i + 1] for i in range(len(sizes) - 1))
    if x.stride(-1) == 1 and (n == 1 or x.stride(-2) == d) and flat:
        return x, n, strides[-1] if sizes else n * d
    return x.contiguous(), n, n * d


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor | None:
    """F.rms_norm over the last dim of fp32 x on CPU in one call, or None (use torch)."""
    if _tracing():
        return None
    lib = library()
    if (lib is None or x.dtype != torch.float32 or x.device.type != "cpu"
            or (weight is not None and (weight.dtype != torch.float32 or not weight.is_contiguous()))):
        return None
    H = x.shape[-1]
    rows = x.numel() // H
    src, heads, stride = _head_rows(x)
    out = torch.empty(x.shape, dtype=torch.float32)
    lib.lr_rms_norm(src.data_ptr(), None if weight is None else weight.data_ptr(), out.data_ptr(), rows, heads,
                    stride, H, eps)
    return out


def rms_norm_rope(x_BTND: torch.Tensor, weight: torch.Tensor, cos_T1D: torch.Tensor, sin_T1D: torch.Tensor,
                  eps: float) -> torch.Tensor | None:
    """apply_rope(rms_norm(x, weight), cos, sin) of fp32 heads on CPU in one call, or None (use torch).
    cos/sin are [T, 1, D] with sin's first half negated (see Gemma4Model.rope)."""
    if _tracing():
        return None
    lib = library()
    tensors = (x_BTND, weight, cos_T1D, sin_T1D)
    if lib is None or any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        return None
    B, T, N, D = x_BTND.shape
    if cos_T1D.shape != (T, 1, D) or sin_T1D.shape != (T, 1, D) or weight.shape != (D,) or D % 2:
        return None
    x, heads, stride = _head_rows(x_BTND)
    cos, sin, w = cos_T1D.contiguous(), sin_T1D.contiguous(), weight.contiguous()
    out = torch.empty(B, T, N, D, dtype=torch.float32)
    lib.lr_rms_norm_rope(x.data_ptr(), w.data_ptr(), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), B * T * N, heads,
                         stride, T, D, eps)
    return out


def _fp32_rows(*tensors: torch.Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def attention_residual_norms(x, w_post, residual, w_mlp, w_moe, w_router, router_scale: float, eps: float):
    """kernels/fused.py's op of the same name for contiguous fp32 CPU rows in one call, or None (use torch)."""
    lib = library()
    if lib is None or _tracing() or not _fp32_rows(x, w_post, residual, w_mlp, w_moe, w_router):
        return None
    H = x.shape[-1]
    outs = [torch.empty(x.shape, dtype=torch.float32) for _ in range(4)]
    lib.lr_attention_residual_norms(x.data_ptr(), w_post.data_ptr(), residual.data_ptr(), w_mlp.data_ptr(),
                                    w_moe.data_ptr(), w_router.data_ptr(), *(o.data_ptr() for o in outs),
                                    x.numel() // H, H, eps, router_scale)
    return tuple(outs)


def ffn_residual(mlp, w1, moe, w2, w, residual, scalar: torch.Tensor, eps: float):
    """kernels/fused.py's op of the same name for contiguous fp32 CPU rows in one call, or None (use torch)."""
    lib = library()
    if lib is None or _tracing() or not _fp32_rows(mlp, w1, moe, w2, w, residual, scalar) or scalar.numel() != 1:
        return None
    H = residual.shape[-1]
    out = torch.empty(residual.shape, dtype=torch.float32)
    lib.lr_ffn_residual(mlp.data_ptr(), w1.data_ptr(), moe.data_ptr(), w2.data_ptr(), w.data_ptr(),
                        residual.data_ptr(), scalar.item(), out.data_ptr(), _scratch("ffn_residual", H).data_ptr(),
                        residual.numel() // H, H, eps)
    return out


def route(logits_TE: torch.Tensor, per_expert_scale: torch.Tensor, top_k: int):
    """kernels/fused.py's op `route` for fp32 CPU logits in one call, or None (use torch)."""
    lib = library()
    if lib is None or _tracing() or not _fp32_rows(logits_TE, per_expert_scale):
        return None
    T, E = logits_TE.shape
    ids = torch.empty(T, top_k, dtype=torch.int64)
    w = torch.empty(T, top_k, dtype=torch.float32)
    lib.lr_route(logits_TE.data_ptr(), per_expert_scale.data_ptr(), ids.data_ptr(), w.data_ptr(), T, E, top_k,
                 _scratch("route", E).data_ptr())
    return ids, w


def route_top_k(logits_TE: torch.Tensor, top_k: int, norm: bool):
    """Qwen3-MoE's / Mixtral's router after its projection (qwen3_moe.Router) for fp32 CPU logits in one
    call: softmax, the top_k largest, divided by their sum when `norm`; or None (use torch)."""
    lib = library()
    if lib is None or _tracing() or not _fp32_rows(logits_TE) or logits_TE.dim() != 2:
        return None
    T, E = logits_TE.shape
    ids = torch.empty(T, top_k, dtype=torch.int64)
    w = torch.empty(T, top_k, dtype=torch.float32)
    lib.lr_route_top_k(logits_TE.data_ptr(), ids.data_ptr(), w.data_ptr(), T, E, top_k, int(norm),
                       _scratch("route", E).data_ptr())
    return ids, w


def decode_attention(q_BN1D: torch.Tensor, k_BKSD: torch.Tensor, v_BKSD: torch.Tensor,
                     visible_1S: torch.Tensor | None, scale: float) -> torch.Tensor | None:
    """grouped_sdpa of one query per head (kernels/attention.py) for fp32 CPU tensors in one C call,
    or None (use torch). k, v may be views of a larger cache (the last dim contiguous)."""
    lib = library()
    if lib is None or _tracing() or q_BN1D.shape[2] != 1:
        return None
    tensors = (q_BN1D, k_BKSD, v_BKSD)
    if any(t.dtype != torch.float32 or t.device.type != "cpu" or t.stride(-1) != 1 for t in tensors):
        return None
    B, N, _, D = q_BN1D.shape
    KV, S = k_BKSD.shape[1], k_BKSD.shape[2]
    if visible_1S is not None and visible_1S.numel() != S:
        return None
    mask = None if visible_1S is None else visible_1S.reshape(S).contiguous().view(torch.uint8)
    out = torch.empty(B, N, 1, D, dtype=torch.float32)
    scratch = _scratch("attention", lib.lr_decode_attention_scratch(B, N, KV, S, torch.get_num_threads()))
    lib.lr_decode_attention(q_BN1D.data_ptr(), k_BKSD.data_ptr(), v_BKSD.data_ptr(),
                            None if mask is None else mask.data_ptr(), out.data_ptr(), scratch.data_ptr(),
                            B, N, KV, S, D, q_BN1D.stride(0), q_BN1D.stride(1), k_BKSD.stride(0), k_BKSD.stride(1),
                            k_BKSD.stride(2), v_BKSD.stride(0), v_BKSD.stride(1), v_BKSD.stride(2), scale)
    return out


def gated(gate_up: torch.Tensor, act: str) -> torch.Tensor | None:
    """act(gate) * up of the dense MLP's fused [..., 2I] projection (gate first) for fp32 CPU rows in
    one C call (the activation the expert kernels and `DecodeLayer` use), or None (use torch)."""
    lib = library()
    if lib is None or _tracing() or act not in ACTIVATION_CODES or not _fp32_rows(gate_up):
        return None
    I2 = gate_up.shape[-1]
    out = torch.empty(*gate_up.shape[:-1], I2 // 2, dtype=torch.float32)
    lib.lr_gated(gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // I2, I2 // 2, ACTIVATION_CODES[act])
    return out


class _LayerDesc(ctypes.Structure):
    """cpu_bf16.c's lr_layer: one Gemma 4 MoE layer's sizes and weight addresses."""
    _fields_ = ([(n, ctypes.c_int64) for n in ("H", "N", "KV", "D", "has_v", "I", "E", "K")]
                + [("eps", ctypes.c_float), ("router_root", ctypes.c_float), ("act", ctypes.c_int64)]
                + [(n, ctypes.c_void_p) for n in ("w_in", "w_qn", "w_kn", "w_post", "w_mlp", "w_moe", "w_router_scale",
                                                  "expert_scale", "qkv", "o", "gate_up", "down", "router", "qkv_bias",
                                                  "o_bias")])


class DecodeLayer:
    """The front of a Gemma 4 MoE layer for one decoded fp32 token on the CPU, as one C call
    (`lr_decode_layer`): input norm, q/k/v, their norms and RoPE, the KV write, attention, o_proj,
    the residual and the FFN norms, the router and the dense MLP (`__call__`); the routed experts
    (any backend) and `ffn_residual` then run in Python. After `with_experts` (resident bf16 or 4-bit
    experts the C kernels read), `full` runs the whole layer, those included, in the same one call.
    Build with `DecodeLayer.build` (None where the layer's weights are not what the kernel reads: bf16
    matrices and fp32 vectors, contiguous)."""

    _full_fn, _full_scratch_fn, _front_scratch_fn = ("lr_decode_layer_full", "lr_decode_layer_full_scratch",
                                                     "lr_decode_layer_scratch")  # the C calls full() and sizes use

    def __init__(self, lib: ctypes.CDLL, desc: ctypes.Structure, keep: list):
        self.lib, self.desc, self._keep = lib, desc, keep  # `keep`: the tensors `desc` points into
        self.ref = ctypes.byref(desc)
        self._full = getattr(lib, self._full_fn)
        self.hidden, self.top_k = desc.H, desc.K
        self._out = threading.local()
        self._sizes: dict[tuple[bool, int, int], int] = {}  # (full call, cache slots, threads) -> scratch floats

    @classmethod
    def build(cls, *, heads: int, kv_heads: int, head_dim: int, eps: float, router_root: float, top_k: int, act: str,
              vectors: dict[str, torch.Tensor], qkv: torch.Tensor, qkv_bias: torch.Tensor | None, o: torch.Tensor,
              o_bias: torch.Tensor | None, gate_up: torch.Tensor, down: torch.Tensor,
              router: torch.Tensor) -> "DecodeLayer | None":
        """vectors: w_in, w_qn, w_kn, w_post, w_mlp, w_moe, w_router_scale, expert_scale (fp32);
        qkv [(N + KV or N + 2 KV) * D, H], o [H, N * D], gate_up [2I, H], down [H, I], router [E, H] (bf16)."""
        lib = library()
        matrices = (qkv, o, gate_up, down, router)
        biases = [b for b in (qkv_bias, o_bias) if b is not None]
        if (lib is None or act not in ACTIVATION_CODES or _tracing()
                or any(m.dtype != torch.bfloat16 or m.device.type != "cpu" or not m.is_contiguous() for m in matrices)
                or not _fp32_rows(*vectors.values(), *biases)):
            return None
        H, E, I = qkv.shape[1], router.shape[0], down.shape[1]
        N, KV, D = heads, kv_heads, head_dim
        width = qkv.shape[0]
        has_v = width == (N + 2 * KV) * D
        if (not has_v and width != (N + KV) * D) or o.shape != (H, N * D) or gate_up.shape != (2 * I, H) \
                or router.shape[1] != H or D % 2:
            return None
        desc = _LayerDesc(H=H, N=N, KV=KV, D=D, has_v=int(has_v), I=I, E=E, K=top_k, eps=eps,
                          router_root=router_root, act=ACTIVATION_CODES[act])
        for name, t in vectors.items():
            setattr(desc, name, t.data_ptr())
        for name, t in (("qkv", qkv), ("o", o), ("gate_up", gate_up), ("down", down), ("router", router),
                        ("qkv_bias", qkv_bias), ("o_bias", o_bias)):
            setattr(desc, name, None if t is None else t.data_ptr())
        return cls(lib, desc, [*vectors.values(), *matrices, *biases])

    def with_experts(self, experts: "ExpertsDesc", post1: torch.Tensor, post2: torch.Tensor, post: torch.Tensor,
                     scalar: float) -> "DecodeLayer":
        """This layer's front plus its routed experts and `ffn_residual` (norm weights post1, post2,
        post and the layer scalar), so that `full` runs the whole layer in one call."""
        if not _fp32_rows(post1, post2, post):
            return self
        x = experts.desc
        x.w_post1, x.w_post2, x.w_post, x.scalar = post1.data_ptr(), post2.data_ptr(), post.data_ptr(), scalar
        self.experts, self._keep = experts, self._keep + [post1, post2, post]
        return self

    experts: "ExpertsDesc | None" = None

    def full(self, x_11H: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             kpos: torch.Tensor | None, slot: int, n_keys: int, position: int, window: int) -> torch.Tensor:
        """The layer's output [1, 1, H] for x (see __call__), experts and ffn_residual included; only
        after `with_experts`."""
        threads, slots = torch.get_num_threads(), k.shape[2]
        n = self._scratch_floats(True, slots, threads)
        scratch = _scratch("decode_layer", n)
        out = torch.empty(1, 1, self.hidden)
        status = self._full(self.ref, self.experts.ref, x_11H.data_ptr(), cos.data_ptr(), sin.data_ptr(), k.data_ptr(),
                            v.data_ptr(), None if kpos is None else kpos.data_ptr(), slots, slot, n_keys, position,
                            window, out.data_ptr(), scratch.data_ptr(), n, threads)
        if status == -3:
            raise ValueError(f"expert ids must be in [0, {self.experts.desc.E}) and name an available expert")
        if status != 0:
            raise RuntimeError(f"{self._full_fn} failed ({status}): slot {slot}, {n_keys} keys of {k.shape[2]}")
        return out

    def _scratch_floats(self, full: bool, slots: int, threads: int) -> int:
        """Scratch floats of `full` (or the front call) for any key count of a cache of `slots`
        positions: asked of the C side once per (call, cache size, threads)."""
        key = (full, slots, threads)
        n = self._sizes.get(key)
        if n is None:
            n = self._sizes[key] = (getattr(self.lib, self._full_scratch_fn)(self.ref, self.experts.ref, slots, threads)
                                    if full else getattr(self.lib, self._front_scratch_fn)(self.ref, slots, threads))
        return n

    def _outputs(self) -> tuple:
        """This thread's output buffers (reused call after call: the caller consumes them before the
        layer's next token) and their addresses."""
        out = getattr(self._out, "bufs", None)
        if out is None:
            H, K = self.hidden, self.top_k
            bufs = (torch.empty(1, 1, H), torch.empty(1, 1, H), torch.empty(1, H),
                    torch.empty(1, K, dtype=torch.int64), torch.empty(1, K))
            out = self._out.bufs = (bufs, [b.data_ptr() for b in bufs])
        return out

    def __call__(self, x_11H: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 kpos: torch.Tensor | None, slot: int, n_keys: int, position: int, window: int):
        """(residual [1, 1, H], dense MLP output [1, 1, H], expert input [1, H], ids [1, K], weights [1, K])
        of the token x (contiguous fp32) at `position`; k/v: the layer's cache buffers [1, KV, slots, D]
        (fp32, contiguous), its K/V written at `slot`, attention over slots [0, n_keys); window > 0 for a
        ring (kpos: its slots' positions, int64, updated here), 0 for a full layer."""
        (res, h, x_moe, ids, w), ptrs = self._outputs()
        threads = torch.get_num_threads()
        n = self._scratch_floats(False, k.shape[2], threads)
        scratch = _scratch("decode_layer", n)
        status = self.lib.lr_decode_layer(self.ref, x_11H.data_ptr(), cos.data_ptr(), sin.data_ptr(), k.data_ptr(),
                                          v.data_ptr(), None if kpos is None else kpos.data_ptr(), k.shape[2], slot,
                                          n_keys, position, window, *ptrs, scratch.data_ptr(), n, threads)
        if status != 0:
            raise RuntimeError(f"lr_decode_layer failed ({status}): slot {slot}, {n_keys} keys of {k.shape[2]}")
        return res, h, x_moe, ids, w


class _MoELayerDesc(ctypes.Structure):
    """cpu_bf16.c's lr_moe_layer: one Qwen3-MoE / Mixtral MoE layer's sizes and weight addresses."""
    _fields_ = ([(n, ctypes.c_int64) for n in ("H", "N", "KV", "D", "E", "K", "qk_norm", "norm_topk", "act")]
                + [("eps", ctypes.c_float), ("scale", ctypes.c_float)]
                + [(n, ctypes.c_void_p) for n in ("w_in", "w_qn", "w_kn", "w_post", "qkv", "o", "router", "qkv_bias",
                                                  "o_bias")])


class MoEDecodeLayer(DecodeLayer):
    """A Qwen3-MoE or Mixtral MoE layer for one decoded fp32 token on the CPU as one C call
    (`lr_moe_decode_layer`): input norm, q/k/v (+ bias), the q/k norms (qk_norm) and RoPE, the KV
    write, attention at the layer's scale, o_proj, the residual, the post-attention norm and the
    router (`__call__`); the routed experts (any backend) and the last residual then run in Python.
    After `with_experts` (resident bf16 or 4-bit experts the C kernels read), `full` runs the whole
    layer in the same one call. Build with `MoEDecodeLayer.build` (None where the layer's weights
    are not what the kernel reads: bf16 matrices and fp32 vectors, contiguous)."""

    _full_fn, _full_scratch_fn = "lr_moe_decode_layer_full", "lr_moe_decode_layer_full_scratch"
    _front_scratch_fn = "lr_moe_decode_layer_scratch"

    @classmethod
    def build(cls, *, heads: int, kv_heads: int, head_dim: int, eps: float, scale: float, top_k: int,
              norm_topk: bool, act: str, vectors: dict[str, torch.Tensor | None], qkv: torch.Tensor,
              qkv_bias: torch.Tensor | None, o: torch.Tensor, o_bias: torch.Tensor | None,
              router: torch.Tensor) -> "MoEDecodeLayer | None":
        """vectors: w_in, w_post, and w_qn, w_kn (None without q/k norms) (fp32); qkv [(N + 2 KV) * D, H],
        o [H, N * D], router [E, H] (bf16)."""
        lib = library()
        matrices = (qkv, o, router)
        given = [t for t in (*vectors.values(), qkv_bias, o_bias) if t is not None]
        if (lib is None or act not in ACTIVATION_CODES or _tracing()
                or any(m.dtype != torch.bfloat16 or m.device.type != "cpu" or not m.is_contiguous() for m in matrices)
                or not _fp32_rows(*given) or vectors.get("w_in") is None or vectors.get("w_post") is None
                or (vectors.get("w_qn") is None) != (vectors.get("w_kn") is None)):
            return None
        H, E = qkv.shape[1], router.shape[0]
        N, KV, D = heads, kv_heads, head_dim
        lengths = {"w_in": H, "w_post": H, "w_qn": D, "w_kn": D}  # what the C code reads of each vector
        if (qkv.shape[0] != (N + 2 * KV) * D or o.shape != (H, N * D) or router.shape[1] != H or D % 2
                or not 0 < top_k <= E or (qkv_bias is not None and qkv_bias.shape != (qkv.shape[0],))
                or (o_bias is not None and o_bias.shape != (H,))
                or any(t is not None and t.numel() != lengths.get(name, t.numel()) for name, t in vectors.items())):
            return None
        qk_norm = vectors.get("w_qn") is not None
        desc = _MoELayerDesc(H=H, N=N, KV=KV, D=D, E=E, K=top_k, qk_norm=int(qk_norm), norm_topk=int(norm_topk),
                             act=ACTIVATION_CODES[act], eps=eps, scale=scale)
        for name, t in (*vectors.items(), ("qkv", qkv), ("o", o), ("router", router), ("qkv_bias", qkv_bias),
                        ("o_bias", o_bias)):
            setattr(desc, name, None if t is None else t.data_ptr())
        return cls(lib, desc, [*given, *matrices])

    def with_experts(self, experts: "ExpertsDesc") -> "MoEDecodeLayer":  # type: ignore[override]
        """This layer plus its routed experts, so that `full` runs the whole layer in one call."""
        self.experts, self._keep = experts, self._keep + [experts]
        return self

    def _outputs(self) -> tuple:
        out = getattr(self._out, "bufs", None)
        if out is None:
            H, K = self.hidden, self.top_k
            bufs = (torch.empty(1, 1, H), torch.empty(1, H), torch.empty(1, K, dtype=torch.int64), torch.empty(1, K))
            out = self._out.bufs = (bufs, [b.data_ptr() for b in bufs])
        return out

    def __call__(self, x_11H: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 kpos: torch.Tensor | None, slot: int, n_keys: int, position: int, window: int):
        """(residual [1, 1, H], expert input [1, H], ids [1, K], weights [1, K]) of the token x; the
        arguments as DecodeLayer's. The outputs are buffers reused by this layer's next token."""
        (res, x_moe, ids, w), ptrs = self._outputs()
        threads = torch.get_num_threads()
        n = self._scratch_floats(False, k.shape[2], threads)
        scratch = _scratch("decode_layer", n)
        status = self.lib.lr_moe_decode_layer(self.ref, x_11H.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                                              k.data_ptr(), v.data_ptr(), None if kpos is None else kpos.data_ptr(),
                                              k.shape[2], slot, n_keys, position, window, *ptrs, scratch.data_ptr(),
                                              n, threads)
        if status != 0:
            raise RuntimeError(f"lr_moe_decode_layer failed ({status}): slot {slot}, {n_keys} keys of {k.shape[2]}")
        return res, x_moe, ids, w


class _ExpertsDesc(ctypes.Structure):
    """cpu_bf16.c's lr_experts."""
    _fields_ = ([(n, ctypes.c_int64) for n in ("kind", "E", "F", "blocksize", "dq")]
                + [(n, ctypes.c_void_p) for n in ("gate_up", "down", "rows", "offsets", "table", "dyn", "w_post1",
                                                  "w_post2", "w_post")]
                + [("scalar", ctypes.c_float)])


class ExpertsDesc:
    """A layer's routed experts as the C layer call reads them (`DecodeLayer.with_experts`): bf16
    tensors (`bf16`) or 4-bit rows (`q4`). Keeps the tensors it points into alive."""

    def __init__(self, desc: _ExpertsDesc, keep: list[torch.Tensor]):
        self.desc, self._keep = desc, keep
        self.ref = ctypes.byref(desc)

    @classmethod
    def bf16(cls, gate_up_E2FH: torch.Tensor, down_EHF: torch.Tensor) -> "ExpertsDesc | None":
        if any(t.dtype != torch.bfloat16 or t.device.type != "cpu" or not t.is_contiguous()
               for t in (gate_up_E2FH, down_EHF)):
            return None
        E, F2, _ = gate_up_E2FH.shape
        desc = _ExpertsDesc(kind=0, E=E, F=F2 // 2, gate_up=gate_up_E2FH.data_ptr(), down=down_EHF.data_ptr())
        return cls(desc, [gate_up_E2FH, down_EHF])

    @classmethod
    def q4(cls, rows_E: torch.Tensor, offsets: torch.Tensor, code: torch.Tensor, nested_code: torch.Tensor,
           inter: int, blocksize: int, double_quant: bool) -> "ExpertsDesc | None":
        """The arguments of `moe_q4` (rows: every expert's address, none 0)."""
        if blocksize < 32 or blocksize & (blocksize - 1) or not bool((rows_E != 0).all()):
            return None
        tensors = [t.contiguous() for t in (rows_E, offsets, code, nested_code)]
        desc = _ExpertsDesc(kind=1, E=rows_E.numel(), F=inter, blocksize=blocksize, dq=int(double_quant),
                            rows=tensors[0].data_ptr(), offsets=tensors[1].data_ptr(), table=tensors[2].data_ptr(),
                            dyn=tensors[3].data_ptr())
        return cls(desc, tensors)


def logits(x_TH: torch.Tensor, w_VH: torch.Tensor, cap: float | None) -> torch.Tensor | None:
    """tanh(x @ w^T / cap) * cap (or the plain products without cap) for few fp32 CPU rows and a bf16
    w in one C call, or None (use torch). Its tanh rounds a little differently from torch's."""
    lib = library()
    if (lib is None or _tracing() or w_VH.dtype != torch.bfloat16 or not w_VH.is_contiguous()
            or x_TH.dtype != torch.float32 or x_TH.device.type != "cpu"
            or (torch.is_grad_enabled() and x_TH.requires_grad)):
        return None
    V, H = w_VH.shape
    rows = x_TH.numel() // H
    if rows > C_KERNEL_MAX_ROWS:
        return None
    x = x_TH.contiguous()
    y = torch.empty(*x_TH.shape[:-1], V, dtype=torch.float32)
    lib.lr_logits(x.data_ptr(), w_VH.data_ptr(), y.data_ptr(), rows, H, V, float(cap or 0.0))
    return y


def rope_row(inv_freq: torch.Tensor, position: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(cos, sin) [1, 1, D] of one position as Gemma4Model.rope builds them (sin's first half
    negated), for an fp32 CPU inv_freq [D / 2] in one C call, or None (use torch)."""
    lib = library()
    if lib is None or _tracing() or not _fp32_rows(inv_freq):
        return None
    n = inv_freq.numel()
    cos, sin = torch.empty(1, 1, 2 * n), torch.empty(1, 1, 2 * n)
    lib.lr_rope_row(inv_freq.data_ptr(), n, position, cos.data_ptr(), sin.data_ptr())
    return cos, sin


def embed(ids_BT: torch.Tensor, w_VH: torch.Tensor, scale: float) -> torch.Tensor | None:
    """F.embedding(ids, w).float() * scale for a bf16 CPU w and few ids in one C call, or None."""
    lib = library()
    if (lib is None or _tracing() or w_VH.dtype != torch.bfloat16 or not w_VH.is_contiguous()
            or ids_BT.device.type != "cpu" or ids_BT.dtype != torch.int64 or ids_BT.numel() > C_KERNEL_MAX_ROWS):
        return None
    V, H = w_VH.shape
    ids = ids_BT.contiguous()
    out = torch.empty(*ids_BT.shape, H)
    if lib.lr_embed(w_VH.data_ptr(), ids.data_ptr(), ids.numel(), V, H, scale, out.data_ptr()) != 0:
        raise IndexError(f"token ids must be in [0, {V})")
    return out
