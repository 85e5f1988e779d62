"""dwirecon response amp2response / fa / ssst: outputs, sidecars, errors."""

import json

import numpy as np
import pytest

from dwiflow.cli.dwirecon import main
from dwiflow.core.gradients import world_to_fsl_bvecs
from dwiflow.core.response import ResponseFunction, tensor_response_zonal
from dwiflow.core.sims import acquisition_scheme, make_phantom
from tests.conftest import write_gradients, write_nifti

AFFINE = np.diag([-2.0, 2.0, 2.0, 1.0])


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    d = tmp_path_factory.mktemp("resp")
    gtab = acquisition_scheme("multi")
    ph = make_phantom(gtab, (16, 16, 6), n_fibres=(1, 2), snr=None, seed=3)
    dwi = write_nifti(d / "dwi.nii.gz", ph.data.astype(np.float32), AFFINE)
    bval, bvec = write_gradients(d / "dwi", gtab.bvals, world_to_fsl_bvecs(gtab.bvecs, AFFINE).T)
    single = ph.n_fibres == 1
    mask = write_nifti(d / "single.nii.gz", single.astype(np.uint8), AFFINE)
    dirs = write_nifti(d / "dirs.nii.gz", np.nan_to_num(ph.directions[..., 0, :]).astype(np.float32), AFFINE)
    return {"dir": d, "dwi": dwi, "bval": bval, "bvec": bvec, "mask": mask, "dirs": dirs, "gtab": gtab, "ph": ph}


def _truth(bvalues, lmax):
    return tensor_response_zonal(np.array([1.7e-3, 0.3e-3, 0.3e-3]), 100.0, np.asarray(bvalues), lmax)


def test_amp2response_command(case, tmp_path, capsys):
    out = tmp_path / "r.txt"
    assert main(["response", "amp2response", *map(str, (case["dwi"], case["bval"], case["bvec"], case["mask"],
                                                         case["dirs"], out)), "--lmax", "0,8,8,8"]) == 0
    r = ResponseFunction.from_text(out.read_text())
    assert out.read_text().startswith("# Shells: 0,1000,2000,3000")
    truth = _truth(r.bvalues, [0, 8, 8, 8])
    # lmax 8 cannot hold the b=3000 kernel's l>=10 content: the least-squares fit differs from
    # the projection by ~6e-4 of S0's coefficient there
    assert np.abs(r.coefficients - truth.coefficients).max() / truth.coefficients[0, 0] < 1e-3
    side = json.loads((tmp_path / "r.txt.json").read_text())
    assert side["Lmax"] == [0, 8, 8, 8] and side["Parameters"]["Voxels"] == int((case["ph"].n_fibres == 1).sum())


def test_fa_command_writes_voxels_and_uses_the_largest_shell(case, tmp_path, capsys):
    out = tmp_path / "fa.txt"
    code = main(["response", "fa", str(case["dwi"]), str(case["bval"]), str(case["bvec"]), str(out),
                 "--voxels", str(tmp_path / "vox.nii.gz"), "--number", "50", "--erode", "0"])
    assert code == 0, capsys.readouterr().err
    r = ResponseFunction.from_text(out.read_text())
    assert np.allclose(r.bvalues, [3000], atol=1)
    truth = _truth(r.bvalues, [10])
    assert np.abs(r.coefficients - truth.coefficients).max() / truth.coefficients[0, 0] < 1e-4


def test_ssst_command_sidecar_records_eigenvalues(case, tmp_path, capsys):
    out = tmp_path / "ssst.txt"
    code = main(["response", "ssst", str(case["dwi"]), str(case["bval"]), str(case["bvec"]), str(out),
                 "--roi-radii", "5", "--fa-threshold", "0.7", "--voxels", str(tmp_path / "v.nii.gz")])
    assert code == 0, capsys.readouterr().err
    side = json.loads((tmp_path / "ssst.txt.json").read_text())
    # a few crossing voxels with a dominant fibre pass FA > 0.7 in this mixed phantom
    assert np.allclose(side["Eigenvalues"], [1.7e-3, 0.3e-3, 0.3e-3], rtol=0.03)
    assert side["S0"] == pytest.approx(100.0) and side["VoxelCount"] > 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--fa-threshold", "0.99"], "--fa-threshold, --roi-radii: no voxel with FA > 0.99"),
        (["--roi-center", "40,0,0"], "outside the volume"),
    ],
)
def test_ssst_errors(case, tmp_path, capsys, argv, message):
    code = main(["response", "ssst", str(case["dwi"]), str(case["bval"]), str(case["bvec"]), str(tmp_path / "x.txt"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and not (tmp_path / "x.txt").exists()


def test_amp2response_errors(case, tmp_path, capsys):
    d = case["dir"]
    wrong = write_nifti(tmp_path / "wrong.nii.gz", np.ones((16, 16, 5), np.uint8), AFFINE)
    nan_dirs = np.nan_to_num(case["ph"].directions[..., 0, :]).astype(np.float32)
    nan_dirs[case["ph"].n_fibres == 1] = np.nan
    bad_dirs = write_nifti(tmp_path / "nan.nii.gz", nan_dirs, AFFINE)
    base = ["response", "amp2response", str(case["dwi"]), str(case["bval"]), str(case["bvec"])]
    cases = [
        ([str(wrong), str(case["dirs"]), str(tmp_path / "o.txt")], "has shape (16, 16, 5)"),
        ([str(case["mask"]), str(bad_dirs), str(tmp_path / "o.txt")], "have a NaN or zero fibre direction"),
        ([str(case["mask"]), str(case["dirs"]), str(tmp_path / "o.txt"), "--shells", "0,5000"], "no shell at b=5000"),
        ([str(case["mask"]), str(case["dirs"]), str(tmp_path / "o.txt"), "--lmax", "0,7,8,8"], "--lmax: every value must be an even integer, got 7"),
        ([str(case["mask"]), str(d / "missing.nii.gz"), str(tmp_path / "o.txt")], "directions image file not found"),
    ]
    for extra, message in cases:
        code = main(base + extra)
        err = capsys.readouterr().err
        assert code == 2 and message in err, err
        assert not (tmp_path / "o.txt").exists()


def test_external_directions_file(case, tmp_path, capsys):
    gtab = case["gtab"]
    shell = gtab.find_shell(2000)
    amps = write_nifti(tmp_path / "amps.nii.gz", case["ph"].data[..., shell.indices].astype(np.float32), AFFINE)
    np.savetxt(tmp_path / "dirs.txt", gtab.bvecs[shell.indices])
    out = tmp_path / "ext.txt"
    assert main(["response", "amp2response", str(amps), "unused.bval", "unused.bvec", str(case["mask"]),
                 str(case["dirs"]), str(out), "--directions", str(tmp_path / "dirs.txt"), "--lmax", "8"]) == 0
    r = ResponseFunction.from_text(out.read_text(), "ext")
    truth = _truth([2000], [8])
    assert np.abs(r.coefficients - truth.coefficients).max() / truth.coefficients[0, 0] < 1e-4
