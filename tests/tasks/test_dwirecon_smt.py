"""dwirecon smt: kernel and Watson FOD maps in the world frame, and errors."""

import nibabel as nib
import numpy as np
import pytest

from dwiflow.cli.dwirecon import main
from dwiflow.core.errors import DwiflowInputError
from dwiflow.core.gradients import world_to_fsl_bvecs
from dwiflow.core.peaks import find_peaks
from dwiflow.core.sims import acquisition_scheme, make_phantom
from dwiflow.tasks.registry import get as stage
from tests.conftest import write_gradients, write_nifti

AFFINE = np.array([[-2.0, 0.3, 0.0, 10.0], [0.2, 1.9, 0.4, -5.0], [0.0, -0.4, 2.0, 3.0], [0, 0, 0, 1.0]])


def _multishell_phantom(tmp_path, shape, **options):
    """A 3-shell phantom written as sub-01_dwi (oblique LAS affine, FSL bvecs): (phantom, dwi, bval, bvec)."""
    g = acquisition_scheme("multi")
    ph = make_phantom(g, shape, **options)
    base = tmp_path / "sub-01_dwi"
    dwi = write_nifti(base.with_suffix(".nii.gz"), ph.data.astype(np.float32), AFFINE)
    bval, bvec = write_gradients(base, g.bvals, world_to_fsl_bvecs(g.bvecs, AFFINE).T)
    return ph, dwi, bval, bvec


def test_smt_kernel_and_watson_maps(tmp_path, capsys):
    ph, dwi, bval, bvec = _multishell_phantom(tmp_path, (5, 5, 2), snr=50, seed=3, n_fibres=1)
    out = tmp_path / "out"
    assert main(["smt", str(dwi), str(bval), str(bvec), str(out)]) == 0
    assert "smt: 50/50 voxels" in capsys.readouterr().err
    name = "sub-01_model-smt_param-{}_dwimap.nii.gz"
    lpar, lperp = (nib.load(out / name.format(p)).get_fdata() for p in ("lpar", "lperp"))
    assert abs(np.median(lpar) / ph.evals[0] - 1) < 0.05 and abs(np.median(lperp) / ph.evals[1] - 1) < 0.1
    assert not (out / name.format("fw")).exists()  # no free-water compartment asked for
    mu = nib.load(out / name.format("mu")).get_fdata()
    truth = ph.directions[..., 0, :]
    angle = np.degrees(np.arccos(np.clip(np.abs(np.sum(mu * truth, -1)), 0, 1)))
    assert np.median(angle) < 2  # world frame despite the oblique LAS affine
    fod = nib.load(out / name.format("fod")).get_fdata()
    peaks = find_peaks(fod).vectors[..., 0, :]
    peak_angle = np.degrees(np.arccos(np.clip(np.abs(np.sum(peaks / np.linalg.norm(peaks, axis=-1, keepdims=True)
                                                            * truth, -1)), 0, 1)))
    assert np.median(peak_angle) < 2
    assert np.allclose(fod[..., 0], 1 / np.sqrt(4 * np.pi), atol=1e-6)  # the FOD integrates to 1
    odi = nib.load(out / name.format("odi")).get_fdata()
    assert np.all((odi >= 0.02 - 1e-6) & (odi <= 0.99 + 1e-6))  # dmipy's ODI bounds (stored as float32)


def test_smt_errors(tmp_path, capsys):
    g = acquisition_scheme("multi")
    keep = g.bvals < 1500
    ph = make_phantom(g, (2, 2, 2), snr=50, seed=3)
    base = tmp_path / "single_dwi"
    dwi = write_nifti(base.with_suffix(".nii.gz"), ph.data[..., keep].astype(np.float32), AFFINE)
    bval, bvec = write_gradients(base, g.bvals[keep], world_to_fsl_bvecs(g.bvecs[keep], AFFINE).T)
    assert main(["smt", str(dwi), str(bval), str(bvec), str(tmp_path / "o")]) == 2
    assert "at least two diffusion-weighted shells" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_smt_bingham_maps_in_the_world_frame(tmp_path):
    """--fod bingham on single-fibre voxels (no dispersion): mu along the fibre, beta and nu written, SH peaks agree."""
    ph, dwi, bval, bvec = _multishell_phantom(tmp_path, (4, 4, 2), snr=50, seed=5, n_fibres=1)
    out = tmp_path / "out"
    assert main(["smt", str(dwi), str(bval), str(bvec), str(out), "--fod", "bingham"]) == 0
    name = "sub-01_model-smt_param-{}_dwimap.nii.gz"
    mu, nu = (nib.load(out / name.format(p)).get_fdata() for p in ("mu", "nu"))
    beta = nib.load(out / name.format("beta")).get_fdata()
    truth = ph.directions[..., 0, :]
    angle = np.degrees(np.arccos(np.clip(np.abs(np.sum(mu * truth, -1)), 0, 1)))
    assert np.median(angle) < 2 and np.allclose(np.sum(mu * nu, -1), 0, atol=1e-5)
    assert np.all((beta >= 0) & (beta <= 1))
    fod = nib.load(out / name.format("fod")).get_fdata()
    peaks = find_peaks(fod).vectors[..., 0, :]
    peaks /= np.linalg.norm(peaks, axis=-1, keepdims=True)
    assert np.median(np.degrees(np.arccos(np.clip(np.abs(np.sum(peaks * mu, -1)), 0, 1)))) < 2
    # Bingham maps need fod: bingham
    with pytest.raises(DwiflowInputError, match="does not write .'beta'"):
        stage("smt")({"beta": tmp_path / "b.nii.gz"}, dwi=dwi, bval=bval, bvec=bvec, fod="watson")


def test_smt_two_watson_compartments_resolve_crossings(tmp_path, capsys):
    """--n-fod 2 on two-fibre voxels (at least 50 degrees apart): both fibres and their fractions recovered."""
    ph, dwi, bval, bvec = _multishell_phantom(tmp_path, (6, 6, 2), snr=50, seed=4, n_fibres=2, min_separation_deg=50)
    out = tmp_path / "out"
    assert main(["smt", str(dwi), str(bval), str(bvec), str(out), "--n-fod", "2"]) == 0
    name = "sub-01_model-smt_param-{}_dwimap.nii.gz"
    mu = nib.load(out / name.format("mu")).get_fdata().reshape(-1, 2, 3)
    fractions = nib.load(out / name.format("fodfrac")).get_fdata().reshape(-1, 2)
    odi = nib.load(out / name.format("odi")).get_fdata()
    assert odi.shape[3] == 2 and np.allclose(fractions.sum(axis=1), 1, atol=1e-5)
    truth = ph.directions.reshape(72, -1, 3)[:, :2]
    true_fractions = ph.fractions.reshape(72, -1)[:, :2]

    def angle(a, b):
        return np.degrees(np.arccos(np.clip(np.abs(np.sum(a * b, -1)), 0, 1)))

    # match each fitted compartment to a true fibre (the better of the two pairings), then the worse of the two errors
    direct = np.maximum(angle(mu[:, 0], truth[:, 0]), angle(mu[:, 1], truth[:, 1]))
    swapped = np.maximum(angle(mu[:, 0], truth[:, 1]), angle(mu[:, 1], truth[:, 0]))
    worst = np.minimum(direct, swapped)
    assert np.median(worst) < 3 and np.percentile(worst, 90) < 6
    matched = np.where((direct <= swapped)[:, None], true_fractions, true_fractions[:, ::-1])
    assert np.median(np.abs(fractions - matched)) < 0.06
    # the FOD (sum of the two Watsons) has its two largest peaks on the fibres too
    fod = nib.load(out / name.format("fod")).get_fdata().reshape(-1, 45)
    peaks = find_peaks(fod, npeaks=2).vectors
    peaks /= np.linalg.norm(peaks, axis=-1, keepdims=True)
    found = np.minimum(np.maximum(angle(peaks[:, 0], truth[:, 0]), angle(peaks[:, 1], truth[:, 1])),
                       np.maximum(angle(peaks[:, 0], truth[:, 1]), angle(peaks[:, 1], truth[:, 0])))
    assert np.nanmedian(found) < 5
    with pytest.raises(DwiflowInputError, match="fitted as Watsons"):
        stage("smt")({"fodfrac": tmp_path / "f.nii.gz"}, dwi=dwi, bval=bval, bvec=bvec, fod="bingham", n_fod=2)
