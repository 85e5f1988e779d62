"""Packaging: the namespace layout, the light-weight core, the version."""

import json
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


def test_numba_kernels_get_scipy_blas_without_the_scipy_linalg_package():
    """A kernel's import loads SciPy's BLAS extension on its own (not the 0.2-0.35 s package ``scipy.linalg``), numba's
    BLAS calls work with it, and a later import of the package or of the module the usual ways finds the same one."""
    code = (
        "import sys, numpy as np\n"
        "import dwiflow.core._msmt_kernel\n"
        "from numba import njit\n"
        "print('linalg' if 'scipy.linalg' in sys.modules else 'no-linalg')\n"
        "blas = sys.modules['scipy.linalg.cython_blas']\n"
        "a = np.arange(12.0).reshape(3, 4)\n"
        "print(float(np.abs(njit(lambda x: np.dot(x, x.T))(a) - a @ a.T).max()))\n"
        "import scipy.linalg.cython_blas as again\n"
        "from scipy.linalg import cython_blas as package_attribute\n"
        "import scipy.linalg\n"
        "print(again is blas, package_attribute is blas, callable(scipy.linalg.solve))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["no-linalg", "0.0", "True", "True", "True"]


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


def test_output_specs_are_read_from_their_compiled_copy_only_while_it_matches_the_yaml():
    """bids_specs/outputs.json is outputs.yaml compiled (tools/update_readme.py writes it), and the specs a command
    reads equal the YAML's; a copy made from other YAML text is ignored, so an edited YAML is read as it is."""
    from importlib import resources

    import yaml

    from dwiflow.bids_specs.outputs import compile_specs, output_specs, specs_from

    folder = resources.files("dwiflow.bids_specs")
    text, compiled = folder.joinpath("outputs.yaml").read_text(), folder.joinpath("outputs.json").read_text()
    assert compiled == compile_specs(text), "bids_specs/outputs.json is stale: run .venv/bin/python tools/update_readme.py"
    assert output_specs() == yaml.safe_load(text)
    edited = text.replace("Description:", "Description:  ", 1)  # the same specs, other text: parsed afresh
    changed = text + "\nextra_key: 1\n"
    assert specs_from(edited, compiled) == yaml.safe_load(text)
    assert specs_from(changed, compiled)["extra_key"] == 1
    assert specs_from(text, compiled.replace('"source_sha256": "', '"source_sha256": "0', 1)) == yaml.safe_load(text)
    assert specs_from(text, "not json") == yaml.safe_load(text)
    digest = json.loads(compiled)["source_sha256"]
    assert specs_from(text, json.dumps({"source_sha256": digest, "specs": {"read": "compiled"}})) == {"read": "compiled"}
    # a command's process reads the compiled copy: PyYAML is never imported
    probe = ("import sys; from dwiflow.bids_specs.outputs import output_spec; output_spec('tensor_fa'); "
             "print('yaml' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60).stdout == "False\n"


def test_sdist_and_wheel_build_and_pass_twine_check(tmp_path):
    """`python -m build` (in this environment, no download) and `twine check`: the wheel carries the licence, the
    SPDX licence expression, the recon specs and the output specs; the version agrees with CITATION.cff."""
    import zipfile
    from pathlib import Path

    import dwiflow

    repo = Path(__file__).resolve().parents[1]
    build = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp_path), str(repo)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    output = build.stdout + build.stderr
    # setuptools' layout and licence-metadata warnings (a data folder absent from `packages`, the deprecated licence
    # table) would mean that a release is missing files or will stop building
    warnings = [line for line in output.splitlines()
                if "warning" in line.lower() and "byte-compiling is disabled" not in line]
    assert not warnings and "absent from the `packages`" not in output, "\n".join(warnings)
    dists = sorted(tmp_path.iterdir())
    assert [p.suffix for p in dists] == [".gz", ".whl"] or [p.suffix for p in dists] == [".whl", ".gz"]
    check = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", *map(str, dists)],
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0 and check.stdout.count("PASSED") == 2, check.stdout + check.stderr
    wheel = next(p for p in dists if p.suffix == ".whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: BSD-3-Clause" in metadata and f"Version: {dwiflow.__version__}" in metadata
    for spec in ("csd", "msmt", "ss3t", "mapmri", "rumba", "smt", "dki", "noddi"):
        assert f"dwiflow/tasks/recon_specs/{spec}.yaml" in names
    assert "dwiflow/bids_specs/outputs.yaml" in names and "dwiflow/bids_specs/outputs.json" in names
    assert "pydra/tasks/dwiflow/__init__.py" in names and not any(n in names for n in ("pydra/__init__.py",
                                                                                     "pydra/tasks/__init__.py"))
    assert f'version: "{dwiflow.__version__}"' in (repo / "CITATION.cff").read_text()
