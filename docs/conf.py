"""Sphinx configuration of dwiflow's documentation (built with warnings as errors: ``python3 dev.py docs``).

Three pages are generated at build time, never typed by hand: every ``dwirecon`` command and option (from the stage
registry), the validation tables (from the numbers the test suite records and the last benchmark run's
``benchmarks/results.json``) and an example methods paragraph (from the built-in ``csd`` recon spec).
"""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS))

from generate import generate_pages  # noqa: E402  (docs/generate.py, beside this file)

from dwiflow import __version__  # noqa: E402

project = "dwiflow"
author = "the dwiflow developers"
copyright = "the dwiflow developers, BSD-3-Clause"
version = release = __version__
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax"]
napoleon_google_docstring = False
napoleon_numpy_docstring = True
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_theme_options = {"description": "BIDS diffusion MRI to fibre orientations and microstructure maps"}


def setup(app):
    app.connect("builder-inited", lambda _app: generate_pages(DOCS / "_generated"))
