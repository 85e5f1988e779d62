"""amp2response equals MRtrix3's amp2response on the same data, mask and directions."""

import subprocess

import nibabel as nib
import numpy as np
import pytest

from dwiflow.core.gradients import world_to_fsl_bvecs
from dwiflow.core.response import ResponseFunction, top_voxels
from dwiflow.core.sims import acquisition_scheme, make_phantom
from dwiflow.core.tensor import TensorModel
from dwiflow.tasks.io import load_dwi
from dwiflow.tasks.registry import get as stage
from tests.conftest import real_run, run_mrtrix, write_gradients, write_nifti

OPTION_SETS = [
    ([], {}),
    (["-noconstraint"], {"noconstraint": True}),
    (["-isotropic"], {"isotropic": True}),
]


def _selection(tmp_path, dwi, bval, bvec, brain, number):
    run = load_dwi(dwi, bval, bvec)
    fit = TensorModel(run.gtab).fit(run.data, brain)
    voxels = top_voxels(fit.fa, brain, number)
    mask = write_nifti(tmp_path / "voxels.nii.gz", voxels.astype(np.uint8), run.affine)
    dirs = write_nifti(tmp_path / "dirs.nii.gz", np.nan_to_num(fit.v1).astype(np.float32), run.affine)
    run_mrtrix("mrconvert", dwi, "-fslgrad", bvec, bval, tmp_path / "dwi.mif")
    return mask, dirs, run.gtab


def _compare(tmp_path, dwi, bval, bvec, mask, dirs, mrtrix_opts, our_opts):
    run_mrtrix("amp2response", tmp_path / "dwi.mif", mask, dirs, tmp_path / "mrtrix.txt", *mrtrix_opts)
    ref = ResponseFunction.from_text((tmp_path / "mrtrix.txt").read_text())
    ours_path = stage("response", "amp2response")({"response": tmp_path / "ours.txt"}, dwi=dwi, bval=bval, bvec=bvec,
                                                  mask=mask, directions_image=dirs, **our_opts)["response"]
    ours = ResponseFunction.from_text(ours_path.read_text())
    assert ours.coefficients.shape == ref.coefficients.shape
    assert np.allclose(ours.bvalues, ref.bvalues, atol=2)
    rel = np.abs(ours.coefficients - ref.coefficients) / np.abs(ref.coefficients[:, :1])
    assert rel.max() < 0.01, rel.max(axis=1)
    return rel.max()


@pytest.mark.mrtrix
@pytest.mark.parametrize("acq", ["b1kb2k", "b6kmax"])
@pytest.mark.parametrize("number", [300, 30])
def test_amp2response_equals_mrtrix_on_real_data(tmp_path, mrtrix, acq, number, record):
    paths = real_run(f"sub-01_acq-{acq}")
    brain = nib.load(paths["mask"]).get_fdata() > 0
    mask, dirs, gtab = _selection(tmp_path, paths["dwi"], paths["bval"], paths["bvec"], brain, number)
    largest = max(_compare(tmp_path, paths["dwi"], paths["bval"], paths["bvec"], mask, dirs, mrtrix_opts, our_opts)
                  for mrtrix_opts, our_opts in OPTION_SETS)
    record("amp2response", f"largest difference / l=0 term, every option set (sub-01 {acq}, {number} voxels)",
           largest, "< 0.01", "MRtrix3 3.0.3 amp2response")
    lmax = [0] + [8, 6] * (len(gtab.shells) // 2) + [4] * ((len(gtab.shells) - 1) % 2)
    lmax = lmax[: len(gtab.shells)]
    _compare(tmp_path, paths["dwi"], paths["bval"], paths["bvec"], mask, dirs,
             ["-lmax", ",".join(map(str, lmax))], {"lmax": lmax})


@pytest.mark.mrtrix
def test_amp2response_equals_mrtrix_on_a_noisy_phantom(tmp_path, mrtrix):
    gtab = acquisition_scheme("multi")
    ph = make_phantom(gtab, (12, 12, 4), n_fibres=1, snr=8, seed=21)
    affine = np.diag([-2.0, 2, 2, 1])
    dwi = write_nifti(tmp_path / "ph.nii.gz", ph.data.astype(np.float32), affine)
    bval, bvec = write_gradients(tmp_path / "ph", gtab.bvals, world_to_fsl_bvecs(gtab.bvecs, affine).T)
    mask, dirs, _ = _selection(tmp_path, dwi, bval, bvec, np.ones(ph.data.shape[:3], bool), 10)
    for mrtrix_opts, our_opts in OPTION_SETS + [(["-lmax", "0,6,8,10"], {"lmax": [0, 6, 8, 10]}),
                                                (["-shells", "0,3000"], {"shells": [0, 3000]})]:
        _compare(tmp_path, dwi, bval, bvec, mask, dirs, mrtrix_opts, our_opts)
    # the default (constrained) fit differs from -noconstraint here, so both paths were exercised
    subprocess.run(["amp2response", "-quiet", "-force", tmp_path / "dwi.mif", mask, dirs, tmp_path / "nc.txt",
                    "-noconstraint"], check=True)
    subprocess.run(["amp2response", "-quiet", "-force", tmp_path / "dwi.mif", mask, dirs, tmp_path / "c.txt"], check=True)
    c = ResponseFunction.from_text((tmp_path / "c.txt").read_text()).coefficients
    nc = ResponseFunction.from_text((tmp_path / "nc.txt").read_text()).coefficients
    assert np.abs(c - nc).max() > 1e-3 * np.abs(c[:, 0]).max()
