"""One module per stage; each declares its stages in a module-level ``STAGES`` tuple.

:func:`dwiflow.tasks.registry.stages` collects them, so adding a stage is adding a module here
(plus its core module, its entries in ``bids_specs/outputs.yaml``, a preset and tests).
"""
