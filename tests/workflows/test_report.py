"""Per-subject HTML reports and the dataset summary page, opened in headless Chromium."""

import json

import nibabel as nib
import numpy as np
import pytest

from dwiflow.cli.bidsapp import main
from dwiflow.cli.dwirecon import main as dwirecon
from tests.conftest import browser_images

ALL_MODELS = """
name: all-models
stages:
  mask: {}
  tensor: {}
  response: {method: ssst, options: {roi_radii: 4, fa_threshold: 0.5}}
  rumba: {n_iter: 50}
  mapmri: {laplacian_weighting: 0.2, big_delta: 0.0265, small_delta: 0.0162, compare: [MAP, MAPL]}
  smt: {fod: bingham}
  peaks: {npeaks: 2}
  fod_metrics: {}
"""


def _assert_images_load(chromium, page, tmp_path):
    images = browser_images(chromium, page, tmp_path / f"{page.stem}.png")
    assert images, f"{page} has no images"
    broken = [i["src"] for i in images if i["width"] == 0 or i["height"] == 0]
    assert not broken, f"broken images in {page.name}: {broken}"
    assert (tmp_path / f"{page.stem}.png").stat().st_size > 10_000  # the screenshot rendered
    return images


def test_demo_reports_open_in_chromium(chromium, tmp_path):
    """The demo job (msmt recon spec on the built-in three-tissue phantom): subject report and dataset summary, no
    broken images, and the accuracy it prints holds against the phantom's truth."""
    from dwiflow.demo import run_demo

    files = run_demo(tmp_path / "demo")
    out = files["derivatives"]
    page = out / "sub-phantom.html"
    images = _assert_images_load(chromium, page, tmp_path)
    text = page.read_text()
    for title in ("Tensor: FA and MD", "Response function WM", "Response function GM", "Response function CSF",
                  "Response voxels", "Multi-tissue CSD compartments", "Multi-tissue CSD status",
                  "Normalised white-matter FOD", "Multi-tissue normalisation field", "Tissue fractions (RGB)"):
        assert f"<b>{title}.</b>" in text, title
    for absent in ("RUMBA-SD", "MAP-MRI", "Spherical mean"):  # models that did not run have no section
        assert absent not in text
    # tensor, its status, three responses, their voxels, the tissue compartments, their status, the normalised WM
    # FOD, the normalisation field, the tissue-fraction RGB, the FOD metrics
    assert len(images) == 12
    # what the demo prints, recomputed: the normalised tissue fractions against the true volume fractions (the
    # multi-tissue issue's 0.03 on the three-shell phantom), the first peak in nearly pure single-fibre WM
    truth = nib.load(files["tissues"]).get_fdata()
    inside = truth.sum(axis=-1) > 0
    recovered = nib.load(files["tissue_fractions"]).get_fdata()
    assert np.all(np.median(np.abs(recovered[inside] - truth[inside]), axis=0) <= 0.04)
    peaks = nib.load(files["peaks"]).get_fdata()[..., :3]
    single = inside & (truth[..., 0] >= 0.9) & (nib.load(files["nfibres"]).get_fdata() == 1)
    fibre = nib.load(files["directions"]).get_fdata()[..., :3]
    cosine = np.abs(np.sum(peaks[single] * fibre[single], axis=-1)) / np.linalg.norm(peaks[single], axis=-1)
    assert single.sum() > 100 and np.median(np.degrees(np.arccos(np.clip(cosine, 0, 1)))) < 2.0
    summary = out / "dataset_summary.html"
    assert len(_assert_images_load(chromium, summary, tmp_path)) == 3  # FA, MD and AFD distributions
    html = summary.read_text()
    assert "sub-phantom" in html
    # the page's table shows the metrics some run has; the TSV keeps every model's column (n/a here)
    header = (out / "desc-group_summary.tsv").read_text().splitlines()[0].split("\t")
    assert "rumba_fwm_mean" in header and "<th>rumba_fwm_mean</th>" not in html and "<th>fa_mean</th>" in html
    assert "In the TSV only" in html and "rumba_fwm_mean" in html.split("In the TSV only")[1]


def test_the_dataset_page_draws_the_kurtosis_and_noddi_distributions(tmp_path):
    """The group level of DKI and NODDI runs draws MK, ICVF and ODI per run on the dataset page (it drew only the
    tensor's, the CSD's, RUMBA's, MAP-MRI's and SMT's metrics, and showed an empty section otherwise), and a page
    with no metric to draw has no empty distributions section."""
    from dwiflow.tasks.report import dataset_summary_page

    bids = tmp_path / "bids"
    assert dwirecon(["phantom", str(bids), "--shape", "8,8,3", "--scheme", "multi", "--seed", "4"]) == 0
    spec = tmp_path / "dki_noddi.yaml"
    spec.write_text("name: dki-noddi\nstages:\n  mask: {}\n  dki: {}\n  noddi: {}\n")
    out = tmp_path / "out"
    assert main([str(bids), str(out), "participant", "--recon-spec", str(spec), "--work-dir", str(tmp_path / "w"),
                 "--mask-dir", str(bids / "derivatives" / "masks"), "-q"]) == 0
    assert main([str(bids), str(out), "group", "-q"]) == 0
    html = (out / "dataset_summary.html").read_text()
    for metric, desc in (("DKI MK", "dkimk"), ("NODDI ICVF", "noddiicvf"), ("NODDI ODI", "noddiodi")):
        figure = out / "figures" / f"desc-{desc}_distribution.png"
        assert figure.stat().st_size > 5_000 and f"{metric} distribution per run" in html, metric
    assert "FA distribution" not in html  # no tensor stage ran
    empty = dataset_summary_page(out, out / "desc-group_summary.tsv", [], ["phantom"]).read_text()
    assert "Distributions per metric" not in empty and "<th>dki_mk_mean</th>" in empty


def test_every_model_has_its_panels_and_a_failed_report_never_fails_the_run(chromium, tmp_path, monkeypatch):
    bids = tmp_path / "bids"
    assert dwirecon(["phantom", str(bids), "--shape", "10,10,4", "--scheme", "multi", "--seed", "5"]) == 0
    spec = tmp_path / "all.yaml"
    spec.write_text(ALL_MODELS)
    out = tmp_path / "out"
    args = [str(bids), str(out), "participant", "--recon-spec", str(spec), "--work-dir", str(tmp_path / "w"),
            "--mask-dir", str(bids / "derivatives" / "masks")]
    assert main(args) == 0
    page = out / "sub-phantom.html"
    _assert_images_load(chromium, page, tmp_path)
    manifest = json.loads((out / "sub-phantom" / "figures" / "sub-phantom_desc-figures_dwi.json").read_text())
    drawn = {e["title"] for e in manifest["figures"] if e["file"]}
    assert not [e for e in manifest["figures"] if e["note"]], manifest
    assert {"RUMBA-SD fibre ODF", "RUMBA-SD combined ODF (fODF + isotropic)", "RUMBA-SD volume fractions",
            "MAP-MRI ODF", "MAP-MRI indices", "MAP-MRI fits compared", "SMT FOD", "SMT kernel", "Response voxels"} <= drawn
    assert {"RUMBA-SD status", "MAP-MRI status", "Spherical mean technique status"} <= drawn
    # the SSST box drawn over the selection holds every selected voxel (the phantom is stored LAS, drawn RAS)
    from dwiflow.tasks.figures import load_canonical, ssst_roi

    folder = out / "sub-phantom" / "dwi"
    voxels = load_canonical(folder / "sub-phantom_desc-ssstvoxels_mask.nii.gz").data > 0
    params = json.loads((folder / "sub-phantom_model-rumba_desc-ssst_response.json").read_text())["Parameters"]
    roi = ssst_roi(folder / "sub-phantom_desc-brain_mask.nii.gz", params)
    assert voxels.sum() > 50 and not np.any(voxels & ~roi)
    text = page.read_text()
    assert "Time per stage" in text and "<td>rumba</td>" in text and "<td>numpy</td>" in text
    # the report is rewritten on a rerun; if it cannot be written the run still succeeds
    import dwiflow.tasks.report as report

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report, "subject_report", broken)
    assert main(args) == 0
