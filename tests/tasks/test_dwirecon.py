"""The dwirecon command line: outputs, sidecars, and one-line errors on bad input."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from dwiflow.cli.dwirecon import main
from dwiflow.core.sims import acquisition_scheme, make_phantom
from tests.conftest import write_gradients, write_nifti


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    assert main(["phantom", str(out), "--shape", "12,12,4", "--seed", "2"]) == 0
    base = out / "sub-phantom" / "dwi" / "sub-phantom_dwi"
    return {"root": out, "dwi": f"{base}.nii.gz", "bval": f"{base}.bval", "bvec": f"{base}.bvec"}


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _outputs(directory):
    return sorted(p.name for p in directory.iterdir())


def test_phantom_writes_bids_and_truth(phantom_dir):
    root = phantom_dir["root"]
    desc = json.loads((root / "dataset_description.json").read_text())
    assert desc["BIDSVersion"] and desc["DatasetType"] == "raw"
    img = nib.load(phantom_dir["dwi"])
    assert img.shape == (18, 18, 8, 66)  # 12x12x4 tissue plus 3,3,2 voxels of background per side
    truth = nib.load(root / "derivatives/truth/sub-phantom/dwi/sub-phantom_desc-nfibres_truth.nii.gz").get_fdata()
    assert set(np.unique(truth)) <= {0, 1, 2, 3} and (truth > 0).sum() == 12 * 12 * 4
    mask = nib.load(root / "derivatives/masks/sub-phantom/dwi/sub-phantom_desc-brain_mask.nii.gz").get_fdata() > 0
    assert np.array_equal(mask, truth > 0)
    b0 = np.asarray(img.dataobj)[..., 0]
    assert b0[mask].mean() == pytest.approx(100, abs=3) and b0[~mask].mean() < 10  # background holds noise only


def test_phantom_with_three_tissues(tmp_path):
    """``--tissues three`` (the demo's dataset): WM, GM and CSF patches with the volume fractions as truth; without
    noise each voxel's b=0 signal is S0 times the fractions weighted by proton density (CSF 1.3), and a voxel that is
    nearly pure GM decays isotropically with GM's diffusivity on every shell."""
    from dwiflow.core.sims import CSF_PROTON_DENSITY, GM_DIFFUSIVITY

    out = tmp_path / "three"
    assert main(["phantom", str(out), "--scheme", "multi", "--tissues", "three", "--shape", "10,10,4", "--snr", "0",
                 "--seed", "3", "-q"]) == 0
    truth_dir = out / "derivatives/truth/sub-phantom/dwi"
    fractions = nib.load(truth_dir / "sub-phantom_desc-tissues_truth.nii.gz").get_fdata()
    assert not (truth_dir / "sub-phantom_desc-csf_truth.nii.gz").exists()
    mask = nib.load(out / "derivatives/masks/sub-phantom/dwi/sub-phantom_desc-brain_mask.nii.gz").get_fdata() > 0
    assert mask.sum() == 10 * 10 * 4 and np.allclose(fractions[mask].sum(axis=-1), 1) and not fractions[~mask].any()
    assert np.all(fractions[mask].max(axis=0) > 0.9)  # each tissue has nearly pure voxels (dhollander needs them)
    base = out / "sub-phantom" / "dwi" / "sub-phantom_dwi"
    data = nib.load(f"{base}.nii.gz").get_fdata()
    bvals = np.loadtxt(f"{base}.bval")
    s0 = data[..., bvals < 50].mean(axis=-1)
    assert np.allclose(s0[mask], 1000 * (fractions[mask] @ [1.0, 1.0, CSF_PROTON_DENSITY]), rtol=1e-5)
    grey = mask & (fractions[..., 1] > 0.999)
    assert grey.any()
    decay = data[grey] / s0[grey, None]
    assert np.allclose(decay, np.exp(-bvals * GM_DIFFUSIVITY), atol=2e-3)
    assert json.loads((out / "dataset_description.json").read_text())["Name"].startswith("dwiflow phantom (multi-shell, WM/GM/CSF")


def test_shells_prints_every_shell(phantom_dir, capsys):
    code, out, _ = _run(["shells", phantom_dir["bval"]], capsys)
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 2 and "6 volumes" in lines[0] and "b=1000" in lines[1] and "60 volumes" in lines[1]


def test_tensor_writes_maps_with_sidecars(phantom_dir, tmp_path, capsys):
    p = phantom_dir
    code, out, err = _run(["tensor", p["dwi"], p["bval"], p["bvec"], "--fa", tmp_path / "fa.nii.gz",
                           "--v1", tmp_path / "v1.nii.gz", "--md", tmp_path / "md.nii.gz"], capsys)
    assert code == 0, err
    fa = nib.load(tmp_path / "fa.nii.gz").get_fdata()
    tissue = nib.load(phantom_dir["root"] / "derivatives/masks/sub-phantom/dwi/sub-phantom_desc-brain_mask.nii.gz").get_fdata() > 0
    assert fa.shape == (18, 18, 8) and 0.3 < np.median(fa[tissue]) < 0.9
    side = json.loads((tmp_path / "v1.json").read_text())
    assert side["OrientationEncoding"] == {"Type": "unit3vector", "Reference": "xyz", "EncodingAxis": 3}  # BEP016
    assert side["Model"]["Parameters"]["FitMethod"] == "MRtrix3 dwi2tensor: first fit WLS, then IWLS"  # the default
    assert side["Model"]["Parameters"]["Iterations"] == 2
    assert json.loads((tmp_path / "md.json").read_text())["Units"] == "mm^2/s"


def test_mask_command(phantom_dir, tmp_path, capsys):
    p = phantom_dir
    code, _, err = _run(["mask", p["dwi"], p["bval"], p["bvec"], tmp_path / "mask.nii.gz"], capsys)
    assert code == 0, err
    side = json.loads((tmp_path / "mask.json").read_text())
    assert side["VoxelCount"] == int(nib.load(tmp_path / "mask.nii.gz").get_fdata().sum())


def _small_case(tmp_path, n_volumes=None, bvals=None):
    gtab = acquisition_scheme("single", n_b0=2)
    ph = make_phantom(gtab, (5, 5, 3), n_fibres=1, snr=None)
    data = ph.data if n_volumes is None else ph.data[..., :n_volumes]
    dwi = write_nifti(tmp_path / "dwi.nii.gz", data.astype(np.float32))
    bval, bvec = write_gradients(tmp_path / "dwi", gtab.bvals if bvals is None else bvals, gtab.bvecs.T)
    return dwi, bval, bvec, ph


def _assert_clean_error(code, err, pattern, out_dir, before):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err
    assert pattern in lines[0], lines[0]
    assert _outputs(out_dir) == before  # nothing written, not even temporaries


def test_bval_bvec_count_mismatch(tmp_path, capsys):
    dwi, bval, bvec, _ = _small_case(tmp_path)
    np.savetxt(bval, np.atleast_2d(np.zeros(61)), fmt="%g")
    before = _outputs(tmp_path)
    code, _, err = _run(["tensor", dwi, bval, bvec, "--fa", tmp_path / "fa.nii.gz"], capsys)
    _assert_clean_error(code, err, "has 61 b-values but", tmp_path, before)


def test_volume_count_mismatch(tmp_path, capsys):
    dwi, bval, bvec, _ = _small_case(tmp_path, n_volumes=40)
    before = _outputs(tmp_path)
    code, _, err = _run(["tensor", dwi, bval, bvec, "--fa", tmp_path / "fa.nii.gz"], capsys)
    _assert_clean_error(code, err, "has 40 volumes but", tmp_path, before)


def test_missing_file(tmp_path, capsys):
    dwi, bval, _, _ = _small_case(tmp_path)
    before = _outputs(tmp_path)
    code, _, err = _run(["tensor", dwi, bval, tmp_path / "none.bvec", "--fa", tmp_path / "fa.nii.gz"], capsys)
    _assert_clean_error(code, err, "bvec file not found", tmp_path, before)


def test_unreadable_image(tmp_path, capsys):
    _, bval, bvec, _ = _small_case(tmp_path)
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"this is not a nifti file")
    before = _outputs(tmp_path)
    code, _, err = _run(["tensor", bad, bval, bvec, "--fa", tmp_path / "fa.nii.gz"], capsys)
    _assert_clean_error(code, err, "cannot read DWI", tmp_path, before)


def test_3d_image_given_as_dwi(tmp_path, capsys):
    _, bval, bvec, ph = _small_case(tmp_path)
    flat = write_nifti(tmp_path / "flat.nii.gz", ph.data[..., 0].astype(np.float32))
    before = _outputs(tmp_path)
    code, _, err = _run(["mask", flat, bval, bvec, tmp_path / "m.nii.gz"], capsys)
    _assert_clean_error(code, err, "must be 4D", tmp_path, before)


def test_empty_and_mismatched_masks(tmp_path, capsys):
    dwi, bval, bvec, _ = _small_case(tmp_path)
    empty = write_nifti(tmp_path / "empty.nii.gz", np.zeros((5, 5, 3), np.uint8))
    wrong = write_nifti(tmp_path / "wrong.nii.gz", np.ones((5, 5, 2), np.uint8))
    before = _outputs(tmp_path)
    code, _, err = _run(["tensor", dwi, bval, bvec, "--mask", empty, "--fa", tmp_path / "fa.nii.gz"], capsys)
    _assert_clean_error(code, err, "is empty", tmp_path, before)
    code, _, err = _run(["tensor", dwi, bval, bvec, "--mask", wrong, "--fa", tmp_path / "fa.nii.gz"], capsys)
    _assert_clean_error(code, err, "has shape (5, 5, 2)", tmp_path, before)


def test_all_zero_b0_cannot_be_masked(tmp_path, capsys):
    dwi, bval, bvec, ph = _small_case(tmp_path)
    data = ph.data.astype(np.float32)
    data[..., :2] = 0
    write_nifti(tmp_path / "dwi.nii.gz", data)
    before = _outputs(tmp_path)
    code, _, err = _run(["mask", dwi, bval, bvec, tmp_path / "m.nii.gz"], capsys)
    _assert_clean_error(code, err, "b=0 volumes are all zero", tmp_path, before)


def test_nan_voxels_are_a_documented_status_not_a_crash(tmp_path, capsys):
    dwi, bval, bvec, ph = _small_case(tmp_path)
    data = ph.data.astype(np.float32)
    data[2, 2, 1, 10] = np.nan
    write_nifti(tmp_path / "dwi.nii.gz", data)
    code, _, err = _run(["tensor", dwi, bval, bvec, "--fa", tmp_path / "fa.nii.gz", "--status", tmp_path / "st.nii.gz"], capsys)
    assert code == 0, err
    fa = nib.load(tmp_path / "fa.nii.gz").get_fdata()
    status = nib.load(tmp_path / "st.nii.gz").get_fdata()
    assert np.isnan(fa[2, 2, 1]) and status[2, 2, 1] == 1
    assert np.isfinite(fa).sum() == fa.size - 1 and (status == 0).sum() == fa.size - 1
    levels = json.loads((tmp_path / "st.json").read_text())["Levels"]
    assert levels["1"] == "non-finite input signal"


def test_no_output_requested_and_bad_option(tmp_path, capsys):
    dwi, bval, bvec, _ = _small_case(tmp_path)
    code, _, err = _run(["tensor", dwi, bval, bvec], capsys)
    assert code == 2 and "no output requested" in err
    code, _, err = _run(["phantom", str(tmp_path / "x"), "--shape", "0,1,1"], capsys)
    assert code == 2 and err.strip() == "dwirecon phantom: error: --shape: every value must be >= 1, got 0"
    assert not (tmp_path / "x").exists()


def test_installed_entry_point_exits_non_zero(tmp_path):
    result = subprocess.run([sys.executable, "-m", "dwiflow.cli.dwirecon", "shells", str(tmp_path / "missing.bval")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == f"dwirecon shells: error: bval file not found: {tmp_path / 'missing.bval'}"


def test_collector_settings_only_in_a_process_of_its_own(phantom_dir, capsys):
    """The command's own process collects less (collect_less_in_this_process); main() called with arguments, as
    here or in a worker, leaves the interpreter's collector as it was."""
    import gc

    before = gc.get_threshold()
    code, _, _ = _run(["shells", phantom_dir["bval"]], capsys)
    assert code == 0 and gc.get_threshold() == before and gc.isenabled()
    probe = ("import gc, runpy, sys; sys.argv = ['dwirecon', 'shells', sys.argv[1]]\n"
             "try:\n    runpy.run_module('dwiflow.cli.dwirecon', run_name='__main__')\n"
             "except SystemExit as end:\n    print(end.code, gc.get_threshold())")
    result = subprocess.run([sys.executable, "-c", probe, phantom_dir["bval"]], capture_output=True, text=True)
    assert result.stdout.strip().splitlines()[-1] == "0 (20000, 20, 1000)", result.stderr


def test_numba_set_up_on_a_thread_changes_no_bit_of_a_kernel_called_at_once(tmp_path):
    """A compiled stage starts numba's set-up on a thread (registry.prepare_compiler_in_background) while it reads
    its data; a kernel called before the set-up is done waits for it. In fresh processes: CSD on a phantom called
    right after the thread starts equals CSD in a process without it, bit for bit, and the thread has ended."""
    script = """
import sys, numpy as np
from dwiflow.core.sims import acquisition_scheme, make_phantom
from dwiflow.core.response import tensor_response_zonal
gtab = acquisition_scheme("single")
phantom = make_phantom(gtab, (6, 5, 4), n_fibres=(1, 2), snr=20, seed=5)
thread = None
if sys.argv[2] == "thread":
    from dwiflow.tasks.registry import prepare_compiler_in_background
    thread = prepare_compiler_in_background()
from dwiflow.core.csd import CsdModel
shell = float(gtab.bvals.max())
response = tensor_response_zonal(np.array(phantom.evals), phantom.s0, np.array([shell]), [8])
fit = CsdModel(gtab, response, shell=shell).fit(phantom.data)
if thread is not None:
    thread.join(60)
    assert not thread.is_alive()
np.save(sys.argv[1], fit.sh)
"""
    results = {}
    for mode in ("thread", "plain"):
        out = tmp_path / f"{mode}.npy"
        done = subprocess.run([sys.executable, "-c", script, str(out), mode], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        results[mode] = np.load(out)
    assert np.isfinite(results["plain"]).all() and np.abs(results["plain"]).max() > 0
    assert np.array_equal(results["thread"], results["plain"])


def test_numba_set_up_does_not_hold_the_compiler_lock_while_a_kernel_builds_numba_s_context():
    """Regression (a msmt-csd command hung): defining a kernel on the stage's thread builds numba's CPU target
    context under that context's own lock, then takes numba's compiler lock; the set-up thread took the compiler
    lock first and then waited for the context, so each held what the other waited for. In a fresh process, this
    thread holds the context's lock as a kernel definition would while the set-up starts: the compiler lock must stay
    free for it (5 s), and the set-up must finish once the context's lock is released."""
    script = """
import time
from numba.core.compiler_lock import global_compiler_lock
from numba.core.registry import CPUTarget
from dwiflow.tasks.registry import prepare_compiler_in_background
context_lock = CPUTarget.__dict__["_toplevel_target_context"]._lock
with context_lock:
    thread = prepare_compiler_in_background()
    time.sleep(1.0)
    free = global_compiler_lock._lock.acquire(timeout=5)
    if free:
        global_compiler_lock._lock.release()
thread.join(60)
print("compiler lock free:", free, "set-up finished:", not thread.is_alive())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "compiler lock free: True set-up finished: True" in done.stdout, done.stdout + done.stderr


def test_nthreads_reaches_numba_whether_or_not_it_is_imported_yet(phantom_dir, tmp_path):
    """``--nthreads N`` in fresh processes (NUMBA_NUM_THREADS unset, every CPU available): a compiled stage (csd)
    runs its kernels on N numba threads, numba imported by the stage itself; a numpy-only stage (tensor) never
    imports numba for it; and in a process where numba is already imported the setting goes to numba directly."""
    import os

    assert main(["response", "fa", phantom_dir["dwi"], phantom_dir["bval"], phantom_dir["bvec"],
                 str(tmp_path / "wm.txt"), "--erode", "0", "-q"]) == 0
    probe = """
import os, sys
pre_import = sys.argv[1] == "numba-first"
if pre_import:
    import numba
from dwiflow.cli.dwirecon import main
code = main(sys.argv[2:])
loaded = "numba" in sys.modules
threads = __import__("numba").get_num_threads() if loaded else None
print(code, loaded, threads, os.environ.get("NUMBA_NUM_THREADS"))
"""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_NUM_THREADS"}
    csd = ["csd", phantom_dir["dwi"], phantom_dir["bval"], phantom_dir["bvec"], str(tmp_path / "wm.txt"),
           str(tmp_path / "fod.nii.gz"), "--nthreads", "1", "-q", "--force"]  # run twice
    tensor = ["tensor", phantom_dir["dwi"], phantom_dir["bval"], phantom_dir["bvec"], "--fa",
              str(tmp_path / "fa.nii.gz"), "--nthreads", "1", "-q"]

    def run(order, argv):
        done = subprocess.run([sys.executable, "-c", probe, order, *argv], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    assert run("stage-first", csd) == ["0", "True", "1", "1"]
    assert run("stage-first", tensor) == ["0", "False", "None", "1"]
    code, loaded, threads, _ = run("numba-first", csd)
    assert (code, loaded, threads) == ("0", "True", "1")


def test_phantom_refuses_a_folder_that_holds_another_dataset(phantom_dir, tmp_path, capsys):
    """`dwirecon phantom OUT_DIR` into a derivative dataset (or any non-empty folder without an earlier phantom)
    wrote the phantom into it and replaced its dataset_description.json (DatasetType derivative became raw): one line
    naming OUT_DIR, exit 2, the folder unchanged. An earlier phantom's folder is rewritten, a new one made."""
    derivative = tmp_path / "derivatives"
    derivative.mkdir()
    description = '{"Name": "x", "BIDSVersion": "1.9.0", "DatasetType": "derivative"}'
    (derivative / "dataset_description.json").write_text(description)
    (derivative / "sub-01").mkdir()
    before = sorted(p.relative_to(derivative) for p in derivative.rglob("*"))
    assert main(["phantom", str(derivative), "--shape", "4,4,2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"OUT_DIR {derivative} is not empty and holds no earlier phantom" in err, err
    assert sorted(p.relative_to(derivative) for p in derivative.rglob("*")) == before
    assert (derivative / "dataset_description.json").read_text() == description
    (tmp_path / "a_file").write_text("x")
    assert main(["phantom", str(tmp_path / "a_file"), "--shape", "4,4,2"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(["phantom", str(phantom_dir["root"]), "--shape", "12,12,4", "--seed", "2", "-q"]) == 0


def test_an_existing_output_stops_the_command_unless_force(phantom_dir, tmp_path, capsys):
    """As MRtrix3's commands without -force: an output file that exists is one line naming it and --force, exit 2,
    before anything is computed (the other output, new, is not written either); with --force it is replaced."""
    p = phantom_dir
    fa, md = tmp_path / "fa.nii.gz", tmp_path / "md.nii.gz"
    fa.write_bytes(b"an earlier result")
    code, _, err = _run(["tensor", p["dwi"], p["bval"], p["bvec"], "--fa", fa, "--md", md], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert f"output {fa} exists: give --force to overwrite it" in err
    assert fa.read_bytes() == b"an earlier result" and not md.exists() and _outputs(tmp_path) == ["fa.nii.gz"]
    code, _, err = _run(["tensor", p["dwi"], p["bval"], p["bvec"], "--fa", fa, "--md", md, "--force", "-q"], capsys)
    assert code == 0, err
    values = nib.load(fa).get_fdata()
    assert values.shape == (18, 18, 8) and 0.3 < np.median(values[values > 0]) < 1
    assert _outputs(tmp_path) == ["fa.json", "fa.nii.gz", "md.json", "md.nii.gz"]


def test_mrtrix3_single_dash_options(phantom_dir, tmp_path, capsys):
    """MRtrix3's spellings (-mask, -lmax, -nthreads, -force, -quiet) give the double-dash options' bytes; a
    misspelt one is named with the option meant, and -fslgrad is told where the gradients go."""
    p = phantom_dir
    mask = p["root"] / "derivatives/masks/sub-phantom/dwi/sub-phantom_desc-brain_mask.nii.gz"
    response = tmp_path / "wm.txt"
    assert main(["response", "fa", p["dwi"], p["bval"], p["bvec"], str(response), "--erode", "0", "-q"]) == 0
    files = [p["dwi"], p["bval"], p["bvec"], response]
    mrtrix_style, ours = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"
    mrtrix_style.write_bytes(b"")
    code, out, err = _run(["csd", *files, mrtrix_style, "-mask", mask, "-lmax", "6", "-nthreads", "1", "-force",
                           "-quiet"], capsys)
    assert code == 0 and out == "", err
    assert main([str(a) for a in ["csd", *files, ours, "--mask", mask, "--lmax=6", "--nthreads", "1", "-q"]]) == 0
    assert mrtrix_style.read_bytes() == ours.read_bytes()
    assert nib.load(ours).shape[-1] == 28  # lmax 6
    for argv, said in (([*files, tmp_path / "c.nii.gz", "-lmx", "6"],
                        "unrecognized arguments: -lmx 6 (-lmx: did you mean --lmax?)"),
                       ([p["dwi"], "-fslgrad", p["bvec"], p["bval"], response, tmp_path / "c.nii.gz"],
                        "(-fslgrad: the gradients are the positional BVAL BVEC after the DWI, b-values first")):
        with pytest.raises(SystemExit) as end:
            main(["csd", *map(str, argv)])
        assert end.value.code == 2 and said in capsys.readouterr().err.splitlines()[-1]
    # fod2fixel's -afd takes a file name; dwirecon's --afd is a switch (the file is afd.nii.gz in OUT_DIR)
    with pytest.raises(SystemExit) as end:
        main(["fixels", str(ours), str(tmp_path / "fixels"), "-afd", "afd.nii.gz"])
    said = capsys.readouterr().err.splitlines()[-1]
    assert end.value.code == 2 and said.endswith("unrecognized arguments: afd.nii.gz (--afd takes no value)"), said
    assert not (tmp_path / "c.nii.gz").exists() and not (tmp_path / "fixels").exists()
