"""Per-stage cluster resources: recon-spec validation and the sbatch arguments each stage's job gets."""

import pytest

from dwiflow.tasks.recon_spec import ReconSpecError, load_recon_spec, validate_recon_spec
from dwiflow.workflows.cluster import stage_sbatch_arguments


def test_builtin_csd_spec_gives_csd_more_than_the_other_stages():
    resources = load_recon_spec("csd").resources
    csd = stage_sbatch_arguments(resources, "csd")
    mask = stage_sbatch_arguments(resources, "mask")
    assert csd[:2] == ["--cpus-per-task=2", "--mem=4096M"] and mask[:2] == ["--cpus-per-task=1", "--mem=2048M"]
    assert "OMP_NUM_THREADS=2" in csd[-1] and "NUMBA_NUM_THREADS=2" in csd[-1] and "OMP_NUM_THREADS=1" in mask[-1]
    # --omp-nthreads wins over the stage's CPUs inside every job
    assert "OMP_NUM_THREADS=3" in stage_sbatch_arguments(resources, "csd", omp_nthreads=3)[-1]
    extra = stage_sbatch_arguments({"csd": {"cpus": 4, "time": "02:00:00", "sbatch_args": "--partition=long"}}, "csd")
    assert extra == ["--cpus-per-task=4", "--time=02:00:00", extra[2], "--partition=long"]


@pytest.mark.parametrize("resources, message", [
    ({"dti": {"cpus": 2}}, "resources.dti: not a stage"),
    ({"csd": {"cpus": 0}}, "resources.csd.cpus: must be a positive integer"),
    ({"csd": {"gpus": 1}}, "resources.csd.gpus: unknown key"),
    ({"csd": {"mem_gb": -1}}, "resources.csd.mem_gb: must be a positive number"),
    ([1, 2], "resources: must be a mapping"),
])
def test_impossible_resources_are_named(resources, message):
    spec = {"stages": {"mask": {}, "tensor": {}, "response": {}, "csd": {}}, "resources": resources}
    with pytest.raises(ReconSpecError) as raised:
        validate_recon_spec(spec, "my.yaml")
    assert message in str(raised.value) and "my.yaml" in str(raised.value)
