"""SMT kernel and Watson FOD against dmipy 2.1 on sub-01 (both acquisitions) and a phantom.

Where the two answers differ, the better fit must be ours, judged by the objective dmipy itself minimises.
"""

import warnings

import numpy as np
import pytest

from dwiflow.core.sh import cart_to_sphere
from dwiflow.core.sims import acquisition_scheme, make_phantom
from dwiflow.core.smt import SmtModel
from dwiflow.core.smt_fod import fit_watson
from tests.conftest import real_run

WATSON = "SD1WatsonDistributed_1_SD1Watson_1_"
KERNEL = "SD1WatsonDistributed_1_G2Zeppelin_1_"


def _mask_voxels(acq: str, n: int):
    from dwiflow.tasks.io import load_dwi, load_mask

    paths = real_run(f"sub-01_acq-{acq}")
    run = load_dwi(paths["dwi"], paths["bval"], paths["bvec"])
    data = np.asarray(run.data[load_mask(paths["mask"], run.data.shape[:3], run.affine)], dtype=float)
    keep = np.linspace(0, data.shape[0] - 1, n).round().astype(int)  # spread over the mask's slices
    return run.gtab, data[keep]


def _dmipy_scheme(gtab):
    from dmipy_fit.core.acquisition_scheme import acquisition_scheme_from_bvalues

    return acquisition_scheme_from_bvalues(gtab.bvals * 1e6, gtab.bvecs, delta=0.0162, Delta=0.0265)


def _watson_model():
    from dmipy_fit.core.modeling_framework import MultiCompartmentModel
    from dmipy_fit.distributions.distribute_models import SD1WatsonDistributed
    from dmipy_fit.signal_models import gaussian_models

    return MultiCompartmentModel(models=[SD1WatsonDistributed(models=[gaussian_models.G2Zeppelin()])])


def _dmipy_watson(bvals, bvecs, kernel, data):
    """dmipy's Watson-dispersed zeppelin with our kernel fixed per voxel: (its fitted model, mu as unit vectors)."""
    from dmipy_fit.core.acquisition_scheme import acquisition_scheme_from_bvalues

    scheme = acquisition_scheme_from_bvalues(bvals * 1e6, bvecs, delta=0.0162, Delta=0.0265)
    mc = _watson_model()
    mc.set_fixed_parameter(KERNEL + "lambda_par", kernel.lambda_par * 1e-6)
    mc.set_fixed_parameter(KERNEL + "lambda_perp", kernel.lambda_perp * 1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted = mc.fit(scheme, data)
    theta, phi = fitted.fitted_parameters[WATSON + "mu"].T
    return fitted, np.stack([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)], axis=1)


def _angle(a, b):
    return np.degrees(np.arccos(np.clip(np.abs(np.sum(a * b, -1)), 0, 1)))


@pytest.mark.parametrize("acq", ["b1kb2k", "b6kmax"])
def test_kernel_equals_dmipy_on_sub01_or_fits_better(acq, record):
    """lambda_par/perp within 1% of dmipy's, or a lower MSE where they differ; the fitter alone equals dmipy's."""
    from dmipy_fit.core.modeling_framework import MultiCompartmentSphericalMeanModel
    from dmipy_fit.signal_models import gaussian_models
    from dmipy_fit.utils.spherical_mean import estimate_spherical_mean_multi_shell

    gtab, data = _mask_voxels(acq, 250)
    model = SmtModel(gtab)
    ours = model.fit(data)
    scheme = _dmipy_scheme(gtab)
    smt = MultiCompartmentSphericalMeanModel(models=[gaussian_models.G2Zeppelin()])
    smt.set_fractional_parameter("G2Zeppelin_1_lambda_perp", "G2Zeppelin_1_lambda_par")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = smt.fit(scheme, data).fitted_parameters
    their_params = np.c_[theirs["G2Zeppelin_1_lambda_par"] * 1e6, theirs["G2Zeppelin_1_lambda_perp_fraction"]]

    def agree(lambda_par, fraction):
        their_perp = np.prod(their_params, axis=1)  # 0 where dmipy's fraction is 0: compare with a 1e-9 floor
        return ((np.abs(lambda_par / their_params[:, 0] - 1) <= 0.01)
                & (np.abs(lambda_par * fraction - their_perp) <= 0.01 * their_perp + 1e-9))

    # 1. the whole estimator: our spherical means, our fit
    fits_better = ours.mse <= ((model.predict(their_params) - ours.spherical_means) ** 2).mean(1) * (1 + 1e-9)
    ok = agree(ours.lambda_par, ours.fraction) | fits_better
    print(f"{acq}: within 1% {np.mean(agree(ours.lambda_par, ours.fraction)):.3f}, or better fit {np.mean(ok):.3f}")
    record("smt", f"kernel (lambda_par, f) within 1% of dmipy's, or a better fit (sub-01 {acq})", np.mean(ok),
           ">= 0.95", "dmipy 2.1 SMT (zeppelin + stick)")
    assert np.mean(ok) >= 0.95
    # 2. the kernel fit alone, on dmipy's own spherical means
    s0 = data[:, gtab.b0s_mask].mean(axis=1, keepdims=True)
    their_means = np.array([estimate_spherical_mean_multi_shell(e, scheme) for e in data / s0])
    their_means = their_means[:, scheme.unique_dwi_indices]
    params, rss = model.fit_means(their_means)
    better_on_theirs = rss / their_means.shape[1] <= ((model.predict(their_params) - their_means) ** 2).mean(1) * (1 + 1e-9)
    print(f"{acq}: on dmipy's means within 1% {np.mean(agree(params[:, 0], params[:, 1])):.3f}, or better fit "
          f"{np.mean(agree(params[:, 0], params[:, 1]) | better_on_theirs):.3f}")
    assert np.mean(agree(params[:, 0], params[:, 1]) | better_on_theirs) >= 0.99
    if acq == "b6kmax":
        # 3-24 directions per shell: dmipy's minimum-norm SH fits at degree 6-14 shrink the l=0 term, so its
        # means (and hence its diffusivities) sit far below the plain shell averages; ours stay near them
        plain = np.stack([(data / s0)[:, s.indices].mean(axis=1) for s in model.shells], axis=1)
        assert np.median(np.abs(their_means / plain - 1)) > 0.5
        assert np.median(np.abs(ours.spherical_means / plain - 1)) < 0.1
        assert np.mean(agree(params[:, 0], params[:, 1])) >= 0.95
    else:
        assert np.mean(agree(ours.lambda_par, ours.fraction)) >= 0.7


def _watson_case(name: str):
    if name == "phantom":
        gtab = acquisition_scheme("multi")
        ph = make_phantom(gtab, (6, 6, 2), n_fibres=1, snr=30, seed=6)
        return gtab, ph.data.reshape(-1, gtab.n_volumes), ph.directions.reshape(72, -1, 3)[:, 0]
    gtab, data = _mask_voxels(name, 60)
    return gtab, data, None


@pytest.mark.parametrize("name", ["phantom", "b1kb2k", "b6kmax"])
def test_watson_equals_dmipy_or_fits_its_objective_better(name):
    """mu within 2 deg and ODI within 0.02 of dmipy's, or, where not, our parameters score lower on dmipy's own
    objective (its forward model, its normalisation) than dmipy's fit does."""
    gtab, data, truth = _watson_case(name)
    kernel = SmtModel(gtab).fit(data)
    ours = fit_watson(data, gtab, kernel.lambda_par, kernel.lambda_perp)
    scheme = _dmipy_scheme(gtab)
    fitted, their_mu = _dmipy_watson(gtab.bvals, gtab.bvecs, kernel, data)
    theirs = fitted.fitted_parameters

    reference = _watson_model()
    normalised = data / data[:, gtab.b0s_mask].mean(axis=1, keepdims=True)

    def dmipy_objective(mu_angles, odi):
        vector = reference.parameters_to_parameter_vector(**{
            WATSON + "mu": mu_angles, WATSON + "odi": odi,
            KERNEL + "lambda_par": kernel.lambda_par * 1e-6, KERNEL + "lambda_perp": kernel.lambda_perp * 1e-6})
        return ((reference.simulate_signal(scheme, vector) - normalised) ** 2).mean(axis=1)

    their_objective = dmipy_objective(theirs[WATSON + "mu"], theirs[WATSON + "odi"])
    assert np.allclose(their_objective, fitted.mean_squared_error(data), rtol=1e-8)  # the objective dmipy reports
    our_objective = dmipy_objective(np.stack(cart_to_sphere(ours.mu), axis=1), ours.odi)
    agree = (_angle(ours.mu, their_mu) <= 2) & (np.abs(ours.odi - theirs[WATSON + "odi"]) <= 0.02)
    better = our_objective <= their_objective * (1 + 1e-9)
    # An isotropic kernel (lambda_perp = lambda_par, CSF-like voxels) has no orientation: every (mu, ODI) predicts the
    # same signal. dmipy's forward model also overflows there (|E| ~ 1e19 at ODI 0.02 for f = 1 - 2e-8), so such
    # voxels are set aside; they must be few.
    oriented = kernel.fraction < 0.999
    assert np.mean(oriented) >= 0.8
    print(f"{name}: mu and ODI agree {np.mean(agree[oriented]):.3f}, or ours lower on dmipy's objective "
          f"{np.mean((agree | better)[oriented]):.3f} ({oriented.sum()} voxels with an anisotropic kernel)")
    assert np.mean((agree | better)[oriented]) >= 0.95
    assert np.mean(agree[oriented]) >= 0.65  # the rest: dmipy stopped on its own bounds (phi = +-pi, theta = 0) or mu is flat
    if truth is not None:
        # where they differ, ours is the one on the fibre
        differ = ~agree
        assert differ.any() and np.median(_angle(ours.mu, truth)[differ]) < np.median(_angle(their_mu, truth)[differ])
        assert np.mean(agree | better) == 1.0


def _white_matter_voxels(acq: str, n: int, min_fa: float = 0.4):
    from dwiflow.core.tensor import TensorModel

    gtab, data = _mask_voxels(acq, 100_000)
    data = data[TensorModel(gtab).fit(data).fa > min_fa]
    return gtab, data[np.linspace(0, data.shape[0] - 1, n).round().astype(int)]


@pytest.mark.parametrize("name", ["phantom", "b6kmax"])  # b1kb2k: in the objective comparison above
def test_watson_equals_dmipy_given_its_best_coordinate_frame(name):
    """dmipy parameterises mu by (theta, phi) with bounds and stops on them (phi = +-pi, theta = 0) where the
    fibre lies near that seam. The model is rotation invariant, so fitting the same data with the gradient table
    rotated is the same model; of three frames, each voxel keeps dmipy's fit with the lowest objective. Then mu is
    within 2 deg and ODI within 0.02 of ours in >= 95% of voxels (sub-01: white matter, tensor FA > 0.4, where mu
    is defined)."""
    from scipy.spatial.transform import Rotation

    if name == "phantom":
        gtab, data, _ = _watson_case(name)
        data = data[:24]
    else:
        gtab, data = _white_matter_voxels(name, 24)  # dmipy's brute-force start costs ~1 s per voxel and frame
    kernel = SmtModel(gtab).fit(data)
    ours = fit_watson(data, gtab, kernel.lambda_par, kernel.lambda_perp)
    frames = [np.eye(3)] + [Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
                            for angles in ([40, 70, 25], [-60, 30, 80])]
    mus, odis, objectives = [], [], []
    for rotation in frames:
        fitted, mu = _dmipy_watson(gtab.bvals, gtab.bvecs @ rotation.T, kernel, data)
        mus.append(mu @ rotation)  # back to the data's frame
        odis.append(fitted.fitted_parameters[WATSON + "odi"])
        objectives.append(fitted.mean_squared_error(data))
    best = np.argmin(objectives, axis=0)
    rows = np.arange(data.shape[0])
    their_mu, their_odi = np.stack(mus)[best, rows], np.stack(odis)[best, rows]
    agree = (_angle(ours.mu, their_mu) <= 2) & (np.abs(ours.odi - their_odi) <= 0.02)
    first_frame = (_angle(ours.mu, mus[0]) <= 2) & (np.abs(ours.odi - odis[0]) <= 0.02)
    print(f"{name}: mu and ODI agree with dmipy's best of 3 frames in {np.mean(agree):.3f} "
          f"(its first frame alone {np.mean(first_frame):.3f}) of {data.shape[0]} voxels")
    assert np.mean(agree) >= 0.95
