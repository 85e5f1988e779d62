"""RUMBA-SD against DIPY's RumbaSDModel (same sphere, responses, iterations) and against phantom truth."""

import numpy as np
import pytest
from dipy.core.gradients import gradient_table as dipy_gradient_table
from dipy.core.sphere import Sphere as DipySphere
from dipy.reconst.rumba import RumbaSDModel as DipyRumba
from dipy.reconst.rumba import generate_kernel, mbessel_ratio as dipy_mbessel_ratio

from dwiflow.core.errors import DwiflowInputError
from dwiflow.core.gradients import gradient_table
from dwiflow.core.peaks import find_peaks
from dwiflow.core.rumba import RumbaSDModel, mbessel_ratio, rumba_kernel
from dwiflow.core.sh import amplitudes_to_sh
from dwiflow.core.sims import acquisition_scheme, make_phantom
from dwiflow.core.sphere import get_sphere, repulsion_sphere


def dipy_model(gtab, vertices, **options):
    dgtab = dipy_gradient_table(gtab.bvals, bvecs=gtab.bvecs)
    return DipyRumba(dgtab, sphere=DipySphere(xyz=vertices), **options)


def relative_odf_error(ours: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    """Per voxel: largest amplitude difference relative to the voxel's largest amplitude."""
    return np.abs(ours - theirs).max(-1) / theirs.max(-1)


@pytest.fixture(scope="module")
def multishell_phantom():
    g = acquisition_scheme("multi")
    return g, make_phantom(g, (4, 4, 3), snr=20, seed=1, csf_fraction=(0.0, 0.3))


def test_bessel_ratio_and_kernel_equal_dipy():
    x = np.r_[0.0, np.logspace(-3, 4, 50)]
    for order in (1, 4):
        assert np.abs(mbessel_ratio(order, x) - dipy_mbessel_ratio(order, x)).max() < 1e-14
    g = acquisition_scheme("multi")
    vertices = get_sphere("repulsion724").vertices
    dgtab = dipy_gradient_table(np.r_[0.0, g.bvals[~g.b0s_mask]], bvecs=np.r_[[[0, 0, 0]], g.bvecs[~g.b0s_mask]])
    # per-shell, non-axially-symmetric eigenvalues exercise the second and third tensor axes
    evals = np.array([[1.8e-3, 0.4e-3, 0.2e-3], [1.7e-3, 0.3e-3, 0.25e-3], [1.6e-3, 0.3e-3, 0.1e-3]])
    for wm, gm, csf in ((np.array([1.7e-3, 0.2e-3, 0.2e-3]), 0.8e-3, 3e-3), (evals, None, 3e-3), (evals, 0.7e-3, None)):
        theirs = generate_kernel(dgtab, DipySphere(xyz=vertices), wm, gm, csf)
        ours = rumba_kernel(g, vertices, wm, gm, csf)
        assert ours.shape == theirs.shape
        assert np.abs(ours - theirs).max() < 1e-12


@pytest.mark.parametrize("precision,bound", [("float64", 1e-5), ("float32", 1e-3)])
def test_voxelwise_equals_dipy_on_multishell_phantom(multishell_phantom, precision, bound):
    g, ph = multishell_phantom
    vertices = get_sphere("repulsion724").vertices
    data = ph.data.reshape(-1, g.n_volumes)
    ours = RumbaSDModel(g, precision=precision).fit(data)
    theirs = dipy_model(g, vertices).fit(data)
    assert np.all(ours.status == 0)
    assert relative_odf_error(ours.odf_rows, theirs.odf()).max() < bound
    assert np.abs(ours.f_iso - theirs.f_iso).max() < bound
    assert np.abs(ours.f_wm - theirs.f_wm).max() < bound
    assert np.abs(ours.f_csf - theirs.f_csf).max() < bound
    # the fractions are real estimates: free water is recovered, not a constant
    assert np.corrcoef(ours.f_csf, ph.csf_fraction.ravel())[0, 1] > 0.8


def test_non_symmetric_sphere_and_sos_noise_equal_dipy(multishell_phantom):
    g, ph = multishell_phantom
    hemisphere = get_sphere("repulsion724").hemisphere  # no antipodal pairs: the full kernel is iterated
    data = ph.data.reshape(-1, g.n_volumes)[:12]
    options = dict(n_iter=200, recon_type="sos", n_coils=4, gm_response=None)
    ours = RumbaSDModel(g, sphere=hemisphere, precision="float64", **options).fit(data)
    theirs = dipy_model(g, hemisphere, **options).fit(data)
    assert relative_odf_error(ours.odf_rows, theirs.odf()).max() < 1e-5
    assert np.all(ours.fractions[:, -2] == 0)  # GM switched off


def test_voxelwise_equals_dipy_on_sub01_b2000(sub01_b1kb2k_brain, record):
    gtab, data = sub01_b1kb2k_brain
    keep = np.flatnonzero(gtab.b0s_mask | (np.abs(gtab.bvals - 2000) < 100))
    shell = gtab.subset(keep)
    rng = np.random.default_rng(0)
    signal = data[rng.choice(data.shape[0], 120, replace=False)][:, keep]
    vertices = get_sphere("repulsion724").vertices
    ours = RumbaSDModel(shell).fit(signal)
    theirs = dipy_model(shell, vertices).fit(signal)
    record("rumba", "fODF, largest relative difference (sub-01 b=2000, 120 voxels)",
           relative_odf_error(ours.odf_rows, theirs.odf()).max(), "< 1e-3", "DIPY 1.12 RumbaSDModel")
    record("rumba", "isotropic fraction, largest difference (sub-01 b=2000)", np.abs(ours.f_iso - theirs.f_iso).max(),
           "< 1e-3", "DIPY 1.12 RumbaSDModel")
    assert relative_odf_error(ours.odf_rows, theirs.odf()).max() < 1e-3
    assert np.abs(ours.f_iso - theirs.f_iso).max() < 1e-3
    assert np.abs(ours.f_wm - theirs.f_wm).max() < 1e-3
    assert 0.05 < np.median(ours.f_iso) < 0.95  # real brain voxels: mixed, not degenerate


# The global TV iteration amplifies rounding: DIPY's own float32 result moves by 3e-3 (R=1) and 8e-3 (R=2) of the
# voxel maximum when its input is perturbed by 1e-6. Our float32 stays within 1e-2 at R=1; R>1 is compared in float64.
@pytest.mark.parametrize("acceleration,n_iter,precision", [(1, 600, "float32"), (2, 150, "float64")])
def test_global_tv_equals_dipy_on_3d_block(multishell_phantom, acceleration, n_iter, precision):
    g, _ = multishell_phantom
    ph = make_phantom(g, (5, 5, 4), snr=15, seed=4, csf_fraction=(0.0, 0.3))
    mask = np.ones(ph.data.shape[:3], bool)
    mask[0, 0, :] = False  # a mask that is not the whole box
    vertices = get_sphere("repulsion724").vertices
    options = dict(n_iter=n_iter, voxelwise=False, use_tv=True, R=acceleration)
    ours = RumbaSDModel(g, precision=precision, **options).fit(ph.data, mask)
    theirs = dipy_model(g, vertices, **options).fit(ph.data, mask=mask)
    assert relative_odf_error(ours.odf()[mask], theirs.odf()[mask]).max() < 1e-2
    assert np.abs(ours.f_iso[mask] - theirs.f_iso[mask]).max() < 1e-2
    # TV changes the result: the regularised fit differs from the voxelwise one
    voxelwise = RumbaSDModel(g, n_iter=n_iter).fit(ph.data, mask)
    assert relative_odf_error(voxelwise.odf()[mask], ours.odf()[mask]).max() > 1e-2


def test_phantom_accuracy_with_peaks():
    """1-2 fibres, b=2000, 150 directions, SNR 20: DIPY's RUMBA gives ~3.0 deg and ~78% (issue figures)."""
    dirs = repulsion_sphere(150, seed=5).hemisphere
    g = gradient_table(np.r_[np.zeros(10), np.full(150, 2000.0)], np.r_[np.zeros((10, 3)), dirs].T, frame="world")
    ph = make_phantom(g, (24, 24, 6), n_fibres=(1, 2), snr=20, seed=7, min_separation_deg=30)
    fit = RumbaSDModel(g).fit(ph.data)
    sh = amplitudes_to_sh(fit.odf(), fit.model.vertices, 8)
    v = find_peaks(sh).vectors
    u = v / np.linalg.norm(v, axis=-1, keepdims=True)
    truth, one, two = ph.directions, ph.n_fibres == 1, ph.n_fibres == 2
    err = np.degrees(np.arccos(np.clip(np.abs(np.sum(u[..., 0, :] * truth[..., 0, :], -1)), 0, 1)))
    assert np.nanmean(err[one]) <= 3.0
    assert np.mean(np.isfinite(v[..., 1, 0])[one]) <= 0.02
    found = [np.degrees(np.arccos(np.clip(np.abs(np.einsum("...pi,...i->...p", np.nan_to_num(u), truth[..., k, :])).max(-1),
                                          0, 1))) < 15 for k in (0, 1)]
    assert np.mean((found[0] & found[1])[two]) >= 0.78


def test_nan_and_empty_voxels_get_nan_and_status(multishell_phantom):
    g, ph = multishell_phantom
    data = ph.data.reshape(-1, g.n_volumes)[:6].copy()
    data[1, 3] = np.nan
    data[2, g.b0s_mask] = 0.0
    fit = RumbaSDModel(g, n_iter=50).fit(data)
    assert fit.status.tolist() == [0, 1, 2, 0, 0, 0]
    assert np.all(np.isnan(fit.fractions[[1, 2]])) and np.all(np.isfinite(fit.fractions[[0, 3, 4, 5]]))
    assert np.allclose(fit.fractions[[0, 3, 4, 5]].sum(axis=1), 1.0)


def test_bad_inputs(multishell_phantom):
    g, ph = multishell_phantom
    with pytest.raises(DwiflowInputError, match="single slice"):
        RumbaSDModel(g, voxelwise=False, use_tv=True, n_iter=5).fit(ph.data[:, :, :1])
    with pytest.raises(DwiflowInputError, match="4D volume"):
        RumbaSDModel(g, voxelwise=False, n_iter=5).fit(ph.data.reshape(-1, g.n_volumes))
    with pytest.raises(DwiflowInputError, match="positive diffusivities"):
        RumbaSDModel(g, wm_response=(1.7e-3, -0.2e-3, -0.2e-3))
    with pytest.raises(DwiflowInputError, match="decreasing order"):
        RumbaSDModel(g, wm_response=(0.2e-3, 0.2e-3, 1.7e-3))
    with pytest.raises(DwiflowInputError, match="csf_response"):
        RumbaSDModel(g, csf_response=-3e-3)
    with pytest.raises(DwiflowInputError, match="n_coils"):
        RumbaSDModel(g, recon_type="sos")
    with pytest.raises(DwiflowInputError, match="recon_type"):
        RumbaSDModel(g, recon_type="grappa")
    with pytest.raises(DwiflowInputError, match="global fit"):
        RumbaSDModel(g, use_tv=True)
    with pytest.raises(DwiflowInputError, match="b=0"):
        RumbaSDModel(g.subset(np.flatnonzero(~g.b0s_mask)))
    with pytest.raises(DwiflowInputError, match="per diffusion-weighted shell"):
        RumbaSDModel(g, wm_response=np.ones((2, 3)) * 1e-3)
