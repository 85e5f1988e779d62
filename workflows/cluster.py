"""Running the participant workflow on a cluster through Pydra's SLURM worker, with per-stage resources.

Pydra's ``slurm`` worker submits every task as one ``sbatch`` job with the same arguments. dwiflow's
:class:`StageSlurmWorker` keeps Pydra's job scripts, polling (``squeue``) and end-state check
(``sacct``) and adds what a dataset on a shared cluster needs:

- per-stage resources from the recon spec's ``resources`` section (CPUs, memory, wall time, extra
  sbatch arguments), the stage's thread count exported into its job (``OMP_NUM_THREADS`` … set to
  ``--omp-nthreads`` or else the stage's CPUs);
- jobs named ``dwiflow.<stage>.<hash>`` (readable in ``squeue``/``sacct``), never requeued silently:
  a job that was cancelled, timed out or failed raises an error naming the stage, the job id, its
  state and its sbatch log (the end of which is quoted), so the run fails visibly and a
  resubmission recomputes only what is missing from the shared cache.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import attrs
import pydra.engine  # noqa: F401  (pydra.workers.base needs the engine imported first)
from pydra.workers import base
from pydra.workers.slurm import SlurmWorker

from dwiflow.tasks.console import VERBOSE, say

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def stage_sbatch_arguments(resources: dict[str, dict[str, Any]], stage: str, omp_nthreads: int | None = None) -> list[str]:
    """sbatch arguments of one stage: its resources (or ``default``'s) and its thread count exported to the job.

    ``resources``: a recon spec's validated ``resources`` section (see :func:`dwiflow.tasks.recon_spec.check_resources`).
    """
    values = {**resources.get("default", {}), **resources.get(stage, {})}
    cpus = int(values.get("cpus", 1))
    args = [f"--cpus-per-task={cpus}"]
    if values.get("mem_gb") is not None:
        args.append(f"--mem={int(round(float(values['mem_gb']) * 1024))}M")
    if values.get("time"):
        args.append(f"--time={values['time']}")
    threads = omp_nthreads or cpus
    args.append("--export=ALL," + ",".join(f"{name}={threads}" for name in THREAD_VARIABLES))
    args += shlex.split(values.get("sbatch_args", ""))
    return args


def check_sbatch_arguments(sbatch_args: str, resources: dict[str, dict[str, Any]], stage_names: list[str],
                           omp_nthreads: int | None = None) -> str | None:
    """Why SLURM would refuse the jobs of ``stage_names`` (one line), or None: each distinct set of their sbatch
    arguments (``--sbatch-args`` and the recon spec's resources) is put to ``sbatch --test-only``, which submits
    nothing and refuses an unknown partition, more CPUs or memory than a node has, a bad time limit."""
    if shutil.which("sbatch") is None:
        return "--worker slurm: sbatch is not on PATH (run dwiflow where SLURM's commands are)"
    tried = set()
    for stage in stage_names:
        args = tuple(shlex.split(sbatch_args) + stage_sbatch_arguments(resources, stage, omp_nthreads))
        if args in tried:
            continue
        tried.add(args)
        try:
            done = subprocess.run(["sbatch", "--test-only", *args, "--wrap", "true"], capture_output=True, text=True,
                                  timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"--worker slurm: sbatch --test-only did not answer ({type(exc).__name__})"
        if done.returncode:
            said = " ".join((done.stderr or done.stdout).split()) or f"exit code {done.returncode}"
            section = stage if stage in resources else "default" if "default" in resources else None
            origin = " and ".join((["--sbatch-args"] if sbatch_args.strip() else [])
                                  + ([f"the recon spec's resources.{section}"] if section else [])) or "defaults"
            return f"--worker slurm: SLURM refuses the {stage} job's arguments ({' '.join(args)}; from {origin}): {said}"
    return None


@attrs.define
class StageSlurmWorker(SlurmWorker):
    """Pydra's SLURM worker with per-stage sbatch arguments and failures that name their job and log."""

    _plugin_name: ClassVar[str] = "slurm"
    resources: dict = attrs.field(factory=dict)
    omp_nthreads: int | None = None
    sacct_retries: int = 30
    submit_jobs: bool = True  # False: only report (cached results pass, anything else fails with its recorded error)
    failures: dict = attrs.field(factory=dict)  # job checksum (stable across submissions) -> why its job failed

    # attrs would generate these for a slotted subclass (pickling the event loop); keep Pydra's
    def __getstate__(self) -> dict[str, Any]:
        return SlurmWorker.__getstate__(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        SlurmWorker.__setstate__(self, state)

    def _prepare_runscripts(self, job, interpreter="/bin/sh", rerun=False):
        """Pydra's job pickle and batch script, the script running :func:`run_job` (the job's own error on failure)."""
        script_dir, batch_script = super()._prepare_runscripts(job, interpreter=interpreter, rerun=rerun)
        job_pkl = script_dir / "_job.pklz"
        # DWIFLOW_JOB_PREFIX: what the job's command runs inside, e.g. "apptainer exec -B /data dwiflow.sif" when
        # dwiflow itself runs in that container (the node then starts the same image)
        prefix = os.environ.get("DWIFLOW_JOB_PREFIX", "").strip()
        # the job's logs are named by sbatch's own --output/--error (a path in an #SBATCH line cannot hold a space)
        batch_script.write_text(f"#!{interpreter}\n"
                                f"{prefix + ' ' if prefix else ''}{shlex.quote(sys.executable)} -m "
                                f"dwiflow.workflows.cluster {shlex.quote(str(job_pkl))}{' --rerun' if rerun else ''}\n")
        return script_dir, batch_script

    async def run(self, job, rerun: bool = False):
        stage = job.name
        cached = None if rerun else job.result()
        if cached is not None and not cached.errored:
            return True  # already in the shared cache: no job to submit
        if not self.submit_jobs:
            raise RuntimeError(self.failures.get(job.checksum, f"stage {stage} was not computed in this submission (an "
                                                          "earlier stage failed or the submission was interrupted)"))
        try:
            return await self._submit_and_wait(job, stage, rerun)
        except Exception as exc:
            self.failures[job.checksum] = str(exc)
            raise

    async def _submit_and_wait(self, job, stage: str, rerun: bool):
        script_dir, batch_script = self._prepare_runscripts(job, rerun=rerun)
        args = shlex.split(self.sbatch_args) + stage_sbatch_arguments(self.resources, stage, self.omp_nthreads)
        if not any(a == "-J" or a.startswith("--job-name") for a in args):
            args.append(f"--job-name=dwiflow.{stage}.{job.uid[:12]}")
        out_log, err_log = script_dir / "slurm-%j.out", script_dir / "slurm-%j.err"
        args += [f"--output={out_log}", f"--error={err_log}"]
        if "--requeue" not in args:
            args.append("--no-requeue")  # a killed job is a failure to report, not a silent retry
        rc, stdout, stderr = await base.read_and_display_async("sbatch", *args, str(batch_script), hide_display=True)
        found = re.search(r"\d+", stdout or "")
        if rc or not found:
            raise RuntimeError(f"sbatch refused the {stage} job ({' '.join(args)}): {' '.join((stderr or stdout).split())}")
        jobid = found.group()
        # the stage's own progress lines go to its job's log on the node: the submitting process says where it is
        run = getattr(getattr(job.hooks, "pre_run_task", None), "run_label", None)
        who = f"{run}: {stage}" if run else stage
        submitted = time.monotonic()
        say(f"[dwiflow]   {who} submitted as slurm job {jobid} ({_resources_of(args)})")
        say(f"[dwiflow]     sbatch {' '.join(a for a in args if not a.startswith('--export'))}", VERBOSE)
        log = Path(str(err_log).replace("%j", jobid))
        misses = 0
        while True:
            await asyncio.sleep(self.poll_delay)
            _, queued, _ = await base.read_and_display_async("squeue", "-h", "-j", jobid, hide_display=True)
            if queued and queued.strip():
                continue
            state, exit_code = await self._end_state(jobid)
            if state is None:  # the accounting database may lag the queue by a moment
                misses += 1
                if misses > self.sacct_retries:
                    raise RuntimeError(f"SLURM job {jobid} ({stage}) left the queue but sacct has no record of it; "
                                       f"sbatch log: {log}")
                continue
            if state in ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED"):
                continue
            if state == "COMPLETED" and exit_code == 0:
                say(f"[dwiflow]   {who} done: slurm job {jobid}, {time.monotonic() - submitted:.1f} s from submission")
                return True
            raise RuntimeError(f"SLURM job {jobid} ({stage}) ended {state} with exit code {exit_code}: "
                               f"{_last_error(log)} (sbatch log: {log})")

    async def _end_state(self, jobid: str) -> tuple[str | None, int]:
        _, stdout, _ = await base.read_and_display_async("sacct", "-n", "-X", "-P", "-j", jobid, "-o", "State,ExitCode",
                                                         hide_display=True)
        line = (stdout or "").strip().splitlines()
        if not line or "|" not in line[0]:
            return None, 0
        state, code = line[0].split("|")[:2]
        return state.split()[0].rstrip("+"), int(code.split(":")[0] or 0)


def _resources_of(args: list[str]) -> str:
    """CPUs and memory of a job from its sbatch arguments, e.g. ``2 CPUs, 4096 MB``."""
    values = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
    cpus = values.get("cpus-per-task", "1")
    parts = [f"{cpus} CPU{'s' if cpus != '1' else ''}"]
    if "mem" in values:
        parts.append(values["mem"].replace("M", " MB") if values["mem"].endswith("M") else values["mem"])
    if "time" in values:
        parts.append(f"time limit {values['time']}")
    return ", ".join(parts)


def _last_error(log: Path) -> str:
    """The last informative line of a job's stderr (the exception), or a note that the log is empty."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no sbatch log was written"
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_.]*(Error|Exception)\b|^[A-Za-z_.]+Error:|^slurmstepd", line):
            return line
    return lines[-1] if lines else "the sbatch log is empty"


def run_job(job_pkl: Path, rerun: bool = False) -> None:
    """Run one pickled Pydra job on a compute node.

    Pydra 1.0a12's ``load_and_run`` hides the error of a job that cannot be unpickled on the node
    (a module or package missing there): its handler for that case fails itself (it takes the
    pickle's path as a string and builds its Result with a wrong keyword). The job is therefore
    unpickled here first, so that such an error ends the job as it is, named in its sbatch log.
    """
    from pydra.engine.job import load_and_run, load_job

    try:
        load_job(job_pkl=Path(job_pkl))
    except Exception:
        print(f"dwiflow: the Pydra job {job_pkl} cannot be unpickled on this node; is dwiflow (and everything the "
              "task refers to) installed here as on the submitting machine?", file=sys.stderr, flush=True)
        raise
    load_and_run(Path(job_pkl), rerun=rerun)


if __name__ == "__main__":
    run_job(Path(sys.argv[1]), rerun="--rerun" in sys.argv[2:])
