"""The built-in recon spec "msmt" (mask, tensor, dhollander, msmt-csd, mtnormalise, peaks, FOD metrics) run by the
BIDS App on sub-01's 9-shell acquisition: every stage gets the right files from the one before."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml

from dwiflow.cli.bidsapp import main
from dwiflow.tasks import recon_spec as recon_spec_module
from dwiflow.tasks.recon_spec import builtin_specs
from dwiflow.tasks.registry import get as stage
from tests.bep016 import dataset_problems, unneeded_bidsignore_entries, validator_errors
from tests.conftest import BIDS_REAL, real_run, run_mrtrix


def test_msmt_recon_spec_wires_dhollander_msmt_and_mtnormalise(tmp_path, capsys, mrtrix):
    real_run("sub-01_acq-b6kmax")
    assert "msmt" in builtin_specs()
    spec = yaml.safe_load((Path(recon_spec_module.__file__).parent / "recon_specs" / "msmt.yaml").read_text())
    spec["stages"]["response"]["options"] = {"erode": 0}  # two slices: any erosion empties the mask
    spec["stages"]["fixels"] = {"afd": True}  # MRtrix3's fixel-based analysis starts here
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    (tmp_path / "filter.json").write_text(json.dumps({"dwi": {"acquisition": "b6kmax"}}))
    out = tmp_path / "out"
    code = main([str(BIDS_REAL), str(out), "participant", "--participant-label", "01", "--bids-filter-file",
                 str(tmp_path / "filter.json"), "--recon-spec", str(tmp_path / "spec.yaml"), "--mask-dir",
                 str(BIDS_REAL / "derivatives" / "masks"), "--work-dir", str(tmp_path / "work")])
    assert code == 0
    assert dataset_problems(out) == {}  # every sidecar follows the BEP016 draft's rules
    assert validator_errors(out) == [] and unneeded_bidsignore_entries(out) == []
    base = out / "sub-01" / "dwi" / "sub-01_acq-b6kmax"
    wm = nib.load(f"{base}_model-msmtcsd_param-fod_desc-wm_dwimap.nii.gz").get_fdata()
    wm_norm = nib.load(f"{base}_model-msmtcsd_param-fod_desc-wmnorm_dwimap.nii.gz").get_fdata()
    field = nib.load(f"{base}_model-mtnormalise_param-field_dwimap.nii.gz").get_fdata()
    mask = nib.load(f"{base}_desc-brain_mask.nii.gz").get_fdata() > 0
    # mtnormalise read msmt-csd's WM FOD: normalised = FOD / field
    assert np.allclose(wm_norm[mask], (wm / field[..., None])[mask], rtol=1e-5, atol=1e-7)
    assert 0.5 < np.median(field[mask]) < 2
    # the responses msmt-csd used are dhollander's, recorded in the FOD's sidecar
    side = json.loads(open(f"{base}_model-msmtcsd_param-fod_desc-wm_dwimap.json").read())
    assert set(side["TissueResponses"]) == {"WM", "GM", "CSF"} and side["ResponseFunction"]["Type"] == "zsh"
    wm_response = np.loadtxt(f"{base}_model-msmtcsd_desc-wm_response.txt", comments="#")
    assert np.allclose(side["ResponseFunction"]["Coefficients"], wm_response, rtol=1e-8)  # BEP016: its own
    assert np.allclose(side["TissueResponses"]["WM"]["Coefficients"], wm_response, rtol=1e-8)
    # peaks came from the normalised FOD: the same as running the peaks stage on it
    direct = stage("peaks")({"peaks": tmp_path / "direct_peaks.nii.gz"},
                            fod=f"{base}_model-msmtcsd_param-fod_desc-wmnorm_dwimap.nii.gz",
                            mask=f"{base}_desc-brain_mask.nii.gz")["peaks"]
    in_run = nib.load(f"{base}_model-mtnormalise_param-peaks_dwimap.nii.gz").get_fdata()
    assert np.allclose(np.nan_to_num(in_run[mask]), np.nan_to_num(nib.load(direct).get_fdata()[mask]), atol=1e-6)
    # fixels came from the normalised FOD too: the same fixel directory as the fixels stage run on it, read by
    # MRtrix3's fixel2voxel; the count and AFD-sum maps are those of the directory
    fixels = Path(f"{base}_model-mtnormalise_fixels")
    direct = stage("fixels")({"fixels": tmp_path / "direct_fixels"}, afd=True, mask=f"{base}_desc-brain_mask.nii.gz",
                             fod=f"{base}_model-msmtcsd_param-fod_desc-wmnorm_dwimap.nii.gz")["fixels"]
    for name in ("index.nii.gz", "directions.nii.gz", "afd.nii.gz"):
        assert np.array_equal(nib.load(fixels / name).get_fdata(), nib.load(direct / name).get_fdata()), name
    count = nib.load(f"{base}_model-mtnormalise_param-nfixels_dwimap.nii.gz").get_fdata()
    afd_sum = nib.load(f"{base}_model-mtnormalise_param-fixelafd_dwimap.nii.gz").get_fdata()
    run_mrtrix("fixel2voxel", fixels / "directions.nii.gz", "count", tmp_path / "count.nii")
    run_mrtrix("fixel2voxel", fixels / "afd.nii.gz", "sum", tmp_path / "afd_sum.nii")
    assert np.array_equal(count, nib.load(tmp_path / "count.nii").get_fdata()) and count[mask].max() >= 2
    assert np.allclose(afd_sum, nib.load(tmp_path / "afd_sum.nii").get_fdata(), rtol=1e-5, atol=1e-7)
    assert json.loads((fixels / "index.json").read_text())["Sources"][0].endswith("desc-wmnorm_dwimap.nii.gz")
    assert list((out / "sub-01" / "figures").glob("*fixels*.png")), "the report has no fixel panel"
    # grey matter is a compartment now, not spurious fibres: in dhollander's GM voxels the GM term dominates WM's
    voxels = nib.load(f"{base}_desc-dhollandervoxels_mask.nii.gz").get_fdata() > 0
    gm = nib.load(f"{base}_model-msmtcsd_param-fod_desc-gm_dwimap.nii.gz").get_fdata()[..., 0]
    assert np.median(gm[voxels[..., 1]]) > 3 * np.median(wm[..., 0][voxels[..., 1]])
    # the tissue-fraction image: the normalised l=0 terms over their sum (WM, GM, CSF), and its RGB rendering
    fractions = nib.load(f"{base}_model-msmtcsd_param-tissuefractions_desc-norm_dwimap.nii.gz").get_fdata()
    l0 = np.stack([wm_norm[..., 0]] + [nib.load(f"{base}_model-msmtcsd_param-fod_desc-{t}norm_dwimap.nii.gz")
                                       .get_fdata().reshape(mask.shape) for t in ("gm", "csf")], axis=-1)
    l0 = np.clip(l0, 0, None)
    assert np.allclose(fractions[mask], (l0 / l0.sum(-1, keepdims=True))[mask], atol=1e-6)
    rgb = np.asanyarray(nib.load(f"{base}_model-msmtcsd_param-tissuefractions_desc-rgb_dwimap.nii.gz").dataobj)
    assert rgb.dtype == np.uint8 and rgb.shape == mask.shape + (3,)
    assert np.abs(rgb[mask].astype(int) - np.rint(255 * fractions[mask][:, ::-1])).max() <= 1  # CSF, GM, WM
    # in dhollander's GM voxels GM has the largest fraction
    assert np.median(fractions[..., 1][voxels[..., 1]]) > 0.5
    assert list((out / "sub-01" / "figures").glob("*tissuergb*.png")), "the report has no tissue-fraction RGB figure"
    # group level: the group responses (one run here: the mean of one is itself, rescaled by 1)
    assert main([str(BIDS_REAL), str(out), "group"]) == 0
    group_wm = out / "model-msmtcsd_desc-wmgroup_response.txt"
    assert np.allclose(np.loadtxt(group_wm, comments="#"), wm_response, rtol=1e-9)
    assert json.loads(group_wm.with_suffix(".json").read_text())["Runs"] == 1
    page = (out / "dataset_summary.html").read_text()  # the dataset page lists the group responses and their runs
    assert "<h2>Group responses</h2>" in page and f"<td>1: sub-01_acq-b6kmax</td><td>{group_wm.name}</td>" in page
    # participant again with the group responses, named by the recon spec's response_dir (relative to the spec
    # file): no response stage; msmt-csd records the group response
    (tmp_path / "group_spec.yaml").write_text(yaml.safe_dump({**spec, "response_dir": "out"}))
    out2 = tmp_path / "out2"
    code = main([str(BIDS_REAL), str(out2), "participant", "--participant-label", "01", "--bids-filter-file",
                 str(tmp_path / "filter.json"), "--recon-spec", str(tmp_path / "group_spec.yaml"), "--mask-dir",
                 str(BIDS_REAL / "derivatives" / "masks"), "--work-dir", str(tmp_path / "work")])
    assert code == 0
    # the stages this pass computes: neither the mask (given) nor the responses (the group's)
    printed = capsys.readouterr().out
    assert "sub-01_acq-b6kmax: stages tensor, msmt_csd, mtnormalise, peaks, fod_metrics, fixels\n" in printed
    base2 = out2 / "sub-01" / "dwi" / "sub-01_acq-b6kmax"
    assert not list(out2.rglob("*_desc-wm_response.txt"))
    side2 = json.loads(open(f"{base2}_model-msmtcsd_param-fod_desc-wm_dwimap.json").read())
    assert side2["TissueResponses"]["WM"]["Source"] == group_wm.name
    methods = (out2 / "logs" / "sub-01_acq-b6kmax_methods.md").read_text()  # the paper's sentence says what went in
    assert "the group averages of 1 run at b = 0, 750, 1500" in methods, methods
    # a run whose b-values differ from the group response's is refused before anything runs, naming both
    (tmp_path / "other.json").write_text(json.dumps({"dwi": {"acquisition": "b1kb2k"}}))
    out3 = tmp_path / "out3"
    code = main([str(BIDS_REAL), str(out3), "participant", "--participant-label", "01", "--bids-filter-file",
                 str(tmp_path / "other.json"), "--recon-spec", str(tmp_path / "spec.yaml"), "--mask-dir",
                 str(BIDS_REAL / "derivatives" / "masks"), "--work-dir", str(tmp_path / "work"), "--response-dir",
                 str(out)])
    assert code == 2 and not out3.exists()
    err = capsys.readouterr().err
    assert "b-values 0, 1000, 2000 do not match the group response" in err and "b=0, 750, 1500" in err
    # --response-dir overrides the spec's response_dir; a spec's folder that is not there is named as the spec's
    (tmp_path / "missing_spec.yaml").write_text(yaml.safe_dump({**spec, "response_dir": "nowhere"}))
    args = [str(BIDS_REAL), str(out3), "participant", "--participant-label", "01", "--bids-filter-file",
            str(tmp_path / "other.json"), "--recon-spec", str(tmp_path / "missing_spec.yaml"), "--work-dir",
            str(tmp_path / "work")]
    assert main(args) == 2 and not out3.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"response_dir {tmp_path / 'nowhere'}: not a folder" in err[0], err
    assert main(args + ["--response-dir", str(out)]) == 2  # now the group response's shells are what is wrong
    assert "do not match the group response" in capsys.readouterr().err
