"""DKI: the closed forms against their definitions, phantom recovery, DIPY 1.12 and MRtrix3's dwi2tensor -dkt."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from conftest import fibonacci_sphere, real_run

from dwiflow.core.dki import (DIPY_KURTOSIS_ORDER, DiffusionKurtosisModel, carlson_rd, carlson_rf,
                              full_kurtosis_tensor)
from dwiflow.core.gradients import gradient_table
from dwiflow.core.status import FitStatus


def _scheme() -> "gradient_table":
    directions = fibonacci_sphere(64)
    bvals = np.concatenate([[0, 0], np.full(64, 1000.0), np.full(64, 2000.0), np.full(64, 3000.0)])
    bvecs = np.concatenate([np.zeros((2, 3)), directions, directions[::-1], directions]).T
    return gradient_table(bvals, bvecs, frame="world")


def _tissue(seed: int, evals=(1.7e-3, 0.5e-3, 0.3e-3)) -> tuple[np.ndarray, np.ndarray]:
    """A rotated diffusion tensor and the kurtosis tensor of a two-compartment mixture (a genuine W)."""
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    diffusion = rotation @ np.diag(evals) @ rotation.T
    other = rotation @ np.diag([1.0e-3, 0.9e-3, 0.8e-3]) @ rotation.T
    # W of a 50/50 mixture of D and `other` (Jensen 2005): 3/MD² times the covariance of the compartments' D
    mean = (diffusion + other) / 2
    md = np.trace(mean) / 3
    dev = [diffusion - mean, other - mean]
    full = np.zeros((3, 3, 3, 3))
    for d in dev:
        full += 0.5 * (np.einsum("ij,kl->ijkl", d, d) + np.einsum("ik,jl->ijkl", d, d) + np.einsum("il,jk->ijkl", d, d))
    full *= 3 / md ** 2 / 3  # the symmetrised covariance (3 pairings, each counted once) times 3/MD²
    return mean, full


def _signal(gtab, diffusion: np.ndarray, full: np.ndarray, s0: float = 1000.0) -> np.ndarray:
    g, b = gtab.bvecs, gtab.bvals
    adc = np.einsum("ni,ij,nj->n", g, diffusion, g)
    apparent_w = np.einsum("ni,nj,nk,nl,ijkl->n", g, g, g, g, full)
    md = np.trace(diffusion) / 3
    return s0 * np.exp(-b * adc + b * b * md * md * apparent_w / 6)


def _apparent_kurtosis(diffusion, full, directions):
    md = np.trace(diffusion) / 3
    adc = np.einsum("ni,ij,nj->n", directions, diffusion, directions)
    return md * md * np.einsum("ni,nj,nk,nl,ijkl->n", directions, directions, directions, directions, full) / adc ** 2


def test_carlson_integrals_equal_scipy():
    from scipy.special import elliprd, elliprf

    rng = np.random.default_rng(0)
    x, y, z = rng.uniform(0.05, 20, size=(3, 2000))
    assert np.max(np.abs(carlson_rf(x, y, z) / elliprf(x, y, z) - 1)) < 1e-12
    assert np.max(np.abs(carlson_rd(x, y, z) / elliprd(x, y, z) - 1)) < 1e-12


@pytest.mark.parametrize("method", ["WLS", "OLS", "IWLS"])
@pytest.mark.parametrize("evals", [(1.7e-3, 0.5e-3, 0.3e-3), (1.5e-3, 0.4e-3, 0.4e-3), (2.0e-3, 1.2e-3, 0.2e-3)])
def test_phantom_tensors_and_maps_equal_their_definitions(method, evals, record):
    """Noise-free signals of known D and W: both recovered; MK is the mean apparent kurtosis over the sphere, AK the
    apparent kurtosis along the principal eigenvector, RK its mean over the perpendicular circle, MKT the mean of W
    over the sphere (Hansen 2013), KFA its definition (Glenn 2015)."""
    gtab = _scheme()
    tissues = [_tissue(seed, evals) for seed in range(4)]
    data = np.stack([_signal(gtab, d, w) for d, w in tissues])[:, None, None, :]
    fit = DiffusionKurtosisModel(gtab, fit_method=method).fit(data)
    assert np.all(fit.status == FitStatus.OK)
    sphere = fibonacci_sphere(20000)
    for index, (diffusion, full) in enumerate(tissues):
        recovered = full_kurtosis_tensor(fit.kurtosis[index, 0, 0])
        assert np.max(np.abs(recovered - full)) < 1e-6 * np.max(np.abs(full))
        xx, xy, yy, xz, yz, zz = fit.lower_triangular[index, 0, 0]
        assert np.allclose([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]], diffusion, rtol=0, atol=1e-12)
        mk = _apparent_kurtosis(diffusion, full, sphere).mean()
        values, vectors = np.linalg.eigh(diffusion)
        principal = vectors[:, np.argmax(values)]
        ak = _apparent_kurtosis(diffusion, full, principal[None])[0]
        rk = _apparent_kurtosis(diffusion, full, _circle(principal)).mean()
        mkt = np.einsum("ni,nj,nk,nl,ijkl->n", sphere, sphere, sphere, sphere, full).mean()
        mkt_tensor = np.einsum("iijj->", full) / 5
        deviation = full.copy()
        identity = (np.einsum("ij,kl->ijkl", np.eye(3), np.eye(3)) + np.einsum("ik,jl->ijkl", np.eye(3), np.eye(3))
                    + np.einsum("il,jk->ijkl", np.eye(3), np.eye(3))) / 3
        deviation -= mkt_tensor * identity
        kfa = np.sqrt((deviation ** 2).sum() / (full ** 2).sum())
        nearly_equal = abs(evals[1] - evals[2]) < 0.025 * evals[1] and evals[1] != evals[2]
        got = {name: float(getattr(fit, name)[index, 0, 0]) for name in ("mk", "ak", "rk", "mkt", "kfa")}
        assert got["mk"] == pytest.approx(mk, rel=2e-3 if nearly_equal else 1e-5)
        assert got["ak"] == pytest.approx(ak, rel=1e-9)
        assert got["rk"] == pytest.approx(rk, rel=1e-6)
        assert got["mkt"] == pytest.approx(mkt, rel=1e-4) and got["mkt"] == pytest.approx(mkt_tensor, rel=1e-9)
        assert got["kfa"] == pytest.approx(kfa, rel=1e-9)
    if method == "WLS" and evals[1] != evals[2]:
        record("dki", f"MK vs mean apparent kurtosis over 20000 directions, relative (eigenvalues {evals})",
               abs(got["mk"] / mk - 1), "< 1e-4", "definition (Jensen 2005; closed form Tabesh 2011)")


def _kurtosis_maps_against_dipy(acq: str, method: str, record) -> None:
    from dipy.core.gradients import gradient_table as dipy_gradient_table
    from dipy.reconst.dki import DiffusionKurtosisModel as DipyModel

    from dwiflow.tasks.io import load_dwi, load_mask

    paths = real_run(f"sub-01_acq-{acq}")
    run = load_dwi(paths["dwi"], paths["bval"], paths["bvec"])
    mask = load_mask(paths["mask"], run.data.shape[:3], run.affine)
    signal = np.asarray(run.data[mask], dtype=float)
    ours = DiffusionKurtosisModel(run.gtab, fit_method=method).fit(signal[:, None, None, :])
    reference = DipyModel(dipy_gradient_table(run.gtab.bvals, bvecs=run.gtab.bvecs, b0_threshold=run.gtab.b0_threshold),
                          fit_method=method).fit(signal)
    ok = ours.status.ravel() == FitStatus.OK
    assert ok.mean() > 0.97  # the rest: an eigenvalue <= 2e-7 mm²/s (DIPY writes 0) or DW signal above b=0
    sphere = fibonacci_sphere(100000)
    # the kurtosis tensor by DIPY's name and in DIPY's element order (world and .bvec frames are one here: the
    # table above is built from the world-frame directions)
    kt = ours.kt.reshape(-1, 15)[ok]
    assert np.median(np.abs(kt - reference.kt[ok]).max(1) / np.abs(reference.kt[ok]).max(1)) < 1e-4
    for name in ("mk", "ak", "rk", "mkt", "kfa", "fa", "md"):
        got = getattr(ours, name).ravel()[ok]
        expected = getattr(reference, name)
        expected = (expected() if callable(expected) else expected)[ok]
        relative = np.abs(got - expected) / np.maximum(np.abs(expected), 1e-12)
        assert np.median(relative) < 1e-4, (name, np.median(relative))
        record("dki", f"{name.upper()} median relative difference ({acq}, {method}, {ok.sum()} voxels)",
               np.median(relative), "< 1e-4", f"DIPY 1.12 DiffusionKurtosisModel {method}")
        if name not in ("mk", "rk"):
            assert np.mean(relative < 1e-6) > 0.999, (name, np.percentile(relative, 99.9))
            continue
        # where MK and RK differ from DIPY's most, ours are their definitions: the average apparent kurtosis over the
        # sphere, or over the circle perpendicular to the principal eigenvector (DIPY's elliptic integrals and its
        # 2.5% band of "equal" eigenvalues err there)
        worst = np.argsort(relative)[-10:]
        evals, evecs = ours.evals.reshape(-1, 3)[ok][worst], ours.evecs.reshape(-1, 3, 3)[ok][worst]
        kurtosis = ours.kurtosis.reshape(-1, 15)[ok][worst]
        for value, reference_value, lam, vectors, w in zip(got[worst], expected[worst], evals, evecs, kurtosis):
            diffusion = vectors @ np.diag(lam) @ vectors.T
            directions = sphere if name == "mk" else _circle(vectors[:, 0])
            definition = _apparent_kurtosis(diffusion, full_kurtosis_tensor(w), directions).mean()
            assert abs(value / definition - 1) < 2e-5 < abs(reference_value / definition - 1)
        record("dki", f"{name.upper()} largest relative difference from DIPY ({acq}, {method}); ours equals the "
               "definition there within 2e-5", relative.max(), "(DIPY's error)",
               f"DIPY 1.12 DiffusionKurtosisModel {method}")


def _circle(axis: np.ndarray, n: int = 4000) -> np.ndarray:
    """n directions evenly spaced on the half circle perpendicular to ``axis``."""
    helper = np.cross(axis, [1.0, 0, 0] if abs(axis[0]) < 0.9 else [0, 1.0, 0])
    helper /= np.linalg.norm(helper)
    angles = np.linspace(0, np.pi, n, endpoint=False)
    return np.cos(angles)[:, None] * helper + np.sin(angles)[:, None] * np.cross(axis, helper)


def test_maps_equal_dipy_wls_on_real_data(record):
    _kurtosis_maps_against_dipy("b6kmax", "WLS", record)


def test_maps_equal_dipy_ols_on_real_data(record):
    _kurtosis_maps_against_dipy("b1kb2k", "OLS", record)


MRTRIX3_KURTOSIS_ORDER = ((0, 0, 0, 0), (1, 1, 1, 1), (2, 2, 2, 2), (0, 0, 0, 1), (0, 0, 0, 2), (0, 1, 1, 1),
                          (0, 2, 2, 2), (1, 1, 1, 2), (1, 2, 2, 2), (0, 0, 1, 1), (0, 0, 2, 2), (1, 1, 2, 2),
                          (0, 0, 1, 2), (0, 1, 1, 2), (0, 1, 2, 2))  # dwi2tensor -help


@pytest.mark.parametrize("options", [(), ("-iter", "0"), ("-ols",), ("-ols", "-iter", "4")])
def test_tensors_equal_dwi2tensor_dkt(mrtrix, tmp_path, options, record):
    import nibabel as nib

    from dwiflow.tasks.io import load_dwi, load_mask

    paths = real_run("sub-01_acq-b6kmax")
    dt, dkt = tmp_path / "dt.nii", tmp_path / "dkt.nii"
    subprocess.run(["dwi2tensor", paths["dwi"], "-fslgrad", paths["bvec"], paths["bval"], "-mask", paths["mask"],
                    "-dkt", dkt, dt, "-nthreads", "1", "-quiet", *options], check=True)
    run = load_dwi(paths["dwi"], paths["bval"], paths["bvec"])
    mask = load_mask(paths["mask"], run.data.shape[:3], run.affine)
    iterations = int(options[options.index("-iter") + 1]) if "-iter" in options else 2
    fit = DiffusionKurtosisModel(run.gtab, fit_method="IWLS", iterations=iterations,
                                 ols_start="-ols" in options).fit(run.data, mask)
    ok = fit.status[mask] == FitStatus.OK
    assert ok.mean() > 0.98
    theirs_w = nib.load(dkt).get_fdata()[mask][:, [MRTRIX3_KURTOSIS_ORDER.index(i) for i in DIPY_KURTOSIS_ORDER]]
    theirs_d = nib.load(dt).get_fdata()[mask]  # D11 D22 D33 D12 D13 D23
    ours_d = fit.lower_triangular[mask][:, [0, 2, 5, 1, 3, 4]]
    for ours, theirs, what in ((fit.kurtosis[mask], theirs_w, "W"), (ours_d, theirs_d, "D")):
        relative = (np.abs(ours - theirs).max(axis=1) / np.abs(theirs).max(axis=1))[ok]
        assert np.mean(relative <= 1e-5) >= 0.999, (what, np.median(relative))
        record("dki", f"{what} elements: voxels within 1e-5 of the largest element (dwi2tensor -dkt "
               f"{' '.join(options) or 'default'})", np.mean(relative <= 1e-5), ">= 0.999", "MRtrix3 3.0.3")


def test_data_that_cannot_determine_kurtosis_are_refused(tmp_path, capsys):
    from conftest import write_gradients, write_nifti

    from dwiflow.cli.dwirecon import main as dwirecon

    gtab = _scheme()
    keep = gtab.bvals < 1500  # b=0 and one shell
    diffusion, full = _tissue(0)
    data = np.tile(_signal(gtab, diffusion, full)[keep], (2, 2, 1, 1)).astype(np.float32)
    dwi = write_nifti(tmp_path / "dwi.nii.gz", data)
    bval, bvec = write_gradients(tmp_path / "dwi", gtab.bvals[keep], gtab.bvecs[keep].T)
    out = tmp_path / "mk.nii.gz"
    assert dwirecon(["dki", str(dwi), str(bval), str(bvec), "--mk", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "DKI needs at least three distinct b-values" in error, error
    assert not out.exists()


def test_a_negative_diffusivity_is_flagged_and_its_status_says_why(tmp_path):
    """A voxel whose signal grows along one axis (a negative diffusivity; the mean diffusion-weighted signal still
    below b=0) gets status 8 and NaN maps; the status map's Levels say what non-physical means for DKI, not another
    model's reason."""
    import json

    import nibabel as nib
    from conftest import write_gradients, write_nifti

    from dwiflow.cli.dwirecon import main as dwirecon

    gtab = _scheme()
    diffusion, full = _tissue(1)
    good = _signal(gtab, diffusion, full)
    bad = _signal(gtab, np.diag([1.6e-3, 1.4e-3, -0.4e-3]), np.zeros((3, 3, 3, 3)))
    assert bad[gtab.bvals > 0].mean() < bad[gtab.bvals == 0].mean()  # not status 7
    data = np.stack([good, bad, good, good]).reshape(2, 2, 1, -1).astype(np.float32)
    dwi = write_nifti(tmp_path / "dwi.nii.gz", data)
    bval, bvec = write_gradients(tmp_path / "dwi", gtab.bvals, gtab.bvecs.T)
    mk, status = tmp_path / "mk.nii.gz", tmp_path / "status.nii.gz"
    assert dwirecon(["dki", str(dwi), str(bval), str(bvec), "--mk", str(mk), "--status", str(status), "-q"]) == 0
    codes = np.asarray(nib.load(status).dataobj).reshape(-1)
    values = nib.load(mk).get_fdata().reshape(-1)
    assert codes.tolist() == [0, int(FitStatus.NON_PHYSICAL), 0, 0] and np.isnan(values[1])
    assert np.all(np.isfinite(values[[0, 2, 3]]))
    level = json.loads(tmp_path.joinpath("status.json").read_text())["Levels"]["8"]
    assert "diffusivity" in level and "return-to-origin" not in level, level


def test_bmax_fits_the_lower_shells_and_high_shells_are_warned_about(tmp_path, capsys):
    """b up to 5000: without --bmax the command warns that the kurtosis model holds to about b=3000 (Jensen &
    Helpern 2010); --bmax 3000 writes the maps a file without the b=5000 volumes gives, bit for bit, and says so in
    the sidecar; a --bmax that leaves fewer than three b-values is one line naming --bmax, exit 2, nothing written."""
    import json

    import nibabel as nib
    from conftest import write_gradients, write_nifti

    from dwiflow.cli.dwirecon import main as dwirecon

    gtab = _scheme()
    bvals = np.where(gtab.bvals == 2000, 5000.0, gtab.bvals)  # shells 1000, 3000, 5000
    diffusion, full = _tissue(2)
    rng = np.random.default_rng(3)
    data = np.stack([_signal(gradient_table(bvals, gtab.bvecs.T, frame="world"), diffusion, full)] * 8)
    data = (data * rng.uniform(0.97, 1.03, data.shape)).reshape(2, 2, 2, -1).astype(np.float32)
    low = bvals <= 3000
    every = (write_nifti(tmp_path / "all.nii.gz", data), *write_gradients(tmp_path / "all", bvals, gtab.bvecs.T))
    lower = (write_nifti(tmp_path / "low.nii.gz", data[..., low]),
             *write_gradients(tmp_path / "low", bvals[low], gtab.bvecs[low].T))
    assert dwirecon(["dki", *map(str, every), "--mk", str(tmp_path / "mk_all.nii.gz"), "-q"]) == 0
    assert "the kurtosis model describes brain tissue to about b=3000" in capsys.readouterr().err
    assert dwirecon(["dki", *map(str, every), "--mk", str(tmp_path / "mk_cut.nii.gz"), "--bmax", "3000", "-q"]) == 0
    assert capsys.readouterr().err == ""
    assert dwirecon(["dki", *map(str, lower), "--mk", str(tmp_path / "mk_low.nii.gz"), "-q"]) == 0
    cut, low_only, full_fit = (nib.load(tmp_path / f"mk_{n}.nii.gz").get_fdata() for n in ("cut", "low", "all"))
    assert np.array_equal(cut, low_only) and np.all(np.isfinite(cut))
    assert np.abs(cut - full_fit).max() > 1e-4  # the b=5000 shell does change the fit it is part of
    parameters = json.loads((tmp_path / "mk_cut.json").read_text())["Model"]["Parameters"]
    assert parameters["Bmax"] == 3000 and parameters["ShellBvalues"] == [0, 1000, 3000]
    out = tmp_path / "mk_none.nii.gz"
    assert dwirecon(["dki", *map(str, every), "--mk", str(out), "--bmax", "2000"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--bmax" in error and "up to b=2000 this run has b=0, b=1000" in error, error
    assert not out.exists()


def _lmi_margin(params: np.ndarray) -> np.ndarray:
    """How far fits (v, 22; DIPY's layout) are inside Dela Haije's constraint, computed independently of dwiflow
    with CVXPY from DIPY's own matrices: the largest t such that M(h, s) - t·I ⪰ 0 for some free variables s, with
    M's diffusion rows scaled by 1e3 and its kurtosis rows by 1e6 (each block of order 1; a positive scaling of a
    block keeps its sign). Negative: outside."""
    import warnings

    import cvxpy
    from dipy.data import load_sdp_constraints

    matrices = [a.toarray() for a in load_sdp_constraints("dki")]
    scale = np.r_[np.full(3, 1e3 ** 0.5), np.full(9, 1e6 ** 0.5)]
    congruence = np.outer(scale, scale)
    free_units = np.r_[np.full(9, 1e-6), np.full(9, 10 ** -4.5)]  # the free variables' typical sizes
    margins = []
    for h in params:
        free, t = cvxpy.Variable(18), cvxpy.Variable()
        fixed = sum(h[i] * matrices[i + 1] for i in range(22)) * congruence
        lmi = fixed + sum(free[j] * (free_units[j] * matrices[23 + j] * congruence) for j in range(18))
        problem = cvxpy.Problem(cvxpy.Maximize(t), [lmi - t * np.eye(12) >> 0, cvxpy.norm(free) <= 1e3])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "solution may be inaccurate": a margin, not a fit
            problem.solve(solver="CLARABEL")
        margins.append(t.value)
    return np.array(margins)


def _raw_parameters(model: DiffusionKurtosisModel, signal: np.ndarray) -> np.ndarray:
    """The fitted 22 parameters (DIPY's layout) of (v, n) signals, before eigenvalue clipping."""
    from dwiflow.core.voxels import VoxelBatch

    batch = VoxelBatch.from_volume(signal[:, None, None, :], None, signal.shape[1])
    params, status = model._fit_batch(batch.signal())
    if model.fit_method in ("CLS", "CWLS"):
        model._fit_constrained(batch, params, status, None)
    return params


@pytest.mark.parametrize("method", ["CLS", "CWLS"])
def test_constrained_fits_equal_dipy_and_are_the_constrained_optimum(method, record):
    """DIPY's CLS/CWLS (Dela Haije 2020) on 500 voxels of sub-01 b6kmax: the maps' median relative difference is
    below 1e-4; where a fit differs by more, ours satisfies the constraint (D positive semidefinite, the kurtosis
    form non-negative on 20000 directions) and its objective is no larger than DIPY's, whose solution there is
    outside the constraint (CVXPY's tolerances on the unscaled program) or worse."""
    import warnings

    from dipy.core.gradients import gradient_table as dipy_gradient_table
    from dipy.reconst.dki import DiffusionKurtosisModel as DipyModel
    from dipy.reconst.dki import cls_fit_dki

    from dwiflow.core.dki import dki_design_matrix
    from dwiflow.tasks.io import load_dwi, load_mask

    paths = real_run("sub-01_acq-b6kmax")
    run = load_dwi(paths["dwi"], paths["bval"], paths["bvec"])
    mask = load_mask(paths["mask"], run.data.shape[:3], run.affine)
    signal = np.asarray(run.data[mask], dtype=float)
    signal = signal[np.random.default_rng(1).choice(signal.shape[0], 500, replace=False)]
    ours = DiffusionKurtosisModel(run.gtab, fit_method=method, n_threads=2)
    fit = ours.fit(signal[:, None, None, :])
    dipy_model = DipyModel(dipy_gradient_table(run.gtab.bvals, bvecs=run.gtab.bvecs,
                                               b0_threshold=run.gtab.b0_threshold), fit_method=method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = dipy_model.fit(signal)
    ok = fit.status.ravel() == FitStatus.OK
    assert ok.mean() > 0.97
    differs = np.zeros(signal.shape[0], dtype=bool)
    # MK from the same formula for both fits (DIPY's): its elliptic integrals err by up to ~1e-3 on their own (see
    # the WLS test, where ours equals the definition), which this test of the fits must not mix in
    from dipy.reconst.dki import mean_kurtosis

    ours_in_dipy_layout = np.concatenate([fit.evals.reshape(-1, 3), fit.evecs.reshape(-1, 9),
                                          fit.kurtosis.reshape(-1, 15)], axis=1)
    for name in ("mk", "ak", "rk", "mkt", "kfa", "fa", "md"):
        got, expected = getattr(fit, name).ravel(), getattr(reference, name)
        expected = expected() if callable(expected) else expected
        if name == "mk":
            got = mean_kurtosis(ours_in_dipy_layout)
        relative = np.abs(got - expected) / np.maximum(np.abs(expected), 1e-12)
        assert np.median(relative[ok]) < 1e-4, (name, np.median(relative[ok]))
        record("dki", f"{name.upper()} median relative difference (b6kmax, {method}, 500 voxels"
               f"{'; MK by DIPY formula for both' if name == 'mk' else ''})",
               np.median(relative[ok]), "< 1e-4", f"DIPY 1.12 DiffusionKurtosisModel {method}")
        differs |= ok & (relative > 1e-4)
    params = _raw_parameters(ours, signal)
    # where ours differs from DIPY: ours is inside the constraint and its objective is no larger than DIPY's, or
    # DIPY's solution is outside
    design = dki_design_matrix(run.gtab)
    log_signal = np.log(np.maximum(signal, 1e-4))
    pinv = np.linalg.pinv(design)
    worse = infeasible = 0
    for row in np.flatnonzero(differs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs, _ = cls_fit_dki(design, np.maximum(signal[row], 1e-4), pinv, dipy_model.sdp,
                                    weights=method == "CWLS", return_lower_triangular=True)
        weights = np.exp(2 * design @ (pinv @ log_signal[row])) if method == "CWLS" else 1.0
        objective = [np.sum(weights * (design @ p - log_signal[row]) ** 2) for p in (params[row], theirs)]
        ours_margin, their_margin = _lmi_margin(np.stack([params[row], theirs]))
        assert ours_margin > -1e-6, (row, ours_margin)
        outside = their_margin < -1e-6
        infeasible += outside
        worse += not outside and objective[0] > objective[1] * (1 + 1e-6)
    assert worse == 0
    record("dki", f"share of the {differs.sum()} voxels (of 500) where {method} differs from DIPY by > 1e-4 in which "
           "DIPY's solution is outside the constraint (elsewhere ours has the smaller objective)",
           infeasible / max(differs.sum(), 1), "ours inside, objective <= DIPY's", f"DIPY 1.12 {method} + CVXPY")


def test_constrained_fit_keeps_feasible_fits_and_solves_the_program_elsewhere(record):
    """Phantom: a genuine tissue's noise-free signal gives an unconstrained fit inside the constraint, which CLS
    returns unchanged; noisy signals whose OLS fit has negative kurtosis in some direction get a feasible fit
    whose objective equals that of the same program solved independently with CVXPY (DIPY's 12x12 inequality,
    unreduced)."""
    import cvxpy
    from dipy.data import load_sdp_constraints

    from dwiflow.core.dki import dki_design_matrix

    gtab = _scheme()
    diffusion, full = _tissue(3)
    # plus isotropic kurtosis 0.5 (W_ijkl = K/3 (δij δkl + δik δjl + δil δjk)): the form is positive everywhere (a
    # two-compartment W alone is zero along some directions, on the constraint's boundary or outside it)
    eye = np.eye(3)
    full = full + 0.5 / 3 * (np.einsum("ij,kl->ijkl", eye, eye) + np.einsum("ik,jl->ijkl", eye, eye)
                             + np.einsum("il,jk->ijkl", eye, eye))
    clean = _signal(gtab, diffusion, full)
    rng = np.random.default_rng(7)
    noisy = np.abs(clean + rng.normal(scale=60.0, size=(400, clean.size)))  # SNR ~17 at b=0
    signal = np.vstack([clean, noisy])
    unconstrained = _raw_parameters(DiffusionKurtosisModel(gtab, fit_method="OLS"), signal)
    constrained = _raw_parameters(DiffusionKurtosisModel(gtab, fit_method="CLS"), signal)
    assert _lmi_margin(unconstrained[:1])[0] > 1e-3 and np.array_equal(constrained[0], unconstrained[0])
    changed = np.flatnonzero(np.abs(constrained - unconstrained).max(axis=1)
                             > 1e-3 * np.abs(unconstrained).max(axis=1))
    assert changed.size >= 20  # the noise pushes enough OLS fits outside
    assert np.all(_lmi_margin(unconstrained[changed[:10]]) < -1e-3)  # … they were outside
    assert np.all(_lmi_margin(constrained[changed[:10]]) > -1e-6)  # … and are inside now
    outside = changed
    matrices = [a.toarray() for a in load_sdp_constraints("dki")]
    design = dki_design_matrix(gtab)
    scale = np.r_[np.full(6, 1e-3), np.full(15, 1e-6), 1.0]
    errors = []
    for row in outside[:10]:
        h, free = cvxpy.Variable(22), cvxpy.Variable(18)
        lmi = sum(h[i] * scale[i] * matrices[i + 1] for i in range(22)) + sum(
            free[j] * 1e-6 * matrices[23 + j] for j in range(18))
        y = np.log(np.maximum(signal[row], 1e-4))
        problem = cvxpy.Problem(cvxpy.Minimize(cvxpy.sum_squares(design @ cvxpy.multiply(scale, h) - y)),
                                [1e6 * lmi >> 0])
        problem.solve(solver="CLARABEL", tol_gap_abs=1e-9, tol_gap_rel=1e-9, tol_feas=1e-9)
        reference = np.sum((design @ (h.value * scale) - y) ** 2)
        ours = np.sum((design @ constrained[row] - y) ** 2)
        errors.append(ours / reference - 1)
    assert max(errors) < 1e-6 and min(errors) > -1e-6, errors
    record("dki", "CLS objective vs the unreduced program (CVXPY + Clarabel, tolerance 1e-9), 10 phantom voxels "
           "outside the constraint, relative", max(np.abs(errors)), "< 1e-6", "Dela Haije 2020 program")
