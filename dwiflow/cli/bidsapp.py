"""``dwiflow``: the BIDS App. ``dwiflow BIDS_DIR OUTPUT_DIR {participant,group} [options]``.

Runs every DWI run of the selected participants through a recon spec (Pydra workflows with a
cache in ``--work-dir``), writes a BIDS derivative dataset, and at the group level one TSV of
per-run summary statistics. Exit codes: 0 success, 1 some runs failed (each named with its log),
2 bad input (nothing written).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dwiflow._version import __version__

EXIT_RUN_FAILED = 1
EXIT_INPUT_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dwiflow", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bids_dir", type=Path, help="the BIDS dataset (preprocessed DWI)")
    p.add_argument("output_dir", type=Path, help="where the derivative dataset is written")
    p.add_argument("analysis_level", choices=("participant", "group"))
    p.add_argument("--participant-label", "--participant_label", nargs="+", metavar="LABEL")
    p.add_argument("--session-label", "--session_label", nargs="+", metavar="LABEL")
    p.add_argument("--bids-filter-file", type=Path, metavar="FILE", help="JSON of pybids entities for the DWI query")
    p.add_argument("--recon-spec", default="csd", metavar="NAME|FILE", help="built-in preset name or a YAML file (default csd)")
    p.add_argument("--mask-dir", type=Path, help="derivative dataset with *_desc-brain_mask images to use")
    p.add_argument("--work-dir", type=Path, help="Pydra cache (default OUTPUT_DIR/../dwiflow_work)")
    p.add_argument("--worker", choices=("debug", "cf", "slurm", "sge"), default="cf")
    p.add_argument("--nprocs", type=int, help="processes for the cf worker")
    p.add_argument("--omp-nthreads", type=int, help="threads per task (numba/BLAS)")
    p.add_argument("--sbatch-args", default="", help="extra sbatch arguments for the slurm worker")
    p.add_argument("--skip-bids-validation", action="store_true",
                   help="accepted for BIDS-Apps compatibility; dwiflow checks its own inputs and does not run a validator")
    p.add_argument("--version", action="version", version=f"dwiflow {__version__}")
    return p


def _error(message: str) -> int:
    print(f"dwiflow: error: {message}", file=sys.stderr)
    return EXIT_INPUT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dwiflow.bids_specs.inputs import BidsInputError, find_dwi_runs, load_filter_file
    from dwiflow.tasks.recon_spec import ReconSpecError, load_recon_spec

    bids_dir, output_dir = args.bids_dir.resolve(), args.output_dir.resolve()
    if not bids_dir.is_dir():
        return _error(f"BIDS_DIR {bids_dir} does not exist")
    if output_dir == bids_dir:
        return _error("OUTPUT_DIR must not be BIDS_DIR (use BIDS_DIR/derivatives/dwiflow)")
    if args.omp_nthreads:
        import os

        os.environ["OMP_NUM_THREADS"] = os.environ["OPENBLAS_NUM_THREADS"] = str(args.omp_nthreads)
        os.environ["NUMBA_NUM_THREADS"] = str(args.omp_nthreads)
    if args.analysis_level == "group":
        from dwiflow.workflows.recon import run_group

        try:
            run_group(output_dir)
        except FileNotFoundError as exc:
            return _error(str(exc))
        return 0
    try:
        spec = load_recon_spec(args.recon_spec)
        filters = load_filter_file(args.bids_filter_file) if args.bids_filter_file else None
        # pybids' own validation is not run (it rejects derivative-style inputs users commonly have);
        # --skip-bids-validation is accepted for BIDS-Apps compatibility
        runs = find_dwi_runs(bids_dir, args.participant_label, args.session_label, filters, args.mask_dir, validate=False)
    except (BidsInputError, ReconSpecError) as exc:
        return _error(str(exc))
    for note in spec.warnings:
        print(f"dwiflow: warning: {note}", file=sys.stderr)
    from dwiflow.workflows.recon import run_participant

    work_dir = (args.work_dir or output_dir.parent / "dwiflow_work").resolve()
    options: dict = {}
    if args.worker == "cf" and args.nprocs:
        options["n_procs"] = args.nprocs
    worker: Any = args.worker
    if args.worker == "slurm":
        from dwiflow.workflows.cluster import StageSlurmWorker

        # Pydra's SLURM worker with the recon spec's per-stage resources and jobs that fail visibly
        worker = StageSlurmWorker(sbatch_args=" ".join(shlex.split(args.sbatch_args)),
                                  resources=spec.resources, omp_nthreads=args.omp_nthreads)
    print(f"[dwiflow] {len(runs)} run(s); recon spec {spec.name}; worker {args.worker}; cache {work_dir}")
    outcomes = run_participant(runs, bids_dir, output_dir, spec, work_dir, worker, options)
    failed = [o for o in outcomes if not o.ok]
    if failed:
        for o in failed:
            print(f"dwiflow: run {o.run.label} failed: {o.error} (log: {o.log})", file=sys.stderr)
        return EXIT_RUN_FAILED
    print(f"[dwiflow] all {len(outcomes)} run(s) done; derivatives in {output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
