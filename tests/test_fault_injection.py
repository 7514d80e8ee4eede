"""benchmarks/fault_injection.py, a few cycles: two concurrent `tdbench run` on one --out,
killed and stalled at random, end with every run complete once, equal to an undisturbed run's,
and nothing left behind (issue 24's acceptance). Slow: minutes."""
from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.slow
def test_fault_injection_loses_nothing(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "fault_injection.py"), "--cycles", "3",
                        "--seed", "7", "--work", str(tmp_path / "work")],
                       capture_output=True, text=True, timeout=1800, cwd=REPO)
    assert r.returncode == 0 and "3 cycles, 0 lost" in r.stdout, r.stdout + r.stderr[-3000:]
