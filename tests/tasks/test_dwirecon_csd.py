"""dwirecon csd / peaks / fod-metrics: outputs, sidecars and errors."""

import json

import nibabel as nib
import numpy as np
import pytest

from dwiflow.cli.dwirecon import main
from dwiflow.core.gradients import world_to_fsl_bvecs
from dwiflow.core.response import tensor_response_zonal
from dwiflow.core.sims import make_phantom
from tests.conftest import write_gradients, write_nifti
from tests.core.test_csd import EVALS, scheme

AFFINE = np.diag([-2.0, 2.0, 2.0, 1.0])


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    d = tmp_path_factory.mktemp("csd")
    g = scheme(60)
    ph = make_phantom(g, (8, 8, 3), n_fibres=(1, 2), snr=30, seed=4, min_separation_deg=60)
    dwi = write_nifti(d / "dwi.nii.gz", ph.data.astype(np.float32), AFFINE)
    bval, bvec = write_gradients(d / "dwi", g.bvals, world_to_fsl_bvecs(g.bvecs, AFFINE).T)
    resp = d / "resp.txt"
    resp.write_text(tensor_response_zonal(np.array(EVALS), 100.0, np.array([2000.0]), [8]).to_text())
    return {"dir": d, "dwi": str(dwi), "bval": str(bval), "bvec": str(bvec), "resp": str(resp), "ph": ph}


def test_csd_peaks_metrics_chain(case, tmp_path, capsys):
    fod, peaks = tmp_path / "fod.nii.gz", tmp_path / "peaks.nii.gz"
    assert main(["csd", case["dwi"], case["bval"], case["bvec"], case["resp"], str(fod), "--status",
                 str(tmp_path / "st.nii.gz"), "--nthreads", "1"]) == 0
    img = nib.load(fod)
    assert img.shape == (8, 8, 3, 45)
    side = json.loads((tmp_path / "fod.json").read_text())
    assert side["OrientationEncoding"]["SphericalHarmonicDegree"] == 8
    assert side["OrientationEncoding"]["SphericalHarmonicBasis"] == "mrtrix3"
    assert len(side["ResponseFunction"]["Coefficients"]) == 5
    assert main(["peaks", str(fod), str(peaks), "--npeaks", "2"]) == 0
    pk = nib.load(peaks).get_fdata()
    assert pk.shape == (8, 8, 3, 6)
    assert json.loads((tmp_path / "peaks.json").read_text())["OrientationEncoding"]["Type"] == "3vector"
    assert main(["fod-metrics", str(fod), str(peaks), str(tmp_path / "m")]) == 0
    nufo = nib.load(tmp_path / "m" / "model-csd_param-nufo_dwimap.nii.gz").get_fdata()
    truth = case["ph"].n_fibres
    assert np.mean(nufo == truth) > 0.9  # crossings are at least 60 degrees apart here


def test_csd_errors(case, tmp_path, capsys):
    two_shell = tmp_path / "two.txt"
    two_shell.write_text(tensor_response_zonal(np.array(EVALS), 100.0, np.array([1000.0, 3000.0]), [8, 8]).to_text())
    empty = write_nifti(tmp_path / "empty.nii.gz", np.zeros((8, 8, 3), np.uint8), AFFINE)
    base = ["csd", case["dwi"], case["bval"], case["bvec"]]
    cases = [
        ([str(two_shell), str(tmp_path / "f.nii.gz")], "response has shells b=1000, 3000"),
        ([case["resp"], str(tmp_path / "f.nii.gz"), "--lmax", "18"], "is more than the 60 directions"),
        ([case["resp"], str(tmp_path / "f.nii.gz"), "--mask", str(empty)], "is empty"),
        ([str(tmp_path / "none.txt"), str(tmp_path / "f.nii.gz")], "response file not found"),
    ]
    for extra, message in cases:
        code = main(base + extra)
        err = capsys.readouterr().err
        assert code == 2 and message in err, err
        assert not (tmp_path / "f.nii.gz").exists()


def test_peaks_rejects_a_non_sh_image(case, tmp_path, capsys):
    code = main(["peaks", case["dwi"], str(tmp_path / "p.nii.gz")])
    err = capsys.readouterr().err
    assert code == 2 and "is not an even-degree SH coefficient count" in err
    assert not (tmp_path / "p.nii.gz").exists()
