"""The participant workflow through a real single-node SLURM cluster (tools/local_slurm.py), end to end.

The cluster (munged, MariaDB, slurmdbd, slurmctld, slurmd from Debian's packages) is started for this
module and stopped by the process ids it recorded. Under CI=true a cluster that cannot start fails the
tests; elsewhere they are skipped when this is not root or the packages are missing.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import BIDS_REAL, IN_CI, REPO

MASKS = BIDS_REAL / "derivatives" / "masks"


def _local_slurm():
    spec = importlib.util.spec_from_file_location("local_slurm", REPO / "tools" / "local_slurm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    local_slurm = _local_slurm()
    problems = local_slurm.missing_requirements()
    if problems:
        if IN_CI:
            pytest.fail("a local SLURM cluster is required under CI=true: " + "; ".join(problems))
        pytest.skip("no local SLURM cluster: " + "; ".join(problems))
    root = tmp_path_factory.mktemp("slurm")
    info = local_slurm.start(root)
    env = dict(os.environ, SLURM_CONF=info["slurm_conf"])
    yield {"root": root, "env": env, "pids": info["pids"]}
    stopped = local_slurm.stop(root)
    assert len(stopped) == len(info["pids"])
    assert not any(local_slurm._alive(pid) for pid in info["pids"].values())


def _dwiflow(args, env, **popen):
    return [sys.executable, "-m", "dwiflow.cli.bidsapp", *map(str, args)]


def _sacct(env, *job_ids):
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", ",".join(job_ids), "-o", "JobID,JobName,State,AllocCPUS"],
                         env=env, capture_output=True, text=True, check=True).stdout
    return {line.split("|")[0]: line.split("|")[1:] for line in out.strip().splitlines()}


def _job_ids(stdout: str) -> dict[str, str]:
    """job id -> stage, from dwiflow's "slurm job <id>: <stage>" lines."""
    return dict(re.findall(r"slurm job (\d+): (\w+)", stdout))


def _outputs(folder: Path) -> dict[str, str]:
    """sha256 of every output (not the HTML reports, which record times): a difference is reported in seconds,
    naming the files."""
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.suffix != ".html" and p.name != ".bidsignore"}


def _differing(ours: dict[str, str], reference: dict[str, str]) -> list[str]:
    return sorted(k for k in set(ours) | set(reference) if ours.get(k) != reference.get(k))


def _results(work: Path) -> set[str]:
    return {p.parent.name for p in (work / "cache").rglob("_result.pklz")}


@pytest.fixture(scope="module")
def cf_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("cf") / "out"
    code = subprocess.run(_dwiflow([BIDS_REAL, out, "participant", "--mask-dir", MASKS, "--work-dir",
                                    out.parent / "work", "--worker", "cf"], os.environ), capture_output=True, text=True)
    assert code.returncode == 0, code.stderr[-2000:]
    return out


def test_every_real_run_through_slurm_equals_cf(cluster, cf_reference, tmp_path, capsys):
    out, work = tmp_path / "out", tmp_path / "work"
    # sub-01's two runs (masks given) and sub-03 (its mask computed); sub-02's two runs go through SLURM in the
    # killed-job test below, so every real run is covered
    run = subprocess.run(_dwiflow([BIDS_REAL, out, "participant", "--participant-label", "01", "03", "--mask-dir",
                                   MASKS, "--work-dir", work, "--worker", "slurm"], cluster["env"]),
                         env=cluster["env"], capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    jobs = _job_ids(run.stdout)
    with capsys.disabled():
        print(f"\n[slurm] {len(jobs)} jobs: " + ", ".join(f"{j}={s}" for j, s in sorted(jobs.items(), key=lambda x: int(x[0]))))
    # 3 runs x (tensor, response, csd, peaks, fod_metrics, stage_derivatives, figures), plus a brain mask for
    # sub-03 (sub-01's runs have theirs in --mask-dir)
    assert sorted(jobs.values()).count("mask") == 1 and len(jobs) == 22
    accounted = _sacct(cluster["env"], *jobs)
    assert set(accounted) == set(jobs)
    for job_id, (name, state, cpus) in accounted.items():
        assert state == "COMPLETED" and name.startswith(f"dwiflow.{jobs[job_id]}.")
        # per-stage resources from the csd recon spec: CSD jobs get 2 CPUs, the others 1
        assert int(cpus) == (2 if jobs[job_id] == "csd" else 1), (jobs[job_id], cpus)
    reference = {k: v for k, v in _outputs(cf_reference).items() if not k.startswith("sub-02/")}
    assert _differing(_outputs(out), reference) == []  # byte-identical to the cf worker, figures included


def test_killed_job_fails_visibly_and_a_resubmission_recomputes_only_what_was_lost(cluster, cf_reference, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    args = _dwiflow([BIDS_REAL, out, "participant", "--participant-label", "02", "--work-dir", work, "--worker", "slurm"],
                    cluster["env"])
    process = subprocess.Popen(args, env=cluster["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed, seen_running = None, {}
    deadline = time.time() + 600
    while killed is None and time.time() < deadline and process.poll() is None:
        queue = subprocess.run(["squeue", "-h", "-o", "%i %j %T"], env=cluster["env"], capture_output=True,
                               text=True).stdout.split("\n")
        for line in queue:
            if " dwiflow.csd." in f" {line}" and line.endswith("RUNNING"):
                seen_running.setdefault(line.split()[0], time.time())
        # cancel a CSD job mid-run: after it has run for a moment (Python started, the fit under way)
        ripe = [job for job, since in seen_running.items() if time.time() - since > 1.5]
        if ripe:
            killed = ripe[0]
            subprocess.run(["scancel", killed], env=cluster["env"], check=True)
        time.sleep(0.3)
    stdout, stderr = process.communicate(timeout=600)
    assert killed is not None, "no CSD job was seen running"
    assert process.returncode == 1, stdout[-2000:] + stderr[-2000:]
    # the failure names the run, the stage, the job and its sbatch log
    failed = [line for line in stderr.splitlines() if line.startswith("dwiflow: run sub-02_dir-")]
    assert len(failed) == 1, stderr[-3000:]
    assert f"SLURM job {killed} (csd) ended CANCELLED" in failed[0] and "sbatch log:" in failed[0]
    log = Path(re.search(r"sbatch log: (\S+?)\)", failed[0]).group(1))
    assert log.name == f"slurm-{killed}.err" and log.parent.is_dir()
    before = _results(work)
    # resubmission: only the killed CSD and what depends on it run again
    rerun = subprocess.run(args, env=cluster["env"], capture_output=True, text=True, timeout=1200)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    resubmitted = sorted(_job_ids(rerun.stdout).values())
    assert resubmitted == ["csd", "figures", "fod_metrics", "peaks", "stage_derivatives"], resubmitted
    assert before <= _results(work)
    reference = {k: v for k, v in _outputs(cf_reference).items() if k.startswith("sub-02/")}
    assert _differing({k: v for k, v in _outputs(out).items() if k.startswith("sub-02/")}, reference) == []
    assert len(reference) > 60


def test_a_task_the_node_cannot_unpickle_reports_the_real_error(cluster, tmp_path, monkeypatch):
    """A task defined in a module only the submitting process can import: the job's own error comes back."""
    from pydra.engine.submitter import Submitter

    from dwiflow.workflows.cluster import StageSlurmWorker

    module_dir = tmp_path / "only_here"
    module_dir.mkdir()
    # an input whose class lives in that module: the job pickle refers to the module, which the node lacks
    (module_dir / "submit_side_only.py").write_text(
        "import typing as ty\nfrom pydra.compose import python\n\n\nclass Marker:\n    pass\n\n\n"
        "@python.define\ndef Describe(x: ty.Any) -> str:\n    return type(x).__name__\n")
    monkeypatch.syspath_prepend(str(module_dir))
    monkeypatch.setenv("SLURM_CONF", cluster["env"]["SLURM_CONF"])
    from submit_side_only import Describe, Marker

    worker = StageSlurmWorker(poll_delay=1)
    with pytest.raises(Exception) as raised:
        with Submitter(cache_root=tmp_path / "cache", worker=worker) as submitter:
            submitter(Describe(x=Marker()), raise_errors=True)
    message = str(raised.value) + "".join(getattr(raised.value, "__notes__", []))
    assert "No module named 'submit_side_only'" in message and "sbatch log:" in message, message
