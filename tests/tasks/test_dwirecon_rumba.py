"""dwirecon rumba: outputs, frames, sidecars, the SSST response hand-over and errors."""

import json

import nibabel as nib
import numpy as np
import pytest

from dwiflow.cli.dwirecon import main
from dwiflow.core.gradients import world_to_fsl_bvecs
from dwiflow.core.peaks import find_peaks
from dwiflow.core.sh import real_sh_basis
from dwiflow.core.sims import make_phantom
from tests.conftest import write_gradients, write_nifti
from tests.core.test_csd import scheme

# oblique, LAS storage: the fODF must still come out in the world frame
AFFINE = np.array([[-2.0, 0.3, 0.0, 10.0], [0.2, 1.9, 0.4, -5.0], [0.0, -0.4, 2.0, 3.0], [0, 0, 0, 1.0]])


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    d = tmp_path_factory.mktemp("rumba")
    g = scheme(60)
    ph = make_phantom(g, (6, 6, 3), n_fibres=(1, 2), snr=40, seed=4, min_separation_deg=60, csf_fraction=(0.0, 0.3))
    base = d / "sub-01_acq-test_dwi"
    dwi = write_nifti(base.with_suffix(".nii.gz"), ph.data.astype(np.float32), AFFINE)
    bval, bvec = write_gradients(base, g.bvals, world_to_fsl_bvecs(g.bvecs, AFFINE).T)
    return {"dir": d, "dwi": str(dwi), "bval": str(bval), "bvec": str(bvec), "ph": ph}


def test_rumba_writes_every_map_in_the_world_frame(case, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["rumba", case["dwi"], case["bval"], case["bvec"], str(out), "--n-iter", "300", "--amplitudes"]) == 0
    assert "rumba: 108/108 voxels" in capsys.readouterr().err
    name = "sub-01_acq-test_model-rumba_param-{}_dwimap.nii.gz"
    fod = nib.load(out / name.format("fod")).get_fdata()
    assert fod.shape == (6, 6, 3, 45)
    amp_img = out / name.format("fodamp")
    amplitudes = nib.load(amp_img).get_fdata()
    side = json.loads(amp_img.with_name(amp_img.name.replace(".nii.gz", ".json")).read_text())
    directions = np.array(side["OrientationEncoding"]["AmplitudesDirections"])
    assert amplitudes.shape == (6, 6, 3, 724) and directions.shape == (724, 3)
    assert side["Model"]["Parameters"]["Iterations"] == 300
    fwm, fiso = (nib.load(out / name.format(p)).get_fdata() for p in ("fwm", "fiso"))
    fgm, fcsf = (nib.load(out / name.format(p)).get_fdata() for p in ("fgm", "fcsf"))
    assert np.allclose(fwm + fiso, 1.0, atol=1e-5) and np.allclose(fgm + fcsf, fiso, atol=1e-5)
    assert np.allclose(amplitudes.sum(-1), fwm, atol=1e-4)
    assert np.corrcoef(fcsf.ravel(), case["ph"].csf_fraction.ravel())[0, 1] > 0.8
    # the SH fODF reproduces the amplitudes' shape
    sampled = fod.reshape(-1, 45) @ real_sh_basis(8, directions).T
    a = amplitudes.reshape(-1, 724)
    corr = [np.corrcoef(x, y)[0, 1] for x, y in zip(sampled, a)]
    assert np.median(corr) > 0.9
    # combined ODF = fODF + isotropic part spread over the sphere
    combined = nib.load(out / name.format("combinedodf")).get_fdata()
    assert np.allclose(combined[..., 0] - fod[..., 0], fiso / 724 * np.sqrt(4 * np.pi), atol=1e-5)
    assert np.allclose(combined[..., 1:], fod[..., 1:], atol=1e-5)
    snr = nib.load(out / name.format("snr")).get_fdata()
    assert 15 < np.median(snr) < 80  # the phantom's S0/sigma is 40
    assert nib.load(out / name.format("status")).get_fdata().max() == 0
    # peaks of the fODF in world coordinates match the phantom's world-frame fibres
    peaks = find_peaks(fod).vectors
    first = peaks[..., 0, :] / np.linalg.norm(peaks[..., 0, :], axis=-1, keepdims=True)
    one = case["ph"].n_fibres == 1
    cosines = np.abs(np.sum(first * case["ph"].directions[..., 0, :], -1))[one]
    assert np.degrees(np.arccos(np.clip(cosines, 0, 1))).mean() < 5


def test_rumba_takes_ssst_eigenvalues_and_switches_compartments_off(case, tmp_path):
    response = tmp_path / "ssst.txt"
    assert main(["response", "ssst", case["dwi"], case["bval"], case["bvec"], str(response), "--roi-radii", "3",
                 "--fa-threshold", "0.5"]) == 0
    evals = json.loads((tmp_path / "ssst.txt.json").read_text())["Eigenvalues"]  # a free name: name + .json
    out = tmp_path / "out"
    assert main(["rumba", case["dwi"], case["bval"], case["bvec"], str(out), "--n-iter", "50", "--wm-response",
                 str(response), "--gm-response", "none", "--no-amplitudes"]) == 0
    written = sorted(p.name for p in out.glob("*.nii.gz"))
    assert not any("fgm" in n or "fodamp" in n for n in written) and any("fcsf" in n for n in written)
    side = json.loads((out / "sub-01_acq-test_model-rumba_param-fwm_dwimap.json").read_text())
    assert np.allclose(side["Model"]["Parameters"]["WhiteMatterResponse"][0], evals)
    assert side["Model"]["Parameters"]["GreyMatterDiffusivity"] is None


def test_rumba_errors_leave_no_outputs(case, tmp_path, capsys):
    single_slice = write_nifti(tmp_path / "slice.nii.gz", case["ph"].data[:, :, :1].astype(np.float32), AFFINE)
    base = [case["dwi"], case["bval"], case["bvec"]]
    cases = [
        (["rumba", *base, str(tmp_path / "o1"), "--recon-type", "sos"], "--recon-type sos (noncentral chi noise) needs --n-coils"),
        (["rumba", *base, str(tmp_path / "o2"), "--wm-response", "0.2e-3,0.2e-3,1.7e-3"], "decreasing order"),
        (["rumba", *base, str(tmp_path / "o3"), "--wm-response", "1.7e-3,-2e-4,-2e-4"],
             "--wm-response: every value must be >= 0, got -0.0002"),
        (["rumba", *base, str(tmp_path / "o4"), "--csf-response=-3e-3"], "--csf-response: must be > 0, got -0.003"),
        (["rumba", *base, str(tmp_path / "o5"), "--tv"], "needs the global fit"),
        (["rumba", str(single_slice), case["bval"], case["bvec"], str(tmp_path / "o6"), "--global", "--tv"],
         "single slice"),
        (["rumba", *base, str(tmp_path / "o7"), "--wm-response", str(tmp_path / "missing.txt")], "not found"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)
        assert not (tmp_path / argv[4]).exists() or not any((tmp_path / argv[4]).iterdir())
