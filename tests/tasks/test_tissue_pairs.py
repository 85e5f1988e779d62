"""ss3t-csd on the command line as MRtrix3Tissue's ss3t_csd_beta1 takes it: (response, output) pairs per tissue
(msmt-csd's and mtnormalise's pairs are tested with MRtrix3's in test_msmt_mrtrix.py)."""

import json

import numpy as np

from dwiflow.cli.dwirecon import main
from dwiflow.core.sims import acquisition_scheme, three_tissue_phantom
from tests.conftest import write_dwi_run


def _run(argv, capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_ss3t_csd_takes_the_pairs_in_ss3t_csd_beta1s_order(tmp_path, capsys):
    multi = acquisition_scheme("multi")
    g = multi.subset(np.flatnonzero(multi.b0s_mask | (multi.bvals == 3000)))
    ph = three_tissue_phantom(g, (4, 4, 2), snr=30, seed=2)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    dwi, bval, bvec = write_dwi_run(tmp_path, g, ph.data, affine)
    shells = "# Shells: 0,3000\n"
    (tmp_path / "wm.txt").write_text(shells + "1000 0 0\n200 -170 90\n")
    (tmp_path / "gm.txt").write_text(shells + "1500\n250\n")
    (tmp_path / "csf.txt").write_text(shells + "3000\n1\n")
    code, err = _run(["ss3t-csd", dwi, bval, bvec, tmp_path / "wm.txt", tmp_path / "o_wm.nii.gz", tmp_path / "gm.txt",
                      tmp_path / "o_gm.nii.gz", tmp_path / "csf.txt", tmp_path / "o_csf.nii.gz", "-q"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "o_gm.json").read_text())["Description"].startswith("Grey-matter")
    assert json.loads((tmp_path / "o_csf.json").read_text())["Description"].startswith("CSF")
    # the order dwirecon took before (responses, then outputs) is refused in one line: an output where a
    # response belongs
    code, err = _run(["ss3t-csd", dwi, bval, bvec, tmp_path / "wm.txt", tmp_path / "gm.txt", tmp_path / "csf.txt",
                      tmp_path / "x_wm.nii.gz", tmp_path / "x_gm.nii.gz", tmp_path / "x_csf.nii.gz", "-q"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and not (tmp_path / "x_gm.nii.gz").exists(), err
