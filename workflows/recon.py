"""Per-run reconstruction workflow (Pydra) built from a recon spec, and the participant/group levels.

A run's workflow is built from plain values (the recon spec, whether a mask was given), so
only the stages the spec asks for become nodes. The last node stages every output under its
BIDS derivative name; the participant level then copies the staged files into OUTPUT_DIR
atomically (temporary name, then rename), so an interrupted run leaves no half-written
outputs and a rerun resumes from Pydra's cache.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fileformats.generic import File
from pydra.compose import workflow
from pydra.engine.hooks import TaskHooks

from dwiflow._version import __version__
from dwiflow.bids_specs.inputs import DwiRunSpec
from dwiflow.tasks.pydra_tasks import (
    BrainMask,
    Csd,
    Figures,
    FodMetrics,
    Peaks,
    MAPMRI_TASK_OUTPUTS,
    Mapmri,
    Response,
    Rumba,
    SMT_TASK_OUTPUTS,
    Smt,
    RUMBA_TASK_OUTPUTS,
    StageDerivatives,
    Tensor,
    code_version,
    figures_version,
)


TIMING_LOG_ENV = "DWIFLOW_TIMING_LOG"  # a JSON-lines file the stages append their timing to (set by the participant level)
_STARTED: dict[str, float] = {}


def _progress(label: str, stage: str) -> TaskHooks:
    """Hooks printing one line when a stage starts computing and when it is done, and recording its duration.

    Pydra calls both hooks in the process that runs the job (a cf worker or a cluster job), only
    when the job computes (not on a cache hit), so the timing log keeps each stage's last real run.
    """

    def started(job) -> None:
        _STARTED[str(job.cache_dir)] = time.time()
        print(f"[dwiflow]   {label}: {stage} ...", flush=True)

    def finished(job, result) -> None:
        errored = bool(getattr(result, "errored", False))
        print(f"[dwiflow]   {label}: {stage} {'FAILED' if errored else 'done'}", flush=True)
        t0 = _STARTED.pop(str(job.cache_dir), None)
        log = os.environ.get(TIMING_LOG_ENV)
        if log and t0 is not None:
            record = {"run": label, "stage": stage, "seconds": round(time.time() - t0, 3), "errored": errored,
                      "finished": time.time()}
            try:
                with open(log, "a") as handle:
                    handle.write(json.dumps(record) + "\n")
            except OSError:  # timing is informative only
                pass

    return TaskHooks(pre_run_task=started, post_run_task=finished)


@workflow.define(outputs=["staged", "figures"])
def ReconRun(
    dwi: File,
    bval: File,
    bvec: File,
    entities: dict,
    stages: dict,
    mask: File | None = None,
    code_version: str = "",
):
    """One diffusion run through the stages of a recon spec; outputs a folder of staged derivatives and one of
    QC figures (drawn from the staged derivatives; the figures task never fails the run)."""
    cv = code_version
    label = "_".join(f"{k}-{v}" for k, v in entities.items())

    def add(task, name: str):
        return workflow.add(task, name=name, hooks=_progress(label, name))

    outputs: dict[str, Any] = {}
    if mask is None:
        mask = add(BrainMask(dwi=dwi, bval=bval, bvec=bvec, code_version=cv), "mask").mask
    outputs["mask"] = mask  # given or computed, the mask used is part of the derivatives
    if "tensor" in stages:
        tensor = add(Tensor(dwi=dwi, bval=bval, bvec=bvec, mask=mask, code_version=cv), "tensor")
        outputs.update(fa=tensor.fa, md=tensor.md, ad=tensor.ad, rd=tensor.rd, v1=tensor.v1, s0=tensor.s0,
                       tensor_status=tensor.status)
    method = ""
    if "response" in stages:
        method = stages["response"].get("method", "fa")
        response_task = add(Response(dwi=dwi, bval=bval, bvec=bvec, mask=mask, method=method,
                                     options=stages["response"].get("options") or {}, code_version=cv), "response")
        response = response_task.response
        outputs.update(response=response, response_voxels=response_task.voxels)
    if "csd" in stages:
        csd = add(Csd(dwi=dwi, bval=bval, bvec=bvec, response=response, mask=mask,
                      lmax=stages["csd"].get("lmax"), code_version=cv), "csd")
        outputs.update(fod=csd.fod, csd_status=csd.status)
    fod, fod_model = (csd.fod, "csd") if "csd" in stages else (None, "")
    if "rumba" in stages:
        options = dict(stages["rumba"])
        # an SSST response (tensor eigenvalues) replaces RUMBA-SD's default white-matter response
        use_response = options.pop("use_response", True) and method == "ssst"
        rumba = add(Rumba(dwi=dwi, bval=bval, bvec=bvec, mask=mask, response=response if use_response else None,
                          options=options, code_version=cv), "rumba")
        outputs.update({f"rumba_{n}": getattr(rumba, n) for n in RUMBA_TASK_OUTPUTS})
        fod, fod_model = rumba.fod, "rumba"
    if "mapmri" in stages:
        mapmri = add(Mapmri(dwi=dwi, bval=bval, bvec=bvec, mask=mask, options=dict(stages["mapmri"]), code_version=cv),
                     "mapmri")
        outputs.update({f"mapmri_{n}": getattr(mapmri, n) for n in MAPMRI_TASK_OUTPUTS})
        if fod is None:
            fod, fod_model = mapmri.odf, "mapmri"
    if "smt" in stages:
        smt = add(Smt(dwi=dwi, bval=bval, bvec=bvec, mask=mask, options=dict(stages["smt"]), code_version=cv), "smt")
        outputs.update({f"smt_{n}": getattr(smt, n) for n in SMT_TASK_OUTPUTS})
        if fod is None and stages["smt"].get("fod", "watson") != "none":
            fod, fod_model = smt.fod, "smt"
    if "peaks" in stages:
        opts = stages["peaks"]
        peaks = add(Peaks(fod=fod, mask=mask, npeaks=opts.get("npeaks", 3),
                          rel_threshold=opts.get("rel_threshold", 0.2),
                          min_separation=opts.get("min_separation", 25.0),
                          subtract_psf=bool(opts.get("subtract_psf", False)), code_version=cv), "peaks").peaks
        outputs["peaks"] = peaks
    if "fod_metrics" in stages:
        metrics = add(FodMetrics(fod=fod, peaks=peaks, code_version=cv), "fod_metrics")
        outputs.update(afd_total=metrics.afd_total, peak_amplitude=metrics.peak_amplitude, nufo=metrics.nufo,
                       gfa=metrics.gfa)
    staged = workflow.add(StageDerivatives(entities=entities, response_method=method, fod_model=fod_model or "csd",
                                           code_version=cv, **outputs),
                          name="stage_derivatives")
    figures = add(Figures(staged=staged.staged, entities=entities, fod_model=fod_model or "csd",
                          response_method=method, code_version=f"{cv}+{figures_version()}"), "figures")
    return staged.staged, figures.figures


BIDSIGNORE_PATTERNS = ("*_dwimap.nii.gz", "*_dwimap.json", "*_response.txt", "*_response.json", "*_summary.tsv",
                       "*.html", "figures", "sub-*/figures")


@dataclass
class RunOutcome:
    """What happened to one run."""

    run: DwiRunSpec
    ok: bool
    files: list[Path] = field(default_factory=list)
    error: str = ""
    log: Path | None = None
    seconds: float = 0.0
    figures: list[Path] = field(default_factory=list)


def output_folder(output_dir: Path, run: DwiRunSpec) -> Path:
    ents = run.short_entities
    folder = output_dir / f"sub-{ents['sub']}"
    if "ses" in ents:
        folder = folder / f"ses-{ents['ses']}"
    return folder / "dwi"


def figures_folder(output_dir: Path, run: DwiRunSpec) -> Path:
    """``OUTPUT_DIR/sub-<label>/figures`` (fMRIPrep's place for report figures, sessions included)."""
    return output_dir / f"sub-{run.short_entities['sub']}" / "figures"


def publish(staged: Path, target: Path) -> list[Path]:
    """Copy staged derivatives into ``target`` atomically (temporary name, then rename)."""
    target.mkdir(parents=True, exist_ok=True)
    written = []
    pending = []
    for src in sorted(Path(staged).iterdir()):
        tmp = target / f".{src.name}.partial"
        shutil.copyfile(src, tmp)
        pending.append((tmp, target / src.name))
    for tmp, final in pending:
        os.replace(tmp, final)
        written.append(final)
    return written


def write_dataset_description(output_dir: Path, bids_dir: Path, recon_spec: dict[str, Any]) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    description = {
        "Name": f"dwiflow derivatives ({recon_spec['name']})",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "dwiflow", "Version": __version__, "CodeURL": "https://github.com/dwiflow/dwiflow",
                         "Description": f"recon spec {recon_spec['name']}: {recon_spec['description']}"}],
        "SourceDatasets": [{"URL": f"file://{bids_dir.resolve()}"}],
    }
    path = output_dir / "dataset_description.json"
    tmp = output_dir / ".dataset_description.json.partial"
    tmp.write_text(json.dumps(description, indent=2) + "\n")
    os.replace(tmp, path)
    # BEP016 maps, response functions and the group summary are not in the released BIDS schema
    # yet; the validator asks for them to be listed here.
    ignore = output_dir / ".bidsignore"
    ignore.write_text("\n".join(BIDSIGNORE_PATTERNS) + "\n")
    readme = output_dir / "README"
    if not readme.exists():
        readme.write_text(f"Diffusion MRI derivatives written by dwiflow {__version__} (recon spec {recon_spec['name']}).\n"
                          "Maps follow BEP016 (model-<label>_param-<label>_dwimap); every map has a JSON sidecar with "
                          "its model, parameters, units and orientation encoding.\n")


def _recon_task(run: DwiRunSpec, stages: dict[str, Any], cv: str):
    return ReconRun(dwi=File(run.dwi), bval=File(run.bval), bvec=File(run.bvec), entities=run.short_entities,
                    stages=stages, mask=File(run.mask) if run.mask else None, code_version=cv)


def _all_runs_workflow(runs: list[DwiRunSpec], stages: dict[str, Any], cv: str):
    """One workflow holding every run's ReconRun as a node, so that independent runs proceed in parallel."""

    @workflow.define(outputs=["first"])
    def AllRuns(n_runs: int = len(runs)):
        staged = [workflow.add(_recon_task(run, stages, cv), name=f"run{i}").staged for i, run in enumerate(runs)]
        return staged[0]

    return AllRuns(n_runs=len(runs))


def run_participant(
    runs: list[DwiRunSpec],
    bids_dir: Path,
    output_dir: Path,
    recon_spec: dict[str, Any],
    work_dir: Path,
    worker: Any = "cf",
    worker_options: dict[str, Any] | None = None,
    progress=print,
) -> list[RunOutcome]:
    """Run every run's workflow; a failed run is reported (naming its stage) and the others go on.

    ``worker``: a Pydra worker name (debug, cf, slurm, sge) or a worker object (e.g.
    :class:`dwiflow.workflows.cluster.StageSlurmWorker`).
    """
    from pydra.engine.submitter import Submitter

    write_dataset_description(output_dir, bids_dir, recon_spec)
    timing_log = work_dir / "logs" / "timings.jsonl"
    timing_log.parent.mkdir(parents=True, exist_ok=True)
    os.environ[TIMING_LOG_ENV] = str(timing_log)  # read by the stage hooks in the worker processes / cluster jobs
    cv = code_version()
    outcomes = []
    stages = recon_spec["stages"]
    worker_name = worker if isinstance(worker, str) else worker.plugin_name()
    if worker_name != "debug" and len(runs) > 1:
        # Phase 1: every run in one graph, so the worker runs independent runs concurrently (cf) or queues all of
        # their jobs at once (slurm/sge). Failures are collected per run in phase 2, where finished runs are
        # cache hits and a failed run fails again with its own error.
        progress(f"[dwiflow] {len(runs)} runs submitted together ({worker_name} worker)")
        try:
            with Submitter(cache_root=work_dir / "cache", worker=worker, clean_stale_locks=True,
                           **(worker_options or {})) as submitter:
                submitter(_all_runs_workflow(runs, stages, cv), raise_errors=False)
        except Exception as exc:  # reported per run below
            progress(f"[dwiflow]   some runs failed ({_last_line(str(exc)) or type(exc).__name__}); details per run follow")
    if hasattr(worker, "submit_jobs") and len(runs) > 1:
        # a cluster worker reports each run from the shared cache and the failures of phase 1; it does not
        # resubmit (a resubmission of the command recomputes what is missing)
        worker.submit_jobs = False
    for index, run in enumerate(runs, 1):
        t0 = time.perf_counter()
        started = time.time()
        progress(f"[dwiflow] run {index}/{len(runs)} {run.label}: stages {', '.join(stages)}")
        task = _recon_task(run, stages, cv)
        log = work_dir / "logs" / f"{run.label}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        try:
            # locks older than this run are stale (a killed earlier run): one dwiflow process per work dir
            with Submitter(cache_root=work_dir / "cache", worker=worker, clean_stale_locks=True,
                           **(worker_options or {})) as submitter:
                result = submitter(task, raise_errors=True)
            if result.errored:
                raise RuntimeError(f"workflow errored; see {result.cache_dir}")
            files = publish(Path(result.outputs.staged), output_folder(output_dir, run))
            figures = publish(Path(result.outputs.figures), figures_folder(output_dir, run))
            outcome = RunOutcome(run, True, files, seconds=time.perf_counter() - t0, figures=figures)
            progress(f"[dwiflow]   done in {outcome.seconds:.1f} s: {len(files)} files in {output_folder(output_dir, run)}")
        except Exception as exc:  # a failed run must not stop the others
            details = task_errors(work_dir / "cache", since=started)
            log.write_text("".join(traceback.format_exception(exc)) + "".join(f"\n--- {where}\n{text}" for where, text in details))
            message = (f"{details[-1][0]}: {_last_line(details[-1][1])}" if details
                       else (_last_line(str(exc)) or type(exc).__name__))
            outcome = RunOutcome(run, False, error=message, log=log, seconds=time.perf_counter() - t0)
            progress(f"[dwiflow]   FAILED {run.label}: {message} (log: {log})")
        outcomes.append(outcome)
    write_reports(outcomes, output_dir, recon_spec, timing_log, progress)
    return outcomes


def write_reports(outcomes: list[RunOutcome], output_dir: Path, recon_spec: dict[str, Any], timing_log: Path | None,
                  progress=print) -> list[Path]:
    """One HTML report per subject of ``outcomes``; a report that cannot be written is reported, never fatal."""
    from dwiflow.tasks.report import RunReport, subject_report

    by_subject: dict[str, list[RunOutcome]] = {}
    for outcome in outcomes:
        by_subject.setdefault(outcome.run.short_entities["sub"], []).append(outcome)
    written = []
    for subject, runs in by_subject.items():
        reports = [RunReport(o.run.label, o.run.short_entities, o.ok, o.error, str(o.log or ""), o.seconds,
                             figures_folder(output_dir, o.run), output_folder(output_dir, o.run), o.files)
                   for o in runs]
        try:
            written.append(subject_report(output_dir, subject, reports, recon_spec, timing_log))
            progress(f"[dwiflow] report: {written[-1]}")
        except Exception as exc:  # a report never fails the run
            progress(f"[dwiflow] WARNING: the report of sub-{subject} could not be written: {exc}")
    return written


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip() and not line.startswith("See output directory")]
    return lines[-1].strip() if lines else ""


def _stage_of(task_dir: Path) -> str:
    """The stage (Pydra node name) whose cache directory this is, from its saved job; else the directory name."""
    import cloudpickle

    try:
        with open(task_dir / "_job.pklz", "rb") as handle:
            return f"stage {cloudpickle.load(handle).name}"
    except Exception:
        return task_dir.name


def task_errors(cache: Path, since: float) -> list[tuple[str, str]]:
    """Tracebacks Pydra saved for failed tasks (``_error.pklz``) since ``since``, innermost last.

    Non-debug workers only say "see output directory"; this brings the real error (the task's
    own exception) into the run's log and its one-line report.
    """
    import cloudpickle

    found = []
    for path in cache.glob("*/_error.pklz"):
        if path.stat().st_mtime < since - 1:
            continue
        try:
            with open(path, "rb") as handle:
                content = cloudpickle.load(handle)
            text = "".join(content.get("error message", [])) if isinstance(content, dict) else str(content)
        except Exception as exc:  # an unreadable error file must not hide the others
            text = f"(could not read {path}: {exc})"
        found.append((_stage_of(path.parent), text))
    # python tasks' own errors (named by their stage) are the most specific: put them last
    return sorted(found, key=lambda item: (item[0].startswith("stage "), item[0]))


SUMMARY_COLUMNS = ("run", "voxels_in_mask", "mean_fa", "mean_md", "mean_afd_total", "response_l0")


def run_group(output_dir: Path, progress=print) -> Path:
    """One TSV of per-run summary statistics over the whole derivative dataset."""
    import nibabel as nib
    import numpy as np

    from dwiflow.core.response import ResponseFunction

    from dwiflow.bids_specs.outputs import output_filename

    fa_name = output_filename("tensor_fa", {})  # names relative to a run: <run entities>_<name>
    mask_name = output_filename("brain_mask", {})
    rows = []
    for fa_path in sorted(output_dir.rglob(f"*_{fa_name}")):
        label = fa_path.name[: -len(fa_name) - 1]
        folder = fa_path.parent

        def find(pattern: str) -> Path | None:
            hits = sorted(folder.glob(f"{label}_{pattern}"))
            return hits[0] if hits else None

        mask_path = find(mask_name)
        mask = nib.load(mask_path).get_fdata() > 0 if mask_path else None
        values: dict[str, Any] = {"run": label}

        def mean_of(pattern: str) -> str:
            path = find(pattern)
            if path is None:
                return "n/a"
            data = nib.load(path).get_fdata()
            sel = mask if mask is not None else np.isfinite(data)
            return f"{np.nanmean(data[sel]):.6g}"

        values["voxels_in_mask"] = str(int(mask.sum())) if mask is not None else "n/a"
        values["mean_fa"] = mean_of(fa_name)
        values["mean_md"] = mean_of(output_filename("tensor_md", {}))
        values["mean_afd_total"] = mean_of(output_filename("afd_total", {"model": "*"}))
        response = find(output_filename("response", {"model": "*", "desc": "*"}))
        values["response_l0"] = (",".join(f"{c:.6g}" for c in ResponseFunction.from_text(response.read_text()).coefficients[:, 0])
                                 if response else "n/a")
        rows.append(values)
    if not rows:
        raise FileNotFoundError(f"no participant-level outputs found in {output_dir}; run the participant level first")
    path = output_dir / output_filename("group_summary", {})
    tmp = output_dir / f".{path.name}.partial"
    tmp.write_text("\t".join(SUMMARY_COLUMNS) + "\n" + "".join("\t".join(r[c] for c in SUMMARY_COLUMNS) + "\n" for r in rows))
    os.replace(tmp, path)
    progress(f"[dwiflow] group summary of {len(rows)} run(s): {path}")
    try:
        page = _dataset_summary(output_dir, path)
        progress(f"[dwiflow] dataset summary page: {page}")
    except Exception as exc:  # the page is a view of the table; it never fails the group level
        progress(f"[dwiflow] WARNING: the dataset summary page could not be written: {exc}")
    return path


# (metric label, output key, entities to fill) drawn as distributions on the dataset summary page
DISTRIBUTION_METRICS = (("FA", "tensor_fa", {}), ("MD", "tensor_md", {}), ("AFD total", "afd_total", {"model": "*"}),
                        ("RUMBA-SD f_wm", "rumba_fwm", {}), ("MAP-MRI RTOP", "mapmri_rtop", {}),
                        ("SMT lambda_par", "smt_lpar", {}), ("SMT ODI", "smt_odi", {}))


def _dataset_summary(output_dir: Path, summary_tsv: Path) -> Path:
    """The group-level HTML page: the summary table and each metric's distribution per run."""
    import nibabel as nib
    import numpy as np

    from dwiflow.bids_specs.outputs import output_filename, output_spec
    from dwiflow.tasks.figures import distribution_figure
    from dwiflow.tasks.report import dataset_summary_page

    mask_name = output_filename("brain_mask", {})
    mask_paths = {p.name[: -len(mask_name) - 1]: p for p in sorted(output_dir.glob(f"sub-*/**/*_{mask_name}"))}
    masks: dict[str, np.ndarray] = {}  # each run's mask, read once
    distributions = []
    for label, key, entities in DISTRIBUTION_METRICS:
        name = output_filename(key, entities)
        values = {}
        for run, mask_path in mask_paths.items():
            hits = sorted(mask_path.parent.glob(f"{run}_{name}"))
            if hits:
                if run not in masks:
                    masks[run] = nib.load(mask_path).get_fdata() > 0
                values[run] = np.asarray(nib.load(hits[0]).dataobj, dtype=np.float32)[masks[run]]
        if not values:
            continue  # no run has this metric: no panel
        figure = output_dir / "figures" / output_filename("qc_distribution", {"desc": key.replace("_", "")})
        try:
            distributions.append((label, distribution_figure(figure, label, values, output_spec(key).get("Units", "")), ""))
        except Exception as exc:  # a figure that cannot be drawn becomes a note
            distributions.append((label, None, f"not drawn: {exc}"))
    subjects = sorted({run.split("_")[0].removeprefix("sub-") for run in mask_paths})
    return dataset_summary_page(output_dir, summary_tsv, distributions, subjects)
