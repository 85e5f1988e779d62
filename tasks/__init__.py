"""File-level stages: load → core → save (+ JSON sidecar).

``stages`` holds plain functions (files in, files out) that both the ``dwirecon``
command and the Pydra tasks call, so the two run the same code path.
"""
