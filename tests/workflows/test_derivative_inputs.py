"""Preprocessed derivatives as input (QSIPrep's layout): entities kept, the derivative's own masks used, and
--mask-dir that matches some runs or none."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from dwiflow.cli.bidsapp import main
from tests.conftest import BIDS_REAL, real_run

SPEC = """
name: tensor-only
stages:
  mask: {}
  tensor: {}
"""


@pytest.fixture(scope="module")
def qsiprep(tmp_path_factory):
    """sub-01 of bids_real laid out as QSIPrep writes it: a derivative dataset of
    sub-01_space-ACPC_desc-preproc_dwi.* runs with sub-01_space-ACPC_desc-brain_mask.nii.gz beside them."""
    root = tmp_path_factory.mktemp("qsiprep")
    deriv = root / "qsiprep"
    folder = deriv / "sub-01" / "dwi"
    folder.mkdir(parents=True)
    (deriv / "dataset_description.json").write_text(json.dumps({
        "Name": "QSIPrep output", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "qsiprep", "Version": "1.0.0"}]}))
    for acq in ("b1kb2k", "b6kmax"):
        paths = real_run(f"sub-01_acq-{acq}")
        stem = folder / f"sub-01_acq-{acq}_space-ACPC_desc-preproc_dwi"
        for key, ext in (("dwi", ".nii.gz"), ("bval", ".bval"), ("bvec", ".bvec")):
            shutil.copyfile(paths[key], f"{stem}{ext}")
        shutil.copyfile(str(paths["dwi"]).replace(".nii.gz", ".json"), f"{stem}.json")
        shutil.copyfile(paths["mask"], folder / f"sub-01_acq-{acq}_space-ACPC_desc-brain_mask.nii.gz")
    spec = root / "spec.yaml"
    spec.write_text(SPEC)
    return {"root": root, "bids": deriv, "spec": spec}


def test_qsiprep_outputs_keep_space_and_use_their_own_masks(qsiprep, capsys):
    out = qsiprep["root"] / "out"
    assert main([str(qsiprep["bids"]), str(out), "participant", "--recon-spec", str(qsiprep["spec"]), "--worker",
                 "debug", "--work-dir", str(qsiprep["root"] / "work"), "-q"]) == 0
    assert "warning" not in capsys.readouterr().err
    folder = out / "sub-01" / "dwi"
    for acq in ("b1kb2k", "b6kmax"):
        fa = folder / f"sub-01_acq-{acq}_space-ACPC_model-tensor_param-fa_dwimap.nii.gz"
        assert fa.is_file()
        used = nib.load(folder / f"sub-01_acq-{acq}_space-ACPC_desc-brain_mask.nii.gz").get_fdata() > 0
        theirs = nib.load(qsiprep["bids"] / "sub-01" / "dwi" /
                          f"sub-01_acq-{acq}_space-ACPC_desc-brain_mask.nii.gz").get_fdata() > 0
        assert np.array_equal(used, theirs)  # QSIPrep's mask, not a computed one
    assert not [p.name for p in folder.iterdir() if "desc-preproc" in p.name]


def test_mask_dir_that_misses_runs_warns_and_one_that_matches_none_is_an_error(qsiprep, tmp_path, capsys):
    only_one = tmp_path / "masks" / "sub-01" / "dwi"
    only_one.mkdir(parents=True)
    shutil.copyfile(BIDS_REAL / "derivatives/masks/sub-01/dwi/sub-01_acq-b1kb2k_desc-brain_mask.nii.gz",
                    only_one / "sub-01_acq-b1kb2k_desc-brain_mask.nii.gz")
    common = [str(BIDS_REAL), str(tmp_path / "out"), "participant", "--participant-label", "01", "--recon-spec",
              str(qsiprep["spec"]), "--worker", "debug", "--work-dir", str(tmp_path / "work")]
    assert main(common + ["--mask-dir", str(tmp_path / "masks"), "-q"]) == 0
    err = capsys.readouterr().err
    assert err.count("has no brain mask for this run") == 1 and "sub-01_acq-b6kmax: --mask-dir" in err, err
    report = (tmp_path / "out" / "sub-01.html").read_text()
    assert report.count("has no brain mask for this run: its mask is computed") == 1
    # masks of other runs only (QSIPrep's names do not match the raw runs): nothing runs, one line, exit 2
    out = tmp_path / "out2"
    code = main([str(BIDS_REAL), str(out), "participant", "--participant-label", "01", "--mask-dir",
                 str(qsiprep["bids"]), "--work-dir", str(tmp_path / "work2")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "has a brain mask for none of the 2 selected run(s)" in err[0], err
    assert not out.exists()
