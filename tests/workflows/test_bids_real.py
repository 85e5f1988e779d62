"""The BIDS App on ../shared/data/bids_real: every run processed with the csd preset."""

import json

import nibabel as nib
import numpy as np

from dwiflow.cli.bidsapp import main
from tests.conftest import BIDS_REAL, browser_images, real_run


def test_every_real_run_with_the_csd_preset(tmp_path, chromium):
    real_run("sub-03")  # fails clearly when the shared data are missing
    out = tmp_path / "derivatives" / "dwiflow"
    code = main([str(BIDS_REAL), str(out), "participant", "--mask-dir", str(BIDS_REAL / "derivatives" / "masks"),
                 "--work-dir", str(tmp_path / "work"), "--worker", "cf"])
    assert code == 0
    expected = ["sub-01/dwi/sub-01_acq-b1kb2k", "sub-01/dwi/sub-01_acq-b6kmax", "sub-02/dwi/sub-02_dir-AP",
                "sub-02/dwi/sub-02_dir-PA", "sub-03/dwi/sub-03"]
    for prefix in expected:
        fod = out / f"{prefix}_model-csd_param-fod_dwimap.nii.gz"
        side = json.loads(fod.with_name(fod.name.replace(".nii.gz", ".json")).read_text())
        assert side["OrientationEncoding"]["SphericalHarmonicBasis"] == "mrtrix3"
        # a voxel whose negative set cycles past the iteration limit (as dwi2fod, which warns and keeps it) gets
        # status NOT_CONVERGED and NaN: at most one per run here (sub-02, after negative samples count as 0)
        params = side["Model"]["Parameters"]
        assert params["VoxelsFailed"] == params["VoxelsNotConverged"] <= 1
        assert {"Description", "Units", "Model"} <= set(side)
        fa = nib.load(out / f"{prefix}_model-tensor_param-fa_dwimap.nii.gz").get_fdata()
        mask = nib.load(out / f"{prefix}_desc-brain_mask.nii.gz").get_fdata() > 0
        assert 0.1 < np.nanmean(fa[mask]) < 0.5
    # sub-03 has 12 directions: the FOD degree drops to what they support instead of failing
    sub03 = nib.load(out / "sub-03/dwi/sub-03_model-csd_param-fod_dwimap.nii.gz")
    assert sub03.shape[3] == 28
    assert main([str(BIDS_REAL), str(out), "group"]) == 0
    assert len((out / "desc-group_summary.tsv").read_text().splitlines()) == 6
    # one report per subject with every run's figures, none broken; the dataset page lists all subjects
    runs_of = {"01": 2, "02": 2, "03": 1}
    for subject, n_runs in runs_of.items():
        page = out / f"sub-{subject}.html"
        images = browser_images(chromium, page, tmp_path / f"sub-{subject}.png")
        assert len(images) == 7 * n_runs and all(i["width"] > 0 and i["height"] > 0 for i in images), images
        assert "FAILED" not in page.read_text()
    summary = out / "dataset_summary.html"
    assert all(i["width"] > 0 for i in browser_images(chromium, summary))
    assert all(f'href="sub-{s}.html"' in summary.read_text() for s in runs_of)
