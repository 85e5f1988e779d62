import nibabel as nib
import numpy as np
import pytest
from dipy.core.gradients import gradient_table as dipy_gradient_table
from dipy.reconst.dti import TensorModel as DipyTensorModel

from dwiflow.core.errors import DwiflowInputError
from dwiflow.core.sims import acquisition_scheme, make_phantom
from dwiflow.core.status import FitStatus
from dwiflow.core.tensor import (
    TensorModel,
    fractional_anisotropy,
)
from dwiflow.tasks.io import load_dwi, read_bvals, read_bvecs
from tests.conftest import real_run


@pytest.mark.parametrize("run", ["sub-01_acq-b1kb2k", "sub-01_acq-b6kmax"])
def test_wls_fa_md_equal_dipy_in_the_brain_mask(run, record):
    paths = real_run(run)
    dwi = load_dwi(paths["dwi"], paths["bval"], paths["bvec"])
    mask = nib.load(paths["mask"]).get_fdata() > 0
    ours = TensorModel(dwi.gtab).fit(dwi.data, mask)
    dgtab = dipy_gradient_table(read_bvals(paths["bval"]), bvecs=read_bvecs(paths["bvec"]).T)
    ref = DipyTensorModel(dgtab, fit_method="WLS").fit(np.asarray(dwi.data, dtype=float), mask=mask)
    # voxels whose mean diffusion-weighted signal exceeds their mean b=0 (noise at the mask's edge, b=0 ~ 10-25 where
    # the brain has hundreds) are non-physical: status SIGNAL_ABOVE_B0 and NaN; every other voxel equals DIPY
    signal = np.asarray(dwi.data[mask], dtype=float)
    above = signal[:, ~dwi.gtab.b0s_mask].mean(1) > signal[:, dwi.gtab.b0s_mask].mean(1)
    assert 0 < above.sum() < 0.005 * mask.sum()
    assert np.array_equal(ours.status[mask] == FitStatus.SIGNAL_ABOVE_B0, above)
    assert np.all(ours.status[mask][~above] == FitStatus.OK) and np.all(np.isnan(ours.fa[mask][above]))
    ok = mask & (ours.status == FitStatus.OK)
    fa_diff = np.abs(ours.fa - ref.fa)[ok].max()
    md_diff = np.abs(ours.md - ref.md)[ok].max() / np.abs(ref.md[ok]).max()
    record("tensor", f"FA, largest difference ({run}, {ok.sum()} voxels)", fa_diff, "< 1e-4", "DIPY 1.12 WLS")
    record("tensor", f"MD, largest difference / largest MD ({run})", md_diff, "< 1e-4", "DIPY 1.12 WLS")
    assert fa_diff < 1e-4
    assert md_diff < 1e-4
    # DIPY's TensorFit names for the rotation-invariant maps, with DIPY's definitions
    # (the mode where the tensor is not isotropic to rounding: at the eigenvalue floor it is 0/0, NaN here)
    anisotropic = ok & (np.ptp(ours.evals, axis=-1) > 1e-3 * ours.evals.mean(axis=-1))
    assert anisotropic.sum() > 0.99 * ok.sum()
    for name, scale in (("trace", np.abs(ref.trace[ok]).max()), ("mode", 1.0), ("linearity", 1.0),
                        ("planarity", 1.0), ("sphericity", 1.0)):
        theirs, mine = np.asarray(getattr(ref, name))[anisotropic], np.asarray(getattr(ours, name))[anisotropic]
        assert np.abs(mine - theirs).max() / scale < 1e-4, name
    assert ours.S0_hat is ours.s0


def test_noiseless_single_fibre_recovers_the_tensor_exactly():
    gtab = acquisition_scheme("multi")
    direction = np.array([[0.6, 0.0, 0.8]])
    ph = make_phantom(gtab, (3, 3, 2), directions=direction, fractions=[1.0], snr=None, evals=(1.7e-3, 0.3e-3, 0.3e-3))
    fit = TensorModel(gtab).fit(ph.data)
    assert np.allclose(fit.evals, [1.7e-3, 0.3e-3, 0.3e-3], rtol=1e-8)
    assert np.allclose(np.abs(fit.v1 @ direction[0]), 1, atol=1e-10)
    assert np.allclose(fit.s0, 100.0)
    assert np.allclose(fit.fa, fractional_anisotropy(np.array([1.7e-3, 0.3e-3, 0.3e-3])))


def test_noisy_single_fibre_phantom_fa_and_md_within_tolerance():
    gtab = acquisition_scheme("single")
    ph = make_phantom(gtab, (20, 20, 10), n_fibres=1, snr=50, seed=4)
    fit = TensorModel(gtab).fit(ph.data)
    true_fa = fractional_anisotropy(np.array([1.7e-3, 0.3e-3, 0.3e-3]))
    assert abs(np.median(fit.fa) - true_fa) < 0.02
    assert abs(np.median(fit.md) - 0.7667e-3) < 0.02e-3
    angle = np.degrees(np.arccos(np.clip(np.abs(np.sum(fit.v1 * ph.directions[..., 0, :], -1)), 0, 1)))
    assert np.median(angle) < 3


@pytest.mark.parametrize("fit_method", ["IWLS", "WLS"])
def test_the_fit_does_not_depend_on_memory_layout_voxel_order_or_threads(fit_method):
    """A NIfTI image's array is Fortran-ordered: its voxels are fitted in memory order, by chunks on threads. The
    thread count must not change a bit (as in a stage, BLAS on one thread); the order changes which voxels share a
    chunk, hence BLAS's last bits only; failures stay in place."""
    from dwiflow.tasks.registry import single_threaded_blas

    gtab = acquisition_scheme("single")
    ph = make_phantom(gtab, (23, 17, 9), n_fibres=(1, 2), snr=20, seed=7)
    data = ph.data.copy()
    data[3, 4, 5] = 0.0  # no signal
    data[10, 2, 1, 7] = np.nan  # a non-finite sample
    mask = np.ones(data.shape[:3], bool)
    mask[:, :, 0] = False
    mask[5:9, 3, :] = False
    model = TensorModel(gtab, fit_method=fit_method, chunk_size=97)
    with single_threaded_blas(scipy_blas=False):
        plain = model.fit(np.ascontiguousarray(data), mask)
        one, three = (model.fit(np.asfortranarray(data), mask, n_threads=n) for n in (1, 3))
    assert np.array_equal(one.lower_triangular, three.lower_triangular, equal_nan=True)
    assert np.array_equal(one.s0, three.s0, equal_nan=True) and np.array_equal(one.status, three.status)
    assert np.array_equal(one.status, plain.status)
    ok = plain.status == FitStatus.OK
    assert np.mean(ok[mask]) > 0.99 and np.all(plain.status[~mask] == 0)
    assert plain.status[3, 4, 5] == FitStatus.NO_SIGNAL and plain.status[10, 2, 1] == FitStatus.NONFINITE_INPUT
    relative = np.abs(one.lower_triangular - plain.lower_triangular)[ok].max() / np.abs(plain.lower_triangular[ok]).max()
    assert relative < 1e-12


def _iwls_in_double_precision(gtab, signal: np.ndarray, iterations: int = 2) -> np.ndarray:
    """dwi2tensor's fit written out voxel by voxel in double precision (numpy's least squares): samples raised to
    1e-6 of the voxel's largest, a first fit weighted by the measured signal, then refits weighted by the
    prediction. Rows of (Dxx, Dxy, Dyy, Dxz, Dyz, Dzz, ln S0)."""
    from dwiflow.core.tensor import tensor_design_matrix

    design = tensor_design_matrix(gtab)
    rows = []
    for voxel in signal.astype(np.float64):
        voxel = np.maximum(voxel, 1e-6 * voxel.max())
        weights = voxel
        for _ in range(1 + iterations):
            beta = np.linalg.lstsq(design * weights[:, None], np.log(voxel) * weights, rcond=None)[0]
            weights = np.exp(design @ beta)
        rows.append(beta)
    return np.array(rows)


def test_iwls_single_precision_steps_agree_with_double_precision_and_do_not_overflow():
    """The IWLS fit takes its logarithms and exponentials in single precision and scales each voxel's weights by
    their largest: its tensors stay within 1e-6 of the voxel's largest element of a double-precision fit, also in
    a voxel whose squared signal (1e60) would overflow single precision's range unscaled."""
    gtab = acquisition_scheme("multi")
    ph = make_phantom(gtab, (6, 5, 4), n_fibres=(1, 2), snr=25, seed=11)
    data = ph.data.astype(np.float32)
    data[0, 0, 0] *= np.float32(1e30 / data[0, 0, 0].max())
    fit = TensorModel(gtab, fit_method="IWLS", keep_flagged_values=True).fit(np.asfortranarray(data))
    reference = _iwls_in_double_precision(gtab, data.reshape(-1, gtab.n_volumes))
    ours = np.concatenate([fit.lower_triangular.reshape(-1, 6), np.log(fit.s0.reshape(-1, 1))], axis=1)
    assert np.all(np.isfinite(ours)) and np.all(fit.status[0, 0, 0] == FitStatus.OK)
    error = np.abs(ours[:, :6] - reference[:, :6]).max(axis=1) / np.abs(reference[:, :6]).max(axis=1)
    assert error.max() < 1e-6, error.max()
    assert np.abs(ours[:, 6] - reference[:, 6]).max() < 1e-6


def test_flagged_voxels_can_keep_their_values_as_dwi2tensor_writes_them():
    """``keep_flagged_values`` (dhollander's FA, as MRtrix3's dwi2tensor): a voxel whose diffusion-weighted signal
    exceeds its b=0 and a tensor with a negative eigenvalue keep their fitted values (by default NaN), with the same
    status; every other voxel is bit-identical."""
    gtab = acquisition_scheme("single")
    ph = make_phantom(gtab, (5, 4, 3), n_fibres=1, snr=30, seed=3)
    data = ph.data.copy()
    data[1, 2, 0, ~gtab.b0s_mask] = 1.4 * data[1, 2, 0, gtab.b0s_mask].mean()  # above its b=0
    negative = np.diag([1.5e-3, 0.4e-3, -0.2e-3])  # not a diffusion tensor, but the log-signal of one
    quadratic = np.einsum("ni,ij,nj->n", gtab.bvecs, negative, gtab.bvecs)
    data[3, 1, 2] = 800.0 * np.exp(-gtab.bvals * quadratic)
    checked = TensorModel(gtab, fit_method="IWLS").fit(data)
    raw = TensorModel(gtab, fit_method="IWLS", keep_flagged_values=True).fit(data)
    assert checked.status[1, 2, 0] == FitStatus.SIGNAL_ABOVE_B0 and checked.status[3, 1, 2] == FitStatus.NON_PHYSICAL
    assert np.all(np.isnan(checked.lower_triangular[[1, 3], [2, 1], [0, 2]]))
    assert np.array_equal(raw.status, checked.status) and np.all(np.isfinite(raw.lower_triangular))
    elements = raw.lower_triangular[3, 1, 2]  # DIPY order: xx, xy, yy, xz, yz, zz
    assert np.allclose(elements, [1.5e-3, 0, 0.4e-3, 0, 0, -0.2e-3], rtol=0, atol=1e-9)
    others = checked.status == FitStatus.OK
    assert others.sum() == others.size - 2 and np.all(np.isfinite(checked.lower_triangular[others]))
    assert np.array_equal(raw.lower_triangular[others], checked.lower_triangular[others])


def test_failed_voxels_get_nan_and_a_status_code():
    gtab = acquisition_scheme("single")
    ph = make_phantom(gtab, (4, 4, 1), n_fibres=1, snr=None)
    data = ph.data.copy()
    data[0, 0, 0, 5] = np.nan
    data[1, 1, 0, :] = 0.0
    fit = TensorModel(gtab).fit(data)
    assert fit.status[0, 0, 0] == FitStatus.NONFINITE_INPUT and np.isnan(fit.fa[0, 0, 0])
    assert fit.status[1, 1, 0] == FitStatus.NO_SIGNAL and np.isnan(fit.md[1, 1, 0])
    good = fit.status == 0
    assert good.sum() == 14 and np.all(np.isfinite(fit.fa[good]))


def test_bad_inputs_are_named():
    gtab = acquisition_scheme("single")
    with pytest.raises(DwiflowInputError, match="mask is empty"):
        TensorModel(gtab).fit(np.ones((2, 2, 2, gtab.n_volumes)), np.zeros((2, 2, 2), bool))
    with pytest.raises(DwiflowInputError, match="mask has shape"):
        TensorModel(gtab).fit(np.ones((2, 2, 2, gtab.n_volumes)), np.ones((2, 2), bool))
    with pytest.raises(DwiflowInputError, match="data has 3 volumes"):
        TensorModel(gtab).fit(np.ones((2, 2, 2, 3)))
    with pytest.raises(DwiflowInputError, match="fit_method"):
        TensorModel(gtab, fit_method="NLLS")
    with pytest.raises(DwiflowInputError, match="cannot determine a tensor"):
        TensorModel(gtab.subset(np.arange(8)))
