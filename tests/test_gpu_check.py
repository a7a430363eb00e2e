"""scripts/gpu_check.py --dry: every step of the GPU check runs on the CPU, so the one command a
session lent a GPU runs first cannot rot between leases."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def test_dry_run_writes_a_complete_report(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--dry"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = report["steps"]
    assert report["dry"] and set(steps) == {"env", "attention", "exact", "demo", "big", "kernels", "compiled"}
    assert not [name for name, value in steps.items() if "error" in value]
    for row in steps["exact"]["tiny"].values():  # CPU stand-in: the same device on both sides
        assert "error" not in row
        assert row.get("tokens_identical", True)
    assert steps["demo"]["correct"]
    for placement in steps["big"].values():
        if not isinstance(placement, dict):
            continue
        memory = placement["memory_after_load"]
        assert memory["device_bytes"] > 0 and memory["planned_device_bytes"] > 0
        assert placement["per_token_eager"]["aten_ops_per_token"] > 0
    resident = steps["big"]["resident"]  # opt-in decode kernels (dense_gemv): the step with each switched on
    assert "error" not in resident["speed_static_with_dense_gemv"]
    assert resident["tokens_static_with_dense_gemv"]["first_divergence_from_default"] is None  # CPU: not taken
    kernels = steps["kernels"]
    assert all("error" not in v for k, v in kernels.items() if isinstance(v, dict))
    gemv = {k: v for k, v in kernels.items() if k.startswith("gemv ") and "max_rel_err_triton" in v}
    assert {"gemv qkv sliding", "gemv router", "gemv lm_head"} <= set(gemv)  # the interpreted kernel ran
    assert all(v["max_rel_err_triton"] < 1e-2 for v in gemv.values())
    assert kernels["gemv per token"]["weight_bytes"] > 0
    assert "gpu_check.md" in {p.name for p in tmp_path.iterdir()}
    assert "## big" in (tmp_path / "gpu_check.md").read_text()
