"""``dwiflow``: the BIDS App. ``dwiflow BIDS_DIR OUTPUT_DIR {participant,group} [options]``.

Runs every DWI run of the selected participants through a recon spec (Pydra workflows with a
cache in ``--work-dir``), writes a BIDS derivative dataset, and at the group level one TSV of
per-run summary statistics. Exit codes: 0 success, 1 some runs failed (each named with its log),
2 bad input (nothing written).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dwiflow._version import __version__
from dwiflow.tasks.console import complain, say

EXIT_RUN_FAILED = 1
EXIT_INPUT_ERROR = 2


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dwiflow", description=(__doc__ or "").replace("``", ""),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bids_dir", type=Path, help="the BIDS dataset (preprocessed DWI)")
    p.add_argument("output_dir", type=Path, help="where the derivative dataset is written")
    p.add_argument("analysis_level", choices=("participant", "group"),
                   help="participant: every selected run through the recon spec; group: the dataset summary and the "
                        "group-average responses, from OUTPUT_DIR")
    p.add_argument("--participant-label", "--participant_label", nargs="+", metavar="LABEL",
                   help="participants to analyse (with or without sub-; default all); at the group level, the runs "
                        "the group responses and the summary cover")
    p.add_argument("--session-label", "--session_label", nargs="+", metavar="LABEL",
                   help="sessions to analyse (with or without ses-; default all)")
    p.add_argument("--bids-filter-file", type=Path, metavar="FILE", help="JSON of pybids entities for the DWI query")
    from dwiflow.tasks.recon_spec import builtin_specs

    p.add_argument("--recon-spec", "--recon_spec", default="csd", metavar="NAME|FILE",
                   help=f"a built-in recon spec ({', '.join(builtin_specs())}) or a YAML file (default csd)")
    p.add_argument("--mask-dir", type=Path, help="derivative dataset with *_desc-brain_mask images to use")
    p.add_argument("--response-dir", type=Path,
                   help="folder with group responses (the group level's *_desc-{wm,gm,csf}group*_response.txt): every "
                        "run is deconvolved with those of its b-values instead of its own (recon spec msmt); overrides "
                        "the recon spec's response_dir")
    p.add_argument("-w", "--work-dir", type=Path,
                   help="Pydra cache: keep it for fast reruns (default: outside the derivative dataset, in "
                        "$XDG_CACHE_HOME/dwiflow/, else ~/.cache/dwiflow/, one folder per OUTPUT_DIR and "
                        "--participant-label/--session-label/--bids-filter-file selection)")
    p.add_argument("--clean-workdir", action="store_true",
                   help="remove the work directory after a run in which every run succeeded (a rerun then "
                        "recomputes everything)")
    p.add_argument("--worker", choices=("debug", "cf", "slurm", "sge"), default="cf",
                   help="where the stages run: debug (this process, one after another), cf (local processes; "
                        "default), slurm or sge (one cluster job per stage)")
    p.add_argument("--nprocs", type=_positive_int,
                   help="processes for the cf worker (default: one per CPU this process may use)")
    p.add_argument("--omp-nthreads", type=_positive_int,
                   help="threads per task (numba/BLAS; default: every CPU, or on a cluster the stage's cpus)")
    p.add_argument("--sbatch-args", default="", help="extra sbatch arguments for the slurm worker")
    p.add_argument("--authors", nargs="+", metavar="NAME",
                   help="the Authors of the derivative dataset (its dataset_description.json)")
    p.add_argument("--skip-invalid-runs", action="store_true",
                   help="run the runs that pass the pre-flight checks and report the others (default: any invalid "
                        "run stops everything before anything is written)")
    p.add_argument("--skip-bids-validation", "--skip_bids_validation", action="store_true",
                   help="accepted for BIDS-Apps compatibility; dwiflow checks its own inputs and does not run a validator")
    loudness = p.add_mutually_exclusive_group()
    loudness.add_argument("-v", "--verbose", action="store_true",
                          help="more progress: each stage's voxels done every few seconds")
    loudness.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    p.add_argument("--version", action="version", version=f"dwiflow {__version__}")
    return p


def _error(message: str) -> int:
    complain(f"dwiflow: error: {message}")
    return EXIT_INPUT_ERROR


def _writable(path: Path) -> str | None:
    """Why ``path`` (created if missing) cannot be written, or None."""
    existing = next((p for p in [path, *path.parents] if p.exists()), None)
    if existing is None or not existing.is_dir():
        return f"{existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def _check_paths(bids_dir: Path, output_dir: Path, work_dir: Path) -> str | None:
    """Problems with where things are written (one line), or None."""
    if output_dir == bids_dir:
        return "OUTPUT_DIR must not be BIDS_DIR (use BIDS_DIR/derivatives/dwiflow)"
    if work_dir in (output_dir, bids_dir):
        return f"--work-dir {work_dir} must not be {'OUTPUT_DIR' if work_dir == output_dir else 'BIDS_DIR'}"
    derivatives = bids_dir / "derivatives"  # the one place inside a BIDS dataset where a pipeline writes
    for what, path in (("OUTPUT_DIR", output_dir), ("--work-dir", work_dir)):
        if ((bids_dir / "dataset_description.json").is_file()  # (else: not a BIDS dataset, said after this)
                and path.is_relative_to(bids_dir) and not (path.is_relative_to(derivatives) and path != derivatives)):
            return (f"{what} {path} is inside BIDS_DIR, where it would write into the raw dataset: use "
                    f"{derivatives / 'dwiflow'} or a folder outside BIDS_DIR")
    for what, path in (("OUTPUT_DIR", output_dir), ("--work-dir", work_dir)):
        problem = _writable(path)
        if problem:
            return f"{what} {path}: {problem}"
    return None


def _check_output_dataset(output_dir: Path, spec_name: str) -> str | None:
    """Why the participant level must not write recon spec ``spec_name`` into ``output_dir`` (one line), or None: a
    folder with files but no derivative dataset, another pipeline's derivative dataset (its dataset_description.json
    would be replaced), or dwiflow's of another recon spec (the dataset's description, reports and methods would
    then describe the new spec alone beside the old spec's maps)."""
    if not output_dir.is_dir():
        return None
    description = output_dir / "dataset_description.json"
    if not description.is_file():
        if any(not entry.name.startswith(".") for entry in output_dir.iterdir()):
            return (f"OUTPUT_DIR {output_dir} is not empty and holds no derivative dataset (no dataset_description.json):"
                    " give a new or empty folder")
        return None
    try:
        content = json.loads(description.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"OUTPUT_DIR {output_dir}: its dataset_description.json cannot be read ({type(exc).__name__})"
    content = content if isinstance(content, dict) else {}
    makers = [g.get("Name") for g in content.get("GeneratedBy", []) if isinstance(g, dict)]
    if "dwiflow" not in makers:
        return (f"OUTPUT_DIR {output_dir} holds another derivative dataset ({content.get('Name', 'no name')!s:.60}, "
                f"generated by {', '.join(map(str, makers)) or 'an unnamed pipeline'}), whose dataset_description.json "
                "dwiflow would replace: give a folder of its own, e.g. BIDS_DIR/derivatives/dwiflow")
    from dwiflow.workflows.recon import dataset_recon_spec

    earlier = dataset_recon_spec(content)
    if earlier is not None and earlier != spec_name:
        return (f"OUTPUT_DIR {output_dir} holds the derivatives of recon spec {earlier}: write recon spec "
                f"{spec_name} into a folder of its own (one derivative dataset per recon spec, as QSIRecon's "
                "qsirecon-<name> folders), or its reports and dataset_description.json would describe it alone")
    return None


def _oversubscription(args: argparse.Namespace) -> str | None:
    """A note when the processes and threads asked for (``--nprocs`` × ``--omp-nthreads``) exceed the CPUs this
    process may use, and the stages run here (debug and cf workers): they would compete, and the run be slower."""
    if args.worker not in ("debug", "cf") or not (args.nprocs or args.omp_nthreads):
        return None
    from dwiflow.tasks.stagelib import available_cpus

    cpus = available_cpus()
    processes = (args.nprocs or 1) if args.worker == "cf" else 1
    threads = args.omp_nthreads or 1
    if processes * threads <= cpus:
        return None
    asked = (f"--nprocs {processes} × --omp-nthreads {threads} = {processes * threads} threads"
             if args.worker == "cf" and args.nprocs and args.omp_nthreads else
             f"--nprocs {processes}" if args.worker == "cf" and args.nprocs else f"--omp-nthreads {threads}")
    return (f"{asked} on {cpus} CPU{'s' if cpus > 1 else ''}: they would compete and the run be slower, not faster "
            f"(at most {cpus} in all)")


def _selection(args: argparse.Namespace, filter_text: str | None = None) -> list[str]:
    """What selects the runs, as the default work directory's key: participant and session labels (sorted, without
    their prefixes) and the filter file's text; empty for every run."""
    parts = [f"sub-{label}" for label in sorted({p.removeprefix("sub-") for p in args.participant_label or []})]
    parts += [f"ses-{label}" for label in sorted({s.removeprefix("ses-") for s in args.session_label or []})]
    if filter_text is not None:
        parts.append(filter_text)
    return parts


def default_work_dir(output_dir: Path, selection: Sequence[str] = ()) -> Path:
    """The work directory when none is given: one folder per OUTPUT_DIR and selection of runs (its name and a digest
    of its absolute path and of ``selection``: the participant and session labels, the filter file) under
    ``$XDG_CACHE_HOME/dwiflow`` or ``~/.cache/dwiflow``, so that the cache lies outside the derivative dataset and a
    rerun finds it, and one job per participant into the same OUTPUT_DIR (a cluster's array job) gets a work
    directory of its own (one dwiflow process per work directory); in the system's temporary folder when neither can
    be written."""
    import hashlib
    import tempfile

    key = str(output_dir.resolve()) + "".join(f"\0{part}" for part in selection)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    leaf = f"{output_dir.name or 'output'}-{digest}"
    for root in (os.environ.get("XDG_CACHE_HOME"), str(Path.home() / ".cache") if Path.home() != Path("/") else None):
        if root and _writable(Path(root) / "dwiflow") is None:
            return Path(root) / "dwiflow" / leaf
    return Path(tempfile.gettempdir()) / "dwiflow" / leaf


def _tree_size(root: Path) -> int:
    total = 0
    for folder, _, names in os.walk(root):
        for name in names:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                continue
    return total


def _participant(args, bids_dir: Path, output_dir: Path) -> int:
    from dwiflow.bids_specs.inputs import BidsInputError, find_dwi_runs, load_filter_file, read_filter_text
    from dwiflow.tasks.preflight import check_runs
    from dwiflow.tasks.recon_spec import ReconSpecError, builtin_spec_file, load_recon_spec
    from dwiflow.workflows.cache import WorkDirInUse, claim_work_dir, disk_free

    filter_text = None
    if args.bids_filter_file:  # read once: it may be a pipe, <(echo '{"acquisition": "b1k"}')
        try:
            filter_text = read_filter_text(args.bids_filter_file)
        except BidsInputError as exc:
            return _error(str(exc))
    work_dir = (args.work_dir or default_work_dir(output_dir, _selection(args, filter_text))).resolve()
    problem = _check_paths(bids_dir, output_dir, work_dir)
    if problem:
        return _error(problem)
    oversubscribed = _oversubscription(args)
    if oversubscribed:
        complain(f"dwiflow: warning: {oversubscribed}")
    try:
        spec = load_recon_spec(args.recon_spec)
        filters = load_filter_file(args.bids_filter_file, filter_text) if args.bids_filter_file else None
        # pybids' own validation is not run (it rejects derivative-style inputs users commonly have);
        # --skip-bids-validation is accepted for BIDS-Apps compatibility
        runs = find_dwi_runs(bids_dir, args.participant_label, args.session_label, filters, args.mask_dir, validate=False)
    except (BidsInputError, ReconSpecError) as exc:
        return _error(str(exc))
    problem = _check_output_dataset(output_dir, spec.name)
    if problem is None and args.worker == "slurm":  # partitions, CPUs, memory and time limits SLURM would refuse
        from dwiflow.workflows.cluster import check_sbatch_arguments

        problem = check_sbatch_arguments(" ".join(shlex.split(args.sbatch_args)), spec.resources,
                                         [*spec.stages, "figures"], args.omp_nthreads)
    if problem:
        return _error(problem)
    for note in spec.warnings:
        complain(f"dwiflow: warning: {note}")
    responses = None
    response_dir = args.response_dir if args.response_dir is not None else spec.response_dir
    if response_dir is not None:
        from dwiflow.core.errors import DwiflowInputError
        from dwiflow.tasks.preflight import group_responses_for

        try:
            responses = group_responses_for(response_dir, spec, "--response-dir" if args.response_dir is not None
                                            else f"recon spec {spec.name}: response_dir")
        except DwiflowInputError as exc:
            return _error(str(exc))
    say(f"[dwiflow] checking {len(runs)} run(s) before anything runs")
    data_notes: dict[str, list[str]] = {}
    run_responses: dict[str, dict[str, Path]] = {}  # each run's group responses: those of its b-values
    invalid = check_runs(runs, spec, responses, data_notes, run_responses)
    mask_notes = {run.label: [f"--mask-dir {args.mask_dir} has no brain mask for this run: its mask is computed from "
                              "the b=0 volumes"] for run in runs if args.mask_dir and run.mask is None}
    for label, notes in mask_notes.items():
        data_notes[label] = notes + data_notes.get(label, [])
    if invalid:
        lines = [line for problems in invalid.values() for line in problems]
        if not args.skip_invalid_runs or len(invalid) == len(runs):
            if len(invalid) < len(runs) and not args.skip_invalid_runs:  # say how to go on with the others
                others = len(runs) - len(invalid)
                lines[-1] += f" (--skip-invalid-runs analyses the other {others} run{'s' if others > 1 else ''})"
            builtin = builtin_spec_file(args.recon_spec)
            if builtin is not None and any(": stages." in line for line in lines):  # and where such a key is set
                lines[-1] += (f" (a built-in spec's options are changed in a copy of {builtin}, given as "
                              "--recon-spec FILE)")
            for line in lines:
                complain(f"dwiflow: error: {line}")
            if args.skip_invalid_runs:
                complain("dwiflow: error: no run passed the checks")
            return EXIT_INPUT_ERROR
        for line in lines:
            complain(f"dwiflow: warning: skipped: {line}")
        runs = [run for run in runs if run.label not in invalid]
    for run in runs:  # what the data of the runs about to run support only poorly
        for note in data_notes.get(run.label, []):
            complain(f"dwiflow: warning: {run.label}: {note}")
    needed = 2 * sum(p.stat().st_size for run in runs for p in (run.dwi, run.bval, run.bvec)) + 64 * 2**20
    if disk_free(work_dir) < needed:
        return _error(f"--work-dir {work_dir}: {disk_free(work_dir) / 2**20:.0f} MB free, the runs need about "
                      f"{needed / 2**20:.0f} MB")
    try:
        claim_work_dir(work_dir)  # held until this process ends: one dwiflow process per work dir
    except WorkDirInUse as exc:
        return _error(str(exc))
    from dwiflow.workflows.recon import run_participant

    options: dict = {}
    if args.worker == "cf" and args.nprocs:
        options["n_procs"] = args.nprocs
    worker: Any = args.worker
    if args.worker == "slurm":
        from dwiflow.workflows.cluster import StageSlurmWorker

        # Pydra's SLURM worker with the recon spec's per-stage resources and jobs that fail visibly
        worker = StageSlurmWorker(sbatch_args=" ".join(shlex.split(args.sbatch_args)),
                                  resources=spec.resources, omp_nthreads=args.omp_nthreads)
    say(f"[dwiflow] {len(runs)} run(s); recon spec {spec.name}; worker {args.worker}; cache {work_dir}")
    outcomes = run_participant(runs, bids_dir, output_dir, spec, work_dir, worker, options,
                               responses=run_responses if responses else None, already_warned=data_notes,
                               report_notes=mask_notes, authors=args.authors, mask_dir=args.mask_dir)
    failed = [o for o in outcomes if not o.ok]
    if failed or invalid:
        for o in failed:
            complain(f"dwiflow: run {o.run.label} failed: {o.error} (log: {o.log})")
        for label in invalid:
            complain(f"dwiflow: run {label} was skipped: it did not pass the checks")
        return EXIT_RUN_FAILED
    say(f"[dwiflow] all {len(outcomes)} run(s) done; derivatives in {output_dir}")
    if args.clean_workdir:
        shutil.rmtree(work_dir, ignore_errors=True)
        say(f"[dwiflow] work directory {work_dir} removed (--clean-workdir)")
    else:
        say(f"[dwiflow] work directory {work_dir}: {_tree_size(work_dir) / 2**20:.0f} MB (kept for fast reruns; "
              "--clean-workdir removes it)")
    return 0


def _joined_sbatch_args(argv: list[str]) -> list[str]:
    """``--sbatch-args VALUE`` as ``--sbatch-args=VALUE``: sbatch's arguments start with a dash, which argparse
    takes for an option of its own ('expected one argument') unless the value is attached."""
    joined = []
    arguments = iter(argv)
    for argument in arguments:
        if argument == "--sbatch-args":
            value = next(arguments, None)
            joined.append(argument if value is None else f"{argument}={value}")
        else:
            joined.append(argument)
    return joined


# QSIRecon's options (qsirecon/cli/parser.py) that dwiflow has under another name or not at all
_CPUS = "QSIRecon's CPU budget: here --nprocs (tasks at once) and --omp-nthreads (threads per task)"
_NO_FREESURFER = "QSIRecon's: dwiflow has no FreeSurfer or anatomical step"
QSIRECON_OPTIONS = {
    **dict.fromkeys(("--nthreads", "--n-cpus", "--n_cpus"), _CPUS),
    **dict.fromkeys(("--mem", "--mem-mb", "--mem_mb"), "QSIRecon's: a cluster job's memory is the recon spec's "
                                                       "resources (mem_gb) or --sbatch-args=--mem=..."),
    **dict.fromkeys(("--output-resolution", "--output_resolution"),
                    "QSIRecon's: dwiflow fits the data on their own grid"),
    **dict.fromkeys(("--fs-license-file", "--fs_license_file", "--freesurfer-input", "--freesurfer_input"),
                    _NO_FREESURFER),
    **dict.fromkeys(("--input-type", "--input_type", "--recon-input", "--recon_input", "--recon-only"),
                    "QSIRecon's: BIDS_DIR is the input, any BIDS dataset of preprocessed DWI (QSIPrep's too)"),
}


def main(argv: Sequence[str] | None = None) -> int:
    from dwiflow.tasks.console import NORMAL, QUIET, VERBOSE, VERBOSITY_ENV, set_verbosity
    from dwiflow.tasks.options import unrecognized_arguments

    parser = build_parser()
    args, unknown = parser.parse_known_args(_joined_sbatch_args(sys.argv[1:] if argv is None else list(argv)))
    if unknown:
        parser.error(unrecognized_arguments(parser, unknown, QSIRECON_OPTIONS))
    # called in-process (tests, notebooks): the verbosity and --omp-nthreads' thread counts are this call's only
    names = (VERBOSITY_ENV, "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")
    previous = {name: os.environ.get(name) for name in names}
    set_verbosity(QUIET if args.quiet else VERBOSE if args.verbose else NORMAL)
    try:
        return _main(args)
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _main(args: argparse.Namespace) -> int:
    bids_dir, output_dir = args.bids_dir.resolve(), args.output_dir.resolve()
    # the workflows run in their cache folders: the masks they read are found from an absolute folder (group
    # responses are resolved where they are found, also when a recon spec names their folder)
    args.mask_dir = args.mask_dir.resolve() if args.mask_dir is not None else None
    if not bids_dir.is_dir():
        return _error(f"BIDS_DIR {bids_dir} does not exist")
    if args.omp_nthreads:
        os.environ["OMP_NUM_THREADS"] = os.environ["OPENBLAS_NUM_THREADS"] = str(args.omp_nthreads)
        os.environ["NUMBA_NUM_THREADS"] = str(args.omp_nthreads)
    from dwiflow.workflows.workers import Interruption, install_signal_handlers

    install_signal_handlers()
    try:
        if args.analysis_level == "group":
            from dwiflow.core.errors import DwiflowInputError
            from dwiflow.workflows.recon import run_group

            for given, flag in ((args.session_label, "--session-label"), (args.bids_filter_file, "--bids-filter-file")):
                if given:
                    complain(f"dwiflow: warning: {flag} is not used at the group level (--participant-label is)")
            try:
                run_group(output_dir, participants=args.participant_label)
            except (FileNotFoundError, DwiflowInputError) as exc:
                return _error(str(exc))
            return 0
        return _participant(args, bids_dir, output_dir)
    except KeyboardInterrupt:
        import signal

        signum = Interruption.signal or signal.SIGINT
        complain(f"dwiflow: interrupted by {signal.Signals(signum).name}: rerun the same command to resume (finished "
                 "stages are not recomputed)")
        return 128 + signum
    except OSError as exc:  # a full disk, a vanished directory ...: one line, not a traceback
        return _error(f"{exc.filename or ''}{': ' if exc.filename else ''}{exc.strerror or exc}")


if __name__ == "__main__":
    sys.exit(main())
