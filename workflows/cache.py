"""The work directory's cache: results that must not count, and leftovers of interrupted runs.

Pydra stores each task's result as ``<cache>/<checksum>/_result.pklz`` and returns it on the next
run. A task interrupted by a signal can leave a result that Pydra 1.0a12 reads as a success with no
outputs (its ``finally`` saves the result before the interrupt propagates), a file being written
when the process was killed can be truncated, and a user can damage anything. Before a run submits
anything, :func:`repair_cache` removes every result that is unreadable, not a Pydra result, errored,
without outputs, or whose output files are gone — each becomes a cache miss that is recomputed —
and the temporary files of interrupted writes. :func:`sweep_partial_outputs` removes
what an interrupted publication left in the output dataset.

Pydra guards its cache with lock files (``SoftFileLock``: a file that exists while held), which a killed
process leaves behind; a lock file that a process created but had not yet written its PID into is never
recognised as abandoned, and every later run waiting on it hangs. One dwiflow process owns a work directory
(:func:`claim_work_dir`), so when it starts, every lock file in its cache is a leftover:
:func:`remove_stale_locks` removes them. Pydra's cache of file hashes lives in the work directory too
(:func:`use_work_dir_hash_cache`), not in the user's shared cache, so that its locks are this run's alone.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import IO

HASH_CACHE_FOLDER = "hashes"
CLAIM_FILE = ".dwiflow-run.lock"
_claims: dict[Path, IO[str]] = {}  # open while this process runs: the kernel releases the claim when it ends


def _output_paths(outputs) -> list[Path]:
    """Every file or directory an outputs object refers to (fileformats FileSets)."""
    import attrs
    from fileformats.core import FileSet

    paths: list[Path] = []

    def collect(value) -> None:
        if isinstance(value, FileSet):
            paths.extend(Path(p) for p in value.fspaths)
        elif isinstance(value, (list, tuple)):
            for item in value:
                collect(item)
        elif isinstance(value, dict):
            for item in value.values():
                collect(item)

    if attrs.has(type(outputs)):
        for field in attrs.fields(type(outputs)):
            collect(getattr(outputs, field.name, None))
    return paths


def usable_result(result_file: Path) -> bool:
    """Whether a ``_result.pklz`` may be served from the cache: readable, a Pydra result, not errored (a failed or
    interrupted task is tried again by the next run; Pydra 1.0a12 would otherwise report the old failure), and
    holding outputs whose files all exist."""
    import cloudpickle
    from pydra.engine.result import Result

    try:
        with open(result_file, "rb") as handle:
            result = cloudpickle.load(handle)
    except Exception:  # truncated, garbage, or from an incompatible version: a cache miss
        return False
    if not isinstance(result, Result):
        return False
    if result.errored or result.outputs is None:  # outputs None, not errored: an interrupted task's result
        return False
    return all(p.exists() for p in _output_paths(result.outputs))


def repair_cache(cache_root: Path) -> list[Path]:
    """Remove results that must not count as successes, and temporary files of interrupted writes; returns the
    results removed. Run it before submitting (one dwiflow process per work directory)."""
    removed = []
    if not cache_root.is_dir():
        return removed
    for task_dir in cache_root.iterdir():
        if not task_dir.is_dir():
            continue
        result_file = task_dir / "_result.pklz"
        if result_file.exists() and not usable_result(result_file):
            result_file.unlink()
            removed.append(result_file)
        if not result_file.exists():  # the task will run again: drop what its interrupted writes left
            for leftover in task_dir.glob(".*.tmp*"):
                leftover.unlink(missing_ok=True)
    return removed


PARTIAL_PATTERNS = (".*.partial", ".*.partial.*")


def sweep_partial_outputs(output_dir: Path) -> list[Path]:
    """Remove temporary files an interrupted publication left in the output dataset (``.<name>.partial…``)."""
    removed = []
    if not output_dir.is_dir():
        return removed
    for pattern in PARTIAL_PATTERNS:
        for path in output_dir.rglob(pattern):
            if path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def disk_free(path: Path) -> int:
    """Free bytes on the filesystem that holds ``path`` (or its nearest existing parent)."""
    import shutil

    existing = next((p for p in [path, *path.parents] if p.exists()), Path(os.sep))
    return shutil.disk_usage(existing).free


class WorkDirInUse(Exception):
    """Another dwiflow process is running on the same work directory."""


def claim_work_dir(work_dir: Path) -> None:
    """Claim ``work_dir`` for this process (an exclusive ``flock`` on ``<work_dir>/.dwiflow-run.lock``, released by
    the kernel when the process ends, however it ends); raises :class:`WorkDirInUse` naming the other process's
    PID. On a filesystem without ``flock`` the claim is skipped."""
    if work_dir in _claims or sys.platform == "win32":
        return
    import fcntl

    work_dir.mkdir(parents=True, exist_ok=True)
    handle = open(work_dir / CLAIM_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise WorkDirInUse(f"--work-dir {work_dir} is in use by another dwiflow process (pid {holder}); wait for it "
                           "or give another --work-dir") from None
    except OSError:  # no flock on this filesystem
        handle.close()
        return
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _claims[work_dir] = handle


def remove_stale_locks(work_dir: Path) -> list[Path]:
    """Remove the lock files left in ``work_dir``'s cache and hash cache by killed processes (Pydra's job locks
    ``<checksum>.lock``, result locks ``<checksum>_save.lock``, hash locks); returns them. Only for the process that
    owns the work directory (:func:`claim_work_dir`), before it submits anything."""
    removed = []
    for folder in (work_dir / "cache", work_dir / HASH_CACHE_FOLDER):
        if folder.is_dir():
            for lock in folder.glob("*.lock"):
                if lock.is_file():
                    lock.unlink(missing_ok=True)
                    removed.append(lock)
    return removed


def use_work_dir_hash_cache(work_dir: Path) -> Path:
    """Point Pydra's persistent cache of file hashes (``PYDRA_HASH_CACHE``, read at each hash; inherited by worker
    processes and cluster jobs) at ``<work_dir>/hashes``; returns that folder."""
    location = work_dir / HASH_CACHE_FOLDER
    location.mkdir(parents=True, exist_ok=True)
    os.environ["PYDRA_HASH_CACHE"] = str(location)
    return location
