"""Numerical core of dwiflow: plain numpy/scipy estimators on arrays.

Nothing here reads or writes files or imports pydra, pybids, nibabel or cvxpy
at import time (cvxpy is imported lazily inside the solvers that need it).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

# The Python API a DIPY user reaches for, by name (``from dwiflow.core import CsdModel, gradient_table``), imported
# on first use so that ``import dwiflow.core.errors`` (every command line) stays cheap.
_PUBLIC = {
    "GradientTable": "gradients", "gradient_table": "gradients",
    "TensorModel": "tensor", "DiffusionKurtosisModel": "dki",
    "amp2response": "response", "response_mean": "response", "ResponseFunction": "response",
    "tournier_response": "response_iterative", "tax_response": "response_iterative",
    "dhollander": "response_dhollander",
    "CsdModel": "csd", "MsmtCsdModel": "msmt_csd", "Ss3tCsdModel": "ss3t", "RumbaSDModel": "rumba", "MapmriModel": "mapmri",
    "SmtModel": "smt", "NoddiModel": "noddi",
    "find_peaks": "peaks", "median_otsu_mask": "mask",
    "Sphere": "sphere", "get_sphere": "sphere",
    "FitStatus": "status", "DwiflowInputError": "errors",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_PUBLIC[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
