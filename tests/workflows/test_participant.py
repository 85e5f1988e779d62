"""The dwiflow BIDS App: outputs, cache behaviour, selection, failures and bad input."""

import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from dwiflow.cli.bidsapp import main
from dwiflow.cli.dwirecon import main as dwirecon
from dwiflow.tasks.registry import get as stage
from tests.bep016 import dataset_problems, unneeded_bidsignore_entries, validator_errors

SPEC = """
name: small
description: csd chain tuned for a small phantom
stages:
  mask: {}
  tensor: {}
  response: {method: fa, options: {number: 50, erode: 0}}
  csd: {}
  peaks: {npeaks: 2}
  fod_metrics: {}
"""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("bids")
    assert dwirecon(["phantom", str(root / "bids"), "--shape", "12,12,6", "--scheme", "multi", "--seed", "3"]) == 0
    bids = root / "bids"
    # a second subject with two runs of one acquisition (dir-AP / dir-PA), like sub-02 of bids_real
    src = bids / "sub-phantom" / "dwi" / "sub-phantom_dwi"
    dst = bids / "sub-two" / "dwi"
    dst.mkdir(parents=True)
    for direction in ("AP", "PA"):
        for ext in (".nii.gz", ".bval", ".bvec"):
            shutil.copyfile(f"{src}{ext}", dst / f"sub-two_dir-{direction}_dwi{ext}")
    spec = root / "small.yaml"
    spec.write_text(SPEC)
    return {"bids": bids, "spec": spec, "root": root}


def _run(dataset, out: Path, *extra: str, worker: str = "debug") -> int:
    return main([str(dataset["bids"]), str(out), "participant", "--recon-spec", str(dataset["spec"]),
                 "--work-dir", str(out.parent / f"work_{out.name}"), "--worker", worker, *extra])


def _result_files(work: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in (work / "cache").rglob("_result.pklz")}


def test_participant_outputs_are_a_bids_derivative(dataset, tmp_path):
    out = tmp_path / "out"
    assert _run(dataset, out, "--participant-label", "phantom") == 0
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "dwiflow"
    folder = out / "sub-phantom" / "dwi"
    fod = folder / "sub-phantom_model-csd_param-fod_dwimap.nii.gz"
    assert nib.load(fod).shape == (18, 18, 10, 45)
    side = json.loads(fod.with_name(fod.name.replace(".nii.gz", ".json")).read_text())
    assert side["OrientationEncoding"]["Type"] == "sh" and side["Model"]["Parameters"]["Lmax"] == 8
    for nifti in folder.glob("*.nii.gz"):
        assert nifti.with_name(nifti.name.replace(".nii.gz", ".json")).is_file()
    assert not (out / "sub-two").exists()  # --participant-label selected only sub-phantom
    assert not list(out.rglob("*.partial"))
    assert dataset_problems(out) == {}  # every sidecar follows the BEP016 draft's rules, Sources are BIDS URIs
    assert validator_errors(out) == []
    assert unneeded_bidsignore_entries(out) == []  # every .bidsignore entry hides what the validator rejects
    # the methods paragraph: this run's acquisition, every stage with the options it ran with, each reference cited
    methods = (out / "logs" / "sub-phantom_methods.md").read_text()
    paragraph, references = methods.split("\n## References\n")
    bvals = np.loadtxt(dataset["bids"] / "sub-phantom" / "dwi" / "sub-phantom_dwi.bval")
    counts = ", ".join(f"{int(n)} at b={b:.0f} s/mm²" if b > 50 else f"{int(n)} at b=0"
                       for b, n in zip(*np.unique(np.round(bvals, -2), return_counts=True)))
    assert f"comprised {bvals.size} volumes ({counts})" in paragraph
    assert "from the 50 voxels of highest FA in the brain mask eroded 0 times" in paragraph  # the spec's options
    assert "Up to 2 FOD peaks per voxel" in paragraph and "recon spec small" in paragraph
    cited = {int(n) for group in re.findall(r"\[([\d, ]+)\]", paragraph) for n in group.split(", ")}
    listed = re.findall(r"^(\d+)\. ", references, flags=re.M)
    assert cited == {int(n) for n in listed} == set(range(1, len(listed) + 1)) and len(listed) >= 8
    assert "Tournier JD, Calamante F, Connelly A. Robust determination" in references  # CSD's paper
    assert "sub-phantom_methods.md" in (out / "sub-phantom.html").read_text()


def test_rerun_is_a_cache_hit_and_workers_agree(dataset, tmp_path):
    out = tmp_path / "out"
    work = tmp_path / "work_out"
    assert _run(dataset, out, "--participant-label", "phantom") == 0
    first = _result_files(work)
    before = {p.name: p.read_bytes() for p in (out / "sub-phantom" / "dwi").iterdir()}
    assert _run(dataset, out, "--participant-label", "phantom", worker="cf") == 0
    assert _result_files(work) == first  # no task result was recomputed or rewritten
    after = {p.name: p.read_bytes() for p in (out / "sub-phantom" / "dwi").iterdir()}
    assert after == before
    # a fresh cache with the cf worker gives byte-identical outputs
    out_cf = tmp_path / "cf"
    assert _run(dataset, out_cf, "--participant-label", "phantom", worker="cf") == 0
    assert {p.name: p.read_bytes() for p in (out_cf / "sub-phantom" / "dwi").iterdir()} == before
    figures = {p.name: p.read_bytes() for p in (out / "sub-phantom" / "figures").iterdir()}
    assert len(figures) == 8  # 7 figures and their manifest, drawn identically by both workers
    assert {p.name: p.read_bytes() for p in (out_cf / "sub-phantom" / "figures").iterdir()} == figures


def test_option_change_reruns_only_downstream_and_code_change_invalidates(dataset, tmp_path, monkeypatch):
    out = tmp_path / "out"
    work = tmp_path / "work_out"
    assert _run(dataset, out, "--participant-label", "phantom") == 0
    first = set(_result_files(work))
    spec = dataset["root"] / "changed.yaml"
    spec.write_text(SPEC.replace("peaks: {npeaks: 2}", "peaks: {npeaks: 3}"))
    assert main([str(dataset["bids"]), str(out), "participant", "--recon-spec", str(spec), "--work-dir", str(work),
                 "--worker", "debug", "--participant-label", "phantom"]) == 0
    new = {Path(p).parent.name for p in set(_result_files(work)) - first}
    # new results: peaks, fod_metrics, the staging task, the figures and the enclosing workflow, nothing upstream
    assert len(new) == 5
    assert nib.load(out / "sub-phantom" / "dwi" / "sub-phantom_model-csd_param-peaks_dwimap.nii.gz").shape[3] == 9
    import dwiflow.tasks.pydra_tasks as tasks

    monkeypatch.setattr(tasks, "code_version", lambda: "edited-core")
    import dwiflow.workflows.recon as recon

    monkeypatch.setattr(recon, "code_version", lambda: "edited-core")
    before = set(_result_files(work))
    assert main([str(dataset["bids"]), str(out), "participant", "--recon-spec", str(spec), "--work-dir", str(work),
                 "--worker", "debug", "--participant-label", "phantom"]) == 0
    assert len(set(_result_files(work)) - before) >= 7  # every task ran again


def test_two_runs_of_one_subject_and_filter_file(dataset, tmp_path):
    out = tmp_path / "out"
    assert _run(dataset, out, "--participant-label", "two") == 0
    names = sorted(p.name for p in (out / "sub-two" / "dwi").glob("*param-fa_dwimap.nii.gz"))
    assert names == ["sub-two_dir-AP_model-tensor_param-fa_dwimap.nii.gz", "sub-two_dir-PA_model-tensor_param-fa_dwimap.nii.gz"]
    filt = tmp_path / "filter.json"
    filt.write_text(json.dumps({"dwi": {"direction": "PA"}}))
    out2 = tmp_path / "filtered"
    assert _run(dataset, out2, "--participant-label", "two", "--bids-filter-file", str(filt)) == 0
    assert [p.name for p in (out2 / "sub-two" / "dwi").glob("*param-fa_dwimap.nii.gz")] == [names[1]]
    assert main([str(dataset["bids"]), str(out), "group"]) == 0
    rows = (out / "desc-group_summary.tsv").read_text().splitlines()
    assert rows[0].split("\t")[0] == "run" and len(rows) == 3


def test_relative_folders_reach_the_workflows(dataset, tmp_path, monkeypatch):
    """--mask-dir given relative to the current folder: the runs submitted together (cf worker) find the masks (the
    workflows run in their cache folders; a relative path failed the whole graph at once, and every run was then
    computed on its own, one after the other)."""
    monkeypatch.chdir(dataset["bids"])
    work = tmp_path / "work"
    assert main([".", str(tmp_path / "out"), "participant", "--recon-spec", str(dataset["spec"]), "--work-dir",
                 str(work), "--worker", "cf", "--mask-dir", "derivatives/masks", "-q"]) == 0
    assert not list((work / "cache").glob("*/_error.pklz"))
    sidecar = json.loads(next((tmp_path / "out").rglob("sub-phantom_desc-brain_mask.json")).read_text())
    assert any("derivatives/masks" in source for source in sidecar.get("Sources", [sidecar.get("Source", "")])), \
        sidecar


@pytest.mark.parametrize("worker", ["debug", "cf"])
def test_failed_run_is_named_and_others_complete(dataset, tmp_path, capsys, caplog, monkeypatch, worker):
    """A run whose mask stage fails is named with its stage's error and log, the other runs complete; and the failed
    workflow ends at once: Pydra's loop waited a second per stage after the failed one (PromptSubmitter)."""
    import asyncio

    import pydra.engine.submitter

    waits = []
    real_sleep = asyncio.sleep

    async def recorded_sleep(delay, *args, **kwargs):
        waits.append(delay)
        return await real_sleep(delay, *args, **kwargs)

    monkeypatch.setattr(pydra.engine.submitter.asyncio, "sleep", recorded_sleep)
    bids = tmp_path / "bids"
    shutil.copytree(dataset["bids"], bids)
    dwi = bids / "sub-two" / "dwi" / "sub-two_dir-AP_dwi.nii.gz"
    img = nib.load(dwi)
    data = np.full(img.shape, np.nan, np.float32)
    data[5, 5, 3] = np.asarray(img.dataobj)[5, 5, 3]  # passes the pre-flight (some signal), but no mask can be made
    nib.save(nib.Nifti1Image(data, img.affine), dwi)
    out = tmp_path / "out"
    code = main([str(bids), str(out), "participant", "--recon-spec", str(dataset["spec"]), "--work-dir",
                 str(tmp_path / "work"), "--worker", worker])
    err = capsys.readouterr().err
    assert code == 1
    assert "run sub-two_dir-AP failed" in err and "log:" in err
    # the stage and its own error, not "see output directory"
    assert "stage mask: " in err and "cannot threshold an image whose values are all equal" in err
    # not Pydra's own log lines besides ("Task execution failed", a crash-report path)
    assert not [r for r in caplog.records if r.levelno >= 30 and r.name.startswith("pydra")], caplog.records
    assert (out / "sub-two" / "dwi" / "sub-two_dir-PA_model-tensor_param-fa_dwimap.nii.gz").is_file()
    assert (out / "sub-phantom" / "dwi" / "sub-phantom_model-csd_param-fod_dwimap.nii.gz").is_file()
    assert not list((out / "sub-two" / "dwi").glob("sub-two_dir-AP_*"))
    assert waits == [], waits


def test_output_dir_of_another_dataset_or_recon_spec_is_refused(dataset, tmp_path, capsys):
    """OUTPUT_DIR holding another pipeline's derivative dataset (dwiflow replaced its dataset_description.json), files
    but no dataset, or dwiflow's derivatives of another recon spec (whose report, methods and description then told of
    the second spec alone, beside the first one's maps) is refused before anything runs: exit 2, one line, nothing
    changed. The same recon spec again runs."""
    fmriprep = tmp_path / "fmriprep"
    fmriprep.mkdir()
    description = '{"Name": "fMRIPrep output", "DatasetType": "derivative", "GeneratedBy": [{"Name": "fMRIPrep"}]}'
    (fmriprep / "dataset_description.json").write_text(description)
    notes = tmp_path / "notes"
    (notes / "draft").mkdir(parents=True)
    for folder, message in ((fmriprep, "holds another derivative dataset (fMRIPrep output, generated by fMRIPrep)"),
                            (notes, "is not empty and holds no derivative dataset (no dataset_description.json)")):
        assert _run(dataset, folder, "--participant-label", "phantom") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert [p.name for p in fmriprep.iterdir()] == ["dataset_description.json"]
    assert (fmriprep / "dataset_description.json").read_text() == description
    assert [p.name for p in notes.iterdir()] == ["draft"]
    out = tmp_path / "out"
    assert _run(dataset, out, "--participant-label", "phantom", "-q") == 0
    capsys.readouterr()
    before = sorted(out.rglob("*"))
    name = json.loads((out / "dataset_description.json").read_text())["Name"]
    assert main([str(dataset["bids"]), str(out), "participant", "--recon-spec", "dki", "--participant-label",
                 "phantom", "--work-dir", str(tmp_path / "work_out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert name == "dwiflow derivatives (small)" and len(err) == 1, (name, err)
    assert err[0].startswith(f"dwiflow: error: OUTPUT_DIR {out} holds the derivatives of recon spec small: write "
                             "recon spec dki into a folder of its own"), err
    assert sorted(out.rglob("*")) == before
    assert _run(dataset, out, "--participant-label", "phantom", "-q") == 0


def test_task_errors_name_the_stage_not_the_workflow_around_it(tmp_path):
    """A run's one-line error is its failed stage's, whatever the names of the workflows around it sort like."""
    import time
    from types import SimpleNamespace

    import cloudpickle

    from dwiflow.workflows.recon import task_errors

    for folder, node, message in (("a", "tensor", "the tensor's own error"), ("b", "run1", "node tensor failed"),
                                  ("c", "AllRuns", "run1 failed"), ("d", "zzz_workflow", "run1 failed")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "_job.pklz").write_bytes(cloudpickle.dumps(SimpleNamespace(name=node)))
        (tmp_path / folder / "_error.pklz").write_bytes(cloudpickle.dumps({"error message": [message]}))
    found = task_errors(tmp_path, since=time.time() - 60)
    assert found[-1] == ("stage tensor", "the tensor's own error") and len(found) == 4
    # the workflows around the stages are named as such (a run whose job sbatch refused failed in 'stage main')
    assert sorted(where for where, _ in found[:-1]) == ["workflow AllRuns", "workflow run1", "workflow zzz_workflow"]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d, t: [str(t / "nowhere"), str(t / "out"), "participant"], "does not exist"),
        (lambda d, t: [str(t), str(t / "out"), "participant"], "is not a BIDS dataset"),
        (lambda d, t: [str(d["bids"]), str(t / "out"), "participant", "--participant-label", "nobody"], "not found"),
        (lambda d, t: [str(d["bids"]), str(d["bids"]), "participant"], "must not be BIDS_DIR"),
        (lambda d, t: [str(d["bids"]), str(t / "out"), "participant", "--recon-spec", "nope"], "unknown recon spec"),
        # a selection that finds nothing says what the dataset has (it printed pybids' query, or blamed the
        # participant for the session)
        (lambda d, t: [str(d["bids"]), str(t / "out"), "participant", "--session-label", "1"],
         "no DWI run found in {bids} in session(s) 1 (DWI runs: 3, without sessions)"),
        (lambda d, t: [str(d["bids"]), str(t / "out"), "participant", "--participant-label", "two", "--session-label",
                       "ses-1"], "no DWI run found for participant(s) two in {bids} in session(s) 1 (DWI runs: 2, "
         "without sessions)"),
        (lambda d, t: [str(d["bids"]), str(t / "out"), "participant", "--bids-filter-file", _write(t / "f.json",
                       '{"dir": "LR"}')], "no DWI run found in {bids} matching the BIDS filter file (DWI runs: 3, "),
        # a dataset_description.json that is not a JSON object was accepted (binary) or left to pybids ('list'
        # object has no attribute 'get')
        (lambda d, t: [_described(d, t, b"\xff\xfe{"), str(t / "out"), "participant"],
         "described/dataset_description.json: 'utf-8' codec can't decode byte 0xff in position 0"),
        (lambda d, t: [_described(d, t, b"[1, 2]"), str(t / "out"), "participant"],
         "described/dataset_description.json is not a JSON object"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(dataset, tmp_path, capsys, make, message):
    code = main(make(dataset, tmp_path))
    err = capsys.readouterr().err
    assert code == 2 and message.format(bids=dataset["bids"]) in err, err
    assert not (tmp_path / "out").exists()


def test_a_datalad_dataset_whose_content_was_not_fetched_is_named_so(dataset, tmp_path, capsys):
    """A DataLad dataset (OpenNeuro's) holds links into .git/annex until its content is fetched: a sidecar link to
    nothing stopped pybids with 'No such file or directory', a DWI link with 'file not found'; both say what it is."""
    bids = tmp_path / "bids"
    shutil.copytree(dataset["bids"], bids)
    folder = bids / "sub-phantom" / "dwi"
    for name in ("sub-phantom_dwi.json", "sub-phantom_dwi.nii.gz"):
        original = (folder / name).read_bytes()
        (folder / name).unlink()
        (folder / name).symlink_to(f"../../.git/annex/objects/Qx/Vw/SHA256E-s99--1f/SHA256E-s99--1f-{name}")
        assert main([str(bids), str(tmp_path / "out"), "participant", "--participant-label", "phantom"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(folder / name) in err[0], err
        assert err[0].endswith("a symbolic link to a missing file (its content is not in this git-annex/DataLad "
                               "dataset: datalad get it)"), err
        (folder / name).unlink()
        (folder / name).write_bytes(original)
    assert not (tmp_path / "out").exists()

def test_runs_told_apart_by_part_or_desc_keep_their_own_outputs(dataset, tmp_path):
    """A complex DWI's part-mag image is the run (its outputs named part-mag), its part-phase image is no DWI to
    fit; two runs that differ only in an entity the output names do not carry (desc of a preprocessed dataset) are
    refused before anything runs, naming a filter that picks one. Both were run, the second writing over the first's
    outputs (part-phase fitted as if it were a magnitude)."""
    from dwiflow.bids_specs.inputs import BidsInputError, find_dwi_runs
    from dwiflow.bids_specs.outputs import output_filename

    source = dataset["bids"] / "sub-phantom" / "dwi" / "sub-phantom_dwi"
    bids = tmp_path / "bids"
    folder = bids / "sub-c" / "dwi"
    folder.mkdir(parents=True)
    shutil.copyfile(dataset["bids"] / "dataset_description.json", bids / "dataset_description.json")

    def copy_run(stem: str) -> None:
        for ext in (".nii.gz", ".bval", ".bvec"):
            shutil.copyfile(f"{source}{ext}", folder / f"{stem}{ext}")

    copy_run("sub-c_part-phase_dwi")
    with pytest.raises(BidsInputError, match="are all part-phase images .*: dwiflow analyses diffusion magnitudes"):
        find_dwi_runs(bids)
    copy_run("sub-c_part-mag_dwi")
    runs = find_dwi_runs(bids)
    assert [run.label for run in runs] == ["sub-c_part-mag"]
    assert output_filename("tensor_fa", runs[0].short_entities) == "sub-c_part-mag_model-tensor_param-fa_dwimap.nii.gz"
    for path in folder.iterdir():
        path.unlink()
    copy_run("sub-c_desc-preproc_dwi")
    copy_run("sub-c_desc-denoised_dwi")
    with pytest.raises(BidsInputError) as refused:
        find_dwi_runs(bids)
    assert str(refused.value) == ("DWI runs sub-c_desc-denoised_dwi.nii.gz and sub-c_desc-preproc_dwi.nii.gz have the "
                                  "same entities (sub-c): their outputs would share names; select one with "
                                  '--bids-filter-file (e.g. {"desc": "denoised"})')
    assert [run.dwi.name for run in find_dwi_runs(bids, bids_filters={"desc": "preproc"})] == [
        "sub-c_desc-preproc_dwi.nii.gz"]

def _described(dataset, tmp_path: Path, description: bytes) -> str:
    """A copy of the dataset with ``description`` as its dataset_description.json."""
    copy = tmp_path / "described"
    shutil.copytree(dataset["bids"], copy)
    (copy / "dataset_description.json").write_bytes(description)
    return str(copy)


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_what_reading_a_run_warns_about_is_a_warning_of_the_run(dataset, tmp_path):
    """The pre-flight check of a run whose bvec is stored n x 3 (read transposed, with a Python warning) hands the
    warning over as one of the run's notes, which the App prints as 'dwiflow: warning: <run>: …' (it came out as a
    raw UserWarning with a source line), and passes the run."""
    import warnings

    from dwiflow.bids_specs.inputs import find_dwi_runs
    from dwiflow.tasks.preflight import check_runs
    from dwiflow.tasks.recon_spec import load_recon_spec

    bids = tmp_path / "bids"
    shutil.copytree(dataset["bids"], bids)
    bvec = bids / "sub-two" / "dwi" / "sub-two_dir-AP_dwi.bvec"
    np.savetxt(bvec, np.loadtxt(bvec).T, fmt="%.8f")
    runs = find_dwi_runs(bids, ["two"])
    notes: dict[str, list[str]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none escapes
        problems = check_runs(runs, load_recon_spec(str(dataset["spec"])), None, notes)
    assert problems == {}
    about_bvec = [note for note in notes["sub-two_dir-AP"] if note.startswith(f"{bvec}: directions are stored as")]
    assert len(about_bvec) == 1 and "transposed" in about_bvec[0]
    assert not any(".bvec:" in note for note in notes.get("sub-two_dir-PA", []))


def test_filter_files_take_file_name_keys_and_name_a_misspelt_entity(dataset):
    """A BIDS filter may use the keys of BIDS file names (dir, sub, acq …) for their entities, as users write them;
    a misspelt entity is named with the one meant; a key and its entity together are refused."""
    from dwiflow.bids_specs.inputs import BidsInputError, find_dwi_runs

    def labels(filters):
        return sorted(run.label for run in find_dwi_runs(dataset["bids"], bids_filters=filters))

    assert labels({"dir": "PA"}) == labels({"direction": "PA"}) == ["sub-two_dir-PA"]
    assert labels({"sub": "two"}) == ["sub-two_dir-AP", "sub-two_dir-PA"]
    with pytest.raises(BidsInputError, match=r"'subjetc': not an entity of .*did you mean 'subject'\?"):
        labels({"subjetc": "two"})
    with pytest.raises(BidsInputError, match="'dir' and 'direction' name the same entity"):
        labels({"dir": "PA", "direction": "AP"})


@pytest.mark.parametrize("where", ["sub-two", "derivatives", "code/dwiflow"])
def test_outputs_inside_the_raw_dataset_are_refused(dataset, tmp_path, capsys, where):
    """OUTPUT_DIR (or --work-dir) inside BIDS_DIR but not in a folder of its derivatives/ would write into the raw
    dataset (a dataset_description.json in sub-two/, its derivatives beside the raw images): one line, exit 2, the
    dataset unchanged."""
    bids = tmp_path / "bids"
    shutil.copytree(dataset["bids"], bids)
    before = sorted(p.relative_to(bids) for p in bids.rglob("*"))
    assert main([str(bids), str(bids / where), "participant", "--work-dir", str(tmp_path / "work")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"OUTPUT_DIR {bids / where} is inside BIDS_DIR" in err, err
    assert main([str(bids), str(tmp_path / "out"), "participant", "--work-dir", str(bids / where)]) == 2
    assert "--work-dir" in capsys.readouterr().err
    assert sorted(p.relative_to(bids) for p in bids.rglob("*")) == before and not (tmp_path / "out").exists()


def test_invalid_recon_spec_names_the_key_and_missing_bvec(dataset, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(SPEC.replace("peaks: {npeaks: 2}", "peaks: {npeaks: 2, colour: red}"))
    assert main([str(dataset["bids"]), str(tmp_path / "out"), "participant", "--recon-spec", str(bad)]) == 2
    assert "bad.yaml: stages.peaks.colour: unknown option (allowed: " in capsys.readouterr().err
    bids = tmp_path / "bids"
    shutil.copytree(dataset["bids"], bids)
    (bids / "sub-two" / "dwi" / "sub-two_dir-PA_dwi.bvec").unlink()
    assert main([str(bids), str(tmp_path / "out"), "participant"]) == 2
    assert "has no .bvec file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_code_version_covers_everything_that_shapes_an_output(tmp_path):
    """Editing an estimator, a stage, the I/O or the output naming/sidecar text changes every task's hash."""
    from dwiflow.tasks.pydra_tasks import code_version, code_version_of
    from dwiflow.tasks.registry import source_hash_files

    code_version.cache_clear()  # computed once per process in normal use
    files = source_hash_files()
    names = {f"{p.parent.name}/{p.name}" for p in files}
    for needed in ("core/tensor.py", "core/csd.py", "stages/csd.py", "tasks/io.py", "tasks/registry.py",
                   "bids_specs/outputs.yaml", "bids_specs/outputs.py"):
        assert needed in names, needed
    copies = []
    for i, path in enumerate(files):
        copy = tmp_path / str(i) / path.name
        copy.parent.mkdir()
        shutil.copyfile(path, copy)
        copies.append(copy)
    assert code_version_of(copies) == code_version()
    for edited in ("tensor.py", "outputs.yaml", "csd.py"):
        target = next(c for c in copies if c.name == edited)
        original = target.read_text()
        target.write_text(original + "\n# edited\n")
        assert code_version_of(copies) != code_version(), edited
        target.write_text(original)
    assert code_version_of(copies) == code_version()


def test_rumba_preset_runs_through_the_bids_app(tmp_path):
    """The built-in rumba spec: SSST eigenvalues hand over to RUMBA-SD, peaks and FOD metrics follow its fODF."""
    bids = tmp_path / "bids"
    assert dwirecon(["phantom", str(bids), "--shape", "8,8,4", "--snr", "30", "--seed", "2"]) == 0
    spec = tmp_path / "rumba_small.yaml"
    spec.write_text("name: rumba-small\nstages:\n  mask: {}\n  response: {method: ssst, options: {roi_radii: 4, "
                    "fa_threshold: 0.5}}\n  rumba: {n_iter: 100, amplitudes: true}\n  peaks: {}\n  fod_metrics: {}\n")
    out = tmp_path / "out"
    assert main([str(bids), str(out), "participant", "--recon-spec", str(spec), "--work-dir", str(tmp_path / "w"),
                 "--worker", "debug", "--mask-dir", str(bids / "derivatives" / "masks")]) == 0
    folder = out / "sub-phantom" / "dwi"
    names = {p.name for p in folder.glob("*.nii.gz")}
    for param in ("fod", "fodamp", "combinedodf", "fwm", "fiso", "fgm", "fcsf", "snr", "status", "peaks", "nufo", "gfa"):
        assert f"sub-phantom_model-rumba_param-{param}_dwimap.nii.gz" in names, param
    response = json.loads((folder / "sub-phantom_model-rumba_desc-ssst_response.json").read_text())
    fwm_side = json.loads((folder / "sub-phantom_model-rumba_param-fwm_dwimap.json").read_text())
    assert np.allclose(fwm_side["Model"]["Parameters"]["WhiteMatterResponse"][0], response["Eigenvalues"])
    truth = nib.load(bids / "derivatives" / "truth" / "sub-phantom" / "dwi" / "sub-phantom_desc-csf_truth.nii.gz").get_fdata()
    fcsf = nib.load(folder / "sub-phantom_model-rumba_param-fcsf_dwimap.nii.gz").get_fdata()
    tissue = truth > 0
    assert np.all(np.isfinite(fcsf[tissue]))
    # the SSST response of this small mixed phantom is fat (lambda_perp ~5e-4 vs 3e-4), which blurs the split
    assert np.corrcoef(fcsf[tissue], truth[tissue])[0, 1] > 0.4


def test_mapmri_stage_runs_through_the_bids_app(dataset, tmp_path):
    """MAP-MRI as a recon-spec stage: its indices are staged as derivatives and its ODF feeds the peaks."""
    spec = tmp_path / "mapmri_small.yaml"
    spec.write_text("name: mapmri-small\nstages:\n  mask: {}\n  mapmri: {laplacian_weighting: 0.2, big_delta: 0.0265, "
                    "small_delta: 0.0162}\n  peaks: {npeaks: 2}\n")
    out = tmp_path / "out"
    assert main([str(dataset["bids"]), str(out), "participant", "--participant-label", "phantom", "--recon-spec",
                 str(spec), "--work-dir", str(tmp_path / "w"), "--worker", "debug"]) == 0
    folder = out / "sub-phantom" / "dwi"
    names = {p.name for p in folder.glob("*.nii.gz")}
    for param in ("rtop", "rtap", "rtpp", "msd", "qiv", "ng", "ngpar", "ngperp", "lapnorm", "odf", "status", "peaks"):
        assert f"sub-phantom_model-mapmri_param-{param}_dwimap.nii.gz" in names, param
    rtop = nib.load(folder / "sub-phantom_model-mapmri_param-rtop_dwimap.nii.gz").get_fdata()
    mask = nib.load(folder / "sub-phantom_desc-brain_mask.nii.gz").get_fdata() > 0
    assert np.all(np.isfinite(rtop[mask])) and np.all(rtop[mask] > 0)
    assert dataset_problems(out) == {}


def test_smt_preset_runs_through_the_bids_app(dataset, tmp_path):
    """The built-in smt spec on the multi-shell phantom: kernel maps, Watson ODI and its peak are staged."""
    out = tmp_path / "out"
    assert main([str(dataset["bids"]), str(out), "participant", "--participant-label", "phantom", "--recon-spec",
                 "smt", "--work-dir", str(tmp_path / "w"), "--worker", "debug"]) == 0
    folder = out / "sub-phantom" / "dwi"
    for param in ("lpar", "lperp", "f", "mse", "r2", "status", "odi", "mu", "fod", "peaks"):
        assert (folder / f"sub-phantom_model-smt_param-{param}_dwimap.nii.gz").is_file(), param
    lpar = nib.load(folder / "sub-phantom_model-smt_param-lpar_dwimap.nii.gz").get_fdata()
    mask = nib.load(folder / "sub-phantom_desc-brain_mask.nii.gz").get_fdata() > 0
    # the phantom's fibres have lambda_par 1.7e-3; its 0-20% free water, not modelled by this preset, raises the estimate
    assert 1.6e-3 < np.nanmedian(lpar[mask]) < 2.6e-3


@pytest.mark.parametrize("recon_spec", ["rumba", "mapmri", "smt", "dki", "noddi"])
def test_builtin_specs_write_bep016_sidecars(dataset, tmp_path, recon_spec):
    """The built-in recon specs the other tests do not run whole (csd: test_bids_real, msmt: test_msmt_pipeline)
    on the phantom: every sidecar follows the BEP016 draft's rules and the dataset has its Authors."""
    bids, out = tmp_path / "bids", tmp_path / "out"
    shutil.copytree(dataset["bids"] / "sub-phantom", bids / "sub-phantom")
    shutil.copyfile(dataset["bids"] / "dataset_description.json", bids / "dataset_description.json")
    side = bids / "sub-phantom" / "dwi" / "sub-phantom_dwi.json"  # MAP-MRI's q-space indices need Δ and δ
    side.write_text(json.dumps({**(json.loads(side.read_text()) if side.is_file() else {}),
                                "LargeDelta": 0.0265, "SmallDelta": 0.0162}))
    assert main([str(bids), str(out), "participant", "--recon-spec", recon_spec, "--work-dir", str(tmp_path / "w"),
                 "--worker", "debug", "-q", "--authors", "A. Tester", "B. Tester"]) == 0
    assert dataset_problems(out) == {}
    assert json.loads((out / "dataset_description.json").read_text())["Authors"] == ["A. Tester", "B. Tester"]


def load_builtin_yaml(name: str) -> dict:
    from dwiflow.tasks import recon_spec

    return yaml.safe_load((Path(recon_spec.__file__).parent / "recon_specs" / f"{name}.yaml").read_text())


def test_ss3t_spec_on_single_shell_data_and_refused_on_multi_shell(tmp_path, capsys):
    """The built-in ss3t spec on a single-shell (b=0 + 3000) three-tissue phantom: every stage's outputs, BEP016
    sidecars, the tissue responses in the FOD's sidecar; on multi-shell data it is refused before anything runs."""
    from dwiflow.tasks.stages.phantom import keep_one_shell, write_phantom_dataset

    files = write_phantom_dataset(tmp_path / "bids", scheme="multi", shape=(14, 14, 10), snr=30.0, seed=1,
                                  tissues="three")
    masks = str(tmp_path / "bids" / "derivatives" / "masks")
    refused = main([str(tmp_path / "bids"), str(tmp_path / "refused"), "participant", "--recon-spec", "ss3t",
                    "--mask-dir", masks, "--work-dir", str(tmp_path / "w0"), "--worker", "debug", "-q"])
    assert refused == 2
    assert "SS3T-CSD needs b=0 and exactly one diffusion-weighted shell; this run has b=0, 1000, 2000, 3000" in \
        capsys.readouterr().err
    assert not list((tmp_path / "refused").glob("sub-*"))
    keep_one_shell(files["dwi"], 3000.0)
    out = tmp_path / "out"
    spec = load_builtin_yaml("ss3t")  # the built-in spec, with dhollander's selection sized for a small phantom
    spec["stages"]["response"]["options"] = {"erode": 0, "sfwm": 5.0}
    (tmp_path / "ss3t.yaml").write_text(yaml.safe_dump(spec))
    assert main([str(tmp_path / "bids"), str(out), "participant", "--recon-spec", str(tmp_path / "ss3t.yaml"),
                 "--mask-dir", masks,
                 "--work-dir", str(tmp_path / "w"), "--worker", "debug", "-q"]) == 0
    folder = out / "sub-phantom" / "dwi"
    for name in ("model-ss3tcsd_param-fod_desc-wm", "model-ss3tcsd_param-fod_desc-gm",
                 "model-ss3tcsd_param-fod_desc-csf"):
        assert (folder / f"sub-phantom_{name}_dwimap.nii.gz").is_file(), name
    sidecar = json.loads((folder / "sub-phantom_model-ss3tcsd_param-fod_desc-wm_dwimap.json").read_text())
    assert sidecar["Model"]["Parameters"]["Iterations"] == 3 and len(sidecar["ResponseFunction"]["Coefficients"]) == 2
    # mtnormalise's images carry the deconvolution's model, and the peaks and FOD metrics come from the normalised
    # WM FOD (as in the msmt spec), not from SS3T's own
    normalised = folder / "sub-phantom_model-ss3tcsd_param-fod_desc-wmnorm_dwimap.nii.gz"
    assert normalised.is_file() and not list(folder.glob("*model-msmtcsd_param-*"))
    peaks = json.loads((folder / "sub-phantom_model-mtnormalise_param-peaks_dwimap.json").read_text())
    assert peaks["Sources"][0].endswith(normalised.name), peaks["Sources"]
    mask_name = "sub-phantom_desc-brain_mask.nii.gz"
    mask = nib.load(folder / mask_name).get_fdata() > 0
    in_run = np.nan_to_num(nib.load(folder / "sub-phantom_model-mtnormalise_param-peaks_dwimap.nii.gz").get_fdata())
    for source, equal in (("wmnorm", True), ("wm", False)):  # the stage run on each FOD
        direct = stage("peaks")({"peaks": tmp_path / f"peaks_{source}.nii.gz"}, mask=folder / mask_name,
                                fod=folder / f"sub-phantom_model-ss3tcsd_param-fod_desc-{source}_dwimap.nii.gz")
        same = np.allclose(in_run[mask], np.nan_to_num(nib.load(direct["peaks"]).get_fdata()[mask]), atol=1e-6)
        assert same == equal, source
    assert dataset_problems(out) == {}
