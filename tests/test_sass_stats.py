"""scripts/sass_stats.py: localrun's MoE decode kernels compiled for sm_90 on this (CPU) machine.

What it checks is static, not a timing: the v3 kernels' inner loops issue fewer instructions per
weight than v2's (which an H200 measured issue-bound at ~920 GB/s) and spill no registers, for
every tile config the autotuner may pick. It skips where triton or its bundled ptxas is absent.
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
def test_v3_loops_issue_fewer_instructions_than_v2_and_never_spill():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "sass_stats.py"), "--json"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(run.stdout)
    v2 = {name: row for name, row in rows.items() if name.startswith("v2 ")}
    v3 = {name: row for name, row in rows.items() if name.startswith("v3 ")}
    assert len(v2) == 2 and len(v3) >= 20
    for name, row in rows.items():
        assert row["loop_instructions"] > 0 and row["local_bytes"] == 0, (name, row)  # a loop found, no spills
    worst_v3 = max(row["instructions_per_weight"] for row in v3.values())
    best_v2 = min(row["instructions_per_weight"] for row in v2.values())
    assert worst_v3 < best_v2, (worst_v3, best_v2)
    for name, row in v3.items():  # each weight: its table load and its FMA, and not much else
        ops = row["ops"]
        assert ops.get("FFMA", 0) * 0.9 <= row["weights_per_thread_step"] <= ops.get("LDG", 0), (name, row)
        assert row["instructions_per_weight"] < 11, (name, row)
