"""The real dataset (../shared/data/bids_real) through the BIDS App: every run with the csd preset on the cf
worker, and the same runs through a real single-node SLURM cluster (tools/local_slurm.py), end to end, byte-identical
to the cf worker's.

The cluster (munged, MariaDB, slurmdbd, slurmctld, slurmd from Debian's packages) is started for the SLURM tests
and stopped by the process ids it recorded. Under CI=true a cluster that cannot start fails the tests; elsewhere
they are skipped when this is not root or the packages are missing. One cf run of every real run is the reference
for both (it used to be made twice, here and in a separate module).
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

from tests.bep016 import dataset_problems
from tests.conftest import BIDS_REAL, IN_CI, REPO, browser_images, real_run

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
    """job id -> stage, from dwiflow's "<run>: <stage> submitted as slurm job <id>" lines."""
    return {job: stage for stage, job in re.findall(r"(\w+) submitted as slurm job (\d+) \(", stdout)}


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
    real_run("sub-03")  # fails clearly when the shared data are missing
    out = tmp_path_factory.mktemp("cf") / "out"
    code = subprocess.run(_dwiflow([BIDS_REAL, out, "participant", "--mask-dir", MASKS, "--work-dir",
                                    out.parent / "work", "--worker", "cf"], os.environ), capture_output=True, text=True)
    assert code.returncode == 0, code.stderr[-2000:]
    return out


def test_every_real_run_with_the_csd_preset(cf_reference, tmp_path, chromium):
    """Every run of the real dataset through the BIDS App (cf worker): FODs, sidecars, plausible FA, sub-03's
    reduced degree, the group summary and one report per subject that opens in Chromium."""
    import json

    import nibabel as nib
    import numpy as np

    from dwiflow.cli.bidsapp import main

    out = cf_reference  # every run, csd preset, --mask-dir, cf worker
    assert dataset_problems(out) == {}  # every sidecar follows the BEP016 draft's rules
    expected = ["sub-01/dwi/sub-01_acq-b1kb2k", "sub-01/dwi/sub-01_acq-b6kmax", "sub-02/dwi/sub-02_dir-AP",
                "sub-02/dwi/sub-02_dir-PA", "sub-03/dwi/sub-03"]
    for prefix in expected:
        fod = out / f"{prefix}_model-csd_param-fod_dwimap.nii.gz"
        side = json.loads(fod.with_name(fod.name.replace(".nii.gz", ".json")).read_text())
        assert side["OrientationEncoding"]["SphericalHarmonicBasis"] == "mrtrix3"
        # a voxel whose negative set cycles past the iteration limit (as dwi2fod, which warns and keeps it) gets
        # status NOT_CONVERGED and NaN: at most one per run here (sub-02, after negative samples count as 0)
        params = side["Model"]["Parameters"]
        assert params["VoxelsFailed"] == params["VoxelsNotConverged"] <= 1
        assert {"Description", "Units", "Model"} <= set(side)
        fa = nib.load(out / f"{prefix}_model-tensor_param-fa_dwimap.nii.gz").get_fdata()
        mask = nib.load(out / f"{prefix}_desc-brain_mask.nii.gz").get_fdata() > 0
        assert 0.1 < np.nanmean(fa[mask]) < 0.5
    # sub-03 has 12 directions: the FOD degree drops to what they support instead of failing
    sub03 = nib.load(out / "sub-03/dwi/sub-03_model-csd_param-fod_dwimap.nii.gz")
    assert sub03.shape[3] == 28
    assert main([str(BIDS_REAL), str(out), "group"]) == 0
    assert len((out / "desc-group_summary.tsv").read_text().splitlines()) == 6
    # one report per subject with every run's figures, none broken; the dataset page lists all subjects
    runs_of = {"01": 2, "02": 2, "03": 1}
    for subject, n_runs in runs_of.items():
        page = out / f"sub-{subject}.html"
        images = browser_images(chromium, page, tmp_path / f"sub-{subject}.png")
        assert len(images) == 7 * n_runs and all(i["width"] > 0 and i["height"] > 0 for i in images), images
        assert "FAILED" not in page.read_text()
    summary = out / "dataset_summary.html"
    assert all(i["width"] > 0 for i in browser_images(chromium, summary))
    assert all(f'href="sub-{s}.html"' in summary.read_text() for s in runs_of)


def test_every_real_run_through_slurm_equals_cf(cluster, cf_reference, tmp_path, capsys):
    # a work directory whose path holds a space (its job scripts named their logs in an #SBATCH line, which sbatch
    # refused: "Invalid directive found in batch script")
    out, work = tmp_path / "out", tmp_path / "work dir"
    # sub-03 (its mask computed, as in the cf reference, where --mask-dir has none for it; given alone here it
    # would be an error: a --mask-dir that matches none of the selected runs); sub-02's two runs go through SLURM
    # in the killed-job test below (sub-01's two-slice runs only differ from these in their given masks, which the
    # cf run covers); the jobs run through DWIFLOW_JOB_PREFIX (`apptainer exec … dwiflow.sif` in the README)
    prefixed = {**cluster["env"], "DWIFLOW_JOB_PREFIX": "env DWIFLOW_RAN_THROUGH_PREFIX=1"}
    run = subprocess.run(_dwiflow([BIDS_REAL, out, "participant", "--participant-label", "03", "--work-dir", work,
                                   "--worker", "slurm"], prefixed),
                         env=prefixed, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    jobs = _job_ids(run.stdout)
    with capsys.disabled():
        print(f"\n[slurm] {len(jobs)} jobs: " + ", ".join(f"{j}={s}" for j, s in sorted(jobs.items(), key=lambda x: int(x[0]))))
    # mask, tensor, response, csd, peaks, fod_metrics, stage_derivatives, figures
    assert sorted(jobs.values()).count("mask") == 1 and len(jobs) == 8
    # the submitting process shows where each run is: every job submitted and done, named by its run and stage
    for job_id, stage in jobs.items():
        assert re.search(rf"\]\s+sub-03: {stage} submitted as slurm job {job_id} \(", run.stdout), run.stdout
        assert re.search(rf"\]\s+sub-03: {stage} done: slurm job {job_id}, [0-9.]+ s from submission", run.stdout)
    assert "(2 CPUs, 4096 MB)" in run.stdout and "sbatch --cpus-per-task" not in run.stdout  # args only with -v
    scripts = list(work.rglob("slurm_scripts/*/*.sh"))
    assert len(scripts) == 8 and all("\nenv DWIFLOW_RAN_THROUGH_PREFIX=1 " in p.read_text() for p in scripts), scripts
    accounted = _sacct(cluster["env"], *jobs)
    assert set(accounted) == set(jobs)
    for job_id, (name, state, cpus) in accounted.items():
        assert state == "COMPLETED" and name.startswith(f"dwiflow.{jobs[job_id]}.")
        # per-stage resources from the csd recon spec: CSD jobs get 2 CPUs, the others 1
        assert int(cpus) == (2 if jobs[job_id] == "csd" else 1), (jobs[job_id], cpus)
    reference = {k: v for k, v in _outputs(cf_reference).items() if k.startswith("sub-03/")}
    assert len(reference) > 30
    ours = {k: v for k, v in _outputs(out).items() if k.startswith("sub-")}
    assert _differing(ours, reference) == []  # byte-identical to the cf worker, figures included


def test_jobs_slurm_would_refuse_are_refused_before_anything_runs(cluster, tmp_path):
    """A partition the cluster lacks (--sbatch-args given as two words, as users type it: argparse took its value for
    an option), or more CPUs for a stage than a node has: one line naming the stage and where its arguments come
    from, exit 2, nothing written and no job submitted (sbatch --test-only)."""
    spec = tmp_path / "wide.yaml"
    spec.write_text((REPO / "tasks" / "recon_specs" / "csd.yaml").read_text().replace("csd: {cpus: 2", "csd: {cpus: 4096"))
    jobs_before = subprocess.run(["sacct", "-n", "-X", "-o", "JobID"], env=cluster["env"], capture_output=True,
                                 text=True).stdout.split()
    for extra, message in (
            (["--sbatch-args", "--partition=nowhere --time=00:10:00"],
             "SLURM refuses the mask job's arguments (--partition=nowhere --time=00:10:00 --cpus-per-task=1 "),
            (["--recon-spec", spec], "SLURM refuses the csd job's arguments (--cpus-per-task=4096 ")):
        run = subprocess.run(_dwiflow([BIDS_REAL, tmp_path / "out", "participant", "--participant-label", "03",
                                       "--work-dir", tmp_path / "work", "--worker", "slurm", *extra], cluster["env"]),
                             env=cluster["env"], capture_output=True, text=True, timeout=120)
        errors = run.stderr.strip().splitlines()
        assert run.returncode == 2 and len(errors) == 1 and message in errors[0], run.stderr
        assert ("from --sbatch-args and the recon spec's resources.default" in errors[0] if "--sbatch-args" in extra
                else "from the recon spec's resources.csd): " in errors[0]), errors
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()
    jobs_after = subprocess.run(["sacct", "-n", "-X", "-o", "JobID"], env=cluster["env"], capture_output=True,
                                text=True).stdout.split()
    assert jobs_after == jobs_before


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
