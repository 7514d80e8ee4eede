"""Cluster profiles are validated like suites: one line naming the key, exit code 2, and
nothing submitted (these checks run before Slurm is contacted, so they need no cluster).
The checks against a live cluster (unknown partition, resources that do not fit) are in
test_slurm.py."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import tiny_suite, write_suite

from bench.cli import main
from bench.slurm import REPO_SLURM, ClusterProfile, load_profile


def test_shipped_profiles_load():
    names = sorted(p.stem for p in REPO_SLURM.glob("*.yaml"))
    assert {"dev", "example-gpu"} <= set(names)
    for n in names:
        prof, path = load_profile(n)
        assert isinstance(prof, ClusterProfile) and prof.name and path.is_file()
    dev, _ = load_profile("dev")
    assert dev.partition == "debug"
    gpu, _ = load_profile(str(REPO_SLURM / "example-gpu.yaml"))  # by path too
    assert gpu.gpus_per_node == 8 and gpu.setup and gpu.sbatch


@pytest.mark.parametrize("profile,key", [
    ({"cpus_per_task": 2}, "partition: Field required"),
    ({"partition": "debug", "cpus": 2}, "cpus: unknown key"),
    ({"partition": "debug", "cpus_per_task": "many"}, "cpus_per_task:"),
    ({"partition": "debug", "cpus_per_task": 0}, "cpus_per_task:"),
    ({"partition": "debug", "gpus_per_node": -1}, "gpus_per_node:"),
    ({"partition": "debug", "mem_gb": -4}, "mem_gb:"),
    ({"partition": "debug", "time_min": 0}, "time_min:"),
    ({"partition": "debug", "setup": "module load x"}, "setup:"),
    ({"partition": "debug", "sbatch": {"partition": "other"}}, "sbatch: Value error, 'partition' is set by"),
    ({"partition": "debug", "sbatch": {"time": 5}}, "sbatch:"),
])
def test_bad_profile_exit_2_naming_the_key(tmp_path, capsys, profile, key):
    prof = tmp_path / "bad.yaml"
    prof.write_text(yaml.safe_dump(profile))
    suite = write_suite(tmp_path / "suite.yaml", tiny_suite())
    out = tmp_path / "out"
    rc = main(["submit", str(suite), "--cluster", str(prof), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and str(prof) in err
    assert key.split(":")[0] in err and key.replace("Value error, ", "") in err.replace("Value error, ", ""), err
    assert not out.exists(), "nothing may be written or submitted"


def test_unknown_profile_name_is_a_clear_error(tmp_path, capsys):
    suite = write_suite(tmp_path / "suite.yaml", tiny_suite())
    rc = main(["submit", str(suite), "--cluster", "dve", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "--cluster" in err and "did you mean 'dev'" in err, err
    rc = main(["submit", str(suite), "--cluster", str(tmp_path / "missing.yaml")])
    err = capsys.readouterr().err
    assert rc == 2 and "missing.yaml: file not found" in err, err


def test_cluster_flag_only_with_slurm(tmp_path, capsys):
    suite = write_suite(tmp_path / "suite.yaml", tiny_suite())
    rc = main(["run", str(suite), "--executor", "debug", "--cluster", "dev", "--out", str(tmp_path / "o")])
    assert rc == 2 and "--cluster" in capsys.readouterr().err
    assert not Path(tmp_path / "o").exists()
