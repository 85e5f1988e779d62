"""Numba settings shared by the compiled kernels (imported by each before it compiles).

GNU OpenMP cannot survive a fork, and Pydra's cf worker forks: use numba's own thread pool
unless the user chose a threading layer.
"""

from __future__ import annotations

import os

from numba import config

if "NUMBA_THREADING_LAYER" not in os.environ:
    config.THREADING_LAYER = "workqueue"
