"""Rules of the Triton sources that the interpreter and this machine's Triton do not enforce, but the
GPU machine's older Triton (3.6, the one torch 2.11's CUDA wheels ship) does."""

from __future__ import annotations

import ast
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[1] / "localrun" / "kernels"


def jit_functions(tree: ast.Module):
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and any(
                ast.unparse(d).split("(")[0] in ("triton.jit", "jit") for d in node.decorator_list):
            yield node


def test_jit_helpers_take_no_default_arguments():
    """A @triton.jit function called from another (not a `*_kernel` launched from Python) must be given
    every argument: Triton 3.6 fails to compile a call that leaves a defaulted constexpr out (the
    route kernel did, on a `CACHE: tl.constexpr = ""`), where 3.9 accepts it."""
    helpers = {}
    for path in sorted(KERNELS.glob("triton_*.py")):
        for fn in jit_functions(ast.parse(path.read_text())):
            if not fn.name.endswith("_kernel"):
                helpers[f"{path.name}:{fn.name}"] = len(fn.args.defaults) + len([d for d in fn.args.kw_defaults if d])
    assert len(helpers) > 10  # the scan found the helpers
    assert not {name: n for name, n in helpers.items() if n}, "defaults in jit helpers"
