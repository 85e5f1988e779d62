#!/usr/bin/env python3
"""Set up dwiflow in a local virtual environment and run its demo or its tests.

Usage (needs only Python >= 3.11):
    python3 dev.py demo    # create .venv, install dwiflow, run the demo on the built-in phantom
    python3 dev.py test    # create .venv, install dwiflow with test extras, run the test suite, build the docs
    python3 dev.py docs    # build the documentation (build/docs/index.html) with warnings as errors
    python3 dev.py bench   # run the benchmarks (dwiflow vs DIPY, and MRtrix3 when installed)

Extra arguments after the command go to the underlying program (pytest, the benchmark runner).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("DWIFLOW_VENV", ROOT / ".venv"))


def _venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_environment(extras: str = "test") -> Path:
    """Create the virtual environment and (re)install dwiflow when pyproject.toml changed."""
    if sys.version_info < (3, 11):
        sys.exit(f"dwiflow needs Python >= 3.11; this is {sys.version.split()[0]}")
    python = _venv_python()
    if not python.exists():
        print(f"[dev] creating virtual environment {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    stamp = VENV / ".dwiflow-install-stamp"
    constraints = ROOT / "constraints.txt"  # every dependency's version, shared with the container build
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + constraints.read_bytes()
                            + extras.encode()).hexdigest()
    if not stamp.exists() or stamp.read_text() != digest:
        print("[dev] installing dwiflow and its dependencies (first run takes a few minutes)", flush=True)
        pip = [str(python), "-m", "pip", "--disable-pip-version-check", "-q"]
        subprocess.run(pip + ["install", "--upgrade", "pip", "setuptools>=64"], check=True)
        target = f"{ROOT}[{extras}]" if extras else str(ROOT)
        subprocess.run(pip + ["install", "-c", str(constraints), "-e", target], check=True)
        stamp.write_text(digest)
    return python


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test", "docs", "bench"):
        print(__doc__)
        return 2
    command, rest = argv[0], argv[1:]
    python = ensure_environment("test")
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    if command == "demo":
        return subprocess.call([str(python), "-m", "dwiflow.demo", *rest], cwd=ROOT, env=env)
    if command == "bench":
        return subprocess.call([str(python), str(ROOT / "benchmarks" / "run.py"), *rest], env=env)
    if command == "docs":
        return build_docs(python, env)
    if not any(arg == "-n" or arg.startswith("-n") or arg.startswith("--numprocesses") for arg in rest):
        # pytest-xdist, one worker per core (up to 2), one test file per worker at a time (a third worker on
        # 2 cores was slower: 16:14 vs 15:29)
        rest = ["-n", str(min(2, os.cpu_count() or 1)), "--dist", "loadfile", *rest]
    code = subprocess.call([str(python), "-m", "pytest", *rest], cwd=ROOT, env=env)
    # the documentation shows the numbers this test run recorded (build/validation): built after it, warnings fatal
    return code or build_docs(python, env)


def build_docs(python: Path, env: dict[str, str]) -> int:
    """Sphinx, warnings as errors, into build/docs (the validation page reads the tests' records)."""
    print("[dev] building the documentation (build/docs/index.html)", flush=True)
    return subprocess.call([str(python), "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(ROOT / "docs"),
                            str(ROOT / "build" / "docs")], cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
