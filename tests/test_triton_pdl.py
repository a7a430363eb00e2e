"""Programmatic dependent launch (kernels/triton_pdl.py): off the GPU nothing asks for it, and every
kernel that takes it waits for the kernel before as its very first statement, so no memory access
can overtake the chain (scripts/sass_stats.py compiles each with PDL on for sm_90; the GPU check
measures it)."""

from __future__ import annotations

from interpreted import triton_module  # noqa: E402 - sets TRITON_INTERPRET=1 before triton loads

import ast
import inspect
import textwrap

import pytest
import torch

triton_pdl = triton_module("triton_pdl")
needs_triton = pytest.mark.skipif(triton_pdl is None, reason="triton is not installed (pip install triton)")

MODULES = ("triton_attention", "triton_fused", "triton_gemv", "triton_moe", "triton_norm", "triton_qkv_write")


def pdl_kernels():
    for name in MODULES:
        module = triton_module(name)
        for attr in vars(module).values():  # kernels (not their autotuners), pdl_start itself aside
            fn = getattr(attr, "fn", None)
            if inspect.isfunction(fn) and "PDL" in attr.arg_names and fn.__name__ != "pdl_start":
                yield fn


@needs_triton
def test_no_pdl_off_the_gpu(monkeypatch):
    monkeypatch.setattr(triton_pdl, "ENABLED", True)
    assert triton_pdl.launch(torch.device("cpu")) == {}  # and under the interpreter whatever the device
    monkeypatch.setattr(triton_pdl, "ENABLED", False)
    assert triton_pdl.launch(torch.device("cpu")) == {}


@needs_triton
def test_every_pdl_kernel_waits_first():
    kernels = list(pdl_kernels())
    assert len(kernels) == 18, [k.__name__ for k in kernels]  # v4 MoE: gate_up and down
    for kernel in kernels:
        tree = ast.parse(textwrap.dedent(inspect.getsource(kernel)))
        body = tree.body[0].body
        if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            body = body[1:]  # the docstring
        first = ast.unparse(body[0])
        assert first == "pdl_start(PDL)", (kernel.__name__, first)
