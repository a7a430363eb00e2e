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


@needs_triton
def test_pdl_only_inside_a_decode_steps_graph_capture(monkeypatch):
    """Enabled, a kernel takes PDL only inside in_graphs() (a capture and its warm-up, which
    step._capture_once opens): a prefill's kernels, launched one by one, keep plain launches."""
    from localrun import step

    monkeypatch.setattr(triton_pdl, "ENABLED", True)
    monkeypatch.setattr(triton_pdl, "_supported", lambda index: True)  # as on an H100
    monkeypatch.setattr(triton_pdl, "pdl_start", lambda PDL: None)  # not the interpreter's function
    cuda = torch.device("cuda", 0)
    assert triton_pdl.launch(cuda) == {}
    with triton_pdl.in_graphs():
        assert triton_pdl.launch(cuda) == {"PDL": True, "launch_pdl": True}
    assert triton_pdl.launch(cuda) == {}

    class Step:  # what _capture_once needs of a graph step
        disabled, _graphs = None, {}

        def _capture(self, span):
            seen.append(triton_pdl.launch(cuda))
            raise RuntimeError("capture failed")  # the step runs uncaptured, plain launches again

    seen = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    graph_step = Step()
    step._capture_once(graph_step, 256)
    assert seen == [{"PDL": True, "launch_pdl": True}] and graph_step.disabled.startswith("RuntimeError")
    assert triton_pdl.launch(cuda) == {}
