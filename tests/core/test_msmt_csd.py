"""Multi-tissue CSD on a three-tissue phantom: tissue fractions and WM fibre directions against the truth."""

import numpy as np

from dwiflow.core.csd import CsdModel
from dwiflow.core.response_dhollander import dhollander
from dwiflow.core.msmt_csd import MsmtCsdModel
from dwiflow.core.msmt_csd import tissue_fractions
from dwiflow.core.mtnormalise import mtnormalise
from dwiflow.core.peaks import find_peaks
from dwiflow.core.response import ResponseFunction
from dwiflow.core.sims import acquisition_scheme, three_tissue_phantom


def _angle(a, b):
    cos = np.abs(np.sum(a * b, -1)) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    return np.degrees(np.arccos(np.clip(cos, 0, 1)))


def test_three_tissue_phantom_fractions_and_fibres():
    """dhollander responses from the data, then MSMT-CSD and mtnormalise: each tissue's share of the b=0 signal
    within 0.03 of the truth (median absolute error, every voxel), and the WM FOD's first peak in nearly pure WM at
    least as close to the true fibre as single-shell CSD's (b=3000, the same WM response)."""
    g = acquisition_scheme("multi")
    ph = three_tissue_phantom(g, (16, 16, 8), snr=30, seed=11)
    mask = np.ones(ph.data.shape[:3], dtype=bool)
    responses = dhollander(ph.data, g, mask, erode=0)
    model = MsmtCsdModel(g, [responses.wm, responses.gm, responses.csf])
    fit = model.fit(ph.data, mask)
    tissues = fit.tissues
    normalised = mtnormalise(tissues, mask, np.eye(4), order=0).normalised
    b0 = np.flatnonzero(g.b0s_mask)[0]
    shares = []
    for t, image in enumerate(normalised):
        start, stop = model.parameter_slices[t]
        shares.append(image.reshape(-1, stop - start) @ model.forward[b0, start:stop])
    shares = np.stack(shares, axis=1)
    shares /= shares.sum(axis=1, keepdims=True)
    error = np.abs(shares - ph.signal_fractions.reshape(-1, 3))
    print("median abs error of the b=0 signal shares (WM, GM, CSF):", np.median(error, axis=0))
    assert np.all(np.median(error, axis=0) <= 0.03)
    # the tissue-fraction image (normalised l=0 terms over their sum) against the true volume fractions
    fractions = tissue_fractions([image[..., 0] if image.ndim == 4 else image for image in normalised])
    volume_error = np.median(np.abs(fractions.reshape(-1, 3) - ph.fractions.reshape(-1, 3)), axis=0)
    print("median abs error of the tissue fractions (WM, GM, CSF):", volume_error)
    assert np.all(volume_error <= 0.03)
    assert np.allclose(fractions.sum(axis=-1), 1.0)
    # WM fibres where the voxel is nearly pure WM with one fibre
    pure = (ph.fractions.reshape(-1, 3)[:, 0] >= 0.9) & (ph.wm.n_fibres.reshape(-1) == 1)
    truth = ph.wm.directions.reshape(pure.size, -1, 3)[pure, 0]
    msmt_peak = find_peaks(tissues[0].reshape(-1, 1, 1, 45)[pure], npeaks=1).vectors.reshape(-1, 3)
    shell = [s.bvalue for s in g.shells].index(3000.0)
    single = ResponseFunction(np.array([3000.0]), responses.wm.coefficients[shell:shell + 1])
    csd = CsdModel(g, single, shell=3000).fit(ph.data.reshape(-1, 1, 1, g.n_volumes)[pure])
    csd_peak = find_peaks(csd.sh, npeaks=1).vectors.reshape(-1, 3)
    msmt_error, csd_error = np.median(_angle(msmt_peak, truth)), np.median(_angle(csd_peak, truth))
    print(f"{pure.sum()} pure single-fibre WM voxels: median first-peak error MSMT {msmt_error:.2f} deg, "
          f"CSD {csd_error:.2f} deg")
    assert msmt_error <= csd_error + 0.5 and msmt_error <= 5
    # DIPY's names: shm_coeff is the WM FOD; odf() takes DIPY's own Sphere and peaks where find_peaks does
    from dipy.data import get_sphere as dipy_sphere

    sphere = dipy_sphere("repulsion724")
    assert np.array_equal(fit.shm_coeff, tissues[0])
    amplitudes = fit.odf(sphere).reshape(-1, sphere.vertices.shape[0])[pure]
    best_vertex = sphere.vertices[np.argmax(amplitudes, axis=1)]
    assert np.median(_angle(best_vertex, msmt_peak)) < 4.0  # repulsion724's vertices are ~8 degrees apart
    assert fit.odf(sphere, tissue=1).shape == tissues[1].shape[:3] + (sphere.vertices.shape[0],)


def test_determined_order_of_the_normalisation_field():
    """The mask's voxels determine the field's order: a 3D block every order; two tilted parallel planes (the
    two-slice sub-01 runs) order 1 (its 20-term cubic basis has rank 16 there); one plane order 0 (its coordinates
    are affinely dependent); one voxel none."""
    from dwiflow.core.mtnormalise import determined_order, polynomial_basis

    affine = np.array([[-2.0, 0, 0, 107.7], [0, 1.973, -0.327, -85.8], [0, 0.327, 1.973, -52.3], [0, 0, 0, 1]])

    def positions(shape):
        voxels = np.indices(shape).reshape(3, -1).T
        return voxels @ affine[:3, :3].T + affine[:3, 3]

    assert determined_order(positions((12, 10, 8)), 3) == 3
    slab = positions((40, 40, 2))
    assert np.linalg.matrix_rank(polynomial_basis((slab - slab.mean(0)) / slab.std(0), 3)) == 16
    assert determined_order(slab, 3) == 1
    assert determined_order(positions((40, 40, 1)), 3) == 0
    assert determined_order(positions((1, 1, 1)), 3) == 0
    assert determined_order(positions((12, 10, 3)), 3) == 2


def test_warm_start_from_an_earlier_active_set_reaches_the_same_solution_sooner():
    """A fit that starts every voxel from its active set of a fit of similar data (SS3T-CSD's next alternation;
    here the same voxels with other noise) returns the cold fit's coefficients (the projection is unique; the paths'
    rounding differs, by far less than the 1e-5 of the voxel's largest coefficient within which MRtrix3's are) in a
    fraction of the iterations; a start from a wrong set (another voxel's) still reaches them."""
    g = acquisition_scheme("multi")
    first = three_tissue_phantom(g, (12, 12, 4), snr=30, seed=5)
    second = three_tissue_phantom(g, (12, 12, 4), snr=30, seed=5)
    noisy = second.data + np.random.default_rng(1).normal(0, 5.0, second.data.shape)  # ~0.5% of S0 more noise
    responses = dhollander(first.data, g, np.ones(first.data.shape[:3], bool), erode=0)
    model = MsmtCsdModel(g, [responses.wm, responses.gm, responses.csf])
    earlier = model.fit(first.data, keep_active=True)
    assert earlier.active_rows.shape == (first.data[..., 0].size, 302) and earlier.active_rows.any(axis=1).all()
    cold = model.fit(noisy)
    warm = model.fit(noisy, start_active=earlier.active_rows)
    scale = np.abs(cold.coefficient_rows).max(axis=1, keepdims=True)
    assert np.all(cold.status_rows == 0) and np.all(warm.status_rows == 0)
    assert np.max(np.abs(warm.coefficient_rows - cold.coefficient_rows) / scale) < 1e-8
    assert warm.iteration_rows.mean() < 0.5 * cold.iteration_rows.mean(), (warm.iteration_rows.mean(),
                                                                              cold.iteration_rows.mean())
    shuffled = model.fit(noisy, start_active=np.roll(earlier.active_rows, 7, axis=0))
    assert np.max(np.abs(shuffled.coefficient_rows - cold.coefficient_rows) / scale) < 1e-8


def test_responses_that_are_not_a_list_of_response_functions_are_named():
    """DIPY's MultiShellResponse (its own basis and scaling) or a single ResponseFunction handed to MsmtCsdModel said
    "object of type 'MultiShellResponse' has no len()"; the error says what the model takes."""
    import pytest
    from dipy.reconst.mcsd import multi_shell_fiber_response

    from dwiflow.core.errors import DwiflowInputError

    gtab = acquisition_scheme("multi")
    shells = np.array([0.0, 1000.0, 2000.0, 3000.0])
    tensors = {name: np.array([[*evals, 100.0]] * 3) for name, evals in
               (("wm", (1.7e-3, 2e-4, 2e-4)), ("gm", (8e-4, 8e-4, 8e-4)), ("csf", (3e-3, 3e-3, 3e-3)))}
    dipy_response = multi_shell_fiber_response(8, shells, tensors["wm"], tensors["gm"], tensors["csf"])
    wm = ResponseFunction(shells, np.array([[100.0, -20.0, 5.0]] * 4), [4] * 4)
    for given, named in ((dipy_response, "got MultiShellResponse (DIPY's MultiShellResponse holds its own basis"),
                         (wm, "got ResponseFunction")):
        with pytest.raises(DwiflowInputError, match=r"responses: a list of ResponseFunction, one per tissue") as refused:
            MsmtCsdModel(gtab, given)
        assert named in str(refused.value)


def test_constraints_chosen_in_single_precision_reach_the_double_precision_solution(monkeypatch):
    """Each voxel's search chooses its constraints on single-precision values while the violations exceed
    COARSE_TOLERANCE · |y_u|, then goes on in double precision: the coefficients are the all-double search's (to
    rounding, far inside MRtrix3's 1e-5), also with a coarse tolerance below single precision's resolution, where
    rounding picks constraints that leave at once (the search then continues in double precision). Stopping at
    the coarse tolerance instead would be off by ~1e-2 of the voxel's largest coefficient."""
    import dwiflow.core.msmt_csd as msmt_csd

    g = acquisition_scheme("multi")
    phantom = three_tissue_phantom(g, (12, 12, 4), snr=30, seed=8)
    responses = dhollander(phantom.data, g, np.ones(phantom.data.shape[:3], bool), erode=0)
    model = MsmtCsdModel(g, [responses.wm, responses.gm, responses.csf])
    fits = {}
    for coarse in (0.0, msmt_csd.COARSE_TOLERANCE, 1e-9):
        monkeypatch.setattr(msmt_csd, "COARSE_TOLERANCE", coarse)
        fits[coarse] = model.fit(phantom.data)
    exact = fits[0.0]
    scale = np.abs(exact.coefficient_rows).max(axis=1, keepdims=True)
    for coarse, fit in fits.items():
        assert np.all(fit.status_rows == 0), coarse
        difference = np.max(np.abs(fit.coefficient_rows - exact.coefficient_rows) / scale)
        print(f"coarse tolerance {coarse:g}: {fit.iteration_rows.mean():.1f} additions a voxel "
              f"({exact.iteration_rows.mean():.1f} in double precision), largest difference {difference:.1e}")
        assert difference < 1e-8, (coarse, difference)
