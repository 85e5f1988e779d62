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


def test_readme_stage_table_is_generated_from_the_registry():
    """README.md's stage-options table equals what the registry generates (tools/update_readme.py rewrites it)."""
    import importlib.util
    from pathlib import Path

    from dwiflow.tasks.registry import all_stages

    tool = Path(__file__).resolve().parents[1] / "tools" / "update_readme.py"
    spec = importlib.util.spec_from_file_location("update_readme", tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = module.README.read_text()
    assert module.updated(text) == text, "README.md is stale: run .venv/bin/python tools/update_readme.py"
    for stage in all_stages():  # every stage and every option appears
        assert f"`dwirecon {stage.command}" in text
        for field, info, _ in stage.options.option_fields():
            assert f"`{field.name}`" in text or f"`--{field.name.replace('_', '-')}`" in text
