"""Localrun's Triton kernel modules, imported to run under TRITON_INTERPRET=1 on CPU tensors (the
variable is read when triton decorates a kernel, so a module imported before it was set is
reloaded). For the test files of the kernels; `needs_triton` skips where triton is not installed.

The interpreter (Triton 3.x) casts fp32 to bf16 by dropping the low 16 bits, rounding toward zero,
where a GPU's conversion (`cvt.rn.bf16.f32`, what `.to(tl.bfloat16)` compiles to) rounds to nearest
even: interpreted, every bf16 output is off by up to one ulp, always toward zero. Importing this
module makes the interpreter round as the GPU does (`BF16_ROUNDS_TO_NEAREST` says whether it could),
so a bf16 kernel compares with its formula at the ulp."""

from __future__ import annotations

import importlib
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"


def _round_bf16_to_nearest() -> bool:
    try:
        import numpy as np
        import torch
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    builder = getattr(interpreter, "InterpreterBuilder", None)
    cast = getattr(builder, "cast_impl", None)
    if cast is None or getattr(cast, "rounds_to_nearest", False):
        return cast is not None

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = torch.from_numpy(np.array(src.data, dtype=np.float32)).to(torch.bfloat16).view(torch.int16)
            return interpreter.TensorHandle(bits.numpy().view(np.uint16), dst_type.scalar)
        return cast(self, src, dst_type)

    cast_impl.rounds_to_nearest = True
    builder.cast_impl = cast_impl
    return True


BF16_ROUNDS_TO_NEAREST = _round_bf16_to_nearest()


def bf16_ulps(out, truth) -> float:
    """The largest |out - truth| in units of the bf16 ulp at truth (in fp64): 0.5 is one correct rounding."""
    import torch

    t = truth.double()
    exponent = torch.floor(torch.log2(t.abs().clamp(min=2.0 ** -126)))
    return ((out.double() - t).abs() / 2.0 ** (exponent - 7)).max().item()


def triton_module(name: str):
    """localrun.kernels.<name> with the interpreter on, or None when triton is not installed."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return None
    full = f"localrun.kernels.{name}"
    module = sys.modules.get(full)
    if module is None:
        return importlib.import_module(full)
    if any(type(v).__name__ == "InterpretedFunction" for v in vars(module).values()):
        return module  # imported with the interpreter on: a reload would make its classes anew under the
    return importlib.reload(module)  # objects other test modules made of them (a V4Tiles no longer one)
