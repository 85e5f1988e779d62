"""Tissues on the command line as MRtrix3 takes them: (response or image, output) pairs for msmt-csd, mtnormalise
(dwi2fod msmt_csd, mtnormalise) and ss3t-csd (ss3t_csd_beta1), the same as naming them with options."""

import json

import numpy as np
import pytest

from dwiflow.cli.dwirecon import main
from dwiflow.core.gradients import world_to_fsl_bvecs
from dwiflow.core.sims import acquisition_scheme, make_phantom, three_tissue_phantom
from tests.conftest import write_gradients, write_nifti

SHELLS = "# Shells: 0,1000,2000,3000\n"
WM = SHELLS + "1000 0 0\n500 -250 60\n300 -220 90\n200 -170 90\n"
GM = SHELLS + "1500\n700\n400\n250\n"
CSF = SHELLS + "3000\n150\n10\n1\n"


@pytest.fixture()
def multi_shell(tmp_path):
    g = acquisition_scheme("multi")
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    ph = make_phantom(g, (4, 4, 3), snr=30, seed=3)
    dwi = write_nifti(tmp_path / "dwi.nii.gz", ph.data.astype(np.float32), affine)
    bval, bvec = write_gradients(tmp_path / "dwi", g.bvals, world_to_fsl_bvecs(g.bvecs, affine).T)
    for name, text in (("wm", WM), ("gm", GM), ("csf", CSF)):
        (tmp_path / f"{name}.txt").write_text(text)
    mask = write_nifti(tmp_path / "mask.nii.gz", np.ones((4, 4, 3), np.uint8), affine)
    return tmp_path, [str(dwi), str(bval), str(bvec)], str(mask)


def _run(argv, capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _same_images(a, b) -> bool:
    import nibabel as nib

    return np.array_equal(np.asanyarray(nib.load(a).dataobj), np.asanyarray(nib.load(b).dataobj))


def test_msmt_csd_and_mtnormalise_take_mrtrix3_pairs(multi_shell, capsys):
    d, base, mask = multi_shell
    named = ["msmt-csd", *base, d / "wm.txt", d / "n_wm.nii.gz", "--response-gm", d / "gm.txt", "--gm",
             d / "n_gm.nii.gz", "--response-csf", d / "csf.txt", "--csf", d / "n_csf.nii.gz", "--mask", mask, "-q"]
    paired = ["msmt-csd", *base, d / "wm.txt", d / "p_wm.nii.gz", d / "gm.txt", d / "p_gm.nii.gz", d / "csf.txt",
              d / "p_csf.nii.gz", "--mask", mask, "-q"]
    assert _run(named, capsys)[0] == 0 and _run(paired, capsys)[0] == 0
    for tissue in ("wm", "gm", "csf"):
        assert _same_images(d / f"n_{tissue}.nii.gz", d / f"p_{tissue}.nii.gz"), tissue
    # two pairs: MRtrix3's two-tissue recipe is WM + CSF; a response that decays as free water does is the CSF
    assert _run(["msmt-csd", *base, d / "wm.txt", d / "t_wm.nii.gz", d / "csf.txt", d / "t_csf.nii.gz", "--mask",
                 mask, "-q"], capsys)[0] == 0
    assert json.loads((d / "t_csf.json").read_text())["Description"].startswith("CSF")
    assert _run(["msmt-csd", *base, d / "wm.txt", d / "u_wm.nii.gz", d / "gm.txt", d / "u_gm.nii.gz", "--mask",
                 mask, "-q"], capsys)[0] == 0
    assert json.loads((d / "u_gm.json").read_text())["Description"].startswith("Grey-matter")
    # a pair after the options' GM fills the next tissue (CSF)
    assert _run(["msmt-csd", *base, d / "wm.txt", d / "v_wm.nii.gz", d / "csf.txt", d / "v_csf.nii.gz",
                 "--response-gm", d / "gm.txt", "--gm", d / "v_gm.nii.gz", "--mask", mask, "-q"], capsys)[0] == 0
    assert _same_images(d / "v_csf.nii.gz", d / "n_csf.nii.gz") and _same_images(d / "v_gm.nii.gz", d / "n_gm.nii.gz")
    # wrong counts: one line each, exit 2, nothing written
    before = sorted(p.name for p in d.iterdir())
    code, err = _run(["msmt-csd", *base, d / "wm.txt", d / "x_wm.nii.gz", d / "gm.txt", "-q"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "pairs" in err, err
    code, err = _run(["msmt-csd", *base, d / "wm.txt", d / "x_wm.nii.gz", d / "gm.txt", d / "x_gm.nii.gz",
                      d / "csf.txt", d / "x_csf.nii.gz", d / "gm.txt", d / "x_4.nii.gz", "-q"], capsys)
    assert code == 2 and "takes at most 3" in err, err
    assert sorted(p.name for p in d.iterdir()) == before

    # mtnormalise IN OUT pairs (MRtrix3's mtnormalise) against the named options
    named = ["mtnormalise", d / "n_wm.nii.gz", d / "nn_wm.nii.gz", "--gm", d / "n_gm.nii.gz", "--gm-norm",
             d / "nn_gm.nii.gz", "--csf", d / "n_csf.nii.gz", "--csf-norm", d / "nn_csf.nii.gz", "--mask", mask,
             "--check-norm", d / "nn_field.nii.gz", "-q"]
    paired = ["mtnormalise", d / "n_wm.nii.gz", d / "pn_wm.nii.gz", d / "n_gm.nii.gz", d / "pn_gm.nii.gz",
              d / "n_csf.nii.gz", d / "pn_csf.nii.gz", "--mask", mask, "--check-norm", d / "pn_field.nii.gz", "-q"]
    assert _run(named, capsys)[0] == 0 and _run(paired, capsys)[0] == 0
    for name in ("wm", "gm", "csf", "field"):
        assert _same_images(d / f"nn_{name}.nii.gz", d / f"pn_{name}.nii.gz"), name
    # two pairs: the second is CSF when its sidecar says so (its tissue-fraction volume is named CSF), else GM
    for image, tissue in (("t_csf", "CSF"), ("u_gm", "GM")):
        assert _run(["mtnormalise", d / "t_wm.nii.gz", d / f"tn_{image}_wm.nii.gz", d / f"{image}.nii.gz",
                     d / f"tn_{image}.nii.gz", "--mask", mask, "--fractions", d / f"tn_{image}_fractions.nii.gz", "-q"],
                    capsys)[0] == 0
        side = json.loads((d / f"tn_{image}_fractions.json").read_text())
        assert side["TissueOrder"] == ["WM FOD", tissue], side["TissueOrder"]


def test_ss3t_csd_takes_the_pairs_in_ss3t_csd_beta1s_order(tmp_path, capsys):
    multi = acquisition_scheme("multi")
    g = multi.subset(np.flatnonzero(multi.b0s_mask | (multi.bvals == 3000)))
    ph = three_tissue_phantom(g, (4, 4, 2), snr=30, seed=2)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    dwi = write_nifti(tmp_path / "dwi.nii.gz", ph.data.astype(np.float32), affine)
    bval, bvec = write_gradients(tmp_path / "dwi", g.bvals, world_to_fsl_bvecs(g.bvecs, affine).T)
    shells = "# Shells: 0,3000\n"
    (tmp_path / "wm.txt").write_text(shells + "1000 0 0\n200 -170 90\n")
    (tmp_path / "gm.txt").write_text(shells + "1500\n250\n")
    (tmp_path / "csf.txt").write_text(shells + "3000\n1\n")
    code, err = _run(["ss3t-csd", dwi, bval, bvec, tmp_path / "wm.txt", tmp_path / "o_wm.nii.gz", tmp_path / "gm.txt",
                      tmp_path / "o_gm.nii.gz", tmp_path / "csf.txt", tmp_path / "o_csf.nii.gz", "-q"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "o_gm.json").read_text())["Description"].startswith("Grey-matter")
    assert json.loads((tmp_path / "o_csf.json").read_text())["Description"].startswith("CSF")
    # the order of the previous release (responses, then outputs) is refused in one line: an output where a
    # response belongs
    code, err = _run(["ss3t-csd", dwi, bval, bvec, tmp_path / "wm.txt", tmp_path / "gm.txt", tmp_path / "csf.txt",
                      tmp_path / "x_wm.nii.gz", tmp_path / "x_gm.nii.gz", tmp_path / "x_csf.nii.gz", "-q"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and not (tmp_path / "x_gm.nii.gz").exists(), err
