"""Numerical core of dwiflow: plain numpy/scipy estimators on arrays.

Nothing here reads or writes files or imports pydra, pybids, nibabel or cvxpy
at import time (cvxpy is imported lazily inside the solvers that need it).
"""
