#!/usr/bin/env python3
"""Benchmarks: dwiflow against DIPY (and MRtrix3 when installed) on the same phantom, in one run.

Prints one table: step, voxels, seconds for each tool, speed ratio (peer time / dwiflow
time, >1 means dwiflow is faster) and an accuracy column (largest difference from the
peer on the same inputs). Run with ``python3 dev.py bench`` (``--voxels N`` to resize).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from dwiflow.core.gradients import world_to_fsl_bvecs
from dwiflow.core.sims import acquisition_scheme, make_phantom
from dwiflow.core.tensor import TensorModel
from dwiflow.tasks.stages import tensor_stage


def _best_of(fn, repeats: int) -> tuple[float, object]:
    best, result = np.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def bench_tensor(n_voxels: int, repeats: int, workdir: Path) -> list[dict]:
    from dipy.core.gradients import gradient_table as dipy_gtab
    from dipy.reconst.dti import TensorModel as DipyTensorModel

    gtab = acquisition_scheme("single")
    side = int(round((n_voxels / 10) ** 0.5))
    shape = (side, side, 10)
    ph = make_phantom(gtab, shape, n_fibres=(1, 2), snr=30, seed=0)
    data = ph.data
    nvox = int(np.prod(shape))
    t_ours, ours = _best_of(lambda: TensorModel(gtab).fit(data), repeats)
    dg = dipy_gtab(gtab.bvals, bvecs=gtab.bvecs)
    t_dipy, ref = _best_of(lambda: DipyTensorModel(dg, fit_method="WLS").fit(data), repeats)
    rows = [{"step": "tensor WLS", "peer": "DIPY 1.12", "voxels": nvox, "dwiflow_s": t_ours, "peer_s": t_dipy,
             "accuracy": f"max|dFA| {np.abs(ours.fa - ref.fa).max():.1e}"}]
    if shutil.which("dwi2tensor"):
        affine = np.diag([-2.0, 2.0, 2.0, 1.0])
        nib.save(nib.Nifti1Image(data.astype(np.float32), affine), workdir / "dwi.nii")
        np.savetxt(workdir / "dwi.bval", gtab.bvals[None], fmt="%g")
        np.savetxt(workdir / "dwi.bvec", world_to_fsl_bvecs(gtab.bvecs, affine).T, fmt="%.8f")
        nthreads = os.cpu_count() or 1
        cmd = ["dwi2tensor", "-quiet", "-force", "-nthreads", str(nthreads), str(workdir / "dwi.nii"),
               "-fslgrad", str(workdir / "dwi.bvec"), str(workdir / "dwi.bval"), str(workdir / "t.nii")]
        t_mrtrix, _ = _best_of(lambda: subprocess.run(cmd, check=True), repeats)
        # file to file on our side too: read NIfTI + gradients, fit, write the maps
        outputs = {"fa": workdir / "fa_ours.nii", "evals": workdir / "evals_ours.nii", "v1": workdir / "v1_ours.nii"}
        t_stage, _ = _best_of(lambda: tensor_stage(workdir / "dwi.nii", workdir / "dwi.bval", workdir / "dwi.bvec",
                                                   outputs), repeats)
        subprocess.run(["tensor2metric", "-quiet", "-force", str(workdir / "t.nii"), "-fa", str(workdir / "fa.nii")], check=True)
        fa_mrtrix = nib.load(workdir / "fa.nii").get_fdata()
        rows.append({"step": "tensor files", "peer": f"MRtrix3 dwi2tensor ({nthreads} threads), both incl. I/O", "voxels": nvox,
                     "dwiflow_s": t_stage, "peer_s": t_mrtrix,
                     "accuracy": f"median|dFA| {np.median(np.abs(ours.fa - fa_mrtrix)):.1e} (IWLS vs WLS)"})
    return rows


def print_table(rows: list[dict]) -> None:
    header = f"{'step':<14} {'peer':<44} {'voxels':>8} {'dwiflow s':>10} {'peer s':>9} {'ratio':>7}  accuracy"
    print(header)
    print("-" * len(header))
    for r in rows:
        ratio = r["peer_s"] / r["dwiflow_s"]
        print(f"{r['step']:<14} {r['peer']:<44} {r['voxels']:>8d} {r['dwiflow_s']:>10.3f} {r['peer_s']:>9.3f} "
              f"{ratio:>6.1f}x  {r['accuracy']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--voxels", type=int, default=100_000, help="phantom size for the tensor step")
    parser.add_argument("--repeats", type=int, default=3, help="best of N timings")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = bench_tensor(args.voxels, args.repeats, Path(tmp))
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
