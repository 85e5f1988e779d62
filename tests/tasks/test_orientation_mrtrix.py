"""Principal eigenvectors in world coordinates agree with MRtrix3's on real and oblique data."""

import nibabel as nib
import numpy as np
import pytest

from dwiflow.core.gradients import world_to_fsl_bvecs
from dwiflow.core.mask import median_otsu_mask
from dwiflow.core.sims import acquisition_scheme, make_phantom
from dwiflow.tasks.io import load_dwi
from dwiflow.tasks.registry import get as stage
from tests.conftest import REAL_RUNS, real_run, run_mrtrix, write_gradients, write_nifti


def _mrtrix_v1(tmp_path, dwi, bval, bvec):
    run_mrtrix("dwi2tensor", dwi, "-fslgrad", bvec, bval, tmp_path / "t.mif")
    run_mrtrix("tensor2metric", tmp_path / "t.mif", "-vector", tmp_path / "v1.nii.gz", "-modulate", "none")
    return nib.load(tmp_path / "v1.nii.gz").get_fdata()


@pytest.mark.mrtrix
@pytest.mark.parametrize("run", sorted(REAL_RUNS))
def test_v1_agrees_with_mrtrix_on_every_real_run(run, tmp_path, mrtrix):
    paths = real_run(run)
    written = stage("tensor")({"v1": tmp_path / "v1_ours.nii.gz", "fa": tmp_path / "fa_ours.nii.gz"}, dwi=paths["dwi"],
                              bval=paths["bval"], bvec=paths["bvec"])
    ours = nib.load(written["v1"]).get_fdata()
    fa = nib.load(written["fa"]).get_fdata()
    if "mask" in paths:
        brain = nib.load(paths["mask"]).get_fdata() > 0
    else:
        dwi = load_dwi(paths["dwi"], paths["bval"], paths["bvec"])
        brain = median_otsu_mask(dwi.data, dwi.gtab)
    theirs = _mrtrix_v1(tmp_path, paths["dwi"], paths["bval"], paths["bvec"])
    selected = brain & (fa > 0.4)
    assert selected.sum() > 500
    agreement = np.abs(np.sum(ours * theirs, axis=-1))[selected].mean()
    assert agreement > 0.97, f"{run}: mean |v1·v1_mrtrix| = {agreement:.3f}"


@pytest.mark.mrtrix
@pytest.mark.parametrize("flip_storage", [False, True])
def test_oblique_positive_determinant_image_matches_truth_and_mrtrix(tmp_path, mrtrix, flip_storage):
    angle_z, angle_x = np.radians(25), np.radians(-15)
    rz = np.array([[np.cos(angle_z), -np.sin(angle_z), 0], [np.sin(angle_z), np.cos(angle_z), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(angle_x), -np.sin(angle_x)], [0, np.sin(angle_x), np.cos(angle_x)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag([2.0, 2.0, 2.5])
    if flip_storage:
        affine[:3, 0] *= -1  # negative determinant: no FSL flip
    gtab = acquisition_scheme("single")
    direction = np.array([0.48, 0.6, 0.64])  # world frame
    ph = make_phantom(gtab, (4, 4, 3), directions=direction[None], fractions=[1.0], snr=None)
    bval, bvec = write_gradients(tmp_path / "dwi", gtab.bvals, world_to_fsl_bvecs(gtab.bvecs, affine).T)
    dwi = write_nifti(tmp_path / "dwi.nii.gz", ph.data.astype(np.float32), affine)
    assert (np.linalg.det(affine[:3, :3]) > 0) != flip_storage
    written = stage("tensor")({"v1": tmp_path / "v1_ours.nii.gz"}, dwi=dwi, bval=bval, bvec=bvec)
    ours = nib.load(written["v1"]).get_fdata()
    theirs = _mrtrix_v1(tmp_path, dwi, bval, bvec)
    unit = direction / np.linalg.norm(direction)
    assert np.abs(ours @ unit).min() > 0.9999
    assert np.abs(theirs @ unit).min() > 0.999
