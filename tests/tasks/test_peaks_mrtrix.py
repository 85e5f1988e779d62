"""The peaks stage with ``search: sh2peaks`` against MRtrix3 3.0.3's ``sh2peaks`` on the same FOD: every peak slot
(not only the first) in the same order, within 0.1 degree, with -num 3 and with thresholds."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from dwiflow.tasks.registry import get as stage
from tests.conftest import run_mrtrix


@pytest.fixture(scope="module")
def fod(sub01_csd_fod):
    """sub-01 b1kb2k's CSD FOD and its mask (tests/conftest.py)."""
    return sub01_csd_fod


@pytest.mark.mrtrix
@pytest.mark.parametrize("npeaks, threshold", [(3, 0.0), (5, 0.1), (2, 0.3)])
def test_sh2peaks_search_equals_sh2peaks_in_every_slot(fod, tmp_path, mrtrix, npeaks, threshold, record):
    fod_path, mask_path = fod
    ours = stage("peaks")({"peaks": tmp_path / "ours.nii.gz"}, fod=fod_path, mask=mask_path, search="sh2peaks",
                          npeaks=npeaks, threshold=threshold)["peaks"]
    run_mrtrix("sh2peaks", fod_path, tmp_path / "mrtrix.nii", "-mask", mask_path, "-num", npeaks, "-threshold",
               threshold)
    mask = nib.load(mask_path).get_fdata() > 0
    a = nib.load(ours).get_fdata()[mask].reshape(-1, npeaks, 3)
    b = nib.load(tmp_path / "mrtrix.nii").get_fdata()[mask].reshape(-1, npeaks, 3)
    a_amp, b_amp = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    present = ~np.isnan(b_amp)
    angle = np.degrees(np.arccos(np.clip(np.abs(np.sum(a * b, axis=-1)) / (a_amp * b_amp), 0, 1)))
    # amplitudes within 1e-4 of the voxel's largest (sh2peaks works in single precision: a peak of amplitude 1e-4
    # carries its rounding, relatively)
    largest = np.nanmax(np.where(present, b_amp, np.nan), axis=1, initial=0.0)[:, None]
    slot_ok = np.where(present, (angle < 0.1) & (np.abs(a_amp - b_amp) <= 1e-4 * largest), np.isnan(a_amp))
    every_slot = np.mean(np.all(slot_ok, axis=1))
    print(f"-num {npeaks} -threshold {threshold}: {present.sum()} peaks in {mask.sum()} voxels; every slot within "
          f"0.1 deg in {every_slot:.5f}")
    record("peaks", f"voxels with every slot within 0.1 deg, -num {npeaks} -threshold {threshold:g} (sub-01)",
           every_slot, ">= 0.999", "MRtrix3 3.0.3 sh2peaks")
    assert present[:, 1].sum() > 1000  # crossings: second peaks to compare
    assert every_slot >= 0.999


def test_sh2peaks_search_refuses_psf_subtraction(fod, tmp_path):
    from dwiflow.core.errors import DwiflowInputError

    with pytest.raises(DwiflowInputError, match="subtract_psf"):
        stage("peaks")({"peaks": tmp_path / "p.nii.gz"}, fod=fod[0], search="sh2peaks", subtract_psf=True)


@pytest.mark.mrtrix
def test_largest_peak_amplitude_equals_sh2peaks_first_peak(fod, tmp_path, mrtrix, record):
    """The Newton ascent dhollander's single-fibre ranking uses for the largest peak amplitude (no search grid):
    within 1e-4 of the voxel's amplitude (sh2peaks' single precision) of MRtrix3's ``sh2peaks -num 1``."""
    from dwiflow.core.peaks import largest_peak_amplitude

    fod_path, mask_path = fod
    run_mrtrix("sh2peaks", fod_path, tmp_path / "mrtrix.nii", "-mask", mask_path, "-num", 1)
    mask = nib.load(mask_path).get_fdata() > 0
    theirs = np.linalg.norm(nib.load(tmp_path / "mrtrix.nii").get_fdata()[mask].reshape(-1, 3), axis=-1)
    ours = largest_peak_amplitude(nib.load(fod_path).get_fdata()[mask])
    found = np.isfinite(theirs)
    agree = np.abs(ours[found] - theirs[found]) <= 1e-4 * theirs[found]
    record("peaks", "voxels whose largest peak amplitude (dhollander's Newton ascent) is within 1e-4 relative of "
           "sh2peaks -num 1 (sub-01)", agree.mean(), ">= 0.999", "MRtrix3 3.0.3 sh2peaks")
    assert found.sum() > 5000
    assert agree.mean() >= 0.999, np.sort(np.abs(ours[found] / theirs[found] - 1))[-10:]
    assert np.all(ours[~found] == 0.0)  # no positive peak found: no positive amplitude
