"""Multi-tissue responses (dhollander) and multi-shell multi-tissue CSD against MRtrix3 3.0.3 on the same inputs."""

from __future__ import annotations

import json
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest

from dwiflow.cli.dwirecon import main
from dwiflow.core.msmt_csd import MsmtCsdModel
from dwiflow.core.response import ResponseFunction
from dwiflow.core.sims import acquisition_scheme, make_phantom
from dwiflow.tasks.registry import get as stage
from dwiflow.tasks.stagelib import load_response
from tests.conftest import real_run, write_dwi_run, write_nifti

ACQUISITIONS = ["b1kb2k", "b6kmax"]


def _mrtrix(*args) -> None:
    subprocess.run([str(a) for a in args] + ["-quiet", "-force", "-nthreads", "2"], check=True)


@pytest.fixture(scope="module")
def dhollander_pair(tmp_path_factory, mrtrix):
    """Ours and MRtrix3's dhollander on both sub-01 acquisitions (erode 0: the data have two slices)."""
    if not shutil.which("dwi2response"):
        pytest.fail("dwi2response (MRtrix3) is required")
    out = {}
    for acq in ACQUISITIONS:
        folder = tmp_path_factory.mktemp(acq)
        paths = real_run(f"sub-01_acq-{acq}")
        ours = stage("response", "dhollander")(
            {t: folder / f"ours_{t}.txt" for t in ("wm", "gm", "csf")} | {"voxels": folder / "ours_voxels.nii.gz"},
            dwi=paths["dwi"], bval=paths["bval"], bvec=paths["bvec"], mask=paths["mask"], erode=0)
        _mrtrix("dwi2response", "dhollander", paths["dwi"], "-fslgrad", paths["bvec"], paths["bval"],
                *(folder / f"mrtrix_{t}.txt" for t in ("wm", "gm", "csf")), "-mask", paths["mask"], "-erode", "0",
                "-voxels", folder / "mrtrix_voxels.nii")
        out[acq] = (folder, paths, ours)
    return out


@pytest.mark.parametrize("acq, options", [("b6kmax", ["--wm-algo", "fa"]), ("b1kb2k", ["--wm-algo", "tournier"]),
                                          ("b6kmax", ["--wm-algo", "tax"]), ("b1kb2k", ["--shells", "0,2000"])])
def test_dhollander_wm_algo_and_shells_equal_mrtrix(acq, options, tmp_path, capsys, record, mrtrix):
    """``--wm-algo`` (MRtrix3's -wm_algo: the single-fibre WM voxels chosen by dwi2response fa, tournier or tax
    inside the refined WM) and ``--shells`` (-shells): the same voxels as MRtrix3 3.0.3 and l=0 terms within 1e-4."""
    paths = real_run(f"sub-01_acq-{acq}")
    ours = [tmp_path / f"o_{t}.txt" for t in ("wm", "gm", "csf")]
    theirs = [tmp_path / f"m_{t}.txt" for t in ("wm", "gm", "csf")]
    assert main([str(a) for a in ["response", "dhollander", paths["dwi"], paths["bval"], paths["bvec"], *ours,
                                  "--mask", paths["mask"], "--erode", "0", "--voxels", tmp_path / "o_vox.nii.gz",
                                  *options, "-q"]]) == 0, capsys.readouterr().err
    _mrtrix("dwi2response", "dhollander", paths["dwi"], "-fslgrad", paths["bvec"], paths["bval"], *theirs, "-mask",
            paths["mask"], "-erode", "0", "-voxels", tmp_path / "m_vox.nii", "-" + options[0][2:].replace("-", "_"),
            options[1])
    mine = nib.load(tmp_path / "o_vox.nii.gz").get_fdata() > 0
    reference = nib.load(tmp_path / "m_vox.nii").get_fdata() > 0
    label = f"sub-01 {acq}, {' '.join(options)}"
    wm_dice = 2 * (mine[..., 2] & reference[..., 2]).sum() / (mine[..., 2].sum() + reference[..., 2].sum())
    record("dhollander", f"single-fibre WM voxels, Dice ({label})", wm_dice, "1",
           "MRtrix3 3.0.3 dwi2response dhollander")
    assert np.array_equal(mine, reference) and reference[..., 2].sum() >= 10
    for o, m in zip(ours, theirs):
        a, b = load_response(o), load_response(m)
        assert a.coefficients.shape == b.coefficients.shape and np.allclose(a.bvalues, b.bvalues, atol=20)
        assert np.max(np.abs(a.coefficients[:, 0] / b.coefficients[:, 0] - 1)) <= 1e-4, (o.name, a.coefficients[:, 0])
    if options[0] == "--shells":
        assert list(np.round(load_response(ours[0]).bvalues, -2)) == [0, 2000]


@pytest.mark.parametrize("acq", ACQUISITIONS)
def test_dhollander_selects_mrtrix_voxels_and_responses(dhollander_pair, acq, record):
    folder, _, ours = dhollander_pair[acq]
    mine = nib.load(ours["voxels"]).get_fdata() > 0
    theirs = nib.load(folder / "mrtrix_voxels.nii").get_fdata() > 0
    for index, tissue in enumerate(("csf", "gm", "wm")):  # MRtrix3's volume order: CSF, GM, WM
        a, b = mine[..., index], theirs[..., index]
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        ours_response = load_response(ours[tissue])
        their_response = load_response(folder / f"mrtrix_{tissue}.txt")
        l0 = np.abs(ours_response.coefficients[:, 0] / their_response.coefficients[:, 0] - 1)
        print(f"{acq} {tissue}: Dice {dice:.4f} ({a.sum()} vs {b.sum()} voxels), l=0 max rel diff {l0.max():.2e}")
        record("dhollander", f"{tissue.upper()} voxels, Dice (sub-01 {acq})", dice, ">= 0.95",
               "MRtrix3 3.0.3 dwi2response dhollander")
        record("dhollander", f"{tissue.upper()} response l=0, largest relative difference (sub-01 {acq})", l0.max(),
               "<= 0.01", "MRtrix3 3.0.3 dwi2response dhollander")
        assert b.sum() > 10 and dice >= 0.95
        assert np.all(np.abs(ours_response.bvalues - their_response.bvalues) <= 20)
        assert l0.max() <= 0.01


@pytest.mark.parametrize("acq", ACQUISITIONS)
def test_msmt_csd_equals_mrtrix(dhollander_pair, acq, record):
    """Same responses (MRtrix3's), same mask (2500 brain voxels, to keep MRtrix3's time down): every tissue within
    1e-5 of dwi2fod msmt_csd. A tissue the solver sets to zero comes out as ~1e-12 from both; there a relative
    difference means nothing, so those compare against the voxel's total signal (sum of the tissues' l=0 terms)."""
    folder, paths, _ = dhollander_pair[acq]
    img = nib.load(paths["mask"])
    mask = img.get_fdata() > 0
    keep = np.zeros(mask.size, dtype=bool)
    keep[np.flatnonzero(mask.ravel())[:2500]] = True
    subset = write_nifti(folder / "subset_mask.nii.gz", keep.reshape(mask.shape).astype(np.uint8), img.affine)
    responses = {t: folder / f"mrtrix_{t}.txt" for t in ("wm", "gm", "csf")}
    outputs = {t: folder / f"ours_{t}_fod.nii.gz" for t in ("wm", "gm", "csf")}
    stage("msmt_csd")(outputs, dwi=paths["dwi"], bval=paths["bval"], bvec=paths["bvec"], mask=subset,
                      response_wm=responses["wm"], response_gm=responses["gm"], response_csf=responses["csf"])
    _mrtrix("dwi2fod", "msmt_csd", paths["dwi"], "-fslgrad", paths["bvec"], paths["bval"], "-mask", subset,
            responses["wm"], folder / "m_wm.nii", responses["gm"], folder / "m_gm.nii", responses["csf"],
            folder / "m_csf.nii")
    inside = keep.reshape(mask.shape)
    ours = {t: nib.load(outputs[t]).get_fdata()[inside] for t in outputs}
    theirs = {t: nib.load(folder / f"m_{t}.nii").get_fdata()[inside] for t in outputs}
    total = sum(np.abs(theirs[t][:, 0]) for t in theirs)
    wm_diff = np.abs(ours["wm"] - theirs["wm"]).max(axis=1)
    wm_scale = np.abs(theirs["wm"]).max(axis=1)
    strict = np.mean(wm_diff <= 1e-5 * wm_scale)
    floored = np.mean(wm_diff <= 1e-5 * np.maximum(wm_scale, total))
    print(f"{acq} WM: within 1e-5 of the voxel's largest coefficient {strict:.5f}; with the total-signal floor "
          f"{floored:.5f}")
    record("msmt-csd", f"WM FOD voxels within 1e-5 of the voxel's signal (sub-01 {acq})", floored, ">= 0.999",
           "MRtrix3 3.0.3 dwi2fod msmt_csd")
    assert strict >= 0.9 and floored >= 0.999  # strict misses only voxels whose WM ODF is 0 (~1e-8) in both
    for tissue in ("gm", "csf"):
        diff = np.abs(ours[tissue][:, 0] - theirs[tissue][:, 0])
        relative = np.mean(diff <= 1e-5 * np.abs(theirs[tissue][:, 0]))
        floored = np.mean(diff <= 1e-5 * np.maximum(np.abs(theirs[tissue][:, 0]), total))
        print(f"{acq} {tissue.upper()}: relative within 1e-5 {relative:.5f}; with the floor {floored:.5f}")
        assert floored >= 0.999


def test_msmt_csd_shells_equal_mrtrix(dhollander_pair, capsys, record):
    """--shells as dwi2fod's -shells (b6kmax: 0,3000,4500,6000 of its nine b-values, 60 volumes for 47 unknowns;
    MRtrix3's responses): equal to dwi2fod msmt_csd -shells with responses of those rows, within 1e-5; the full
    nine-row responses give the same files (their # Shells line names the rows), where dwi2fod asks for those rows
    only."""
    folder, paths, _ = dhollander_pair["b6kmax"]
    img = nib.load(paths["mask"])
    keep = np.zeros(img.shape, dtype=bool).ravel()
    keep[np.flatnonzero(img.get_fdata().ravel() > 0)[:1500]] = True
    subset = write_nifti(folder / "shells_mask.nii.gz", keep.reshape(img.shape).astype(np.uint8), img.affine)
    shells = "0,3000,4500,6000"
    rows = {}
    for t in ("wm", "gm", "csf"):
        full = load_response(folder / f"mrtrix_{t}.txt")
        chosen = [int(np.argmin(np.abs(full.bvalues - float(b)))) for b in shells.split(",")]
        rows[t] = folder / f"rows_{t}.txt"
        lines = [f"# Shells: {','.join(f'{full.bvalues[r]:g}' for r in chosen)}"]
        lines += [" ".join(f"{v:.15g}" for v in full.coefficients[r]) for r in chosen]
        rows[t].write_text("\n".join(lines) + "\n")
    _mrtrix("dwi2fod", "msmt_csd", paths["dwi"], "-fslgrad", paths["bvec"], paths["bval"], "-mask", subset,
            "-shells", shells, *sum(([rows[t], folder / f"ms_{t}.nii"] for t in ("wm", "gm", "csf")), []))
    for label, given in (("rows", rows), ("full", {t: folder / f"mrtrix_{t}.txt" for t in ("wm", "gm", "csf")})):
        argv = ["msmt-csd", paths["dwi"], paths["bval"], paths["bvec"]]
        argv += sum(([given[t], folder / f"os_{label}_{t}.nii.gz"] for t in ("wm", "gm", "csf")), [])
        assert main([str(a) for a in argv] + ["--mask", str(subset), "--shells", shells, "-q"]) == 0
    inside = keep.reshape(img.shape)
    theirs = {t: nib.load(folder / f"ms_{t}.nii").get_fdata()[inside] for t in ("wm", "gm", "csf")}
    total = sum(np.abs(theirs[t][:, 0]) for t in theirs)
    for t in ("wm", "gm", "csf"):
        ours = nib.load(folder / f"os_rows_{t}.nii.gz").get_fdata()[inside]
        assert np.array_equal(ours, nib.load(folder / f"os_full_{t}.nii.gz").get_fdata()[inside]), t
        scale = np.maximum(np.abs(theirs[t]).max(axis=1), total)
        within = np.mean(np.abs(ours - theirs[t]).max(axis=1) <= 1e-5 * scale)
        record("msmt-csd", f"{t.upper()} within 1e-5 with --shells {shells} (sub-01 b6kmax)", within, ">= 0.999",
               "MRtrix3 3.0.3 dwi2fod msmt_csd -shells")
        assert within >= 0.999, (t, within)
    sidecar = json.loads((folder / "os_full_wm.json").read_text())
    assert sidecar["Model"]["Parameters"]["Shells"] == [0.0, 3000.0, 4500.0, 6000.0]


def test_msmt_csd_recovers_a_phantom_compartment():
    """Noiseless WM fibre + isotropic compartment on three shells + b=0: the fit reproduces the signal and the
    isotropic compartment it was made of (within 5%)."""
    g = acquisition_scheme("multi")
    b = np.array([s.bvalue for s in g.shells])
    wm = ResponseFunction(b, np.array([[1000, 0, 0], [500, -250, 60], [300, -220, 90], [200, -170, 90]], float))
    csf = ResponseFunction(b, np.c_[[3000, 150, 10, 1]].astype(float))
    model = MsmtCsdModel(g, [wm, csf], lmax=[8, 0])
    from dwiflow.core.sh import real_sh_basis

    truth_wm = 0.3 * real_sh_basis(8, np.array([[0.0, 0.6, 0.8]]))[0]
    x = np.concatenate([truth_wm, [0.5 / np.sqrt(np.pi) * 0.2]])
    signal = model.forward @ x
    fit = model.fit(signal[None, None, None, :])
    assert fit.status.ravel()[0] == 0
    predicted = fit.predict().reshape(-1)
    assert np.max(np.abs(predicted - signal)) <= 0.05 * signal.max()
    csf_l0 = fit.tissue(1).reshape(-1)[0]
    assert abs(csf_l0 - x[45]) <= 0.05 * x[45]


@pytest.fixture()
def case(tmp_path):
    g = acquisition_scheme("multi")
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    ph = make_phantom(g, (4, 4, 3), snr=30, seed=3)
    dwi, bval, bvec = write_dwi_run(tmp_path, g, ph.data, affine)
    shells = "# Shells: 0,1000,2000,3000\n"
    (tmp_path / "wm.txt").write_text(shells + "1000 0 0\n500 -250 60\n300 -220 90\n200 -170 90\n")
    (tmp_path / "gm.txt").write_text(shells + "1500\n700\n400\n250\n")
    (tmp_path / "csf.txt").write_text(shells + "3000\n150\n10\n1\n")
    (tmp_path / "wm3.txt").write_text("# Shells: 0,1000,2000\n1000 0 0\n500 -250 60\n300 -220 90\n")
    empty = write_nifti(tmp_path / "empty.nii.gz", np.zeros((4, 4, 3), np.uint8), affine)
    return {"dir": tmp_path, "base": [dwi, bval, bvec], "empty": empty}


def _refused(argv, capsys, folder, message):
    before = sorted(p.name for p in folder.iterdir())
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert sorted(p.name for p in folder.iterdir()) == before


def test_msmt_csd_bad_input_is_refused_in_one_line(case, capsys):
    d = case["dir"]
    base = ["msmt-csd", *case["base"]]
    tissues = [d / "wm.txt", d / "out_wm.nii.gz", "--response-gm", d / "gm.txt", "--gm", d / "out_gm.nii.gz",
               "--response-csf", d / "csf.txt", "--csf", d / "out_csf.nii.gz"]
    _refused(base[:4] + [d / "wm3.txt", d / "out_wm.nii.gz"], capsys, d, "has 3 rows but the data have 4 shells")
    _refused(base + tissues + ["--lmax", "8,0"], capsys, d, "2 values for 3 tissues")
    _refused(base + tissues + ["--lmax", "8,1,0"], capsys, d, "even")
    _refused(base + tissues + ["--mask", case["empty"]], capsys, d, "empty")
    _refused(base + tissues[:2] + ["--response-gm", d / "gm.txt"], capsys, d, "no output for the GM ODF")


def _run_pairs(argv, capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _same_images(a, b) -> bool:
    return np.array_equal(np.asanyarray(nib.load(a).dataobj), np.asanyarray(nib.load(b).dataobj))


def test_msmt_csd_and_mtnormalise_take_mrtrix3_pairs(case, capsys):
    """The tissues as MRtrix3 takes them, (response or image, output) pairs, give the same files as the named
    options; two pairs name the second tissue by what it is; wrong counts are refused in one line."""
    d, base = case["dir"], [str(p) for p in case["base"]]
    mask = str(write_nifti(d / "mask.nii.gz", np.ones((4, 4, 3), np.uint8), np.diag([2.0, 2.0, 2.0, 1.0])))
    named = ["msmt-csd", *base, d / "wm.txt", d / "n_wm.nii.gz", "--response-gm", d / "gm.txt", "--gm",
             d / "n_gm.nii.gz", "--response-csf", d / "csf.txt", "--csf", d / "n_csf.nii.gz", "--mask", mask, "-q"]
    paired = ["msmt-csd", *base, d / "wm.txt", d / "p_wm.nii.gz", d / "gm.txt", d / "p_gm.nii.gz", d / "csf.txt",
              d / "p_csf.nii.gz", "--mask", mask, "-q"]
    assert _run_pairs(named, capsys)[0] == 0 and _run_pairs(paired, capsys)[0] == 0
    for tissue in ("wm", "gm", "csf"):
        assert _same_images(d / f"n_{tissue}.nii.gz", d / f"p_{tissue}.nii.gz"), tissue
    # two pairs: MRtrix3's two-tissue recipe is WM + CSF; a response that decays as free water does is the CSF
    assert _run_pairs(["msmt-csd", *base, d / "wm.txt", d / "t_wm.nii.gz", d / "csf.txt", d / "t_csf.nii.gz", "--mask",
                 mask, "-q"], capsys)[0] == 0
    assert json.loads((d / "t_csf.json").read_text())["Description"].startswith("CSF")
    assert _run_pairs(["msmt-csd", *base, d / "wm.txt", d / "u_wm.nii.gz", d / "gm.txt", d / "u_gm.nii.gz", "--mask",
                 mask, "-q"], capsys)[0] == 0
    assert json.loads((d / "u_gm.json").read_text())["Description"].startswith("Grey-matter")
    # a pair after the options' GM fills the next tissue (CSF)
    assert _run_pairs(["msmt-csd", *base, d / "wm.txt", d / "v_wm.nii.gz", d / "csf.txt", d / "v_csf.nii.gz",
                 "--response-gm", d / "gm.txt", "--gm", d / "v_gm.nii.gz", "--mask", mask, "-q"], capsys)[0] == 0
    assert _same_images(d / "v_csf.nii.gz", d / "n_csf.nii.gz") and _same_images(d / "v_gm.nii.gz", d / "n_gm.nii.gz")
    # wrong counts: one line each, exit 2, nothing written
    before = sorted(p.name for p in d.iterdir())
    code, err = _run_pairs(["msmt-csd", *base, d / "wm.txt", d / "x_wm.nii.gz", d / "gm.txt", "-q"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "pairs" in err, err
    code, err = _run_pairs(["msmt-csd", *base, d / "wm.txt", d / "x_wm.nii.gz", d / "gm.txt", d / "x_gm.nii.gz",
                      d / "csf.txt", d / "x_csf.nii.gz", d / "gm.txt", d / "x_4.nii.gz", "-q"], capsys)
    assert code == 2 and "takes at most 3" in err, err
    assert sorted(p.name for p in d.iterdir()) == before

    # mtnormalise IN OUT pairs (MRtrix3's mtnormalise) against the named options
    named = ["mtnormalise", d / "n_wm.nii.gz", d / "nn_wm.nii.gz", "--gm", d / "n_gm.nii.gz", "--gm-norm",
             d / "nn_gm.nii.gz", "--csf", d / "n_csf.nii.gz", "--csf-norm", d / "nn_csf.nii.gz", "--mask", mask,
             "--check-norm", d / "nn_field.nii.gz", "-q"]
    paired = ["mtnormalise", d / "n_wm.nii.gz", d / "pn_wm.nii.gz", d / "n_gm.nii.gz", d / "pn_gm.nii.gz",
              d / "n_csf.nii.gz", d / "pn_csf.nii.gz", "--mask", mask, "--check-norm", d / "pn_field.nii.gz", "-q"]
    assert _run_pairs(named, capsys)[0] == 0 and _run_pairs(paired, capsys)[0] == 0
    for name in ("wm", "gm", "csf", "field"):
        assert _same_images(d / f"nn_{name}.nii.gz", d / f"pn_{name}.nii.gz"), name
    # two pairs: the second is CSF when its sidecar says so (its tissue-fraction volume is named CSF), else GM
    for image, tissue in (("t_csf", "CSF"), ("u_gm", "GM")):
        assert _run_pairs(["mtnormalise", d / "t_wm.nii.gz", d / f"tn_{image}_wm.nii.gz", d / f"{image}.nii.gz",
                     d / f"tn_{image}.nii.gz", "--mask", mask, "--fractions", d / f"tn_{image}_fractions.nii.gz", "-q"],
                    capsys)[0] == 0
        side = json.loads((d / f"tn_{image}_fractions.json").read_text())
        assert side["TissueOrder"] == ["WM FOD", tissue], side["TissueOrder"]


def test_more_tissues_than_bvalues_is_refused_and_two_tissues_work_on_one_shell(tmp_path, capsys):
    from dwiflow.core.sims import acquisition_scheme as scheme

    g = scheme("single")
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    ph = make_phantom(g, (3, 3, 2), snr=40, seed=4)
    dwi, bval, bvec = write_dwi_run(tmp_path, g, ph.data, affine)
    (tmp_path / "wm.txt").write_text("# Shells: 0,1000\n1000 0 0 0\n450 -200 60 -10\n")
    (tmp_path / "gm.txt").write_text("# Shells: 0,1000\n1500\n700\n")
    (tmp_path / "csf.txt").write_text("# Shells: 0,1000\n3000\n150\n")
    argv = ["msmt-csd", dwi, bval, bvec, tmp_path / "wm.txt", tmp_path / "o_wm.nii.gz", "--response-csf",
            tmp_path / "csf.txt", "--csf", tmp_path / "o_csf.nii.gz"]
    _refused(argv + ["--response-gm", tmp_path / "gm.txt", "--gm", tmp_path / "o_gm.nii.gz"], capsys, tmp_path,
             "3 tissues but the data have only 2 distinct b-values")
    assert main([str(a) for a in argv]) == 0
    capsys.readouterr()
    wm = nib.load(tmp_path / "o_wm.nii.gz").get_fdata()
    csf = nib.load(tmp_path / "o_csf.nii.gz").get_fdata()
    # the WM response reaches l=6 (4 columns): its ODF's default lmax is min(8, 6), as MRtrix3
    assert wm.shape[-1] == 28 and np.all(np.isfinite(wm)) and np.all(csf >= -1e-9 * np.abs(wm).max()) and wm[..., 0].mean() > 0


def _mtnormalise_both(tissues: dict, mask_path, tmp_path, label: str, record, order: int = 3) -> dict:
    """Run our mtnormalise stage and MRtrix3's (field of ``order``) on the same tissue images; assert field and
    outputs within 1e-4 of MRtrix3's (the issue asks 1% and 0.5%), the same balance factors and inlier mask; return
    our outputs."""
    ours = stage("mtnormalise")(
        {"wm": tmp_path / "n_wm.nii.gz", "gm_norm": tmp_path / "n_gm.nii.gz", "csf_norm": tmp_path / "n_csf.nii.gz",
         "check_norm": tmp_path / "field.nii.gz", "check_mask": tmp_path / "inliers.nii.gz",
         "check_factors": tmp_path / "factors.txt"},
        fod=tissues["wm"], gm=tissues["gm"], csf=tissues["csf"], mask=mask_path, order=order)
    _mrtrix("mtnormalise", tissues["wm"], tmp_path / "m_wm.nii", tissues["gm"], tmp_path / "m_gm.nii", tissues["csf"],
            tmp_path / "m_csf.nii", "-mask", mask_path, "-check_norm", tmp_path / "m_field.nii", "-check_mask",
            tmp_path / "m_mask.nii", "-check_factors", tmp_path / "m_factors.txt", "-order", order)
    mask = nib.load(mask_path).get_fdata() > 0
    field = nib.load(ours["check_norm"]).get_fdata()[mask]
    their_field = nib.load(tmp_path / "m_field.nii").get_fdata()[mask]
    field_diff = np.abs(field / their_field - 1)
    print(f"field: median rel diff {np.median(field_diff):.2e}, max {field_diff.max():.2e}")
    record("mtnormalise", f"field, largest relative difference ({label})", field_diff.max(), "<= 1e-4",
           "MRtrix3 3.0.3 mtnormalise")
    assert field_diff.max() <= 1e-4
    for name, theirs in (("wm", "m_wm.nii"), ("gm_norm", "m_gm.nii"), ("csf_norm", "m_csf.nii")):
        a = nib.load(ours[name]).get_fdata()[mask].reshape(mask.sum(), -1)
        b = nib.load(tmp_path / theirs).get_fdata()[mask].reshape(mask.sum(), -1)
        scale = np.abs(b).max(axis=1)
        relative = np.abs(a - b).max(axis=1)[scale > 0] / scale[scale > 0]
        print(f"{name}: median rel diff {np.median(relative):.2e}")
        record("mtnormalise", f"{name}, median relative difference ({label})", np.median(relative), "<= 1e-4",
               "MRtrix3 3.0.3 mtnormalise")
        assert np.median(relative) <= 1e-4
    mine = np.loadtxt(ours["check_factors"])
    theirs = np.loadtxt(tmp_path / "m_factors.txt")
    assert np.allclose(mine, theirs, rtol=1e-4), (mine, theirs)
    assert np.array_equal(nib.load(ours["check_mask"]).get_fdata()[mask] > 0,
                          nib.load(tmp_path / "m_mask.nii").get_fdata()[mask] > 0)
    return ours


def test_mtnormalise_equals_mrtrix(dhollander_pair, tmp_path, record):
    """Our multi-tissue CSD of sub-01 b6kmax (with our dhollander responses), normalised by both, first-order field.

    The data have two slices: every voxel lies on one of two parallel planes, so the second- and third-order terms
    of the default field are linear combinations of the others there (the 20-term basis has rank 16, its normal
    matrix a condition number ~1e20). Either program's default-order field then depends on the rounding of its
    solver (it differs between machines' BLAS); the first-order field is well determined. The default order is
    compared on a whole 3D volume below."""
    folder, paths, ours_responses = dhollander_pair["b6kmax"]
    tissues = {t: tmp_path / f"{t}.nii.gz" for t in ("wm", "gm", "csf")}
    stage("msmt_csd")(tissues, dwi=paths["dwi"], bval=paths["bval"], bvec=paths["bvec"], mask=paths["mask"],
                      response_wm=ours_responses["wm"], response_gm=ours_responses["gm"],
                      response_csf=ours_responses["csf"])
    _mtnormalise_both(tissues, paths["mask"], tmp_path, "sub-01 b6kmax, order 1", record, order=1)


def test_mtnormalise_default_order_equals_mrtrix_and_recovers_the_field(tmp_path, mrtrix, record):
    """A 3D phantom (40x36x30 voxels of 2 mm, an ellipsoid of smooth WM/GM/CSF fractions, each tissue with its own
    scale, 5% log-normal noise, a cubic bias field): our default mtnormalise equals MRtrix3's (1e-4) and recovers
    the true field (to 1%; the field is found up to the geometric mean of the tissue scales, set to 1 here)."""
    from dwiflow.core.mtnormalise import polynomial_basis
    from dwiflow.core.sims import smooth_tissue_fractions

    shape = (40, 36, 30)
    affine = np.array([[-2.0, 0, 0, 40], [0, 2.0, 0, -36], [0, 0, 2.0, -20], [0, 0, 0, 1]])
    axes = [np.arange(n) - (n - 1) / 2 for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    mask = (x / (0.45 * shape[0])) ** 2 + (y / (0.45 * shape[1])) ** 2 + (z / (0.45 * shape[2])) ** 2 <= 1
    fractions = smooth_tissue_fractions(shape, seed=11)
    positions = np.indices(shape).reshape(3, -1).T @ affine[:3, :3].T + affine[:3, 3]
    true_coefficients = np.array([0.05, 4e-3, -3e-3, 2e-3, -4e-5, 3e-5, -2e-5, 1e-5, 2e-5, -1e-5,
                                  2e-7, -1e-7, 1e-7, 0, 1e-7, 0, -1e-7, 0, 1e-7, 0])
    true_field = np.exp(polynomial_basis(positions, 3) @ true_coefficients).reshape(shape)
    scales = np.array([1.6, 0.8, 1.0 / (1.6 * 0.8)])  # geometric mean 1
    rng = np.random.default_rng(12)
    tissues = {}
    for t, name in enumerate(("wm", "gm", "csf")):
        image = 0.28209479177 * fractions[..., t] * scales[t] * true_field
        image *= np.exp(0.05 * rng.standard_normal(shape))
        image[~mask] = 0.0
        tissues[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(image.astype(np.float32), affine), tissues[name])
    mask_path = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), mask_path)
    ours = _mtnormalise_both(tissues, mask_path, tmp_path, "3D phantom, order 3", record)
    field = nib.load(ours["check_norm"]).get_fdata()[mask]
    error = np.abs(field / true_field[mask] - 1)
    print(f"field against truth: median {np.median(error):.1e}, max {error.max():.1e}")
    record("mtnormalise", "field against the true field, median relative error (3D phantom)", np.median(error),
           "<= 0.01", "phantom truth")
    assert np.median(error) <= 0.01


def test_group_response_equals_responsemean(dhollander_pair, tmp_path, mrtrix):
    """Three runs' WM responses (sub-01 b6kmax's, and two copies scaled and perturbed as other subjects would be):
    our mean equals MRtrix3's responsemean to 1e-6, with its global-intensity compensation and with -legacy."""
    from dwiflow.core.response import response_mean

    folder, _, ours = dhollander_pair["b6kmax"]
    base = load_response(ours["wm"])
    rng = np.random.default_rng(5)
    files = [ours["wm"]]
    responses = [base]
    for i, scale in enumerate((1.7, 0.6)):
        other = ResponseFunction(base.bvalues, base.coefficients * scale * (1 + 0.05 * rng.standard_normal(
            base.coefficients.shape)))
        path = tmp_path / f"r{i}.txt"
        path.write_text(other.to_text())
        files.append(path)
        responses.append(load_response(path))
    for legacy in (False, True):
        _mrtrix("responsemean", *files, tmp_path / "mean.txt", *(["-legacy"] if legacy else []))
        theirs = np.loadtxt(tmp_path / "mean.txt", comments="#")
        mine = response_mean(responses, legacy=legacy).coefficients
        assert np.max(np.abs(mine - theirs) / np.abs(theirs).max()) <= 1e-6
    shifted = ResponseFunction(base.bvalues + 500, base.coefficients)
    with pytest.raises(Exception, match="is for b="):
        response_mean([base, shifted])
