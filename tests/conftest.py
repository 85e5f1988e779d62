"""Shared fixtures: the real BIDS data in ../shared, MRtrix3 availability, small images."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BIDS_REAL = Path(os.environ.get("DWIFLOW_BIDS_REAL", REPO.parent / "shared" / "data" / "bids_real"))
IN_CI = os.environ.get("CI", "").lower() == "true"

REAL_RUNS = {
    "sub-01_acq-b1kb2k": "sub-01/dwi/sub-01_acq-b1kb2k_dwi",
    "sub-01_acq-b6kmax": "sub-01/dwi/sub-01_acq-b6kmax_dwi",
    "sub-02_dir-AP": "sub-02/dwi/sub-02_dir-AP_dwi",
    "sub-02_dir-PA": "sub-02/dwi/sub-02_dir-PA_dwi",
    "sub-03": "sub-03/dwi/sub-03_dwi",
}


# files whose tests mostly wait (image build downloads, cluster jobs, signalled subprocesses): run first, so that
# with pytest-xdist's --dist loadfile they overlap with the compute-bound files instead of forming a tail
RUN_FIRST = ("test_container.py", "test_bids_real.py", "test_reliability.py")


# Numbers the tests assert, recorded for the documentation's validation page (docs/generate.py reads them)
VALIDATION_DIR = Path(os.environ.get("DWIFLOW_VALIDATION_DIR", REPO / "build" / "validation"))


def pytest_sessionstart(session):
    if not hasattr(session.config, "workerinput"):  # the controller (or a run without xdist): a fresh record
        shutil.rmtree(VALIDATION_DIR, ignore_errors=True)


@pytest.fixture
def record(request):
    """``record(model, quantity, value, limit, reference)``: write a number this test asserts (and the limit it
    asserts) into the validation record, one JSON line per number, for the documentation."""
    import json

    def write(model: str, quantity: str, value: float, limit: str, reference: str) -> None:
        VALIDATION_DIR.mkdir(parents=True, exist_ok=True)
        line = {"model": model, "quantity": quantity, "value": float(value), "limit": limit, "reference": reference,
                "test": request.node.nodeid}
        with open(VALIDATION_DIR / f"{os.environ.get('PYTEST_XDIST_WORKER', 'main')}.jsonl", "a") as handle:
            handle.write(json.dumps(line) + "\n")

    return write


@pytest.fixture(autouse=True, scope="session")
def _cache_home(tmp_path_factory):
    """The BIDS App's default work directory lies under $XDG_CACHE_HOME: keep the tests' runs out of ~/.cache."""
    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))
    yield
    if previous is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = previous


def pytest_collection_modifyitems(config, items):
    order = {name: i for i, name in enumerate(RUN_FIRST)}
    items.sort(key=lambda item: order.get(Path(str(item.fspath)).name, len(RUN_FIRST)))


def real_run(name: str) -> dict[str, Path]:
    """Paths of one run of ../shared/data/bids_real (the data must be there)."""
    if not BIDS_REAL.is_dir():
        pytest.fail(f"real test data not found at {BIDS_REAL} (set DWIFLOW_BIDS_REAL)")
    base = BIDS_REAL / REAL_RUNS[name]
    paths = {k: Path(f"{base}.{ext}") for k, ext in (("dwi", "nii.gz"), ("bval", "bval"), ("bvec", "bvec"))}
    if name.startswith("sub-01"):
        acq = name.split("acq-")[1]
        paths["mask"] = BIDS_REAL / f"derivatives/masks/sub-01/dwi/sub-01_acq-{acq}_desc-brain_mask.nii.gz"
    return paths


@pytest.fixture(scope="session")
def mrtrix() -> dict[str, str]:
    """Paths of MRtrix3 commands; required under CI=true, skipped elsewhere when absent."""
    tools = {name: shutil.which(name) for name in ("dwi2tensor", "tensor2metric", "mrconvert", "amp2response")}
    if not tools["dwi2tensor"] or not tools["tensor2metric"]:
        if IN_CI:
            pytest.fail("MRtrix3 is required under CI=true (apt-get install -y mrtrix3)")
        pytest.skip("MRtrix3 not installed (apt-get install -y mrtrix3)")
    return tools  # type: ignore[return-value]


def run_mrtrix(*args: str | os.PathLike) -> None:
    subprocess.run([str(a) for a in args] + ["-quiet", "-force"], check=True)


def fibonacci_sphere(n: int) -> np.ndarray:
    """n nearly uniform unit vectors (a Fibonacci lattice)."""
    k = np.arange(n) + 0.5
    z = 1 - 2 * k / n
    phi = np.pi * (1 + 5 ** 0.5) * k
    r = np.sqrt(1 - z * z)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), str(path))
    return path


def write_gradients(base: Path, bvals: np.ndarray, bvecs_3xn: np.ndarray) -> tuple[Path, Path]:
    bval = base.with_suffix(".bval")
    bvec = base.with_suffix(".bvec")
    np.savetxt(bval, np.atleast_2d(bvals), fmt="%g")
    np.savetxt(bvec, bvecs_3xn, fmt="%.8f")
    return bval, bvec


def write_dwi_run(folder: Path, gtab, data: np.ndarray, affine: np.ndarray) -> tuple[Path, Path, Path]:
    """``folder/dwi.nii.gz`` (float32) with its FSL gradients (``dwi.bval``, ``dwi.bvec`` in image axes)."""
    from dwiflow.core.gradients import world_to_fsl_bvecs

    dwi = write_nifti(folder / "dwi.nii.gz", np.asarray(data, np.float32), affine)
    bval, bvec = write_gradients(folder / "dwi", gtab.bvals, world_to_fsl_bvecs(gtab.bvecs, affine).T)
    return dwi, bval, bvec


@pytest.fixture(scope="session")
def sub01_b1kb2k_brain():
    """(gradient table in world frame, signals of the shipped brain mask's voxels) of sub-01 acq-b1kb2k."""
    from dwiflow.tasks.io import load_dwi, load_mask

    paths = real_run("sub-01_acq-b1kb2k")
    run = load_dwi(paths["dwi"], paths["bval"], paths["bvec"])
    mask = load_mask(paths["mask"], run.data.shape[:3], run.affine)
    return run.gtab, np.asarray(run.data[mask], dtype=float)


CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


@pytest.fixture(scope="session")
def sub01_csd_fod(tmp_path_factory) -> tuple[Path, Path]:
    """sub-01 b1kb2k's CSD FOD (tournier response, b=2000) and its brain mask, as dwiflow's stages write them."""
    from dwiflow.tasks.registry import get as stage

    folder = tmp_path_factory.mktemp("sub01_fod")
    paths = real_run("sub-01_acq-b1kb2k")
    common = {"dwi": paths["dwi"], "bval": paths["bval"], "bvec": paths["bvec"], "mask": paths["mask"]}
    stage("response", "tournier")({"response": folder / "response.txt"}, **common)
    stage("csd")({"fod": folder / "fod.nii.gz"}, response=folder / "response.txt", **common)
    return folder / "fod.nii.gz", paths["mask"]


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of headless Chromium; required under CI=true, skipped elsewhere when absent."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        if IN_CI:
            pytest.fail("Chromium is required under CI=true (apt-get install -y chromium)")
        pytest.skip("Chromium not installed (apt-get install -y chromium)")
    return path


def browser_images(chromium: str, page: Path, screenshot: Path | None = None) -> list[dict]:
    """Every <img> of ``page`` as the browser loaded it: src, naturalWidth, naturalHeight.

    A copy of the page with a probe script appended is opened beside it (so relative image paths
    resolve the same way); the script writes the images' natural sizes into the DOM, which Chromium
    dumps once the page has loaded. ``screenshot``: also save a full-page PNG of the real page.
    """
    import html
    import json
    import re
    import tempfile

    probe = page.with_name(f".probe_{page.name}")
    script = ("<script>window.addEventListener('load', () => { const found = [...document.images].map(i => "
              "({src: i.getAttribute('src'), width: i.naturalWidth, height: i.naturalHeight})); "
              "const pre = document.createElement('pre'); pre.id = 'dwiflow-probe'; "
              "pre.textContent = JSON.stringify(found); document.body.appendChild(pre); });</script>")
    probe.write_text(page.read_text().replace("</body>", script + "</body>"))
    try:
        with tempfile.TemporaryDirectory() as profile:
            dom = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=20000",
                                  "--dump-dom", probe.resolve().as_uri()], capture_output=True, text=True, timeout=180).stdout
        if screenshot is not None:
            with tempfile.TemporaryDirectory() as profile:
                subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1400,2400",
                                "--hide-scrollbars", f"--screenshot={screenshot}", page.resolve().as_uri()],
                               capture_output=True, timeout=180)
    finally:
        probe.unlink(missing_ok=True)
    match = re.search(r'<pre id="dwiflow-probe">(.*?)</pre>', dom, re.S)
    assert match, f"the probe did not run in Chromium; DOM dump starts: {dom[:300]!r}"
    return json.loads(html.unescape(match.group(1)))
