"""SciPy's BLAS for the compiled kernels, without the 0.2–0.35 s of ``import scipy.linalg``.

numba's linear algebra calls BLAS through ``scipy.linalg.cython_blas``, and numba imports that module while it sets
up its CPU target (``numba.np.arraymath`` checks that BLAS is there), as does ``single_threaded_blas`` of
:mod:`dwiflow.tasks.registry`, which loads SciPy's BLAS so that a thread limit covers it. Importing it the usual way
first runs the package ``scipy.linalg``, and that package's ``__init__`` builds SciPy's array-API wrapper of numpy:
a copy of numpy's namespace that imports every lazily loaded numpy submodule (``numpy.f2py``, ``numpy.testing``, …).
Measured on 2 cores: numba's target set-up 0.41 s with it, 0.18–0.24 s without; a ``response dhollander`` command on
109k voxels at two threads 1.29 → 1.07 s (best of 8, the old and the new code alternating). The extension module
needs none of it, so :func:`load_scipy_blas` loads it on its own, under its full name; a later
``import scipy.linalg`` (or of the module itself) then finds it in ``sys.modules`` and imports the package as usual.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import threading

MODULE = "scipy.linalg.cython_blas"
_lock = threading.Lock()


def load_scipy_blas() -> None:
    """Make ``scipy.linalg.cython_blas`` importable at no more than the extension module's own cost (a few ms).

    Once it is loaded, or once ``scipy.linalg`` is, the usual import (which returns the module loaded, after any
    other thread's import of it has finished); so too where SciPy's layout is not the expected one (no such
    extension file beside the package). Callers on several threads load it once, under a lock."""
    with _lock:
        if MODULE not in sys.modules and "scipy.linalg" not in sys.modules:
            try:
                import scipy

                spec = importlib.machinery.PathFinder.find_spec(
                    MODULE, [os.path.join(os.path.dirname(scipy.__file__), "linalg")])
                if spec is not None and isinstance(spec.loader, importlib.machinery.ExtensionFileLoader):
                    module = importlib.util.module_from_spec(spec)
                    sys.modules[MODULE] = module
                    try:
                        spec.loader.exec_module(module)
                    except BaseException:
                        del sys.modules[MODULE]
                        raise
                    return
            except Exception:  # noqa: BLE001  (the usual import below reports what is wrong)
                pass
        importlib.import_module(MODULE)
