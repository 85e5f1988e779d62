"""Packaging: the namespace layout, the light-weight core, the version."""

import subprocess
import sys



def test_core_imports_no_heavy_or_file_dependencies():
    code = (
        "import sys, dwiflow.core.gradients, dwiflow.core.sh, dwiflow.core.sphere, dwiflow.core.tensor, "
        "dwiflow.core.mask, dwiflow.core.sims\n"
        "bad = [m for m in ('pydra', 'bids', 'nibabel', 'cvxpy') if m in sys.modules]\n"
        "print(','.join(bad))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_subpackages_live_in_their_folders():
    import dwiflow.bids_specs
    import dwiflow.core
    import dwiflow.tasks
    import dwiflow.workflows

    for module, folder in ((dwiflow.core, "core"), (dwiflow.tasks, "tasks"), (dwiflow.workflows, "workflows"),
                           (dwiflow.bids_specs, "bids_specs")):
        assert module.__file__.replace("\\", "/").endswith(f"/{folder}/__init__.py")
    assert dwiflow.__version__.count(".") == 2
