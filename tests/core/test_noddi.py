"""NODDI as AMICO fits it: the solvers, phantom truth, and dmri-amico 2.x on real data and on a phantom."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import fibonacci_sphere, real_run, write_gradients, write_nifti

from dwiflow.core.noddi import NoddiModel, watson_concentration


def noddi_signal(bvals, bvecs, direction, icvf, odi, isovf, d_par=1.7e-3, d_iso=3e-3) -> np.ndarray:
    """The NODDI signal (Zhang et al. 2012) by brute force: the Watson distribution sampled on 8000 directions (not
    dwiflow's Legendre series), its sticks, the hindered compartment with the Watson-averaged zeppelin and
    tortuosity, and free water."""
    sphere = fibonacci_sphere(8000)
    weights = np.exp(watson_concentration(odi) * ((sphere @ direction) ** 2 - 1))
    weights /= weights.sum()
    stick = np.exp(-np.outer(bvals, np.ones(len(sphere))) * d_par * (bvecs @ sphere.T) ** 2) @ weights
    spread = weights @ (sphere @ direction) ** 2
    d_perp = d_par * (1 - icvf)
    par, perp = d_perp + (d_par - d_perp) * spread, d_perp + (d_par - d_perp) * (1 - spread) / 2
    hindered = np.exp(-bvals * (perp + (par - perp) * (bvecs @ direction) ** 2))
    return (1 - isovf) * (icvf * stick + (1 - icvf) * hindered) + isovf * np.exp(-bvals * d_iso)


def _phantom(bvals, bvecs, n: int, seed: int, snr: float | None):
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(n, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    truth = np.column_stack([rng.uniform(0.2, 0.85, n), rng.uniform(0.05, 0.7, n), rng.uniform(0.0, 0.3, n)])
    data = np.stack([noddi_signal(bvals, bvecs, d, *t) for d, t in zip(directions, truth)]) * 1000.0
    if snr is not None:
        sigma = 1000.0 / snr
        data = np.hypot(data + rng.normal(0, sigma, data.shape), rng.normal(0, sigma, data.shape))
    return data, truth


def test_solvers_equal_scipy_nnls_and_the_elastic_net_optimality_conditions():
    """The active-set solver works on the Gram matrix: given A (as one "shell" whose Legendre block is the identity,
    so that G = AᵀA), NNLS must fit as well as SciPy's (QR-based) NNLS, with columns in near-identical triples as
    the NODDI dictionary's neighbouring atoms; the elastic net must meet its optimality conditions from any start."""
    from scipy.optimize import nnls

    from dwiflow.core._noddi_kernel import nonnegative_elastic_net

    rng = np.random.default_rng(0)
    for _ in range(50):
        base = np.abs(rng.normal(size=(60, 12)))
        matrix = np.repeat(base, 3, axis=1) + 1e-3 * rng.normal(size=(60, 36))  # near twins
        target = np.abs(rng.normal(size=60)) * 3
        series, blocks, scale = matrix[None].copy(), np.eye(60)[None].copy(), np.ones(36)
        everything, none = np.ones(36, dtype=bool), np.zeros(36, dtype=bool)

        def solve(lambda1, lambda2, start):
            gram, known = np.empty((36, 36)), np.zeros(36, dtype=bool)
            shared, shared_known = np.empty((36, 36)), np.zeros(36, dtype=bool)
            return nonnegative_elastic_net(series, blocks, np.ones((1, 60), dtype=bool), 0, scale, matrix.T @ target,
                                           lambda1, lambda2, everything, start,
                                           1e-10 * max(1.0, np.abs(target).max()), 500, gram, known, shared,
                                           shared_known)

        ours = solve(0.0, 0.0, none)
        reference, _ = nnls(matrix, target)
        assert np.linalg.norm(matrix @ ours - target) <= np.linalg.norm(matrix @ reference - target) + 1e-9
        # elastic net: KKT conditions (gradient 0 on the support, <= 0 off it) from any start
        lambda1, lambda2 = 0.5, 1e-3
        x = solve(lambda1, lambda2, rng.random(36) < 0.3)
        gradient = matrix.T @ (target - matrix @ x) - lambda1 - lambda2 * x
        assert np.all(x >= 0) and np.all(np.abs(gradient[x > 0]) < 1e-8) and np.all(gradient[x == 0] < 1e-8)
        assert np.allclose(x, solve(lambda1, lambda2, none), atol=1e-10)


def test_phantom_parameters_are_recovered(record):
    """Noise-free and SNR-30 signals of a brute-force NODDI forward model at off-grid parameters."""
    from dwiflow.core.gradients import gradient_table

    directions = fibonacci_sphere(60)
    bvals = np.concatenate([np.zeros(6), np.full(30, 1000.0), np.full(60, 2000.0)])
    bvecs = np.concatenate([np.zeros((6, 3)), directions[::2], directions])
    gtab = gradient_table(bvals, bvecs.T, frame="world")
    for snr, limits in ((None, (0.03, 0.03, 0.02)), (30, (0.06, 0.06, 0.05))):
        data, truth = _phantom(bvals, bvecs, 200, seed=1, snr=snr)
        fit = NoddiModel(gtab).fit(data[:, None, None, :], n_threads=1)
        assert np.all(fit.status == 0)
        estimates = np.column_stack([fit.icvf.ravel(), fit.odi.ravel(), fit.isovf.ravel()])  # QSIRecon's names
        assert np.array_equal(estimates[:, 0], fit.ndi.ravel()) and np.array_equal(estimates[:, 2], fit.fwf.ravel())
        errors = np.median(np.abs(estimates - truth), axis=0)
        for name, error, limit in zip(("ICVF", "ODI", "ISOVF"), errors, limits):
            assert error < limit, (name, snr, error)
            record("noddi", f"{name} median absolute error, phantom {'noise-free' if snr is None else f'SNR {snr}'}",
                   error, f"< {limit}", "ground truth")


@pytest.fixture(scope="module")
def amico_runs(tmp_path_factory):
    """dmri-amico 2.x's NODDI (its defaults) on sub-01 b1kb2k and on an SNR-30 phantom with the same scheme (the
    kernels, generated once, take ~2 minutes)."""
    import amico
    import nibabel as nib

    root = tmp_path_factory.mktemp("amico")
    paths = real_run("sub-01_acq-b1kb2k")
    bvals = np.loadtxt(paths["bval"])
    bvecs = np.loadtxt(paths["bvec"]).T
    data, truth = _phantom(bvals, np.where(bvals[:, None] > 0, bvecs, 0.0), 400, seed=2, snr=30)
    phantom = {"dwi": write_nifti(root / "phantom.nii.gz", data.reshape(20, 20, 1, -1).astype(np.float32)),
               "bval": paths["bval"], "bvec": paths["bvec"],
               "mask": write_nifti(root / "phantom_mask.nii.gz", np.ones((20, 20, 1), dtype=np.uint8))}
    amico.setup()
    results = {}
    for name, run in (("real", paths), ("phantom", phantom)):
        work = root / name
        work.mkdir()
        amico.util.fsl2scheme(str(run["bval"]), str(run["bvec"]), schemeFilename=str(work / "dwi.scheme"))
        evaluation = amico.Evaluation(study_path=str(root), subject=name, output_path=str(work / "out"))
        evaluation.set_config("nthreads", 1)
        evaluation.load_data(str(run["dwi"]), str(work / "dwi.scheme"), mask_filename=str(run["mask"]), b0_thr=0)
        evaluation.set_model("NODDI")
        evaluation.generate_kernels(regenerate=False)  # the same scheme: the second run reuses the kernels
        evaluation.load_kernels()
        evaluation.fit()
        evaluation.save_results()
        results[name] = {"paths": run, **{key: nib.load(work / "out" / f"fit_{key}.nii.gz").get_fdata()
                                          for key in ("NDI", "ODI", "FWF")}}
    results["phantom"]["truth"] = truth
    return results


@pytest.mark.parametrize("name", ["real", "phantom"])
def test_maps_equal_amico(amico_runs, name, record):
    from dwiflow.tasks.io import load_dwi, load_mask

    run = amico_runs[name]
    dwi = load_dwi(run["paths"]["dwi"], run["paths"]["bval"], run["paths"]["bvec"])
    mask = load_mask(run["paths"]["mask"], dwi.data.shape[:3], dwi.affine)
    fit = NoddiModel(dwi.gtab).fit(dwi.data, mask, n_threads=1)
    ok = (fit.status == 0) & mask
    assert ok[mask].mean() > 0.99
    for ours, key, label in ((fit.ndi, "NDI", "ICVF"), (fit.odi, "ODI", "ODI"), (fit.fwf, "FWF", "ISOVF")):
        difference = np.median(np.abs(ours[ok] - run[key][ok]))
        assert difference <= 0.01, (label, difference)
        record("noddi", f"{label} median absolute difference ({'sub-01 b1kb2k' if name == 'real' else 'phantom SNR 30'}"
               f", {ok.sum()} voxels)", difference, "<= 0.01", "dmri-amico 2.1 NODDI")
    if name == "phantom":  # both against the truth
        truth = run["truth"]
        for column, (ours, key) in enumerate(((fit.ndi, "NDI"), (fit.odi, "ODI"), (fit.fwf, "FWF"))):
            mine = np.median(np.abs(ours[:, :, 0].ravel() - truth[:, column]))
            theirs = np.median(np.abs(run[key][:, :, 0].ravel() - truth[:, column]))
            assert mine <= theirs + 0.01, (key, mine, theirs)


def test_data_noddi_cannot_fit_are_refused(tmp_path, capsys):
    from dwiflow.cli.dwirecon import main as dwirecon

    directions = fibonacci_sphere(30)
    cases = ((np.concatenate([[0.0], np.full(30, 1000.0)]), np.concatenate([np.zeros((1, 3)), directions]),
              "NODDI needs at least two diffusion-weighted shells"),
             (np.concatenate([np.full(30, 1000.0), np.full(30, 2000.0)]), np.concatenate([directions, directions]),
              "NODDI needs b=0 volumes"))
    for bvals, bvecs, message in cases:
        data = np.tile(noddi_signal(bvals, bvecs, np.array([0, 0, 1.0]), 0.5, 0.3, 0.1) * 1000, (2, 2, 1, 1))
        dwi = write_nifti(tmp_path / "dwi.nii.gz", data.astype(np.float32))
        bval, bvec = write_gradients(tmp_path / "dwi", bvals, bvecs.T)
        out = tmp_path / "icvf.nii.gz"
        assert dwirecon(["noddi", str(dwi), str(bval), str(bvec), "--icvf", str(out)]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and message in error, error
        assert not out.exists()
