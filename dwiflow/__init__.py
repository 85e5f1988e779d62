"""dwiflow: BIDS diffusion MRI to fibre-orientation and microstructure maps.

The numerical core lives in :mod:`dwiflow.core` (numpy/scipy only), file-level
stages in :mod:`dwiflow.tasks`, workflows in :mod:`dwiflow.workflows` and the
output naming in :mod:`dwiflow.bids_specs`.
"""

import os as _os

from dwiflow._version import __version__

__all__ = ["__version__"]


def _seed_numba_cache() -> None:
    """Container images: copy the numba kernels compiled at build time (``DWIFLOW_NUMBA_CACHE_SEED``) into the
    writable ``NUMBA_CACHE_DIR`` once, so that a run loads them instead of compiling, whatever the uid and even
    with a read-only image (numba only uses a cache folder it can write to)."""
    seed, target = _os.environ.get("DWIFLOW_NUMBA_CACHE_SEED"), _os.environ.get("NUMBA_CACHE_DIR")
    if not seed or not target or _os.path.exists(target) or not _os.path.isdir(seed):
        return
    import shutil
    import tempfile

    parent = _os.path.dirname(_os.path.abspath(target))
    try:
        _os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".numba-seed-", dir=parent)
    except OSError:
        return  # no writable parent: numba compiles as it would without the seed
    try:
        shutil.copytree(seed, _os.path.join(staging, "cache"))
        _os.rename(_os.path.join(staging, "cache"), target)  # atomic: concurrent processes race harmlessly
    except OSError:
        pass  # another process got there first, or no space
    finally:
        shutil.rmtree(staging, ignore_errors=True)

_seed_numba_cache()
