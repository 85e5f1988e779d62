import numpy as np
import pytest
from dipy.core.gradients import gradient_table as dipy_gradient_table
from dipy.reconst.csdeconv import auto_response_ssst

from dwiflow.core.errors import DwiflowInputError
from dwiflow.core.response import (
    ResponseFunction,
    amp2response,
    fa_response_voxels,
    mask_for_response_ssst,
    response_constraints,
    response_from_mask_ssst,
    roi_mask,
    solve_convex_qp,
    tensor_response_zonal,
)
from dwiflow.core.sims import acquisition_scheme, make_phantom
from dwiflow.tasks.io import load_dwi, read_bvals, read_bvecs
from tests.conftest import real_run

EVALS = (1.7e-3, 0.3e-3, 0.3e-3)


@pytest.fixture(scope="module")
def single_fibre_phantom():
    gtab = acquisition_scheme("multi")
    return make_phantom(gtab, (20, 20, 5), n_fibres=1, snr=None, evals=EVALS, seed=11)


def test_amp2response_recovers_the_analytic_response(single_fibre_phantom):
    ph = single_fibre_phantom
    signals = ph.data.reshape(-1, ph.gtab.n_volumes)
    fibres = ph.directions[..., 0, :].reshape(-1, 3)
    est = amp2response(signals, fibres, ph.gtab)
    truth = tensor_response_zonal(np.array(EVALS), 100.0, est.bvalues, est.lmax)
    assert np.allclose(est.bvalues, [0, 1000, 2000, 3000], atol=1)
    err = np.abs(est.coefficients - truth.coefficients) / truth.coefficients[:, :1]
    assert err.max() < 1e-5  # noiseless: exact but for the kernel's l>10 content, which lmax 10 cannot hold


def test_amp2response_at_snr_30_is_within_2_percent_up_to_b2000(single_fibre_phantom):
    # At b=3000 the signal along the fibre (S0·e^-5.1 ≈ 0.6) sits below the Rician noise floor (σ=3.3),
    # which biases that shell by ~6%: a property of magnitude data, not of the estimator.
    gtab = single_fibre_phantom.gtab
    ph = make_phantom(gtab, (20, 20, 5), n_fibres=1, snr=30, evals=EVALS, seed=12)
    est = amp2response(ph.data.reshape(-1, gtab.n_volumes), ph.directions[..., 0, :].reshape(-1, 3), gtab,
                       shells=[0, 1000, 2000], lmax=[0, 8, 8])
    truth = tensor_response_zonal(np.array(EVALS), 100.0, est.bvalues, est.lmax)
    err = np.abs(est.coefficients - truth.coefficients) / truth.coefficients[:, :1]
    assert err.max() < 0.02


def test_constrained_solution_is_the_qp_optimum():
    cvxpy = pytest.importorskip("cvxpy")
    rng = np.random.default_rng(0)
    a = rng.standard_normal((40, 6))
    hessian = a.T @ a
    linear = a.T @ rng.standard_normal(40) * 5
    c = response_constraints(10)
    ours = solve_convex_qp(hessian, linear, c)
    x = cvxpy.Variable(6)
    cvxpy.Problem(cvxpy.Minimize(0.5 * cvxpy.quad_form(x, hessian) - linear @ x), [c @ x >= 0]).solve(solver="CLARABEL")
    assert np.all(c @ ours >= -1e-9)
    assert np.allclose(ours, x.value, atol=1e-5 * np.abs(x.value).max())
    assert not np.allclose(ours, np.linalg.solve(hessian, linear), atol=1e-3)  # the constraints were active


def test_response_text_round_trip_and_errors():
    r = ResponseFunction(np.array([0, 1000.0]), np.array([[10.0, 0, 0], [5, -2, 0.5]]), [0, 4])
    text = r.to_text()
    assert text.splitlines()[0] == "# Shells: 0,1000"
    back = ResponseFunction.from_text(text)
    assert np.allclose(back.coefficients, r.coefficients) and np.allclose(back.bvalues, r.bvalues)
    with pytest.raises(DwiflowInputError, match="no '# Shells:' line"):
        ResponseFunction.from_text("1 2 3\n4 5 6\n")
    with pytest.raises(DwiflowInputError, match="cannot parse"):
        ResponseFunction.from_text("# Shells: 1000\n1 two 3\n")


def test_amp2response_bad_inputs(single_fibre_phantom):
    ph = single_fibre_phantom
    signals = ph.data.reshape(-1, ph.gtab.n_volumes)[:50]
    fibres = ph.directions[..., 0, :].reshape(-1, 3)[:50].copy()
    with pytest.raises(DwiflowInputError, match="no shell at b=5000"):
        amp2response(signals, fibres, ph.gtab, shells=[5000])
    for bad in (3, -2):
        with pytest.raises(DwiflowInputError, match="non-negative even integer"):
            amp2response(signals, fibres, ph.gtab, lmax=[0, bad, 8, 8])
    with pytest.raises(DwiflowInputError, match="2 lmax values given for 4 shells"):
        amp2response(signals, fibres, ph.gtab, lmax=[0, 8])
    with pytest.raises(DwiflowInputError, match="b=0 shell"):
        amp2response(signals, fibres, ph.gtab, lmax=[2, 8, 8, 8])
    fibres[3] = np.nan
    fibres[7] = 0
    with pytest.raises(DwiflowInputError, match="2 of the 50 selected voxels have a NaN or zero fibre direction"):
        amp2response(signals, fibres, ph.gtab)
    with pytest.raises(DwiflowInputError, match="single-fibre mask is empty"):
        amp2response(signals[:0], fibres[:0], ph.gtab)


def test_external_directions_equal_the_gradient_path(single_fibre_phantom):
    ph = single_fibre_phantom
    shell = ph.gtab.find_shell(2000)
    signals = ph.data.reshape(-1, ph.gtab.n_volumes)
    fibres = ph.directions[..., 0, :].reshape(-1, 3)
    via_gtab = amp2response(signals, fibres, ph.gtab, shells=[2000])
    via_file = amp2response(signals[:, shell.indices], fibres, directions=ph.gtab.bvecs[shell.indices])
    assert np.allclose(via_gtab.coefficients, via_file.coefficients, rtol=1e-12)


@pytest.mark.parametrize("run", ["sub-01_acq-b1kb2k", "sub-01_acq-b6kmax"])
def test_ssst_equals_dipy_auto_response_ssst(run):
    paths = real_run(run)
    dwi = load_dwi(paths["dwi"], paths["bval"], paths["bvec"])
    data = np.asarray(dwi.data, dtype=float)
    dgtab = dipy_gradient_table(read_bvals(paths["bval"]), bvecs=read_bvecs(paths["bvec"]).T)
    for radii, thr in ((10, 0.7), (20, 0.5)):
        (ref_evals, ref_s0), _ = auto_response_ssst(dgtab, data, roi_radii=radii, fa_thr=thr)
        voxels = mask_for_response_ssst(data, dwi.gtab, roi_radii=radii, fa_threshold=thr)
        ours = response_from_mask_ssst(data, dwi.gtab, voxels)
        assert np.allclose(ours.evals, ref_evals, rtol=1e-6, atol=0)
        assert ours.s0 == pytest.approx(ref_s0, rel=1e-6)


def test_ssst_equals_dipy_and_truth_on_a_phantom():
    gtab = acquisition_scheme("single")
    ph = make_phantom(gtab, (12, 12, 6), n_fibres=1, snr=None, evals=EVALS, seed=5)
    dgtab = dipy_gradient_table(gtab.bvals, bvecs=gtab.bvecs)
    (ref_evals, ref_s0), _ = auto_response_ssst(dgtab, ph.data, roi_radii=4, fa_thr=0.7)
    ours = response_from_mask_ssst(ph.data, gtab, mask_for_response_ssst(ph.data, gtab, roi_radii=4))
    assert np.allclose(ours.evals, ref_evals, rtol=1e-6) and ours.s0 == pytest.approx(ref_s0, rel=1e-6)
    assert np.allclose(ours.evals, EVALS, rtol=1e-8) and ours.s0 == pytest.approx(100.0)


def test_ssst_no_voxel_names_the_count_and_option():
    gtab = acquisition_scheme("single")
    ph = make_phantom(gtab, (8, 8, 4), n_fibres=1, snr=None, evals=(0.9e-3, 0.8e-3, 0.8e-3))
    with pytest.raises(DwiflowInputError, match=r"no voxel with FA > 0.7 among the \d+ voxels of the ROI.*lower fa_threshold"):
        mask_for_response_ssst(ph.data, gtab)


def test_roi_mask_shrinks_like_dipy():
    m = roi_mask((104, 104, 2), None, 10)
    assert m.sum() == 21 * 21 * 2  # z radius shrinks to 1 around centre 1 (slices 0..2, 2 is outside)
    with pytest.raises(DwiflowInputError, match="outside the volume"):
        roi_mask((10, 10, 10), (10, 0, 0), 2)


def test_fa_selection_recovers_the_response_on_a_mixed_phantom():
    gtab = acquisition_scheme("single")
    ph = make_phantom(gtab, (20, 20, 8), n_fibres=(1, 2), snr=None, evals=EVALS, seed=8)
    voxels, v1, fa = fa_response_voxels(ph.data, gtab, np.ones((20, 20, 8), bool), number=100)
    assert voxels.sum() == 100 and np.all(ph.n_fibres[voxels] == 1)  # the highest FA is single-fibre
    est = amp2response(ph.data[voxels], v1[voxels], gtab, shells=[1000])
    truth = tensor_response_zonal(np.array(EVALS), 100.0, est.bvalues, est.lmax)
    assert np.abs(est.coefficients - truth.coefficients).max() / truth.coefficients[0, 0] < 1e-6
    with pytest.raises(DwiflowInputError, match="empty after 3 erosions"):
        fa_response_voxels(ph.data, gtab, np.pad(np.ones((2, 2, 8), bool), ((9, 9), (9, 9), (0, 0))))


def test_nonnegative_least_squares_is_optimal():
    """Our Lawson-Hanson NNLS against scipy.optimize.nnls on random problems of the shapes solve_convex_qp builds
    (few rows, up to hundreds of columns), and the optimality (KKT) conditions."""
    from scipy.optimize import nnls

    from dwiflow.core.response import nonnegative_least_squares

    rng = np.random.default_rng(11)
    for _ in range(200):
        rows, cols = int(rng.integers(3, 30)), int(rng.integers(2, 400))
        a, b = rng.normal(size=(rows, cols)), rng.normal(size=rows)
        ours = nonnegative_least_squares(a, b, 50 * cols)
        reference = nnls(a, b, maxiter=50 * cols)[0]
        assert np.linalg.norm(a @ ours - b) <= np.linalg.norm(a @ reference - b) + 1e-10
        gradient = a.T @ (b - a @ ours)
        assert ours.min() >= 0 and gradient.max() <= 1e-8  # no improving direction
        assert np.all(np.abs(gradient[ours > 0]) <= 1e-8)  # stationary on the free variables


@pytest.mark.parametrize("layout", ["C", "F"])
def test_dhollander_volume_means_match_each_shells_clipped_mean(layout):
    """dhollander's shell means (signal clipped at 0, as mrcalc -max 0 then mrmath mean) and the mean over all
    volumes, computed by slabs of voxels smaller than the image (on one thread or two), equal the per-shell means of
    the clipped signal to float32 rounding, for C- and Fortran-ordered images (a NIfTI image's array is
    Fortran-ordered)."""
    from dwiflow.core.response_dhollander import volume_means

    gtab = acquisition_scheme("multi")
    data = make_phantom(gtab, (9, 7, 5), n_fibres=(1, 2), snr=5, seed=3).data.astype(np.float32)
    data[2, 3, 1, :4] = -50.0  # negative samples: clipped in the shell means, kept in the overall mean
    data = np.asfortranarray(data) if layout == "F" else np.ascontiguousarray(data)
    means, overall = volume_means(data, gtab, slab=37)
    threaded = volume_means(data, gtab, slab=37, n_threads=2)  # the slabs on two threads: the same bits
    assert all(np.array_equal(a, b) for a, b in zip([*means, overall], [*threaded[0], threaded[1]]))
    for shell, mean in zip(gtab.shells, means):
        expected = np.maximum(data[..., shell.indices].astype(np.float64), 0).mean(axis=-1)
        assert mean.shape == data.shape[:3]
        np.testing.assert_allclose(mean, expected, rtol=2e-7, atol=0)
    np.testing.assert_allclose(overall, data.astype(np.float64).mean(axis=-1), rtol=2e-7, atol=1e-5)
    first = next(k for k, shell in enumerate(gtab.shells) if 0 in shell.indices)
    unclipped = data[2, 3, 1, gtab.shells[first].indices].astype(np.float64).mean()
    assert means[first][2, 3, 1] > unclipped  # the negative samples count as 0 in the shell's mean
    # within a region (dhollander's eroded mask): the same values there, bit for bit, and 0 elsewhere
    region = np.zeros(data.shape[:3], dtype=bool)
    region[1:8, 2:6, 1:4] = True
    region[2, 3, 1] = region[0, 0, 0] = True
    inside, inside_overall = volume_means(data, gtab, slab=37, region=region)
    for full, part in zip([*means, overall], [*inside, inside_overall]):
        assert part.dtype == np.float32 and np.array_equal(part[region], full[region])
        assert not part[~region].any()
