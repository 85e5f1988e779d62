"""dwirecon mapmri: outputs and sidecars, Delta/delta from the sidecar, the BIDS-app stage, errors."""

import json

import nibabel as nib
import numpy as np
import pytest

from dwiflow.cli.dwirecon import main
from dwiflow.core.gradients import world_to_fsl_bvecs
from dwiflow.core.sims import acquisition_scheme, make_phantom
from tests.conftest import write_gradients, write_nifti

AFFINE = np.diag([-2.0, 2.0, 2.0, 1.0])


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    d = tmp_path_factory.mktemp("mapmri")
    g = acquisition_scheme("multi")
    ph = make_phantom(g, (5, 5, 3), snr=30, seed=2)
    base = d / "sub-01_acq-multi_dwi"
    dwi = write_nifti(base.with_suffix(".nii.gz"), ph.data.astype(np.float32), AFFINE)
    bval, bvec = write_gradients(base, g.bvals, world_to_fsl_bvecs(g.bvecs, AFFINE).T)
    base.with_suffix(".json").write_text(json.dumps({"LargeDelta": 0.0265, "SmallDelta": 0.0162}))
    single = d / "single_dwi"
    keep = g.bvals < 1500
    sdwi = write_nifti(single.with_suffix(".nii.gz"), ph.data[..., keep].astype(np.float32), AFFINE)
    sbval, sbvec = write_gradients(single, g.bvals[keep], world_to_fsl_bvecs(g.bvecs[keep], AFFINE).T)
    return {"dwi": str(dwi), "bval": str(bval), "bvec": str(bvec), "single": (str(sdwi), str(sbval), str(sbvec)),
            "g": g, "ph": ph}


def test_mapmri_maps_and_sidecars(case, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["mapmri", case["dwi"], case["bval"], case["bvec"], str(out), "--signal"]) == 0
    assert "mapmri: 75/75 voxels" in capsys.readouterr().err
    name = "sub-01_acq-multi_model-mapmri_param-{}_dwimap.{}"
    rtop = nib.load(out / name.format("rtop", "nii.gz")).get_fdata()
    msd = nib.load(out / name.format("msd", "nii.gz")).get_fdata()
    side = json.loads((out / name.format("rtop", "json")).read_text())
    assert side["Model"]["Parameters"]["BigDelta"] == 0.0265 and side["Units"] == "mm^-3"
    assert side["Model"]["Parameters"]["DiffusionTimesFrom"] == "sub-01_acq-multi_dwi.json"
    # Gaussian sanity: for a free-diffusion-like propagator RTOP ~ (4 pi MSD / 3 * ...) — here simply the scales:
    # MSD = 6 D tau for a Gaussian; the phantom's mean diffusivities are 0.7-1.1e-3 mm^2/s
    tau = 0.0265 - 0.0162 / 3
    assert 0.4e-3 < np.median(msd / (6 * tau)) < 1.5e-3
    assert np.all(rtop > 0)
    odf = nib.load(out / name.format("odf", "nii.gz"))
    assert odf.shape == (5, 5, 3, 28)
    signal = nib.load(out / name.format("signal", "nii.gz")).get_fdata()
    normalised = case["ph"].data / case["ph"].data[..., case["g"].b0s_mask].mean(-1, keepdims=True)
    assert np.median(np.abs(signal - normalised)) < 0.05
    assert nib.load(out / name.format("status", "nii.gz")).get_fdata().max() == 0


def test_mapmri_isotropic_skips_non_gaussianity(case, tmp_path):
    out = tmp_path / "iso"
    assert main(["mapmri", case["dwi"], case["bval"], case["bvec"], str(out), "--isotropic", "--radial-order", "8",
                 "--laplacian-weight", "gcv"]) == 0
    names = {p.name for p in out.glob("*.nii.gz")}
    assert not any("param-ng" in n for n in names) and any("param-rtap" in n for n in names)


def test_mapmri_errors_leave_no_outputs(case, tmp_path, capsys):
    nodelta = tmp_path / "nodelta_dwi"
    img = nib.load(case["dwi"])
    nib.save(img, nodelta.with_suffix(".nii.gz"))
    base = [case["dwi"], case["bval"], case["bvec"]]
    cases = [
        (["mapmri", *case["single"], str(tmp_path / "o1"), "--big-delta", "0.03", "--small-delta", "0.01"],
         "several diffusion-weighted shells"),
        (["mapmri", str(nodelta.with_suffix(".nii.gz")), case["bval"], case["bvec"], str(tmp_path / "o2")],
         "need the diffusion times"),
        (["mapmri", *base, str(tmp_path / "o3"), "--radial-order", "5"], "even integer"),
        (["mapmri", *base, str(tmp_path / "o4"), "--positivity", "grid", "--solver", "gurobi"], "not available"),
        (["mapmri", *base, str(tmp_path / "o5"), "--laplacian-weighting", "lots"],
         "--laplacian-weighting: must be float or one of gcv, got 'lots'"),
        # the old spelling still works and warns
        (["mapmri", *base, str(tmp_path / "o7"), "--laplacian-weight", "-1"],
         "--laplacian-weight is deprecated; use --laplacian-weighting"),
        (["mapmri", *base, str(tmp_path / "o6"), "--no-anisotropic-scaling", "--positivity", "global"],
         "--positivity global (sum of squares) needs --anisotropic-scaling"),
        (["mapmri", *base, str(tmp_path / "o8"), "--isotropic", "--positivity", "global"],
         "--isotropic is deprecated; use --no-anisotropic-scaling"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)
        assert not (tmp_path / argv[4]).exists() or not any((tmp_path / argv[4]).iterdir())


def test_compare_holds_this_fit_and_each_variant(case, tmp_path, capsys):
    """--compare MAP: the comparison map's first fit is this run's indices, the second equals a MAP fit of its own."""
    out, plain = tmp_path / "out", tmp_path / "plain"
    args = [case["dwi"], case["bval"], case["bvec"]]
    assert main(["mapmri", *args, str(out), "--compare", "MAP"]) == 0
    assert main(["mapmri", *args, str(plain), "--laplacian-weighting", "0"]) == 0
    name = "sub-01_acq-multi_model-mapmri_param-{}_dwimap.{}"
    compare = nib.load(out / name.format("compare", "nii.gz")).get_fdata()
    params = json.loads((out / name.format("compare", "json")).read_text())["Model"]["Parameters"]["Compare"]
    indices = params["Indices"]
    assert params["Fits"][1:] == ["MAP"] and compare.shape[3] == 2 * len(indices) == 18
    for i, index in enumerate(indices):
        this = nib.load(out / name.format(index, "nii.gz")).get_fdata()
        variant = nib.load(plain / name.format(index, "nii.gz")).get_fdata()
        assert np.allclose(compare[..., i], this, rtol=1e-6, equal_nan=True), index
        assert np.allclose(compare[..., len(indices) + i], variant, rtol=1e-5, equal_nan=True), index
    assert main(["mapmri", *args, str(tmp_path / "bad"), "--compare", "MAPX"]) == 2
    assert "--compare: every value must be one of MAP, MAPL, CMAP, CMAPL, MAP+, got 'MAPX'" in capsys.readouterr().err
