"""File-level stages and everything derived from their declarations.

``registry`` collects the stage declarations of ``stages/`` (one module per stage: typed options, the
function that runs it, its inputs and outputs); the ``dwirecon`` command, the Pydra tasks
(``pydra_tasks``), recon-spec validation (``recon_spec``), the workflow wiring, figures and reports
all derive from it, so the command line and a run call the same code path.
"""
