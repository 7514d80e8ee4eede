"""The single-node dev cluster (slurm/dev-cluster.sh) runs real Slurm jobs.

Nothing is mocked: the module fixture installs (apt, first time only) and starts munged,
slurmctld, slurmd, MariaDB and slurmdbd, and the tests submit jobs with sbatch and read them
back with scontrol and sacct. The cluster is left up for the other Slurm tests.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

SCRIPT = Path(__file__).resolve().parents[1] / "slurm" / "dev-cluster.sh"
EXIT_PREREQ = 3  # dev-cluster.sh: Slurm missing and not installable here (not root, no apt)
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


@dataclass
class Cluster:
    env: dict[str, str]
    conf: Path

    def run(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=check)

    def script(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return self.run("bash", str(SCRIPT), *args, timeout=timeout, check=False)

    def sbatch(self, *args: str) -> str:
        out = self.run("sbatch", "--parsable", *args).stdout.strip()
        return out.split(";")[0]  # "<jobid>[;cluster]"

    def job_states(self, job_id: str) -> list[str]:
        """States of a job (every task of an array), as slurmctld reports them."""
        r = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        return re.findall(r"\bJobState=(\S+)", r.stdout)

    def wait_done(self, job_id: str, n_tasks: int = 1, timeout: float = 60) -> list[str]:
        deadline = time.monotonic() + timeout
        states: list[str] = []
        while time.monotonic() < deadline:
            states = self.job_states(job_id)
            if len(states) >= n_tasks and all(s in TERMINAL for s in states):
                return states
            time.sleep(0.25)
        pytest.fail(f"job {job_id} not finished after {timeout} s: states {states}\n"
                    + self.run("squeue", check=False).stdout)


def _run_script(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout)


def _bring_up() -> Cluster:
    if not sys.platform.startswith("linux") or shutil.which("bash") is None:
        pytest.skip("the dev Slurm cluster needs Linux and bash")
    r = _run_script("up", "--accounting")
    if r.returncode == EXIT_PREREQ:
        last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "(no message)"
        pytest.skip(f"cannot install/run Slurm here: {last}")
    assert r.returncode == 0, f"dev-cluster.sh up failed (rc {r.returncode}):\n{r.stderr}"
    last = r.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"export SLURM_CONF=(\S+)", last)
    assert m, f"last line of 'up' is not an export line: {last!r}"
    conf = Path(m.group(1))
    assert conf.is_file()
    return Cluster(env={**os.environ, "SLURM_CONF": str(conf)}, conf=conf)


@pytest.fixture(scope="module")
def cluster() -> Cluster:
    return _bring_up()  # deliberately not brought down: other Slurm tests reuse it


def test_status_exits_zero_when_up(cluster: Cluster) -> None:
    r = cluster.script("status")
    assert r.returncode == 0, r.stdout + r.stderr
    for daemon in ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd"):
        assert re.search(rf"{daemon}\s+running \(pid \d+\)", r.stdout), r.stdout
    assert "PARTITION" in r.stdout  # sinfo output


def test_up_is_idempotent(cluster: Cluster) -> None:
    r = cluster.script("up", "--accounting")
    assert r.returncode == 0, r.stderr
    assert "already up" in r.stderr
    assert r.stdout.strip().splitlines()[-1] == f"export SLURM_CONF={cluster.conf}"


def test_sbatch_wrap_job_completes(cluster: Cluster, tmp_path: Path) -> None:
    job = cluster.sbatch("--chdir", str(tmp_path), "--output", str(tmp_path / "out-%j.txt"),
                         "--wrap", "echo hi")
    assert cluster.wait_done(job) == ["COMPLETED"]
    assert (tmp_path / f"out-{job}.txt").read_text().strip() == "hi"


def test_job_array_completes(cluster: Cluster, tmp_path: Path) -> None:
    job = cluster.sbatch("--array=0-2", "--chdir", str(tmp_path),
                         "--output", str(tmp_path / "arr-%A_%a.txt"),
                         "--wrap", "echo task $SLURM_ARRAY_TASK_ID")
    assert cluster.wait_done(job, n_tasks=3) == ["COMPLETED"] * 3
    for i in range(3):
        assert (tmp_path / f"arr-{job}_{i}.txt").read_text().strip() == f"task {i}"


def test_sacct_lists_the_job(cluster: Cluster, tmp_path: Path) -> None:
    job = cluster.sbatch("--chdir", str(tmp_path), "--output", "/dev/null", "--wrap", "true")
    cluster.wait_done(job)
    deadline = time.monotonic() + 60  # slurmdbd records a job seconds after it ends
    rows: list[str] = []
    while time.monotonic() < deadline:
        r = cluster.run("sacct", "-j", job, "-X", "-n", "-P", "-o", "JobID,State", check=False)
        rows = r.stdout.split()
        if f"{job}|COMPLETED" in rows:
            return
        time.sleep(0.5)
    pytest.fail(f"sacct does not list job {job} as COMPLETED after 60 s: {rows}")


def test_down_then_up_again(cluster: Cluster, tmp_path: Path) -> None:
    # Last in the module: leaves the cluster up again for the other Slurm tests.
    r = cluster.script("down")
    assert r.returncode == 0, r.stderr
    status = cluster.script("status")
    assert status.returncode == 1, status.stdout
    assert "running (pid" not in status.stdout
    assert "cluster: down" in status.stdout

    again = _bring_up()
    assert again.conf == cluster.conf
    assert cluster.script("status").returncode == 0
    job = cluster.sbatch("--chdir", str(tmp_path), "--output", str(tmp_path / "o.txt"),
                         "--wrap", "echo again")
    assert cluster.wait_done(job) == ["COMPLETED"]
    assert (tmp_path / "o.txt").read_text().strip() == "again"
