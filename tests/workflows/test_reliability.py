"""Interruptions and damaged caches: whatever stops a run, the rerun finishes with byte-identical outputs.

The kill matrix signals the BIDS App (SIGINT to its process group as Ctrl-C does, SIGTERM and SIGKILL
to the dwiflow process alone, as a scheduler or the OOM killer do) while it is inside a chosen stage
or while it publishes its outputs — held there by the ``DWIFLOW_HOLD_AT`` fault-injection point — with
the debug and the cf worker, then reruns with the other worker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from itertools import product
from pathlib import Path

import pytest

from dwiflow.cli.dwirecon import main as dwirecon

SPEC = """
name: kill
stages:
  mask: {}
  tensor: {}
  response: {method: fa, options: {number: 20, erode: 0}}
  csd: {}
  peaks: {}
"""
POINTS = ("tensor", "csd", "figures", "publish")
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)
WORKERS = ("debug", "cf")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    assert dwirecon(["phantom", str(root / "bids"), "--shape", "5,5,3", "--scheme", "multi", "--seed", "3"]) == 0
    (root / "spec.yaml").write_text(SPEC)
    reference = root / "reference"
    run = subprocess.run(_command(root, reference, root / "work_reference", "debug"), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    return {"root": root, "reference": _outputs(reference)}


def _command(root: Path, out: Path, work: Path, worker: str) -> list[str]:
    return [sys.executable, "-m", "dwiflow.cli.bidsapp", str(root / "bids"), str(out), "participant", "--recon-spec",
            str(root / "spec.yaml"), "--work-dir", str(work), "--worker", worker, "--mask-dir",
            str(root / "bids" / "derivatives" / "masks")]


def _outputs(out: Path) -> dict[str, bytes]:
    """Every file of the subject's derivatives and figures (not the HTML report, which records times)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "sub-phantom").rglob("*")) if p.is_file()}


def _processes_mentioning(token: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if token in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _wait_gone(token: str, seconds: float = 10.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := _processes_mentioning(token)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def _temporaries(*folders: Path) -> list[Path]:
    found = []
    for folder in folders:
        found += [p for p in folder.rglob("*") if ".partial" in p.name or ".tmp" in p.name]
    return found


# The test run takes 12 of the 24 combinations, chosen so that every signal meets every point, and so does every
# worker (the whole matrix does not fit the suite's time limit on 2 cores); DWIFLOW_FULL_KILL_MATRIX=1 runs all 24.
POINTS_OF = {("debug", signal.SIGINT): ("tensor", "figures"), ("debug", signal.SIGTERM): ("csd", "publish"),
             ("debug", signal.SIGKILL): ("tensor", "publish"), ("cf", signal.SIGINT): ("csd", "publish"),
             ("cf", signal.SIGTERM): ("tensor", "figures"), ("cf", signal.SIGKILL): ("csd", "figures")}
if os.environ.get("DWIFLOW_FULL_KILL_MATRIX") == "1":
    CASES = list(product(SIGNALS, WORKERS, POINTS))
else:
    CASES = [(sig, worker, point) for sig, worker in product(SIGNALS, WORKERS) for point in POINTS_OF[(worker, sig)]]
assert {(s, p) for s, _, p in CASES} == set(product(SIGNALS, POINTS))
assert {(w, p) for _, w, p in CASES} == set(product(WORKERS, POINTS))


def _interrupt_and_resume(root: Path, folder: Path, sig: signal.Signals, worker: str, point: str) -> dict:
    """Run held at ``point``, signal it, rerun with the other worker; returns what the assertions look at."""
    out, work, hold = folder / "out", folder / "work", folder / "hold"
    folder.mkdir(parents=True)
    env = dict(os.environ, DWIFLOW_HOLD_AT=point, DWIFLOW_HOLD_FILE=str(hold))
    proc = subprocess.Popen(_command(root, out, work, worker), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 240
    while not hold.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    case = {"held": hold.exists()}
    if not case["held"]:
        proc.kill()
        case["log"] = proc.communicate(timeout=60)[0].decode()[-2000:]
        return case
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)  # Ctrl-C reaches the whole foreground process group
    else:
        os.kill(proc.pid, sig)  # a scheduler's SIGTERM or the OOM killer's SIGKILL reach dwiflow alone
    log = proc.communicate(timeout=120)[0].decode()
    case.update(returncode=proc.returncode, log=log, orphans=_wait_gone(str(out)),
                temporaries_after_signal=_temporaries(out))
    other = "cf" if worker == "debug" else "debug"
    code, rerun_log = _run_or_dump(_command(root, out, work, other), work)
    case.update(rerun_code=code, rerun_log=rerun_log, outputs=_outputs(out),
                temporaries=_temporaries(out), orphans_after_rerun=_wait_gone(str(out)))
    return case


def _run_or_dump(command: list[str], work: Path, timeout: float = 300) -> tuple[int | str, str]:
    """Run a command; if it hangs, its Python stacks (faulthandler, on SIGABRT), the process tree and the work
    directory's lock files are what the failing assertion shows."""
    env = dict(os.environ, PYTHONFAULTHANDLER="1")
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output = proc.communicate(timeout=timeout)[0]
        return proc.returncode, output[-2000:]
    except subprocess.TimeoutExpired:
        tree = subprocess.run(["ps", "-eo", "pid,ppid,stat,etime,args", "--forest"], capture_output=True,
                              text=True).stdout
        locks = [f"{p} ({p.stat().st_size} bytes)" for p in work.rglob("*.lock")]
        proc.send_signal(signal.SIGABRT)
        stacks = proc.communicate()[0]
        return "timeout", f"hung {timeout} s\n--- locks\n" + "\n".join(locks) + f"\n--- ps\n{tree}\n--- out\n{stacks}"


@pytest.fixture(scope="module")
def kill_matrix(small, tmp_path_factory):
    """Every case of the matrix, three at a time (each is a few processes that mostly wait or import)."""
    from concurrent.futures import ThreadPoolExecutor

    base = tmp_path_factory.mktemp("matrix")
    with ThreadPoolExecutor(3) as pool:
        futures = {case: pool.submit(_interrupt_and_resume, small["root"], base / f"{case[0].name}-{case[1]}-{case[2]}",
                                     *case) for case in CASES}
        results = {}
        for case, future in futures.items():
            try:
                results[case] = future.result()
            except Exception as exc:  # one case's failure is that case's, not the matrix's
                results[case] = {"held": False, "log": f"{type(exc).__name__}: {exc}"}
        return results


@pytest.mark.parametrize("sig, worker, point", CASES, ids=[f"{s.name}-{w}-{p}" for s, w, p in CASES])
def test_interrupted_run_resumes_with_identical_outputs(small, kill_matrix, sig, worker, point):
    case = kill_matrix[(sig, worker, point)]
    assert case["held"], case["log"]
    expected = -signal.SIGKILL if sig == signal.SIGKILL else 128 + sig
    assert case["returncode"] == expected, case["log"]
    assert case["orphans"] == []  # no worker outlives the dwiflow process
    if sig != signal.SIGKILL:
        assert "interrupted by" in case["log"] and case["temporaries_after_signal"] == []  # nothing half-published
        assert "Traceback" not in case["log"], case["log"][-3000:]  # one line, wherever the signal landed
    assert case["rerun_code"] == 0, case["rerun_log"]  # the rerun uses the other worker
    assert case["outputs"] == small["reference"]
    assert case["temporaries"] == [] and case["orphans_after_rerun"] == []


INTERRUPTED_INSIDE_A_TASK = """
import asyncio, gc, os, signal, sys
from dwiflow.workflows.workers import install_signal_handlers

install_signal_handlers()


async def job():  # as one of Pydra's jobs: a task of its own, in the middle of a step when the signal lands
    os.kill(os.getpid(), signal.SIG{name})
    sum(range(10_000))


async def waiting_job():  # as Pydra's jobs that wait on others: suspended when the run is abandoned
    try:
        await asyncio.sleep(10)
    finally:
        asyncio.get_event_loop().call_soon(print)  # Pydra cancels its futures here: the loop is closed by then


async def workflow():
    asyncio.ensure_future(waiting_job())
    await asyncio.sleep(0)  # the waiting job starts and suspends
    asyncio.ensure_future(job())
    await asyncio.sleep(0.5)


loop = asyncio.new_event_loop()
try:
    loop.run_until_complete(workflow())
except KeyboardInterrupt as exc:
    print(f"interrupted by {{exc}}", file=sys.stderr)
loop.close()
gc.collect()
"""


@pytest.mark.parametrize("name", ["INT", "TERM"])
def test_a_signal_inside_an_asyncio_task_prints_no_traceback(name):
    """The kill matrix's signal lands in select() or inside a task's step, by timing; inside a step, asyncio kept
    the KeyboardInterrupt in the task and printed its traceback when the task was freed (a CI failure). Jobs
    suspended at that moment are closed after their loop: their failing clean-up is not printed either."""
    run = subprocess.run([sys.executable, "-c", INTERRUPTED_INSIDE_A_TASK.format(name=name)], capture_output=True,
                         text=True, timeout=60)
    assert run.stderr == f"interrupted by SIG{name}\n"


IDLE_POOL_WORKER_SIGNALLED = """
import os, signal, time
from dwiflow.workflows.workers import LocalProcessWorker, install_signal_handlers
install_signal_handlers()  # dwiflow's process: its handlers are what a forked worker inherits
worker = LocalProcessWorker(n_procs=1)
assert worker.pool.submit(os.getpid).result() != os.getpid()  # the worker process exists and is idle
process = next(iter(worker.pool._processes.values()))
os.kill(process.pid, signal.SIG{name})  # as a Ctrl-C or a scheduler's SIGTERM to the whole process group
time.sleep(1.0)
print("alive" if process.is_alive() else "dead")
worker.kill()
"""


@pytest.mark.parametrize("name", ["INT", "TERM"])
def test_an_idle_pool_worker_ignores_the_signal_that_dwiflow_handles(name):
    """A Ctrl-C reaches every process of the group, also the cf worker's idle processes; with the handlers they
    inherit from dwiflow they raised KeyboardInterrupt and printed its traceback before dwiflow killed them (the
    kill matrix, by timing). They ignore SIGINT and SIGTERM: dwiflow itself kills them."""
    run = subprocess.run([sys.executable, "-c", IDLE_POOL_WORKER_SIGNALLED.format(name=name)], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0 and run.stdout == "alive\n" and run.stderr == "", run.stderr


# ------------------------------------------------------------------------------------------------ damaged cache, stale input
def test_damaged_cache_results_are_recomputed(small, tmp_path):
    """Garbage, truncated and interrupted-looking results, and a workflow result replaced by text: all are cache
    misses; the rerun recomputes them and the outputs are the same."""
    import cloudpickle
    from pydra.engine.result import Result

    root = small["root"]
    out, work = tmp_path / "out", tmp_path / "work"
    assert subprocess.run(_command(root, out, work, "debug"), capture_output=True, timeout=300).returncode == 0
    results = sorted((work / "cache").glob("*/_result.pklz"))
    stages = [p for p in results if p.parent.name.startswith("python-")]
    workflows = [p for p in results if p.parent.name.startswith("workflow-")]
    assert len(stages) >= 4 and workflows
    stages[0].write_text("garbage, not a pickle")
    stages[1].write_bytes(stages[1].read_bytes()[:20])  # truncated
    with open(stages[2], "rb") as handle:
        result = cloudpickle.load(handle)
    assert isinstance(result, Result)
    result.outputs, result.errored = None, False  # what an interrupted task left before this fix
    with open(stages[2], "wb") as handle:
        cloudpickle.dump(result, handle)
    workflows[0].write_text("12345 text in place of a workflow's result")
    rerun = subprocess.run(_command(root, out, work, "cf"), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert "unusable (failed, interrupted or damaged): they are recomputed" in rerun.stdout
    assert _outputs(out) == small["reference"]


def test_lock_files_left_by_killed_processes_do_not_hang_the_rerun(small, tmp_path):
    """A process killed inside one of Pydra's file locks leaves the lock file; killed just after creating it, the
    file is empty and no lock library can tell it is abandoned. The next run (which owns the work directory)
    removes such leftovers instead of waiting forever on them."""
    root = small["root"]
    out, work = tmp_path / "out", tmp_path / "work"
    assert subprocess.run(_command(root, out, work, "debug"), capture_output=True, timeout=300).returncode == 0
    hashes = sorted(p for p in (work / "hashes").iterdir() if p.is_file())
    assert hashes  # the file hashes are cached in the work directory, not in the user's shared cache
    left = [p.with_name(p.name + ".lock") for p in hashes]
    stages = sorted((work / "cache").glob("python-*/_result.pklz"))
    stages[-1].unlink()  # one stage is recomputed, so its result is saved under its "_save.lock" again
    task = stages[-1].parent
    left += [task.with_name(task.name + "_save.lock"), task.with_suffix(".lock")]
    for lock in left:
        lock.write_text("")
    code, log = _run_or_dump(_command(root, out, work, "cf"), work, timeout=120)
    assert code == 0, log[-6000:]
    assert _outputs(out) == small["reference"]
    assert [p for p in left if p.exists()] == []


def test_a_second_process_on_the_same_work_dir_is_refused(small, tmp_path, capsys):
    import fcntl

    bids = _dataset(small["root"], tmp_path)
    out = tmp_path / "out"
    work = tmp_path / "work"
    work.mkdir()
    with open(work / ".dwiflow-run.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the other dwiflow process holds it
        held.write("4242\n")
        held.flush()
        assert _app(bids, out, "--participant-label", "phantom") == 2
    error = capsys.readouterr().err
    assert f"--work-dir {work} is in use by another dwiflow process (pid 4242)" in error
    assert not list(out.glob("sub-*")) and not (work / "cache").exists()


def test_changed_input_with_restored_mtime_is_recomputed(small, tmp_path):
    """cp -p / rsync -a / tar x restore the mtime of a changed file: the rerun still sees the new content."""
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(small["root"] / "bids", root / "bids")
    shutil.copyfile(small["root"] / "spec.yaml", root / "spec.yaml")
    out, work = tmp_path / "out", tmp_path / "work"
    assert subprocess.run(_command(root, out, work, "debug"), capture_output=True, timeout=300).returncode == 0
    first = _outputs(out)
    dwi = root / "bids" / "sub-phantom" / "dwi" / "sub-phantom_dwi.nii.gz"
    stat = dwi.stat()
    other = tmp_path / "other"
    assert dwirecon(["phantom", str(other), "--shape", "5,5,3", "--scheme", "multi", "--seed", "4"]) == 0
    shutil.copyfile(other / "sub-phantom" / "dwi" / "sub-phantom_dwi.nii.gz", dwi)
    os.utime(dwi, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as touch -r, cp -p, rsync -a, tar x do
    assert dwi.stat().st_mtime_ns == stat.st_mtime_ns
    assert subprocess.run(_command(root, out, work, "debug"), capture_output=True, timeout=300).returncode == 0
    fresh = tmp_path / "fresh"
    assert subprocess.run(_command(root, fresh, tmp_path / "work_fresh", "debug"), capture_output=True,
                          timeout=300).returncode == 0
    assert _outputs(out) == _outputs(fresh) != first


def test_one_and_two_threads_give_identical_files(small, tmp_path):
    """Per-voxel results do not depend on how BLAS or numba split the work (fixed chunks, BLAS on one thread)."""
    root = small["root"]
    runs = {}
    for threads in (1, 2):
        out = tmp_path / f"out{threads}"
        command = _command(root, out, tmp_path / f"work{threads}", "cf") + ["--omp-nthreads", str(threads)]
        assert subprocess.run(command, capture_output=True, timeout=300).returncode == 0
        runs[threads] = _outputs(out)
    assert runs[1] == runs[2] == small["reference"]


# ------------------------------------------------------------------------------------------------ pre-flight
def _dataset(root: Path, tmp_path: Path) -> Path:
    import shutil

    bids = tmp_path / "bids"
    shutil.copytree(root / "bids", bids)
    shutil.copyfile(root / "spec.yaml", tmp_path / "spec.yaml")
    src = bids / "sub-phantom" / "dwi" / "sub-phantom_dwi"
    for label in ("two", "three"):  # more runs to break one at a time
        dst = bids / f"sub-{label}" / "dwi"
        dst.mkdir(parents=True)
        for ext in (".nii.gz", ".bval", ".bvec", ".json"):
            shutil.copyfile(f"{src}{ext}", dst / f"sub-{label}_dwi{ext}")
    return bids


def _app(bids: Path, out: Path, *extra: str) -> int:
    from dwiflow.cli.bidsapp import main

    spec = bids.parent / "spec.yaml"  # the small chain of the kill matrix (no erosion: tiny masks)
    return main([str(bids), str(out), "participant", "--work-dir", str(out.parent / "work"), "--worker", "debug",
                 *(["--recon-spec", str(spec)] if spec.is_file() else []), *extra])


@pytest.mark.parametrize("breakage, message", [
    ("truncated", "sub-two: DWI"),
    ("crc", "is corrupt: its gzip stream cannot be read whole"),
    ("3d", "must be 4D (x, y, z, volumes), but it is 3D"),
    ("commas", "separates values with commas"),
    ("zeros", "holds no signal (every value is zero or not finite)"),
    ("units", "these look like ms/µm²"),
    ("sidecar", "cannot read the JSON sidecar"),
])
def test_bad_data_is_found_before_anything_runs(small, tmp_path, capsys, breakage, message):
    import gzip

    import nibabel as nib
    import numpy as np

    bids = _dataset(small["root"], tmp_path)
    base = bids / "sub-two" / "dwi" / "sub-two_dwi"
    dwi = Path(f"{base}.nii.gz")
    if breakage == "truncated":
        dwi.write_bytes(dwi.read_bytes()[:4000])
    elif breakage == "crc":
        raw = bytearray(dwi.read_bytes())
        raw[-8] ^= 0xFF
        dwi.write_bytes(bytes(raw))
    elif breakage == "3d":
        img = nib.load(dwi)
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[..., 0], img.affine), dwi)
    elif breakage == "commas":
        Path(f"{base}.bval").write_text(Path(f"{base}.bval").read_text().strip().replace(" ", ",") + "\n")
    elif breakage == "zeros":
        img = nib.load(dwi)
        nib.save(nib.Nifti1Image(np.zeros(img.shape, np.float32), img.affine), dwi)
    elif breakage == "units":
        values = np.loadtxt(f"{base}.bval") / 1000
        np.savetxt(f"{base}.bval", values[None], fmt="%g")
    elif breakage == "sidecar":
        Path(f"{base}.json").write_text('{"EchoTime": 0.08,')
    out = tmp_path / "out"
    code = _app(bids, out)
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    if breakage != "sidecar":  # a run's problem (not the dataset's): the line says how to go on with the others
        assert err.strip().endswith("(--skip-invalid-runs analyses the other 2 runs)"), err
    assert not out.exists() and not (tmp_path / "work").exists()
    if breakage not in ("sidecar",):  # a dataset pybids can index: the other runs can still go on, on request
        code = _app(bids, out, "--skip-invalid-runs")
        err = capsys.readouterr().err
        assert code == 1 and "run sub-two was skipped" in err
        assert (out / "sub-phantom" / "dwi").is_dir() and (out / "sub-three" / "dwi").is_dir()
        assert not (out / "sub-two").exists()


def test_each_bad_run_gets_its_line(small, tmp_path, capsys):
    import numpy as np

    bids = _dataset(small["root"], tmp_path)
    for label in ("two", "three"):
        base = bids / f"sub-{label}" / "dwi" / f"sub-{label}_dwi"
        np.savetxt(f"{base}.bval", np.zeros((1, 5)))
    code = _app(bids, tmp_path / "out")
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 2 and {line.split(":")[2].strip() for line in lines} == {"sub-two", "sub-three"}


def test_a_mask_of_another_grid_and_a_recon_spec_the_data_cannot_support(small, tmp_path, capsys):
    import nibabel as nib
    import numpy as np

    bids = _dataset(small["root"], tmp_path)
    masks = tmp_path / "masks"
    (masks / "sub-two" / "dwi").mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.ones((3, 3, 3), np.uint8), np.eye(4)), masks / "sub-two" / "dwi" /
             "sub-two_desc-brain_mask.nii.gz")
    code = _app(bids, tmp_path / "out", "--mask-dir", str(masks), "--participant-label", "two")
    err = capsys.readouterr().err
    assert code == 2 and "sub-two: mask" in err and "has shape (3, 3, 3)" in err
    single = tmp_path / "single"
    assert dwirecon(["phantom", str(single), "--shape", "4,4,2", "--scheme", "single", "--seed", "1"]) == 0
    code = _app(single, tmp_path / "out", "--recon-spec", "smt")
    err = capsys.readouterr().err
    assert code == 2 and "sub-phantom: stage smt: SMT needs at least two diffusion-weighted shells" in err
    code = _app(bids, tmp_path / "out", "--recon-spec", "mapmri", "--participant-label", "phantom")
    err = capsys.readouterr().err
    assert code == 2 and "give stages.mapmri.big_delta and stages.mapmri.small_delta" in err  # the spec's keys, no flags
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, message", [
    (["--nprocs", "0"], "argument --nprocs: expected a positive integer, got 0"),
    (["--nprocs", "-3"], "argument --nprocs: expected a positive integer, got -3"),
    (["--omp-nthreads", "-1"], "argument --omp-nthreads: expected a positive integer, got -1"),
])
def test_numbers_on_the_command_line_are_range_checked(small, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exc:
        _app(small["root"] / "bids", tmp_path / "out", *extra)
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_paths_and_filters_are_checked_first(small, tmp_path, capsys, monkeypatch):
    import json

    bids = small["root"] / "bids"
    out = tmp_path / "out"
    from dwiflow.cli.bidsapp import main

    def run(*extra: str, output: Path = out, work: Path | None = None) -> tuple[int, str]:
        code = main([str(bids), str(output), "participant", "--work-dir", str(work or tmp_path / "work"), *extra])
        return code, capsys.readouterr().err

    code, err = run(work=out)
    assert code == 2 and "must not be OUTPUT_DIR" in err
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    if os.access(readonly, os.W_OK):  # root ignores permission bits: use a directory the kernel refuses instead
        readonly = Path("/proc/sys")
    assert not os.access(readonly, os.W_OK), "no read-only directory to test with"
    code, err = run(output=readonly / "dwiflow_out")
    assert code == 2 and f"OUTPUT_DIR {readonly / 'dwiflow_out'}: {readonly} is not writable" in err
    for content, message in ((["acq-x"], "must hold a JSON object"), ({"dwi": "acq-x"}, "the 'dwi' entry must be"),
                             ({"dwi": {"colour": "red"}}, "BIDS filter 'colour': not an entity of"),
                             ({"dwi": {"extension": ".json"}}, "BIDS filter 'extension': dwiflow selects DWI images"),
                             ({"dwi": {"subject": {"a": 1}}}, "expected a label, a number, null")):
        filt = tmp_path / "filter.json"
        filt.write_text(json.dumps(content))
        code, err = run("--bids-filter-file", str(filt))
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    import dwiflow.workflows.cache as cache

    monkeypatch.setattr(cache, "disk_free", lambda path: 1024)
    code, err = run()
    assert code == 2 and "MB free, the runs need about" in err
    assert not out.exists() and not (tmp_path / "work").exists()


def test_a_full_disk_while_publishing_leaves_no_partial_file(small, tmp_path, capsys, monkeypatch):
    """ENOSPC while copying the third derivative into OUTPUT_DIR: the run fails with that error, nothing of it is
    published, no temporary copy is left; the next run (disk free again) publishes everything."""
    import errno
    import shutil

    bids = _dataset(small["root"], tmp_path)
    original, copies = shutil.copyfile, []

    def copyfile(src, dst, *args, **kwargs):
        if Path(dst).name.startswith(".") and Path(dst).name.endswith(".partial"):
            copies.append(dst)
            if len(copies) == 3:
                Path(dst).write_bytes(b"")  # the copy had begun when the disk filled up
                raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return original(src, dst, *args, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", copyfile)  # publication copies through tasks.io.copy_path
    out = tmp_path / "out"
    masks = str(bids / "derivatives" / "masks")
    code = _app(bids, out, "--participant-label", "phantom", "--mask-dir", masks)
    err = capsys.readouterr().err
    assert code == 1 and "No space left on device" in err
    assert _temporaries(out) == [] and not list((out / "sub-phantom").rglob("*.nii.gz"))
    monkeypatch.setattr(shutil, "copyfile", original)
    assert _app(bids, out, "--participant-label", "phantom", "--mask-dir", masks) == 0
    assert _outputs(out) == small["reference"]


def test_a_published_folder_replaces_the_earlier_one_whole(tmp_path, monkeypatch):
    """A staged folder (a fixel directory) is published under a temporary name and renamed; published again it
    replaces the earlier folder whole (no file of the first run left in it), and a failure before the renames
    publishes nothing and leaves no temporary."""
    import dwiflow.workflows.recon as recon

    def staged(name: str, files: dict[str, str]) -> Path:
        folder = tmp_path / name
        (folder / "sub-01_model-csd_fixels").mkdir(parents=True)
        for file, text in files.items():
            (folder / "sub-01_model-csd_fixels" / file).write_text(text)
        (folder / "sub-01_desc-brain_mask.nii.gz").write_text(name)
        return folder

    target = tmp_path / "out"
    recon.publish(staged("first", {"index.nii.gz": "1", "afd.nii.gz": "1"}), target)
    published = recon.publish(staged("second", {"index.nii.gz": "2"}), target)
    fixels = target / "sub-01_model-csd_fixels"
    assert sorted(p.name for p in published) == ["sub-01_desc-brain_mask.nii.gz", "sub-01_model-csd_fixels"]
    assert sorted(p.name for p in fixels.iterdir()) == ["index.nii.gz"] and (fixels / "index.nii.gz").read_text() == "2"
    assert sorted(p.name for p in target.iterdir()) == ["sub-01_desc-brain_mask.nii.gz", "sub-01_model-csd_fixels"]

    def interrupted(point: str) -> None:
        raise KeyboardInterrupt(point)

    monkeypatch.setattr("dwiflow.tasks.io.hold_point", interrupted)
    with pytest.raises(KeyboardInterrupt):
        recon.publish(staged("third", {"index.nii.gz": "3"}), target)
    assert (fixels / "index.nii.gz").read_text() == "2"
    assert (target / "sub-01_desc-brain_mask.nii.gz").read_text() == "second"
    assert sorted(p.name for p in target.iterdir()) == ["sub-01_desc-brain_mask.nii.gz", "sub-01_model-csd_fixels"]
