"""dwirecon csd / peaks / fod-metrics: outputs, sidecars and errors."""

import json
import subprocess
import sys

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
                 str(tmp_path / "st.nii.gz")]) == 0
    # --nthreads in a process of its own: numba.set_num_threads in this process would break the forked
    # workers of the workflow tests that run after it (numba's pool does not survive the fork then)
    one_thread = tmp_path / "fod1.nii.gz"
    subprocess.run([sys.executable, "-m", "dwiflow.cli.dwirecon", "csd", case["dwi"], case["bval"], case["bvec"],
                    case["resp"], str(one_thread), "--nthreads", "1"], check=True, capture_output=True)
    assert np.allclose(nib.load(one_thread).get_fdata(), nib.load(fod).get_fdata(), rtol=0, atol=1e-10)
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


def test_peaks_use_the_point_spread_function_in_the_fod_sidecar(tmp_path, capsys):
    """Two fibres 40 deg apart merge into one FOD lobe: local maxima (the default) find one peak; --subtract-psf,
    with the point-spread function the CSD sidecar carries, finds both; a missing or bad PSF entry is an error."""
    g = scheme(150)
    fibres = np.array([[1.0, 0.0, 0.0], [np.cos(np.radians(40)), np.sin(np.radians(40)), 0.0]])
    ph = make_phantom(g, (4, 4, 2), directions=fibres, fractions=np.array([0.6, 0.4]), snr=50, seed=2)
    dwi = write_nifti(tmp_path / "dwi.nii.gz", ph.data.astype(np.float32), AFFINE)
    bval, bvec = write_gradients(tmp_path / "dwi", g.bvals, world_to_fsl_bvecs(g.bvecs, AFFINE).T)
    resp = tmp_path / "resp.txt"
    resp.write_text(tensor_response_zonal(np.array(EVALS), 100.0, np.array([2000.0]), [8]).to_text())
    fod = tmp_path / "fod.nii.gz"
    assert main(["csd", str(dwi), str(bval), str(bvec), str(resp), str(fod)]) == 0
    assert len(json.loads((tmp_path / "fod.json").read_text())["PointSpreadFunction"]["Coefficients"]) == 5

    def peaks(*extra):
        out = tmp_path / "peaks.nii.gz"
        assert main(["peaks", str(fod), str(out), "--npeaks", "3", "--force", *extra]) == 0  # the same output each time
        return nib.load(out).get_fdata().reshape(-1, 3, 3), json.loads((tmp_path / "peaks.json").read_text())

    def angles(v, k):  # angle of every peak to fibre k, per voxel (NaN where no peak)
        u = v / np.linalg.norm(v, axis=-1, keepdims=True)
        return np.degrees(np.arccos(np.clip(np.abs(u @ fibres[k]), 0, 1)))

    subtracted, side = peaks("--subtract-psf")
    assert side["Parameters"]["Method"] == "point-spread-function subtraction"
    both = (np.nanmin(angles(subtracted, 0), axis=1) < 10) & (np.nanmin(angles(subtracted, 1), axis=1) < 10)
    assert both.all() and np.all(np.isnan(subtracted[:, 2]))  # both fibres, within 10 deg, and nothing more
    maxima, side = peaks()
    assert side["Parameters"]["Method"] == "local maxima"
    assert np.mean(np.isfinite(maxima[:, 1, 0])) < 0.2  # one merged lobe: mostly a single maximum
    sidecar = json.loads((tmp_path / "fod.json").read_text())
    sidecar["PointSpreadFunction"]["Coefficients"] = [1.0, 2.0]
    (tmp_path / "fod.json").write_text(json.dumps(sidecar))
    assert main(["peaks", str(fod), str(tmp_path / "p2.nii.gz"), "--subtract-psf"]) == 2
    assert "PointSpreadFunction that is not 5 finite zonal coefficients" in capsys.readouterr().err
    (tmp_path / "fod.json").unlink()
    assert main(["peaks", str(fod), str(tmp_path / "p2.nii.gz"), "--subtract-psf"]) == 2
    assert "needs the FOD's point-spread function in its sidecar fod.json" in capsys.readouterr().err
    assert not (tmp_path / "p2.nii.gz").exists()


def test_descoteaux07_output_is_read_by_dipy_and_by_every_stage(case, tmp_path, capsys):
    """--sh-basis descoteaux07: DIPY's own sh_to_sf gives the amplitudes of the MRtrix3-basis FOD; peaks and FOD
    metrics read the basis from the sidecar (identical maps); sh-convert goes both ways exactly."""
    from dipy.data import get_sphere
    from dipy.reconst.shm import sh_to_sf

    mrtrix, dipy_fod = tmp_path / "fod.nii.gz", tmp_path / "fod_desc.nii.gz"
    common = [case["dwi"], case["bval"], case["bvec"], case["resp"]]
    assert main(["csd", *common, str(mrtrix)]) == 0
    assert main(["csd", *common, str(dipy_fod), "--sh-basis", "descoteaux07"]) == 0
    side = json.loads((tmp_path / "fod_desc.json").read_text())["OrientationEncoding"]
    assert side["SphericalHarmonicBasis"] == "descoteaux" and side["SphericalHarmonicDegree"] == 8
    sphere = get_sphere(name="repulsion724")
    reference = sh_to_sf(nib.load(mrtrix).get_fdata(), sphere, sh_order_max=8, basis_type="tournier07", legacy=False)
    theirs = sh_to_sf(nib.load(dipy_fod).get_fdata(), sphere, sh_order_max=8, basis_type="descoteaux07",
                      legacy=False)
    assert np.abs(theirs - reference).max() <= 1e-6 * np.abs(reference).max()
    assert not np.allclose(nib.load(dipy_fod).get_fdata(), nib.load(mrtrix).get_fdata())  # other coefficients
    for fod, name in ((mrtrix, "a"), (dipy_fod, "b")):
        assert main(["peaks", str(fod), str(tmp_path / f"peaks_{name}.nii.gz")]) == 0
        assert main(["fod-metrics", str(fod), str(tmp_path / f"peaks_{name}.nii.gz"), str(tmp_path / name)]) == 0
    assert np.array_equal(nib.load(tmp_path / "peaks_a.nii.gz").get_fdata(),
                          nib.load(tmp_path / "peaks_b.nii.gz").get_fdata(), equal_nan=True)
    for metric in ("afdtotal", "nufo"):
        name = f"model-csd_param-{metric}_dwimap.nii.gz"
        assert np.array_equal(nib.load(tmp_path / "a" / name).get_fdata(), nib.load(tmp_path / "b" / name).get_fdata())
    back = tmp_path / "back.nii.gz"
    assert main(["sh-convert", str(dipy_fod), str(back), "--to", "mrtrix3"]) == 0
    assert np.array_equal(nib.load(back).get_fdata(), nib.load(mrtrix).get_fdata())
    assert json.loads((tmp_path / "back.json").read_text())["OrientationEncoding"]["SphericalHarmonicBasis"] == "mrtrix3"
    capsys.readouterr()
    assert main(["sh-convert", str(dipy_fod), str(tmp_path / "x.nii.gz"), "--source-basis", "mrtrix3"]) == 2
    assert "contradicts the sidecar" in capsys.readouterr().err and not (tmp_path / "x.nii.gz").exists()
