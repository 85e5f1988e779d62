"""dwiflow: BIDS diffusion MRI to fibre-orientation and microstructure maps.

The numerical core lives in :mod:`dwiflow.core` (numpy/scipy only), file-level
stages in :mod:`dwiflow.tasks`, workflows in :mod:`dwiflow.workflows` and the
output naming in :mod:`dwiflow.bids_specs`.
"""

from dwiflow._version import __version__

__all__ = ["__version__"]
