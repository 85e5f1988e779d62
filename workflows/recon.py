"""Per-run reconstruction workflow (Pydra) built from a recon spec, and the participant/group levels.

A run's workflow is built from plain values (the recon spec, whether a mask was given), so
only the stages the spec asks for become nodes. The last node stages every output under its
BIDS derivative name; the participant level then copies the staged files into OUTPUT_DIR
atomically (temporary name, then rename), so an interrupted run leaves no half-written
outputs and a rerun resumes from Pydra's cache.
"""

from __future__ import annotations

import json
import logging
import os
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
from dwiflow.tasks.console import complain, say
from dwiflow.tasks.pydra_tasks import Figures, StageDerivatives, code_version, figures_version, stage_task
from dwiflow.tasks.recon_spec import ReconSpec


TIMING_LOG_ENV = "DWIFLOW_TIMING_LOG"  # a JSON-lines file the stages append their timing to (set by the participant level)
_STARTED: dict[str, float] = {}


def _progress(label: str, stage: str) -> TaskHooks:
    """Hooks printing one line when a stage starts computing and when it is done, and recording its duration.

    Pydra calls both hooks in the process that runs the job (a cf worker or a cluster job), only
    when the job computes (not on a cache hit), so the timing log keeps each stage's last real run.
    """

    def started(job) -> None:
        _STARTED[str(job.cache_dir)] = time.time()
        say(f"[dwiflow]   {label}: {stage} ...")

    def finished(job, result) -> None:
        errored = bool(getattr(result, "errored", False))
        t0 = _STARTED.pop(str(job.cache_dir), None)
        took = f" in {time.time() - t0:.1f} s" if t0 is not None else ""
        say(f"[dwiflow]   {label}: {stage} {'FAILED' if errored else 'done'}{took}")
        log = os.environ.get(TIMING_LOG_ENV)
        if log and t0 is not None:
            record = {"run": label, "stage": stage, "seconds": round(time.time() - t0, 3), "errored": errored,
                      "finished": time.time()}
            try:
                with open(log, "a") as handle:
                    handle.write(json.dumps(record) + "\n")
            except OSError:  # timing is informative only
                pass

    started.run_label = label  # read by the SLURM worker, whose progress lines the submitting process prints
    return TaskHooks(pre_run_task=started, post_run_task=finished)


def stages_computed(spec: ReconSpec, mask_given: bool, responses_given: set[str]) -> list[str]:
    """The recon spec's stages a run computes: not the mask stage when a mask is given (``--mask-dir``), nor the
    response stage when group responses (kinds ``response_wm`` …) replace its outputs (``--response-dir``)."""
    return [name for name, configured in spec.stages.items()
            if not ("mask" in configured.stage.provides and mask_given)
            and not any(kind in configured.stage.provides for kind in responses_given)]


def _labelled(label: str) -> TaskHooks:
    """Hooks that print nothing but carry the run's label (for the SLURM worker's lines about the node's job)."""

    def started(job) -> None:
        pass

    started.run_label = label
    return TaskHooks(pre_run_task=started)


def derivative_names(spec: ReconSpec, entities: dict[str, str]) -> dict[str, str]:
    """Output key → BIDS file name of everything a run of ``spec`` stages (from the registry and bids_specs)."""
    from dwiflow.bids_specs.outputs import output_filename

    naming = spec.naming()
    names = {}
    for name, configured in spec.stages.items():
        stage = configured.stage
        for output in stage.writes(configured.options):
            key = stage.output_key(output)
            names[key] = output_filename(key, entities, naming)
    return names


@workflow.define(outputs=["staged", "figures"])
def ReconRun(
    dwi: File,
    bval: File,
    bvec: File,
    entities: dict,
    stages: dict,
    mask: File | None = None,
    response_wm: File | None = None,
    response_gm: File | None = None,
    response_csf: File | None = None,
    code_version: str = code_version(),
    run_folder: str = "",
    source_uris: dict | None = None,
    spatial_reference: str = "",
):
    """One diffusion run through the stages of a recon spec, wired from the stage registry: each stage's inputs
    come from the run or from the stage that provides them (the FOD from the stage of highest FOD priority);
    outputs a folder of staged derivatives and one of QC figures (the figures task never fails the run)."""
    spec = ReconSpec.from_plain(stages)
    naming = spec.naming()
    fod_source = spec.fod_source()
    label = "_".join(f"{k}-{v}" for k, v in entities.items())

    def add(task, name: str):
        return workflow.add(task, name=name, hooks=_progress(label, name))

    available: dict[str, Any] = {"dwi": dwi, "bval": bval, "bvec": bvec}
    latest_fod = None
    staged: dict[str, Any] = {}
    if mask is not None:  # a given mask replaces the mask stage and is staged as its output
        available["mask"] = mask
        staged["mask"] = mask
    given_responses = {kind: value for kind, value in (("response_wm", response_wm), ("response_gm", response_gm),
                                                       ("response_csf", response_csf)) if value is not None}
    available.update(given_responses)  # group responses (--response-dir) replace the per-run ones
    computed = stages_computed(spec, mask is not None, set(given_responses))
    for name, configured in spec.stages.items():
        stage, options = configured.stage, configured.options
        if name not in computed:
            continue
        connected = {given.kind: available[given.kind] for given in stage.inputs
                     if given.kind in available and (given.when is None or given.when(spec))}
        if "fod" not in connected and latest_fod is not None and any(g.kind == "fod" for g in stage.inputs):
            connected["fod"] = latest_fod  # a stage before the FOD source reads the FOD made so far (mtnormalise)
        node = add(stage_task(stage)(options=options.to_dict(), naming=naming, code_version=code_version,
                                     **connected), name)
        for output in stage.writes(options):
            staged[stage.output_key(output)] = getattr(node, output)
        for kind, output in stage.provided(options).items():
            if kind != "fod" or name == fod_source:
                available[kind] = getattr(node, output)
            if kind == "fod":
                latest_fod = getattr(node, output)
    names = derivative_names(spec, entities)
    staging = workflow.add(StageDerivatives(names=names, code_version=code_version, run_folder=run_folder,
                                            source_uris=source_uris, spatial_reference=spatial_reference,
                                            **staged), name="stage_derivatives", hooks=_labelled(label))
    figures = add(Figures(staged=staging.staged, files=names, entities=entities, naming=naming,
                          code_version=f"{code_version}+{figures_version()}"), "figures")
    return staging.staged, figures.figures


# What today's bids-validator (3.x, the test extra's) does not know yet, and only that
# (tests/bep016.unneeded_bidsignore_entries): BEP016 maps, response functions and balance factors, the group summary,
# the HTML reports, MRtrix3 fixel directories and the figure folders (a name without a slash matches at every depth,
# as in .gitignore: the group's figures/ and every sub-*/figures/). The validator skips logs/ (the methods
# paragraphs) by itself.
BIDSIGNORE_PATTERNS = ("*_dwimap.nii.gz", "*_dwimap.json", "*_response.txt", "*_response.json", "*_summary.tsv",
                       "*_factors.txt", "*.html", "figures", "*_fixels")


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
    notes: list[str] = field(default_factory=list)  # warnings about the run for its report (e.g. no given mask)


def output_folder(output_dir: Path, run: DwiRunSpec | dict[str, str]) -> Path:
    """``OUTPUT_DIR/sub-<label>[/ses-<label>]/dwi`` of a run (or of a run's short entities)."""
    ents = run if isinstance(run, dict) else run.short_entities
    folder = output_dir / f"sub-{ents['sub']}"
    if "ses" in ents:
        folder = folder / f"ses-{ents['ses']}"
    return folder / "dwi"


def figures_folder(output_dir: Path, run: DwiRunSpec | dict[str, str]) -> Path:
    """``OUTPUT_DIR/sub-<label>/figures`` (fMRIPrep's place for report figures, sessions included)."""
    ents = run if isinstance(run, dict) else run.short_entities
    return output_dir / f"sub-{ents['sub']}" / "figures"


def publish(staged: Path, target: Path) -> list[Path]:
    """Copy staged derivatives into ``target`` together: every file (or folder: a fixel directory) is copied under a
    temporary name first, then all are renamed; on any failure (a full disk, a signal) the temporary copies are
    removed and none is renamed. A folder replaces an earlier one of its name whole (old one renamed aside, then
    removed), so that it never mixes two runs' files."""
    from dwiflow.tasks.io import copy_path, hold_point, remove_path

    target.mkdir(parents=True, exist_ok=True)
    pending: list[tuple[Path, Path]] = []
    try:
        for src in sorted(Path(staged).iterdir()):
            pending.append((target / f".{src.name}.partial", target / src.name))
            copy_path(src, pending[-1][0])  # replacing what an interrupted publication left
        hold_point("publish")
    except BaseException:
        for tmp, _ in pending:
            remove_path(tmp)
        raise
    for tmp, final in pending:
        if tmp.is_dir() and final.is_dir():
            aside = final.with_name(f".{final.name}.old")
            remove_path(aside)
            os.replace(final, aside)
            os.replace(tmp, final)
            remove_path(aside)
        else:
            os.replace(tmp, final)
    return [final for _, final in pending]


DATASET_NAME = "dwiflow derivatives ({spec})"  # the derivative dataset's Name, which says its recon spec


def dataset_recon_spec(description: dict) -> str | None:
    """The recon spec whose derivatives a dataset_description.json (as a dict) describes, from its Name as
    :func:`write_dataset_description` writes it; None when the Name is not of that form."""
    prefix, suffix = DATASET_NAME.split("{spec}")
    name = str(description.get("Name", ""))
    return name[len(prefix):-len(suffix)] or None if name.startswith(prefix) and name.endswith(suffix) else None


def write_dataset_description(output_dir: Path, bids_dir: Path, recon_spec: ReconSpec,
                              authors: list[str] | None = None, datasets: dict[str, Path] | None = None) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    description = {
        "Name": DATASET_NAME.format(spec=recon_spec.name),
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "Authors": list(authors) if authors else [f"dwiflow {__version__} (automated; --authors names the people)"],
        "GeneratedBy": [{"Name": "dwiflow", "Version": __version__, "CodeURL": "https://github.com/dwiflow/dwiflow",
                         "Description": f"recon spec {recon_spec.name}: {recon_spec.description}"}],
        "SourceDatasets": [{"URL": f"file://{bids_dir.resolve()}"}],
        "DatasetLinks": {name: f"file://{Path(root).resolve()}" for name, root in (datasets or {"raw": bids_dir}).items()},
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
        readme.write_text(f"Diffusion MRI derivatives written by dwiflow {__version__} (recon spec {recon_spec.name}).\n"
                          "Maps follow BEP016 (model-<label>_param-<label>_dwimap); every map has a JSON sidecar with "
                          "its model, parameters, units and orientation encoding.\n")


def bids_uri(path: Path, datasets: dict[str, Path]) -> str | None:
    """The BIDS URI (``bids:<dataset>:<relative path>``) of ``path`` in the innermost of ``datasets`` (name →
    root; the name ``""`` is the derivative dataset itself) that holds it; None when none does."""
    path = Path(path).resolve()
    holders = [(name, root.resolve()) for name, root in datasets.items() if path.is_relative_to(root.resolve())]
    if not holders:
        return None
    name, root = max(holders, key=lambda item: len(item[1].parts))
    return f"bids:{name}:{path.relative_to(root).as_posix()}"


def dataset_links(bids_dir: Path, mask_dir: Path | None = None) -> dict[str, Path]:
    """The datasets a run's inputs come from, by the names their BIDS URIs use (``DatasetLinks``)."""
    links = {"raw": Path(bids_dir)}
    if mask_dir is not None and not Path(mask_dir).resolve().is_relative_to(Path(bids_dir).resolve()):
        links["masks"] = Path(mask_dir)
    return links


def _recon_task(run: DwiRunSpec, stages: dict[str, Any], cv: str, responses: dict[str, Path] | None = None,
                datasets: dict[str, Path] | None = None, output_dir: Path | None = None):
    given = {f"response_{tissue}": File(path) for tissue, path in (responses or {}).items()}
    inputs = [run.dwi, run.bval, run.bvec, run.mask, *(responses or {}).values()]
    places = {**(datasets or {}), **({"": output_dir} if output_dir is not None else {})}
    source_uris = {Path(f).name: uri for f in inputs if f is not None and (uri := bids_uri(f, places)) is not None}
    run_folder = output_folder(Path("."), run).as_posix()
    return ReconRun(dwi=File(run.dwi), bval=File(run.bval), bvec=File(run.bvec), entities=run.short_entities,
                    stages=stages, mask=File(run.mask) if run.mask else None, code_version=cv, run_folder=run_folder,
                    source_uris=source_uris, spatial_reference=source_uris.get(Path(run.dwi).name, ""), **given)


def _all_runs_workflow(runs: list[DwiRunSpec], stages: dict[str, Any], cv: str,
                       responses: dict[str, dict[str, Path]] | None = None, datasets: dict[str, Path] | None = None,
                       output_dir: Path | None = None):
    """One workflow holding every run's ReconRun as a node, so that independent runs proceed in parallel."""

    @workflow.define(outputs=["first"])
    def AllRuns(n_runs: int = len(runs)):
        staged = [workflow.add(_recon_task(run, stages, cv, (responses or {}).get(run.label), datasets, output_dir),
                               name=f"run{i}").staged
                  for i, run in enumerate(runs)]
        return staged[0]

    return AllRuns(n_runs=len(runs))


def run_participant(
    runs: list[DwiRunSpec],
    bids_dir: Path,
    output_dir: Path,
    recon_spec: ReconSpec,
    work_dir: Path,
    worker: Any = "cf",
    worker_options: dict[str, Any] | None = None,
    progress=say,
    responses: dict[str, dict[str, Path]] | None = None,
    warn=None,
    already_warned: dict[str, list[str]] | None = None,
    report_notes: dict[str, list[str]] | None = None,
    authors: list[str] | None = None,
    mask_dir: Path | None = None,
) -> list[RunOutcome]:
    """Run every run's workflow; a failed run is reported (naming its stage) and the others go on.

    Every sidecar's ``Sources`` are BIDS URIs: ``bids:raw:…`` for the input dataset (``bids_dir``), ``bids:masks:…``
    for masks from ``mask_dir`` outside it, ``bids::…`` for this derivative dataset; ``dataset_description.json``
    links the names (``DatasetLinks``).

    ``responses``: run label → group responses by tissue (``wm``, ``gm``, ``csf``; from ``--response-dir``, those
    of the run's b-values) that replace the run's own response stage.

    ``warn`` prints what the outputs' sidecars warn about (default: stderr), except what ``already_warned`` (run
    label → lines printed by the pre-flight checks) holds; ``report_notes`` (run label → lines) are listed among
    the run's warnings in the report.

    ``worker``: a Pydra worker name (debug, cf, slurm, sge) or a worker object (e.g.
    :class:`dwiflow.workflows.cluster.StageSlurmWorker`).
    """
    from dwiflow.workflows.cache import remove_stale_locks, repair_cache, sweep_partial_outputs, use_work_dir_hash_cache
    from dwiflow.workflows.workers import LocalProcessWorker, PromptSubmitter, interrupted

    if warn is None:
        def warn(message: str) -> None:
            complain(f"dwiflow: warning: {message}")

    invocation_start = time.time()
    use_work_dir_hash_cache(work_dir)
    remove_stale_locks(work_dir)  # one dwiflow process per work dir (the BIDS App claims it): all are leftovers
    removed = repair_cache(work_dir / "cache")
    if removed:
        progress(f"[dwiflow] {len(removed)} cached result(s) unusable (failed, interrupted or damaged): they are recomputed")
    sweep_partial_outputs(output_dir)
    datasets = dataset_links(bids_dir, mask_dir)
    write_dataset_description(output_dir, bids_dir, recon_spec, authors, datasets)
    timing_log = work_dir / "logs" / "timings.jsonl"
    timing_log.parent.mkdir(parents=True, exist_ok=True)
    os.environ[TIMING_LOG_ENV] = str(timing_log)  # read by the stage hooks in the worker processes / cluster jobs
    cv = code_version()
    outcomes = []
    stages = recon_spec.to_plain()
    worker_name = worker if isinstance(worker, str) else worker.plugin_name()

    def fresh_worker():  # each Submitter closes its worker; local processes end with this one (LocalProcessWorker)
        if worker == "cf":
            return LocalProcessWorker(**(worker_options or {})).start_handing_over_the_dwi()
        return worker

    pydra_options = {} if worker == "cf" else dict(worker_options or {})
    if worker_name != "debug" and len(runs) > 1:
        # Phase 1: every run in one graph, so the worker runs independent runs concurrently (cf) or queues all of
        # their jobs at once (slurm/sge). Failures are collected per run in phase 2, where finished runs are
        # cache hits and a failed run fails again with its own error.
        progress(f"[dwiflow] {len(runs)} runs submitted together ({worker_name} worker)")
        # Pydra logs a failure of this graph ("Task execution failed", a crash-report path) on stderr; the runs'
        # own errors are reported below, one line each
        submitter_log = logging.getLogger("pydra.submitter")
        level = submitter_log.level
        submitter_log.setLevel(logging.CRITICAL)
        try:
            with PromptSubmitter(cache_root=work_dir / "cache", worker=fresh_worker(), clean_stale_locks=True,
                                 **pydra_options) as submitter:
                submitter(_all_runs_workflow(runs, stages, cv, responses, datasets, output_dir), raise_errors=False)
        except Exception as exc:  # reported per run below
            if interrupted():
                raise KeyboardInterrupt from exc
            progress(f"[dwiflow]   some runs failed ({_last_line(str(exc)) or type(exc).__name__}); details per run follow")
        finally:
            submitter_log.setLevel(level)
    if hasattr(worker, "submit_jobs") and len(runs) > 1:
        # a cluster worker reports each run from the shared cache and the failures of phase 1; it does not
        # resubmit (a resubmission of the command recomputes what is missing)
        worker.submit_jobs = False
    for index, run in enumerate(runs, 1):
        t0 = time.perf_counter()
        started = time.time()
        run_responses = (responses or {}).get(run.label)
        given = {f"response_{tissue}" for tissue in run_responses or {}}
        names = stages_computed(recon_spec, run.mask is not None, given)
        progress(f"[dwiflow] run {index}/{len(runs)} {run.label}: stages {', '.join(names)}")
        task = _recon_task(run, stages, cv, run_responses, datasets, output_dir)
        log = work_dir / "logs" / f"{run.label}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        try:
            # locks older than this run are stale (a killed earlier run): one dwiflow process per work dir
            with PromptSubmitter(cache_root=work_dir / "cache", worker=fresh_worker(), clean_stale_locks=True,
                                 **pydra_options) as submitter:
                result = submitter(task, raise_errors=True)
            if result.errored:
                raise RuntimeError(f"workflow errored; see {result.cache_dir}")
            files = publish(Path(result.outputs.staged), output_folder(output_dir, run))
            figures = publish(Path(result.outputs.figures), figures_folder(output_dir, run))
            write_run_methods(output_dir, run, recon_spec, run_responses)
            outcome = RunOutcome(run, True, files, seconds=time.perf_counter() - t0, figures=figures)
            computed = _computed_seconds(timing_log, run.label, invocation_start)
            how = (f"stages computed in {computed:.1f} s" if computed is not None
                   else "every stage from the cache")
            progress(f"[dwiflow]   {run.label} done ({how}): {len(files)} files in {output_folder(output_dir, run)}")
            printed = (already_warned or {}).get(run.label, [])
            for note in output_warnings(files):
                if not any(line.endswith(note) for line in printed):  # the pre-flight checks printed it already
                    warn(f"{run.label}: {note}")
        except Exception as exc:  # a failed run must not stop the others
            if interrupted():
                raise KeyboardInterrupt from exc
            details = task_errors(work_dir / "cache", since=started)
            try:
                log.write_text("".join(traceback.format_exception(exc))
                               + "".join(f"\n--- {where}\n{text}" for where, text in details))
            except OSError:  # a full disk must not hide the run's own error
                pass
            if details:  # a stage's own error names the stage; a workflow's (a job not submitted) says itself
                where, text = details[-1]
                message = f"{where}: {_last_line(text)}" if where.startswith("stage ") else _last_line(text)
            else:
                message = _last_line(str(exc)) or type(exc).__name__
            outcome = RunOutcome(run, False, error=message, log=log, seconds=time.perf_counter() - t0)
            progress(f"[dwiflow]   FAILED {run.label}: {message} (log: {log})")
        outcomes.append(outcome)
    for outcome in outcomes:
        outcome.notes = list((report_notes or {}).get(outcome.run.label, []))
    write_reports(outcomes, output_dir, recon_spec, timing_log, progress)
    return outcomes


def earlier_runs(output_dir: Path, subject: str, known: set[str]) -> list:
    """Reports of the subject's runs published by earlier invocations (another session, other runs) and not in
    ``known``: found from their figure manifests, so that a subject's report keeps every run in the dataset."""
    from dwiflow.bids_specs.outputs import entities_from_filename, output_filename
    from dwiflow.tasks.report import RunReport

    figures = figures_folder(output_dir, {"sub": subject})
    tail = output_filename("figures_manifest", {}).lstrip("_")
    found = []
    for manifest in sorted(figures.glob(f"sub-{subject}_*{tail}")):
        entities = {k: v for k, v in entities_from_filename(manifest.name).items() if k != "desc"}
        label = "_".join(f"{k}-{v}" for k, v in entities.items())
        if not entities or label in known:
            continue
        folder = output_folder(output_dir, entities)
        files = sorted(p for p in folder.glob(f"{label}_*") if p.is_file())
        found.append(RunReport(label, entities, True, derivative_dir=folder, figures_dir=figures, files=files,
                               error="", log="", seconds=0.0, methods=methods_path(output_dir, label)))
    return found


def methods_path(output_dir: Path, label: str) -> Path:
    """``OUTPUT_DIR/logs/<run label>_methods.md``: the run's methods paragraph (as fMRIPrep's logs/CITATION.md)."""
    return output_dir / "logs" / f"{label}_methods.md"


def write_run_methods(output_dir: Path, run: DwiRunSpec, recon_spec: ReconSpec,
                      group_responses: dict[str, Path] | None = None) -> Path:
    """The run's methods paragraph, from the recon spec, its options and the run's acquisition."""
    import nibabel as nib

    from dwiflow.tasks.methods import acquisition_sentence, methods_markdown, write_methods

    header = nib.load(str(run.dwi)).header
    acquisition = acquisition_sentence(run.bval, tuple(header.get_data_shape()), tuple(header.get_zooms()))
    text = methods_markdown(recon_spec, run.label, acquisition, given_mask=run.mask is not None,
                            group_responses=group_responses)
    return write_methods(methods_path(output_dir, run.label), text)


def output_warnings(files: list[Path]) -> list[str]:
    """The ``Warnings`` the stages wrote into the sidecars of a run's outputs (what the data could not support),
    each once, in file order."""
    from dwiflow.tasks.report import read_sidecars

    notes: list[str] = []
    for _, content in read_sidecars(files):
        for note in content.get("Warnings", []):
            if note not in notes:
                notes.append(note)
    return notes


def _computed_seconds(timing_log: Path, label: str, since: float) -> float | None:
    """Seconds the stages of run ``label`` computed during this invocation (from the timing log); None if every
    stage came from the cache. Runs submitted together overlap, so their wall-clock time is not theirs alone."""
    from dwiflow.tasks.report import read_timing_records

    seconds = [rec["seconds"] for rec in read_timing_records(timing_log)
               if rec.get("run") == label and rec.get("finished", 0) >= since]
    return float(sum(seconds)) if seconds else None


def write_reports(outcomes: list[RunOutcome], output_dir: Path, recon_spec: ReconSpec, timing_log: Path | None,
                  progress=say) -> list[Path]:
    """One HTML report per subject of ``outcomes``; a report that cannot be written is reported, never fatal."""
    from dwiflow.tasks.report import RunReport, subject_report

    by_subject: dict[str, list[RunOutcome]] = {}
    for outcome in outcomes:
        by_subject.setdefault(outcome.run.short_entities["sub"], []).append(outcome)
    written = []
    for subject, runs in by_subject.items():
        reports = [RunReport(o.run.label, o.run.short_entities, o.ok, o.error, str(o.log or ""), o.seconds,
                             figures_folder(output_dir, o.run), output_folder(output_dir, o.run), o.files,
                             notes=list(o.notes), methods=methods_path(output_dir, o.run.label) if o.ok else None)
                   for o in runs]
        reports += earlier_runs(output_dir, subject, {r.label for r in reports})
        reports.sort(key=lambda r: r.label)
        try:
            written.append(subject_report(output_dir, subject, reports, recon_spec.summary(), timing_log))
            progress(f"[dwiflow] report: {written[-1]}")
        except Exception as exc:  # a report never fails the run
            progress(f"[dwiflow] WARNING: the report of sub-{subject} could not be written: {exc}")
    return written


def _last_line(text: str) -> str:
    """The last meaningful line of an error text, without the class path of dwiflow's own stage error (a
    stage's message is for the user as it stands)."""
    lines = [line for line in text.strip().splitlines() if line.strip() and not line.startswith("See output directory")]
    last = lines[-1].strip() if lines else ""
    for prefix in ("dwiflow.tasks.pydra_tasks.StageError: ", "StageError: "):
        if last.startswith(prefix):
            return last[len(prefix):]
    return last


def _stage_nodes() -> set[str]:
    """The Pydra node names of a run's stages (the workflows around them have other names)."""
    from dwiflow.tasks.registry import stages

    return {*stages(), "figures", "stage_derivatives"}


def _stage_of(task_dir: Path) -> str:
    """``stage <name>`` or ``workflow <name>`` (Pydra node name) whose cache directory this is, from its saved job;
    else the directory name."""
    import cloudpickle

    try:
        with open(task_dir / "_job.pklz", "rb") as handle:
            name = cloudpickle.load(handle).name
    except Exception:
        return task_dir.name
    return f"{'stage' if name in _stage_nodes() else 'workflow'} {name}"


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
    # the stages' own errors are the most specific: put them last (after those of the workflows around them, which
    # only say that a node failed, whatever the names sort like)
    return sorted(found, key=lambda item: (item[0].startswith("stage "), item[0]))


def run_group(output_dir: Path, progress=say, participants: list[str] | None = None) -> Path:
    """The group level: the group responses (:func:`dwiflow.tasks.group.group_responses`), one TSV of per-run
    summary statistics and the dataset summary page (:func:`dwiflow.tasks.group.group_summary`), over the runs of
    ``participants`` when given (BIDS Apps' ``--participant-label`` at the group level), else of all."""
    from dwiflow.tasks.group import check_participants, group_responses, group_summary

    check_participants(output_dir, participants)
    group_responses(output_dir, progress, participants)
    return group_summary(output_dir, progress, participants)
