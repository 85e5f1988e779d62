"""Numba settings shared by the compiled kernels (imported by each before it compiles).

GNU OpenMP cannot survive a fork, and Pydra's cf worker forks: use numba's own thread pool
unless the user chose a threading layer. SciPy's BLAS, which numba's set-up imports, is loaded first without the
package ``scipy.linalg`` (:mod:`dwiflow.core._scipy_blas`).
"""

from __future__ import annotations

import os

from dwiflow.core._scipy_blas import load_scipy_blas

load_scipy_blas()  # before numba's target set-up imports it (see the module)

from numba import config  # noqa: E402

if "NUMBA_THREADING_LAYER" not in os.environ:
    config.THREADING_LAYER = "workqueue"
