"""Pydra 1.0 tasks derived from the stage registry: one task class per stage, plus derivative staging and figures.

Each stage task (``Csd``, ``Tensor``, ``ResponseFa`` …, built by :func:`stage_task` from the
stage's declaration) takes the stage's input files by kind, its options as plain values and
``code_version``; it writes its outputs into its own working directory (Pydra's cache directory for
the task) and returns them as files, so only file paths cross task boundaries. ``code_version``
(package version + a hash of everything that shapes an output, see :func:`code_version`) is in
every task's hash, so editing an estimator, a stage, the I/O or the output naming invalidates the
cached results it touches; it defaults to the running code's version.

Pipeline builders can use these tasks in their own Pydra workflows, e.g.::

    from dwiflow.tasks.pydra_tasks import Tensor
    task = Tensor(dwi=..., bval=..., bvec=..., mask=..., options={"method": "wls", "maps": ["fa", "md"]})
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from fileformats.core import FileSet
from fileformats.generic import Directory, File
from pydra.compose import python
from pydra.utils.hash import CacheKey, register_serializer
from pydra.utils.hash import bytes_repr_fileset as _pydra_fileset_bytes

from dwiflow._version import __version__
from dwiflow.tasks.registry import Stage, StageGroup, all_stages, source_hash_files, stages


def code_version_of(files: list[Path]) -> str:
    """``<version>+<sha256 of the files' names and contents>`` (12 hex digits)."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return f"{__version__}+{digest.hexdigest()[:12]}"


@lru_cache(maxsize=1)
def code_version() -> str:
    """The running code's version: :func:`code_version_of` everything that shapes an output (core, the stages,
    I/O, the output naming and sidecar specs; :func:`dwiflow.tasks.registry.source_hash_files`)."""
    return code_version_of(source_hash_files())


class StageError(Exception):
    """A stage failed on its input or options inside a run; the message names the recon-spec key path."""


class StageInterrupted(Exception):
    """A stage was interrupted (SIGINT/SIGTERM). Raised as an ordinary exception so that Pydra records the task as
    errored: an interrupted task never leaves a result that counts as a success."""


def _hash_key_with_content_identity(fileset, cache):
    """Pydra's file hash, looked up in its persistent cache under a key that changes whenever the content can have
    changed: path, mtime, ctime, size and inode of each file (Pydra 1.0a12 keys on path and mtime only, so a file
    rewritten with its mtime restored — ``cp -p``, ``rsync -a``, ``tar x``, ``touch -r`` — kept its old hash). The
    ctime cannot be set back by a user."""
    fspaths = sorted(fileset.fspaths)
    identity = []
    for path in fspaths:
        st = path.stat()
        identity.append((st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino, path.lstat().st_ctime_ns))
    yield CacheKey(tuple(repr(p) for p in fspaths) + tuple(identity))
    content = _pydra_fileset_bytes(fileset, cache)
    next(content)  # Pydra's own (path, mtime) key
    yield from content


register_serializer(FileSet)(_hash_key_with_content_identity)


def _run_stage(stage: str, method: str | None, options: dict, naming: dict, code_version: str, **files):
    """Run one registered stage in the task's working directory; returns its outputs (None for those not written)."""
    import warnings
    from pathlib import Path

    from fileformats.generic import Directory, File

    from dwiflow.bids_specs.outputs import output_spec
    from dwiflow.core.errors import DwiflowInputError
    from dwiflow.tasks import registry
    from dwiflow.tasks.io import forget_dwi, hold_point
    from dwiflow.tasks.options import render_error
    from dwiflow.tasks.pydra_tasks import StageError, StageInterrupted

    declared = registry.get(stage, method)
    prefix = f"stages.{stage}.options." if method is not None else f"stages.{stage}."
    if not any(given.kind == "dwi" for given in declared.inputs):
        forget_dwi()  # the stages after the deconvolution read none: the DWI kept for the next one is dead weight
    try:
        hold_point(stage)
        configured = declared.options(**options)
        keys = {name: declared.output_key(name) for name in declared.writes(configured)}
        # files named by output key (csd_fod.nii.gz): unique over every stage, as bids_specs/outputs.yaml names them
        targets = {name: Path.cwd() / f"{key}{output_spec(key)['extension']}" for name, key in keys.items()}
        given = {kind: (None if path is None else Path(path)) for kind, path in files.items()}
        with warnings.catch_warnings():
            # what the data support poorly reaches the user through the pre-flight checks, the outputs' sidecars
            # and the report; library warnings (numpy's "Mean of empty slice" …) would only be noise in a run
            warnings.simplefilter("ignore")
            progress = None
            if declared.progress and files.get("dwi"):
                from dwiflow.tasks.console import StageProgress

                label = Path(str(files["dwi"])).name.split(".")[0].removesuffix("_dwi")
                unit = "iterations" if getattr(configured, "global_fit", False) else declared.progress
                progress = StageProgress(label, declared.label, unit)
            written = declared.execute(given, targets, configured,
                                       registry.RunContext(progress=progress, naming=dict(naming or {})))
    except DwiflowInputError as exc:
        raise StageError(render_error(exc, lambda name: prefix + name)) from None
    except KeyboardInterrupt as exc:
        raise StageInterrupted(f"stage {stage} was interrupted ({exc or 'SIGINT'})") from None
    returned = {out.name: ((Directory if out.folder else File)(written[out.name]) if out.name in written else None)
                for out in declared.outputs}
    # Pydra gives a task with one output the whole return value
    return next(iter(returned.values())) if len(returned) == 1 else returned


def _class_name(stage: Stage) -> str:
    words = re.split(r"[_\-]", stage.name) + ([stage.method] if stage.method else [])
    return "".join(w[:1].upper() + w[1:] for w in words if w).replace("+", "Plus")


def _define(function, name: str, inputs: dict, outputs: dict):
    """A Pydra task class that pickles by reference (module-level name in this module)."""
    cls = python.define(function, inputs=inputs, outputs=outputs, name=name)
    cls.__module__ = __name__
    cls.__qualname__ = name
    globals()[name] = cls
    return cls


def _stage_task(stage: Stage):
    inputs: dict[str, Any] = {
        "stage": python.arg(name="stage", type=str, default=stage.name, help="the registered stage"),
        "method": python.arg(name="method", type=str | None, default=stage.method, help="its method"),
        "options": python.arg(name="options", type=dict, help="the stage's options (plain values)"),
        "naming": python.arg(name="naming", type=dict | None, default=None, help="values of configuration-dependent "
                             "entities of output names"),
        "code_version": python.arg(name="code_version", type=str, default=code_version(),
                                   help="the code's version (part of the hash)"),
    }
    for given in stage.inputs:
        inputs[given.kind] = python.arg(name=given.kind, type=File | None, default=None, help=given.help)
    outputs = {out.name: python.out(name=out.name, type=(Directory if out.folder else File) | None, help=out.help)
               for out in stage.outputs}
    return _define(_run_stage, _class_name(stage), inputs, outputs)


STAGE_TASKS: dict[tuple[str, str | None], type] = {
    (s.name, s.method): _stage_task(s) for s in all_stages() if s.pipeline
}


def stage_task(stage: Stage) -> type:
    """The Pydra task class of a registered stage."""
    return STAGE_TASKS[(stage.name, stage.method)]


# ------------------------------------------------------------------------------------------------ staging
def derivative_inputs() -> list[tuple[str, bool]]:
    """Every output a run can stage, as (input name = output key, whether it is a folder)."""
    found: dict[str, bool] = {}
    for entry in stages().values():
        for stage in entry.methods.values() if isinstance(entry, StageGroup) else [entry]:
            if stage.pipeline:
                for out in stage.outputs:
                    found.setdefault(stage.output_key(out.name), out.folder)
    return list(found.items())


def _stage_derivatives(names: dict, code_version: str, run_folder: str = "", source_uris: dict | None = None,
                       spatial_reference: str = "", **files):
    """Copy a run's outputs (and their sidecars) under their BIDS derivative names into one folder; every sidecar's
    ``Sources`` become BIDS URIs: ``bids::<run_folder>/<name>`` for this run's derivatives, ``source_uris`` (file
    name → URI, e.g. ``bids:raw:sub-01/dwi/sub-01_dwi.nii.gz``) for the inputs. Every image's sidecar gets the
    ``SpatialReference`` (the DWI it is on the grid of; BIDS requires it without a standard-template ``space``); a
    folder (a fixel directory) is copied whole, with the same treatment of the sidecars inside it."""
    from pathlib import Path

    from fileformats.generic import Directory

    from dwiflow.tasks.io import copy_path, sidecar_path

    folder = Path.cwd() / "derivatives"
    folder.mkdir(exist_ok=True)
    uri_of = dict(source_uris or {})
    prefix = f"bids::{run_folder}/" if run_folder else "bids::"
    uri_of.update({Path(value).name: prefix + names[key] for key, value in files.items() if value is not None})

    def described(value: Path, target: Path) -> list[tuple[Path, Path, bool]]:
        """(sidecar or would-be sidecar, its staged path, whether it describes an image) of one staged output; a
        folder's (a fixel directory) are the JSON files inside it, each describing the image of its name."""
        if not Path(value).is_dir():
            return [(sidecar_path(value), sidecar_path(target), target.name.endswith((".nii.gz", ".nii")))]
        return [(side, target / side.name, True) for side in sorted(Path(value).glob("*.json"))]

    for key, value in files.items():
        if value is None:
            continue
        target = folder / names[key]
        copy_path(Path(value), target)
        for side, staged_side, image in described(Path(value), target):
            if not side.is_file() and not image:
                continue
            _stage_sidecar(side, staged_side, Path(value).name, image, uri_of, source_uris, spatial_reference)
    return Directory(folder)


def _stage_sidecar(side: Path, target: Path, source_name: str, image: bool, uri_of: dict, source_uris: dict | None,
                   spatial_reference: str) -> None:
    """Write one staged output's sidecar with BIDS URIs as ``Sources`` and the ``SpatialReference`` of images."""
    import json

    content = json.loads(side.read_text()) if side.is_file() else {}
    if isinstance(content.get("Sources"), list):
        content["Sources"] = [uri_of.get(source, source) for source in content["Sources"]]
    elif source_name in (source_uris or {}):  # an input staged as it is (a given mask): its origin
        content["Sources"] = [source_uris[source_name]]
    if spatial_reference and image:
        content.setdefault("SpatialReference", spatial_reference)
    target.write_text(json.dumps(content, indent=2) + "\n")


StageDerivatives = _define(
    _stage_derivatives, "StageDerivatives",
    {"names": python.arg(name="names", type=dict, help="output key -> BIDS derivative file name"),
     "code_version": python.arg(name="code_version", type=str, default=code_version(), help="the code's version"),
     "run_folder": python.arg(name="run_folder", type=str, default="", help="the run's folder in the derivative "
                              "dataset (sub-<label>[/ses-<label>]/dwi), for the BIDS URIs of Sources"),
     "source_uris": python.arg(name="source_uris", type=dict | None, default=None,
                               help="input file name -> its BIDS URI (bids:<dataset>:<path>)"),
     "spatial_reference": python.arg(name="spatial_reference", type=str, default="",
                                     help="BIDS URI of the image whose grid the run's maps are on (the DWI)"),
     **{key: python.arg(name=key, type=(Directory if folder else File) | None, default=None, help=f"output {key}")
        for key, folder in derivative_inputs()}},
    {"staged": python.out(name="staged", type=Directory, help="the run's derivatives under their BIDS names")},
)


# ------------------------------------------------------------------------------------------------ figures
@lru_cache(maxsize=1)
def figures_version() -> str:
    """Hash of the drawing code: the figures task reruns when it changes (and only it)."""
    return hashlib.sha256((Path(__file__).resolve().parent / "figures.py").read_bytes()).hexdigest()[:12]


@python.define(outputs=["figures"])
def Figures(staged: Directory, files: dict, entities: dict, naming: dict, code_version: str = ""):
    """QC figures of a run's staged derivatives, with a manifest; never fails (a failure becomes a note).

    ``files``: output key → file name inside ``staged``; ``naming``: the run's configuration-dependent
    entities (``fod_model``, ``method``)."""
    import traceback
    from pathlib import Path

    from fileformats.generic import Directory

    from dwiflow.tasks.figures import figures_stage, write_manifest
    from dwiflow.tasks.io import forget_dwi, hold_point
    from dwiflow.tasks.pydra_tasks import StageInterrupted

    forget_dwi()  # the figures draw the derivatives, not the DWI
    folder = Path.cwd() / "figures"
    folder.mkdir(exist_ok=True)
    try:
        hold_point("figures")
        figures_stage(staged, folder, files, entities, naming)
    except KeyboardInterrupt as exc:
        raise StageInterrupted(f"the figures were interrupted ({exc or 'SIGINT'})") from None
    except Exception as exc:  # the report must never fail the run
        note = traceback.format_exception_only(type(exc), exc)[-1].strip()
        write_manifest(folder, entities, [{"section": "tensor", "title": "Figures", "file": "", "caption": "",
                                           "note": f"no figures could be drawn: {note}"}], [])
    return Directory(folder)
