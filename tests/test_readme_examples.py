"""The README's Python examples, run as they are written, on a phantom whose truth is known.

The DIPY-style example must recover the phantom's fibres, accept a DIPY ``GradientTable`` to the same result and
refuse a table whose frame is not said; the Pydra example must run in a user's own workflow with both local workers
and give the fibre counts of the truth.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dwiflow.core.errors import DwiflowInputError
from dwiflow.tasks.stages.phantom import write_phantom_dataset

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(heading: str) -> list[str]:
    """The ```python blocks of the README section that starts at ``heading``."""
    text = README.read_text()
    start = text.index(f"\n{heading}\n") + len(heading) + 2
    following = re.search(r"^#{1,3} ", text[start:], flags=re.M)
    section = text[start:start + following.start()] if following else text[start:]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.fixture(scope="module")
def phantom_run(tmp_path_factory) -> dict:
    """A multi-shell phantom with the README's file names (sub-01_dwi.*, sub-01_desc-brain_mask.nii.gz)."""
    root = tmp_path_factory.mktemp("readme")
    files = write_phantom_dataset(root / "bids", scheme="multi", shape=(12, 12, 8), snr=30.0, seed=1)
    for suffix in ("nii.gz", "bval", "bvec"):
        (root / f"sub-01_dwi.{suffix}").symlink_to(files["dwi"].parent / f"sub-phantom_dwi.{suffix}")
    (root / "sub-01_desc-brain_mask.nii.gz").symlink_to(files["mask"])
    truth = {name: nib.load(files[name]).get_fdata() for name in ("nfibres", "directions")}
    return {"root": root, **truth}


def test_the_readme_has_both_examples():
    assert len(python_blocks("### Models on arrays, as in DIPY")) == 1
    assert len(python_blocks("### dwiflow's stages as Pydra 1.0 tasks")) == 1


def test_dipy_style_example_recovers_the_phantom_fibres(phantom_run, monkeypatch, record):
    from dipy.core.gradients import gradient_table as dipy_gradient_table

    from dwiflow.core import gradient_table
    from dwiflow.core.peaks import find_peaks_rows
    from dwiflow.core.sphere import get_sphere

    monkeypatch.chdir(phantom_run["root"])
    namespace: dict = {}
    exec(python_blocks("### Models on arrays, as in DIPY")[0], namespace)
    fit, fod, gtab, img = namespace["fit"], namespace["fod"], namespace["gtab"], namespace["img"]
    assert fod.shape == fit.sh.shape[:3] + (get_sphere("repulsion724").vertices.shape[0],)

    single = phantom_run["nfibres"] == 1
    peaks = find_peaks_rows(fit.shm_coeff[single], npeaks=1)  # (n, 1, 3), world frame as the truth
    first = peaks[:, 0, :] / np.linalg.norm(peaks[:, 0, :], axis=-1, keepdims=True)
    truth = phantom_run["directions"][single][:, :3]
    angles = np.degrees(np.arccos(np.clip(np.abs(np.sum(first * truth, axis=-1)), 0, 1)))
    record("csd", "first peak to the true fibre, median angle in degrees (phantom, SNR 30, README example)",
           np.median(angles), "< 3", "ground truth")
    assert np.median(angles) < 3.0 and np.mean(angles < 10) > 0.95  # SNR 30, up to 20% CSF

    bvals, bvecs = np.loadtxt("sub-01_dwi.bval"), np.loadtxt("sub-01_dwi.bvec")
    from_dipy = gradient_table(dipy_gradient_table(bvals, bvecs=bvecs.T), affine=img.affine)
    assert np.allclose(from_dipy.bvecs, gtab.bvecs, atol=1e-12)
    with pytest.raises(DwiflowInputError, match="say which frame"):
        gradient_table(bvals, bvecs)


def test_pydra_example_runs_in_a_users_workflow(phantom_run, tmp_path):
    """The README's workflow as a user's script (the cf worker forks), then its fibre counts against the truth."""
    script = tmp_path / "pipeline.py"
    script.write_text(python_blocks("### dwiflow's stages as Pydra 1.0 tasks")[0])
    run = subprocess.run([sys.executable, str(script)], cwd=phantom_run["root"], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    fod_path, nufo_path = (Path(p) for p in run.stdout.split()[-2:])
    assert fod_path.name == "csd_fod.nii.gz" and nufo_path.name == "fod_metrics_nufo.nii.gz"  # by output key
    assert nib.load(fod_path).shape[-1] == 45
    nufo, n_true = nib.load(nufo_path).get_fdata(), phantom_run["nfibres"]
    agreement = [np.mean(nufo[n_true == k] == k) for k in (1, 2, 3)]
    assert agreement[0] > 0.95 and agreement[1] > 0.8 and agreement[2] > 0.8, agreement


def test_the_tasks_are_also_under_the_pydra_tasks_namespace():
    """``from pydra.tasks.dwiflow import Csd`` as for other pydra-tasks packages: the same classes, every stage."""
    import pydra.tasks.dwiflow as namespace

    from dwiflow.tasks import pydra_tasks
    from dwiflow.tasks.registry import all_stages

    pipeline = [stage for stage in all_stages() if stage.pipeline]
    assert namespace.Csd is pydra_tasks.Csd and namespace.MsmtCsd is pydra_tasks.MsmtCsd
    assert {getattr(namespace, pydra_tasks.stage_task(stage).__qualname__) for stage in pipeline} == \
        {pydra_tasks.stage_task(stage) for stage in pipeline}
    assert len(pipeline) == 19 and "Figures" in namespace.__all__ and namespace.Dki is pydra_tasks.Dki
    assert namespace.Noddi is pydra_tasks.Noddi and namespace.Ss3tCsd is pydra_tasks.Ss3tCsd
    assert namespace.Fixels is pydra_tasks.Fixels
