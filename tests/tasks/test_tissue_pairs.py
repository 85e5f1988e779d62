"""ss3t-csd on the command line as MRtrix3Tissue's ss3t_csd_beta1 takes it: (response, output) pairs per tissue
(msmt-csd's and mtnormalise's pairs are tested with MRtrix3's in test_msmt_mrtrix.py)."""

import json

import nibabel as nib
import numpy as np

from dwiflow.cli.dwirecon import main
from dwiflow.core.sims import acquisition_scheme, three_tissue_phantom
from tests.conftest import write_dwi_run, write_nifti


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


def test_mrtrix3_recipe_names_response_and_image_alike(tmp_path, capsys):
    """MRtrix3's multi-tissue recipe (and the README's) names a tissue's response and its image alike (gm.txt,
    gm.mif → gm.nii.gz): dhollander, msmt-csd and mtnormalise run one after the other with those names. The
    image's sidecar is gm.json and the response's gm.txt.json (both were gm.json: msmt-csd refused to overwrite the
    response's); each describes its own file."""
    from dwiflow.core.response import ResponseFunction

    ph = three_tissue_phantom(acquisition_scheme("multi"), (24, 24, 6), snr=30, seed=5)
    dwi, bval, bvec = write_dwi_run(tmp_path, ph.gtab, ph.data, np.diag([2.0, 2.0, 2.0, 1.0]))
    names = {t: tmp_path / f"{t}.txt" for t in ("wm", "gm", "csf")}
    images = {"wm": tmp_path / "wmfod.nii.gz", "gm": tmp_path / "gm.nii.gz", "csf": tmp_path / "csf.nii.gz"}
    code, err = _run(["response", "dhollander", dwi, bval, bvec, *names.values(), "--erode", "0", "-q"], capsys)
    # a small phantom's 96 refined WM voxels: 0.5 % (the default) is no voxel, said with the option to change
    assert code == 2 and err.strip() == ("dwirecon response dhollander: error: --sfwm: dhollander's single-fibre WM "
                                         "candidates: 0 of 96 candidate voxels requested (twice 0.5 % of 96 refined "
                                         "WM voxels): the mask or the tissue is too small for this selection"), err
    assert not names["wm"].exists()
    code, err = _run(["response", "dhollander", dwi, bval, bvec, *names.values(), "--erode", "0", "--sfwm", "5", "-q"],
                     capsys)
    assert code == 0, err
    code, err = _run(["msmt-csd", dwi, bval, bvec, *sum(([names[t], images[t]] for t in names), []), "-q"], capsys)
    assert code == 0, err
    mask = write_nifti(tmp_path / "mask.nii.gz", np.ones(ph.data.shape[:3], np.uint8), np.diag([2.0, 2.0, 2.0, 1.0]))
    code, err = _run(["mtnormalise", *sum(([images[t], tmp_path / f"{t}_norm.nii.gz"] for t in names), []),
                      "--mask", mask, "-q"], capsys)
    assert code == 0, err
    for tissue in names:
        response = ResponseFunction.from_text(names[tissue].read_text())
        own = json.loads((tmp_path / f"{tissue}.txt.json").read_text())
        assert np.allclose(own["ResponseFunction"]["Coefficients"], response.coefficients, rtol=1e-6)
    gm_image = json.loads((tmp_path / "gm.json").read_text())
    assert gm_image["Description"].startswith("Grey-matter")
    gm_response = ResponseFunction.from_text(names["gm"].read_text()).coefficients
    assert np.allclose(gm_image["ResponseFunction"]["Coefficients"], gm_response, rtol=1e-6)


def test_ss3t_csd_on_one_shell_of_multi_shell_data(tmp_path, capsys):
    """--shell B on multi-shell data: SS3T-CSD on b=0 and that shell with the multi-shell responses' rows for them,
    the same numbers as on the data and responses cut to b=0 + B beforehand (dwiextract -shells 0,B, as QSIRecon's
    select_gradients); without it, or with a shell the data lack, one line naming what to give."""
    from dwiflow.core.response import ResponseFunction

    ph = three_tissue_phantom(acquisition_scheme("multi"), (24, 24, 6), snr=30, seed=5)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    (tmp_path / "all").mkdir()
    (tmp_path / "cut").mkdir()
    dwi, bval, bvec = write_dwi_run(tmp_path / "all", ph.gtab, ph.data, affine)
    keep = np.flatnonzero(ph.gtab.b0s_mask | (np.abs(ph.gtab.bvals - 3000) < 80))
    cut = write_dwi_run(tmp_path / "cut", ph.gtab.subset(keep), ph.data[..., keep], affine)
    names = [tmp_path / f"{t}.txt" for t in ("wm", "gm", "csf")]
    assert main([str(a) for a in ["response", "dhollander", dwi, bval, bvec, *names, "--erode", "0", "--sfwm", "5",
                                  "-q"]]) == 0
    rows = [ResponseFunction.from_text(n.read_text()) for n in names]
    assert all(r.bvalues.size == 4 for r in rows)  # b=0 and three shells
    two_rows = []
    for n, r in zip(names, rows):
        two_rows.append(n.with_name(f"two_{n.name}"))
        two_rows[-1].write_text(r.rows_for([0.0, 3000.0]).to_text())
    outputs = {k: [tmp_path / f"{k}_{t}.nii.gz" for t in ("wm", "gm", "csf")] for k in ("shell", "cut")}
    code, err = _run(["ss3t-csd", dwi, bval, bvec, *sum(([r, o] for r, o in zip(names, outputs["shell"])), []),
                      "--shell", "3000", "-q"], capsys)
    assert code == 0, err
    code, err = _run(["ss3t-csd", *cut, *sum(([r, o] for r, o in zip(two_rows, outputs["cut"])), []), "-q"], capsys)
    assert code == 0, err
    for a, b in zip(outputs["shell"], outputs["cut"]):
        assert np.array_equal(np.asarray(nib.load(a).dataobj), np.asarray(nib.load(b).dataobj))
    assert json.loads((tmp_path / "shell_wm.json").read_text())["Model"]["Parameters"]["Shells"] == [0.0, 3000.0]
    code, err = _run(["ss3t-csd", dwi, bval, bvec, *sum(([r, tmp_path / f"x{i}.nii.gz"] for i, r in enumerate(names)),
                                                         []), "-q"], capsys)
    assert code == 2 and err.strip().endswith("(multi-shell data: recon spec msmt, or b=0 and one shell: dwirecon "
                                              "ss3t-csd --shell 3000; in a recon spec, ss3t_csd: {shell: 3000} (the "
                                              "largest, as SS3T's author advises))"), err
    code, err = _run(["ss3t-csd", dwi, bval, bvec, *sum(([r, tmp_path / f"x{i}.nii.gz"] for i, r in enumerate(names)),
                                                         []), "--shell", "2500", "-q"], capsys)
    assert code == 2 and err.strip() == ("dwirecon ss3t-csd: error: --shell: SS3T-CSD uses b=0 and the shell b=2500; "
                                         "this run has b=0, 1000, 2000, 3000"), err
    assert not list(tmp_path.glob("x*.nii.gz"))
