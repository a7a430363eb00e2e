"""Programmatic dependent launch (kernels/triton_pdl.py): off the GPU nothing asks for it, and every
kernel that takes it waits for the kernel before before any access but its prologue's loads of
weights, so nothing a kernel of the step wrote is read early and nothing is written early
(scripts/sass_stats.py compiles each with PDL on for sm_90, tests/test_sass_stats.py checks the
order in its SASS; the GPU check measures it)."""

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


# The pointers each kernel reads before its wait (its prologue): weights and model buffers, which no
# kernel of a decode step writes (triton_pdl's docstring). Every other kernel waits first.
PROLOGUE = {
    "_gemv_kernel": {"w_ptr", "b_ptr"},
    "_attention_residual_norms_kernel": {"w_post_ptr", "w_mlp_ptr", "w_moe_ptr", "w_router_ptr"},
    "_ffn_residual_kernel": {"w1_ptr", "w2_ptr", "w_ptr", "scalar_ptr", "w_next_ptr"},
    "_norms_route_kernel": {"router_ptr", "w_post_ptr", "w_router_ptr"},
    "_gated_gemv_route_kernel": {"w_ptr"},
    "_rope_rows_kernel": {"inv_ptr"},
    "_rms_norm_kernel": {"w_ptr"},
    "_rms_norm_rope_kernel": {"w_ptr"},
    "_qkv_write_kernel": {"qw_ptr", "w_ptr"},
    "_qkv_attention_kernel": {"qw_ptr", "kw_ptr"},
}
# The MoE decode kernels' EARLY prologue (triton_moe.EARLY_LOADS): the expert rows of the ids as they stand
# before the wait (an earlier token's, where the kernel before wrote them), read again after it.
ROUTED_PROLOGUE = {"_gate_up_v2_kernel", "_down_v2_kernel", "_gate_up_v4_kernel", "_down_v4_kernel"}
ROUTED_POINTERS = {"early_ids_ptr", "buf_i32", "buf_u8", "buf_f32", "nested_code"}
STORES = ("store", "atomic_add", "atomic_xchg", "atomic_cas", "atomic_max", "atomic_min", "atomic_or")


def prologue(source: str) -> tuple[list[ast.stmt], set[str]]:
    """The statements of a kernel's source before its top-level `pdl_start(PDL)` and the arguments
    they name (fails where it has no such statement: a wait inside a branch binds not every program)."""
    tree = ast.parse(textwrap.dedent(source))
    args = {a.arg for a in tree.body[0].args.args}
    body = tree.body[0].body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    starts = [i for i, stmt in enumerate(body) if ast.unparse(stmt) == "pdl_start(PDL)"]
    assert len(starts) == 1, "pdl_start(PDL) once, at the top level"
    before = body[:starts[0]]
    named = {node.id for stmt in before for node in ast.walk(stmt) if isinstance(node, ast.Name)}
    return before, named & args


def check_prologue(source: str, allowed: set[str]):
    """Before its wait the kernel reads no pointer but `allowed` (nothing at all where that is empty)
    and stores nothing."""
    before, named = prologue(source)
    assert bool(before) == bool(allowed), [ast.unparse(stmt) for stmt in before]
    pointers = {n for n in named if n.endswith("_ptr") or n in ("code", "nested_code") or n.startswith("buf_")}
    assert pointers <= allowed, pointers - allowed
    calls = {ast.unparse(node.func) for stmt in before for node in ast.walk(stmt) if isinstance(node, ast.Call)}
    assert not {c for c in calls if c.split(".")[-1] in STORES}, calls


def check_routed_prologue(source: str):
    """Before its wait the kernel reads expert rows only under `if EARLY:`, at ids from early_ids_ptr (no
    other pointer of the step), and stores nothing; after it, it reads the step's ids and compares."""
    before, named = prologue(source)
    for stmt in before:
        names = {n.id for n in ast.walk(stmt) if isinstance(n, ast.Name)}
        if names & {"early_ids_ptr", "buf_i32", "buf_u8", "buf_f32", "nested_code", "code"}:
            assert isinstance(stmt, ast.If) and ast.unparse(stmt.test) == "EARLY", ast.unparse(stmt)
    pointers = {n for n in named if n.endswith("_ptr") or n in ("code", "nested_code") or n.startswith("buf_")}
    assert pointers <= ROUTED_POINTERS, pointers - ROUTED_POINTERS
    calls = {ast.unparse(node.func) for stmt in before for node in ast.walk(stmt) if isinstance(node, ast.Call)}
    assert not {c for c in calls if c.split(".")[-1] in STORES}, calls
    after = textwrap.dedent(source).split("pdl_start(PDL)", 1)[1]
    assert ("_step_expert(ids_ptr + p" in after or "_gate_up_pair(ids_ptr" in after) and "e != e0" in after


@needs_triton
def test_every_pdl_kernel_reads_only_step_constants_before_its_wait():
    kernels = list(pdl_kernels())
    assert len(kernels) == 20, [k.__name__ for k in kernels]  # v2, v4 and v5 MoE; norms_route; qkv_attention; gated_gemv_route
    assert set(PROLOGUE) <= {k.__name__ for k in kernels}
    for kernel in kernels:
        try:
            if kernel.__name__ in ROUTED_PROLOGUE:
                check_routed_prologue(inspect.getsource(kernel))
                continue
            check_prologue(inspect.getsource(kernel), PROLOGUE.get(kernel.__name__, set()))
        except AssertionError as e:
            raise AssertionError(f"{kernel.__name__}: {e}") from e


def test_the_prologue_check_catches_an_early_read_or_write():
    head = "def k(x_ptr, w_ptr, PDL):\n    w = tl.load(w_ptr)\n"
    check_prologue(head + "    pdl_start(PDL)\n    x = tl.load(x_ptr)\n", {"w_ptr"})
    bad = [head + "    x = tl.load(x_ptr + 1)\n    pdl_start(PDL)\n",  # an activation before the wait
           head + "    tl.store(w_ptr, w)\n    pdl_start(PDL)\n",  # a write before the wait
           head + "    if PDL:\n        pdl_start(PDL)\n",  # a wait not every program passes
           "def k(x_ptr, PDL):\n    i = 1\n    pdl_start(PDL)\n"]  # a prologue the list does not name
    for source in bad:
        with pytest.raises(AssertionError):
            check_prologue(source, {"w_ptr"} if "w_ptr" in source else set())


def test_the_routed_prologue_check_catches_an_unguarded_or_unchecked_read():
    head = "def k(ids_ptr, early_ids_ptr, buf_i32, x_ptr, PDL, EARLY):\n    r = 1\n"
    early = "    if EARLY:\n        e0 = tl.load(early_ids_ptr)\n        w = tl.load(buf_i32 + e0)\n"
    after = "    pdl_start(PDL)\n    e = _step_expert(ids_ptr + p, None, None, EARLY)\n    if e != e0:\n        w = 0\n"
    check_routed_prologue(head + early + after)
    bad = [head + "    w = tl.load(buf_i32 + r)\n" + after,  # expert rows read whether EARLY or not
           head + early.replace("early_ids_ptr", "ids_ptr") + after,  # ids read before the wait for good
           head + early + "    if EARLY:\n        x = tl.load(x_ptr)\n" + after,  # an activation
           head + early + "    pdl_start(PDL)\n    e = tl.load(ids_ptr + p)\n"]  # never compared
    for source in bad:
        with pytest.raises(AssertionError):
            check_routed_prologue(source)


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
