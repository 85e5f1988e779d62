"""What the user is shown and told: the automatic mask, warnings about what the data support, reports that keep
every session, progress lines, verbosity, the work directory and the group summary."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from scipy import ndimage

from dwiflow.cli.bidsapp import default_work_dir, main
from dwiflow.cli.dwirecon import main as dwirecon
from tests.conftest import BIDS_REAL, real_run
from tests.workflows.test_participant import SPEC


@pytest.mark.parametrize("acquisition", ["b1kb2k", "b6kmax"])
def test_automatic_mask_of_the_two_slice_runs_has_no_holes(acquisition, tmp_path):
    """sub-01 of bids_real (two axial slices): Dice >= 0.97 with the provided masks, no hole in any slice, and a
    sidecar that says what was done."""
    paths = real_run(f"sub-01_acq-{acquisition}")
    out = tmp_path / "mask.nii.gz"
    assert dwirecon(["mask", str(paths["dwi"]), str(paths["bval"]), str(paths["bvec"]), str(out), "-q"]) == 0
    ours = nib.load(out).get_fdata() > 0
    provided = nib.load(paths["mask"]).get_fdata() > 0
    dice = 2 * (ours & provided).sum() / (ours.sum() + provided.sum())
    assert dice >= 0.97, dice
    for z in range(ours.shape[2]):
        assert not (ndimage.binary_fill_holes(ours[..., z]) & ~ours[..., z]).any()
    side = json.loads(out.with_name("mask.json").read_text())
    assert side["HolesFilled"] == "3-D and within every slice" and side["InPlaneDilation"] == 1
    assert 0.3 < side["FieldOfViewFraction"] < 0.45 and "Warnings" not in side


def test_data_warnings_before_anything_runs():
    """Too few directions for CSD's lmax (sub-01 b6kmax: b=6000 has 24 directions) and SMT on two shells are
    found by the pre-flight checks, with what would be supported."""
    from dwiflow.tasks.preflight import check_run
    from dwiflow.tasks.recon_spec import load_recon_spec

    paths = real_run("sub-01_acq-b6kmax")
    notes: list[str] = []
    assert check_run("b6kmax", paths["dwi"], paths["bval"], paths["bvec"], paths["mask"], load_recon_spec("csd"),
                     warnings=notes) == []
    assert any("CSD at lmax 8 estimates 45 coefficients from the 24 directions of b=6000" in n
               and "the directions determine lmax 4" in n for n in notes), notes
    paths = real_run("sub-01_acq-b1kb2k")
    notes = []
    assert check_run("b1kb2k", paths["dwi"], paths["bval"], paths["bvec"], paths["mask"], load_recon_spec("smt"),
                     warnings=notes) == []
    assert any("SMT fits 2 kernel parameters to 2 shell means" in n for n in notes), notes


def test_dhollander_erosion_of_thin_data_refused_before_anything_runs(tmp_path, capsys):
    """dhollander's default 3 erosions leave nothing of two-slice data (each also removes the image's outer layer,
    as MRtrix3's maskfilter erode, which leaves 0 of sub-01's 8865 mask voxels after one pass): the pre-flight says
    so and names the option, and the BIDS App where a built-in spec's option is changed; with erode 0 the run
    passes."""
    from dwiflow.tasks import recon_spec
    from dwiflow.tasks.preflight import check_run
    from dwiflow.tasks.recon_spec import load_recon_spec

    paths = real_run("sub-01_acq-b1kb2k")
    problems = check_run("b1kb2k", paths["dwi"], paths["bval"], paths["bvec"], paths["mask"], load_recon_spec("msmt"))
    assert problems == ["b1kb2k: stage response: stages.response.options.erode: 3 erosions leave no voxel of a "
                        "104x104x2 image (each also removes the image's outer layer, as MRtrix3's maskfilter erode); "
                        "use erode 0 for data of fewer than 7 slices"], problems
    builtin = Path(recon_spec.__file__).parent / "recon_specs" / "msmt.yaml"
    out = tmp_path / "out"
    assert main([str(BIDS_REAL), str(out), "participant", "--participant-label", "01", "--recon-spec", "msmt",
                 "--work-dir", str(tmp_path / "work")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.endswith(f"(a built-in spec's options are changed in a copy of {builtin}, given as --recon-spec FILE)")
    assert not out.exists()
    spec = yaml.safe_load(builtin.read_text())
    spec["stages"]["response"]["options"] = {**spec["stages"]["response"].get("options", {}), "erode": 0}
    (tmp_path / "thin.yaml").write_text(yaml.safe_dump(spec))
    assert check_run("b1kb2k", paths["dwi"], paths["bval"], paths["bvec"], paths["mask"],
                     load_recon_spec(str(tmp_path / "thin.yaml"))) == []


def test_three_tissues_on_single_shell_data_refused_before_anything_runs(tmp_path, capsys):
    """The msmt spec on sub-02 (b=0 and one shell): its dhollander hands MSMT-CSD three tissues, which two b-values
    cannot separate. The pre-flight says so for each run and names the ss3t spec; nothing is written (the runs
    failed in the deconvolution, after the mask, tensor and response stages had run)."""
    from dwiflow.tasks.preflight import check_run
    from dwiflow.tasks.recon_spec import load_recon_spec

    out = tmp_path / "out"
    code = main([str(BIDS_REAL), str(out), "participant", "--participant-label", "02", "--recon-spec", "msmt",
                 "--work-dir", str(tmp_path / "work")])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2 and not out.exists() and not (tmp_path / "work").exists()
    assert len(err) == 2 and all("stage msmt_csd: 3 tissues (WM, GM, CSF) but this run has only 2 distinct b-values "
                                 "(0, 2500)" in line and "use recon spec ss3t" in line for line in err), err
    paths = real_run("sub-01_acq-b1kb2k")  # three b-values separate three tissues (its only problem: the erosion)
    problems = check_run("b1kb2k", paths["dwi"], paths["bval"], paths["bvec"], paths["mask"], load_recon_spec("msmt"))
    assert len(problems) == 1 and "erode" in problems[0], problems


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    """A BIDS dataset with one subject scanned in two sessions (copies of the multi-shell phantom)."""
    root = tmp_path_factory.mktemp("sessions")
    assert dwirecon(["phantom", str(root / "src"), "--shape", "12,12,6", "--scheme", "multi", "--seed", "3"]) == 0
    bids = root / "bids"
    bids.mkdir()
    shutil.copyfile(root / "src" / "dataset_description.json", bids / "dataset_description.json")
    src = root / "src" / "sub-phantom" / "dwi" / "sub-phantom_dwi"
    for session in ("pre", "post"):
        folder = bids / "sub-s" / f"ses-{session}" / "dwi"
        folder.mkdir(parents=True)
        for ext in (".nii.gz", ".bval", ".bvec", ".json"):
            if Path(f"{src}{ext}").is_file():
                shutil.copyfile(f"{src}{ext}", folder / f"sub-s_ses-{session}_dwi{ext}")
    spec = root / "small.yaml"
    spec.write_text(SPEC)
    return {"bids": bids, "spec": spec, "root": root}


def test_sessions_verbosity_work_dir_warnings_and_summary(sessions, capsys):
    bids, out = sessions["bids"], sessions["root"] / "out"
    common = [str(bids), str(out), "participant", "--recon-spec", str(sessions["spec"]), "--worker", "debug"]
    # session pre, quiet, default work directory: outside the derivative dataset, one folder per OUTPUT_DIR and
    # selection of runs
    assert main(common + ["--session-label", "pre", "-q"]) == 0
    printed = capsys.readouterr()
    assert "[dwiflow" not in printed.out
    # the data's warning, printed once, before anything ran (the csd stage uses one of the phantom's shells)
    assert printed.err.count("sub-s_ses-pre: stage csd: CSD deconvolves one shell (b=3000)") == 1, printed.err
    work = default_work_dir(out, ["ses-pre"])
    assert work.is_dir() and out not in work.parents and bids not in work.parents
    # session post, verbose, with --clean-workdir: time-stamped lines, the work directory's size, then removed
    assert main(common + ["--session-label", "post", "-v", "--clean-workdir"]) == 0
    printed = capsys.readouterr().out
    work = default_work_dir(out, ["ses-post"])
    assert re.search(r"^\[dwiflow \d\d:\d\d:\d\d\]   sub-s_ses-post: figures done in \d+\.\d s$", printed, re.M), printed
    assert re.search(r"sub-s_ses-post done \(stages computed in \d+\.\d s\)", printed), printed
    assert f"work directory {work} removed (--clean-workdir)" in printed and not work.exists()
    # one report with both sessions (the first invocation's run is kept), each with the csd warning
    report = (out / "sub-s.html").read_text()
    for session in ("pre", "post"):
        assert f'<h2 id="sub-s_ses-{session}">' in report
    assert report.count("CSD deconvolves one shell (b=3000)") == 2
    # the group summary: a row per run, one number per column, n/a for the models that did not run
    assert main([str(bids), str(out), "group"]) == 0
    lines = (out / "desc-group_summary.tsv").read_text().splitlines()
    header, rows = lines[0].split("\t"), [dict(zip(lines[0].split("\t"), line.split("\t"))) for line in lines[1:]]
    assert [r["run"] for r in rows] == ["sub-s_ses-post", "sub-s_ses-pre"]
    for row in rows:
        assert all("," not in value for value in row.values())
        assert 0.05 < float(row["fa_mean"]) < 0.9 and float(row["afd_total_mean"]) > 0
        assert 1 <= float(row["nufo_mean"]) <= 2 and float(row["response_wm_l0_highest_shell"]) > 0
        assert row["mapmri_rtop_median"] == "n/a" and row["smt_odi_mean"] == "n/a"
    assert rows[0]["fa_mean"] == rows[1]["fa_mean"]  # the two sessions hold the same data
    assert len(header) == len(set(header))
    mask_side = json.loads(next((out / "sub-s" / "ses-pre" / "dwi").glob("*_desc-brain_mask.json")).read_text())
    assert mask_side["HolesFilled"] == "3-D and within every slice"


def test_non_physical_mapmri_voxels_get_a_status(tmp_path):
    """MAP-MRI without positivity on sub-01 b6kmax: voxels with a negative RTOP get status 8 (non-physical) and NaN,
    and the status map's levels say so."""
    paths = real_run("sub-01_acq-b6kmax")
    out = tmp_path / "mapmri"
    assert dwirecon(["mapmri", str(paths["dwi"]), str(paths["bval"]), str(paths["bvec"]), str(out), "--mask",
                     str(paths["mask"]), "--positivity", "none", "-q"]) == 0
    status_path = next(out.glob("*param-status_dwimap.nii.gz"))
    status = nib.load(status_path).get_fdata()
    rtop = nib.load(next(out.glob("*param-rtop_dwimap.nii.gz"))).get_fdata()
    mask = nib.load(paths["mask"]).get_fdata() > 0
    flagged = (status == 8) & mask
    assert 20 < flagged.sum() < 0.1 * mask.sum(), flagged.sum()
    assert np.all(np.isnan(rtop[flagged])) and np.nanmin(rtop[mask]) > 0
    levels = json.loads(status_path.with_name(status_path.name.replace(".nii.gz", ".json")).read_text())["Levels"]
    assert levels["8"].startswith("non-physical estimate") and "return-to-origin" in levels["8"]


def test_progress_lines_follow_the_verbosity(capsys, monkeypatch):
    """A long stage prints its progress with the elapsed time (throttled), -q silences progress, -v prints more
    often; every line carries the wall-clock time."""
    import time as clock

    from dwiflow.tasks import console

    monkeypatch.setenv(console.VERBOSITY_ENV, str(console.NORMAL))
    progress = console.StageProgress("sub-03", "rumba", "voxels", interval=0.05)
    progress(10, 100)  # within the first interval: nothing yet
    clock.sleep(0.06)
    progress(40, 100)
    progress(41, 100)  # throttled
    clock.sleep(0.06)
    progress(100, 100)  # the stage's own "done" line follows: not repeated here
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and re.fullmatch(r"\[dwiflow \d\d:\d\d:\d\d\]   sub-03: rumba 40/100 voxels \(0 s\)", lines[0])
    assert console.StageProgress("a", "b", "voxels").interval == 20.0
    monkeypatch.setenv(console.VERBOSITY_ENV, str(console.VERBOSE))
    assert console.StageProgress("a", "b", "voxels").interval == 5.0
    monkeypatch.setenv(console.VERBOSITY_ENV, str(console.QUIET))
    console.say("[dwiflow] hidden")
    quiet = console.StageProgress("sub-03", "rumba", "voxels", interval=0.0)
    clock.sleep(0.01)
    quiet(5, 100)
    assert capsys.readouterr().out == ""


def test_a_progress_line_is_one_write(monkeypatch):
    """Worker processes print to the same stream: each line goes out in one write, newline included (a pipe keeps
    writes under 4096 bytes whole), so two processes' lines cannot run into each other."""
    from dwiflow.tasks import console

    class Recorder:
        def __init__(self):
            self.writes: list[str] = []

        def write(self, text: str) -> int:
            self.writes.append(text)
            return len(text)

        def flush(self) -> None:
            pass

    recorder = Recorder()
    monkeypatch.setattr(sys, "stdout", recorder)
    monkeypatch.setenv(console.VERBOSITY_ENV, str(console.NORMAL))
    console.say("[dwiflow]   sub-01: dki ...")
    assert len(recorder.writes) == 1 and re.fullmatch(r"\[dwiflow \d\d:\d\d:\d\d\]   sub-01: dki \.\.\.\n",
                                                       recorder.writes[0]), recorder.writes


def test_a_run_goes_on_when_the_reader_of_its_progress_goes(tmp_path):
    """``dwiflow … | head -2``: the reader closes the pipe after two lines; the run (cf worker: the worker processes
    print to the same pipe) still finishes, writes its outputs and exits 0, without a broken-pipe error."""
    import subprocess

    bids, out = tmp_path / "bids", tmp_path / "out"
    assert dwirecon(["phantom", str(bids), "--shape", "8,8,3", "--seed", "4"]) == 0
    process = subprocess.Popen([sys.executable, "-m", "dwiflow.cli.bidsapp", str(bids), str(out), "participant",
                                "--work-dir", str(tmp_path / "work"), "--worker", "cf", "--nprocs", "2"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = [process.stdout.readline(), process.stdout.readline()]
    process.stdout.close()
    errors = process.stderr.read()
    assert process.wait(timeout=600) == 0, errors
    assert all(line.startswith("[dwiflow ") for line in first), first
    assert "Broken pipe" not in errors and "Exception ignored" not in errors, errors
    assert list(out.glob("sub-phantom/dwi/*_model-csd_param-fod_dwimap.nii.gz"))
    assert (out / "sub-phantom.html").is_file()


def test_a_run_goes_on_when_the_reader_of_its_warnings_goes(tmp_path):
    """``dwiflow … 2>&1 | tail -0``: the reader of both streams is gone before the run warns (single-shell CSD on
    multi-shell data); the warning went to a closed pipe and made every run fail with 'Broken pipe'. The run
    finishes and exits 0."""
    import subprocess

    bids, out = tmp_path / "bids", tmp_path / "out"
    assert dwirecon(["phantom", str(bids), "--shape", "6,6,2", "--scheme", "multi", "--seed", "4"]) == 0
    process = subprocess.Popen([sys.executable, "-m", "dwiflow.cli.bidsapp", str(bids), str(out), "participant",
                                "--work-dir", str(tmp_path / "work"), "--worker", "debug"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    process.stdout.close()
    assert process.wait(timeout=600) == 0
    assert list(out.glob("sub-phantom/dwi/*_model-csd_param-fod_dwimap.nii.gz"))
    sidecar = json.loads(next(out.glob("sub-phantom/dwi/*_model-csd_param-fod_dwimap.json")).read_text())
    assert any("deconvolves one shell" in note for note in sidecar["Warnings"])  # the warning it printed


def test_help_lists_the_built_in_specs_and_every_method(capsys):
    from dwiflow.tasks.recon_spec import builtin_specs
    from dwiflow.tasks.registry import StageGroup, stages

    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"a built-in recon spec ({', '.join(builtin_specs())})" in text and "``" not in text
    assert "--clean-workdir" in text and "-q, --quiet" in text and "$XDG_CACHE_HOME/dwiflow/" in text
    with pytest.raises(SystemExit):
        dwirecon(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for entry in stages().values():
        if isinstance(entry, StageGroup):
            assert f"{entry.title.lower()}: {', '.join(entry.methods)}" in text
            assert {"tournier", "tax", "dhollander"} <= set(entry.methods) or entry.name != "response"


def test_a_misspelt_option_is_named_with_the_one_meant_in_the_commands_own_usage(capsys, tmp_path):
    """An argument a command does not take is refused (exit 2) by that command's parser, with its usage (dwirecon's
    subcommands said 'usage: dwirecon [-h] [--version] COMMAND ...'), and a misspelt option names the one meant."""
    with pytest.raises(SystemExit) as end:
        dwirecon(["tensor", "dwi.nii.gz", "dwi.bval", "dwi.bvec", "--fa-map", "fa.nii.gz"])
    err = capsys.readouterr().err
    assert end.value.code == 2 and "usage: dwirecon tensor " in err, err
    assert err.splitlines()[-1] == ("dwirecon tensor: error: unrecognized arguments: --fa-map fa.nii.gz "
                                    "(--fa-map: did you mean --fa?)")
    with pytest.raises(SystemExit) as end:
        dwirecon(["response", "dhollander", "a", "b", "c", "d", "e", "f", "g"])
    err = capsys.readouterr().err
    assert end.value.code == 2 and err.splitlines()[-1] == "dwirecon response dhollander: error: unrecognized arguments: g"
    with pytest.raises(SystemExit) as end:
        main([str(tmp_path), str(tmp_path / "out"), "participant", "--partcipant-label", "01"])
    err = capsys.readouterr().err.splitlines()[-1]
    assert end.value.code == 2 and err == ("dwiflow: error: unrecognized arguments: --partcipant-label 01 "
                                           "(--partcipant-label: did you mean --participant-label?)"), err
    assert not (tmp_path / "out").exists()


def test_one_job_per_participant_into_one_output_dir_runs_side_by_side(tmp_path):
    """Two participants run by two dwiflow processes at once into one OUTPUT_DIR, without --work-dir (a cluster's
    array job): each selection has a default work directory of its own, so neither is refused for a work directory
    in use (both were: one dwiflow process per work directory), and both write their derivatives; the same
    selection again finds its cache."""
    import subprocess

    bids = tmp_path / "bids"
    assert dwirecon(["phantom", str(bids), "--shape", "6,6,3", "--seed", "4"]) == 0
    shutil.copytree(bids / "sub-phantom", bids / "sub-other")
    for path in (bids / "sub-other").rglob("sub-phantom_*"):
        path.rename(path.with_name(path.name.replace("sub-phantom", "sub-other")))
    out = tmp_path / "out"
    env = {**__import__("os").environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}

    def start(label):
        return subprocess.Popen([sys.executable, "-m", "dwiflow.cli.bidsapp", str(bids), str(out), "participant",
                                 "--participant-label", label, "--worker", "debug", "-q"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    jobs = [start("phantom"), start("other")]
    results = [(job.wait(timeout=600), job.stderr.read()) for job in jobs]
    assert all(code == 0 for code, _ in results) and not any("in use" in err for _, err in results), results
    for label in ("phantom", "other"):
        assert list(out.glob(f"sub-{label}/dwi/*_model-csd_param-fod_dwimap.nii.gz")), label
    works = sorted((tmp_path / "cache" / "dwiflow").iterdir())
    assert len(works) == 2 and len({w.name for w in works}) == 2
    again = start("other")
    assert again.wait(timeout=600) == 0
    assert sorted((tmp_path / "cache" / "dwiflow").iterdir()) == works  # its own work directory again


@pytest.mark.parametrize("extra, asked", [
    (["--nprocs", "4", "--omp-nthreads", "3"], "--nprocs 4 × --omp-nthreads 3 = 12 threads on 2 CPUs"),
    (["--omp-nthreads", "4", "--worker", "debug"], "--omp-nthreads 4 on 2 CPUs"),
    (["--nprocs", "2"], None), (["--nprocs", "8", "--worker", "slurm"], None),
])
def test_more_processes_and_threads_than_cpus_are_warned_about(tmp_path, capsys, monkeypatch, extra, asked):
    """--nprocs × --omp-nthreads beyond the CPUs this process may use (2 here), with a worker that runs the stages on
    this machine: a warning before anything else, as fMRIPrep gives; within them, or on SLURM: none."""
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    threads_before = {name: os.environ.get(name) for name in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS")}
    bids = tmp_path / "bids"
    assert dwirecon(["phantom", str(bids), "--shape", "4,4,2", "--seed", "4"]) == 0
    code = main([str(bids), str(tmp_path / "out"), "participant", "--participant-label", "nobody", *extra])
    err = capsys.readouterr().err
    assert code == 2 and "participant(s) ['nobody'] not found" in err
    # an in-process call leaves the process's thread settings as they were (numba refuses a change once started)
    assert all(os.environ.get(name) == value for name, value in threads_before.items())
    warnings = [line for line in err.splitlines() if line.startswith("dwiflow: warning:")]
    if asked is None:
        assert warnings == [], err
    else:
        assert len(warnings) == 1 and asked in warnings[0] and "slower, not faster" in warnings[0], err


def test_qsirecon_users_spellings_and_spec_names(capsys, tmp_path):
    """What QSIRecon users type: its underscore and short spellings of options dwiflow has mean the same; its
    options dwiflow lacks, its built-in spec names and its spec files are each one line saying what to use here
    (exit 2, nothing written)."""
    from dwiflow.cli.bidsapp import build_parser

    parser = build_parser()
    common = [str(tmp_path), str(tmp_path / "out"), "participant"]
    theirs = parser.parse_args(common + ["--recon_spec", "dki", "-w", str(tmp_path / "w"), "--skip_bids_validation"])
    ours = parser.parse_args(common + ["--recon-spec", "dki", "--work-dir", str(tmp_path / "w"),
                                       "--skip-bids-validation"])
    assert vars(theirs) == vars(ours) and ours.recon_spec == "dki" and ours.skip_bids_validation

    def refused(*argv):
        with pytest.raises(SystemExit) as end:
            main([str(BIDS_REAL), str(tmp_path / "out"), "participant", *argv])
        assert end.value.code == 2
        return capsys.readouterr().err.splitlines()[-1]

    assert refused("--nthreads", "8").endswith(
        "(--nthreads: QSIRecon's CPU budget: here --nprocs (tasks at once) and --omp-nthreads (threads per task))")
    assert "(--fs-license-file: QSIRecon's: dwiflow has no FreeSurfer or anatomical step)" in refused(
        "--fs-license-file", "license.txt")

    def refused_spec(spec):
        assert main([str(BIDS_REAL), str(tmp_path / "out"), "participant", "--recon-spec", spec]) == 2
        return capsys.readouterr().err.strip()

    assert refused_spec("mrtrix_multishell_msmt_ACT-hsvs").endswith(
        "'mrtrix_multishell_msmt_ACT-hsvs' is QSIRecon's: --recon-spec msmt (dhollander, MSMT-CSD, mtnormalise, "
        "peaks; no tractography)")
    assert refused_spec("amico_noddi").endswith("'amico_noddi' is QSIRecon's: --recon-spec noddi")
    assert refused_spec("dsi_studio_gqi").endswith("'dsi_studio_gqi' is QSIRecon's, and dwiflow has no counterpart of it")
    qsirecon_file = tmp_path / "dipy_dki.yaml"
    qsirecon_file.write_text(yaml.safe_dump({"name": "dipy_dki", "space": "T1w", "anatomical": [], "nodes": [
        {"name": "dki_recon", "action": "DKI_reconstruction", "software": "Dipy", "input": "qsirecon"}]}))
    said = refused_spec(str(qsirecon_file))
    assert said.count("\n") == 0 and f"{qsirecon_file}: a QSIRecon recon spec (a list of nodes)" in said
    assert said.endswith("'dipy_dki' is QSIRecon's: --recon-spec dki")
    assert not (tmp_path / "out").exists()


def test_a_filter_file_given_as_a_pipe_is_read_once(tmp_path, capsys):
    """``--bids-filter-file <(echo '{…}')``: a pipe, which can be read once (it was 'not found': only a regular file
    was taken, and the default work directory's key read it a second time). Its filter selects the runs."""
    import os
    import threading

    fifo = tmp_path / "filter"
    os.mkfifo(fifo)

    def write():
        with open(fifo, "w") as stream:
            stream.write('{"acquisition": "b9k"}')

    writer = threading.Thread(target=write)
    writer.start()
    code = main([str(BIDS_REAL), str(tmp_path / "out"), "participant", "--bids-filter-file", str(fifo)])
    writer.join(timeout=10)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == (f"dwiflow: error: no DWI run found in {BIDS_REAL.resolve()} matching the BIDS "
                                 "filter file (DWI runs: 5, without sessions)"), err  # BIDS_DIR as resolved
    assert main([str(BIDS_REAL), str(tmp_path / "out"), "participant", "--bids-filter-file", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"dwiflow: error: BIDS filter file {tmp_path} is a folder, not a JSON file"
    assert not (tmp_path / "out").exists()


def test_ss3t_spec_on_multi_shell_data_names_the_shell_option(tmp_path, capsys):
    """Recon spec ss3t on multi-shell data (bids_real sub-01 b6kmax): refused before anything runs, naming msmt and
    the shell option with the largest b-value; with ss3t_csd: {shell: B} the run deconvolves b=0 and that shell
    (its sidecar and methods say so)."""
    out = tmp_path / "out"
    (tmp_path / "b6kmax.json").write_text('{"acquisition": "b6kmax"}')
    selection = ["--participant-label", "01", "--bids-filter-file", str(tmp_path / "b6kmax.json")]
    assert main([str(BIDS_REAL), str(out), "participant", "--recon-spec", "ss3t", *selection, "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert any("(multi-shell data: recon spec msmt, or b=0 and one shell: dwirecon ss3t-csd --shell 6000; in a "
               "recon spec, ss3t_csd: {shell: 6000} (the largest, as SS3T's author advises))" in line
               for line in err), err
    assert not out.exists()
    spec = yaml.safe_load((Path(__file__).parents[2] / "tasks/recon_specs/ss3t.yaml").read_text())
    spec["stages"]["ss3t_csd"] = {"shell": 6000}
    spec["stages"]["response"]["options"] = {"erode": 0}  # two slices
    (tmp_path / "ss3t_b6000.yaml").write_text(yaml.safe_dump(spec))
    assert main([str(BIDS_REAL), str(out), "participant", "--recon-spec", str(tmp_path / "ss3t_b6000.yaml"),
                 *selection, "--work-dir", str(tmp_path / "work"), "-q"]) == 0, capsys.readouterr().err
    side = json.loads(next(out.glob("sub-01/dwi/*_model-ss3tcsd_param-fod_desc-wm_dwimap.json")).read_text())
    assert side["Model"]["Parameters"]["Shells"] == [0.0, 6000.0]
    methods = next(out.glob("logs/*b6kmax*methods*")).read_text()
    assert "from the b=6000 shell (the other shells left out) and b=0 by single-shell three-tissue CSD" in methods
