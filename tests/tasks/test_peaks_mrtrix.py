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
