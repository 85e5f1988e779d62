#!/usr/bin/env python3
"""Workflow overhead: the BIDS App's wall time against the sum of its stages run directly.

For each dataset, runs the csd chain once by calling the stage functions in sequence (the
compute), then ``dwiflow … participant`` on a fresh cache with the chosen worker, and prints
both times and the overhead. Usage: ``python benchmarks/workflow_overhead.py [--worker cf]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from dwiflow.bids_specs.inputs import find_dwi_runs
from dwiflow.cli.bidsapp import main as bidsapp
from dwiflow.tasks.registry import get as stage
from dwiflow.tasks.stages.phantom import write_phantom_dataset

REPO = Path(__file__).resolve().parents[1]


def stage_chain(run, mask, folder: Path) -> float:
    t0 = time.perf_counter()
    if mask is None:
        mask = folder / "mask.nii.gz"
        stage("mask")({"mask": mask}, dwi=run.dwi, bval=run.bval, bvec=run.bvec)
    gradients = dict(dwi=run.dwi, bval=run.bval, bvec=run.bvec, mask=mask)
    stage("tensor")({k: folder / f"{k}.nii.gz" for k in ("fa", "md", "ad", "rd", "v1", "s0", "status")}, **gradients)
    stage("response", "fa")({"response": folder / "resp.txt"}, **gradients)
    stage("csd")({"fod": folder / "fod.nii.gz", "status": folder / "st.nii.gz"}, response=folder / "resp.txt",
                 **gradients)
    stage("peaks")({"peaks": folder / "peaks.nii.gz"}, fod=folder / "fod.nii.gz", mask=mask)
    stage("fod_metrics")({k: folder / f"{k}.nii.gz" for k in ("afd_total", "peak_amplitude", "nufo", "gfa")},
                         fod=folder / "fod.nii.gz", peaks=folder / "peaks.nii.gz")
    return time.perf_counter() - t0


def measure(name: str, bids: Path, mask_dir: Path | None, labels: list[str], worker: str) -> None:
    runs = find_dwi_runs(bids, labels, mask_dir=mask_dir)
    with tempfile.TemporaryDirectory() as tmp:
        compute = sum(stage_chain(r, r.mask, Path(tmp) / r.label) for r in runs if (Path(tmp) / r.label).mkdir() or True)
        args = [str(bids), str(Path(tmp) / "out"), "participant", "--work-dir", str(Path(tmp) / "work"),
                "--worker", worker, "--participant-label", *labels]
        if mask_dir:
            args += ["--mask-dir", str(mask_dir)]
        t0 = time.perf_counter()
        assert bidsapp(args) == 0
        wall = time.perf_counter() - t0
    print(f"{name:<34} stages {compute:7.2f} s   workflow ({worker}) {wall:7.2f} s   overhead {100 * (wall / compute - 1):+5.1f}%",
          flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", default="cf", choices=("debug", "cf"))
    args = parser.parse_args()
    real = REPO.parent / "shared" / "data" / "bids_real"
    with tempfile.TemporaryDirectory() as tmp:
        phantom = Path(tmp) / "phantom"
        write_phantom_dataset(phantom, scheme="single", shape=(100, 100, 10), snr=20, seed=1)  # 100,000 tissue voxels
        # warm-up (numba compilation is cached on disk after the first process)
        measure("warm-up (sub-01 b1kb2k)", real, real / "derivatives" / "masks", ["01"], args.worker)
        measure("sub-01 (2 runs, real)", real, real / "derivatives" / "masks", ["01"], args.worker)
        measure("phantom 100,000 tissue voxels", phantom, phantom / "derivatives" / "masks", ["phantom"], args.worker)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
