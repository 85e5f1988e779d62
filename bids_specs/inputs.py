"""What dwiflow reads from a BIDS dataset: every DWI run with its gradients and entities.

pybids does the querying (sidecar inheritance included); this module adds the checks a
BIDS App needs before anything runs: the dataset exists, the selected participants have
DWI runs, and every run has its .bval and .bvec.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# the entities that tell runs apart and are kept in every output's name (a preprocessed derivative's space
# included: QSIPrep's space-ACPC); an input's desc (desc-preproc) describes its processing, not the run
RUN_ENTITIES = ("subject", "session", "acquisition", "reconstruction", "direction", "run", "part", "space", "chunk")
SHORT = {"subject": "sub", "session": "ses", "acquisition": "acq", "reconstruction": "rec",
         "direction": "dir", "run": "run", "part": "part", "space": "space", "chunk": "chunk"}
# part-phase (and part-real/-imag) images of a complex DWI are not the diffusion-weighted magnitudes
MAGNITUDE_PARTS = (None, "mag")


class BidsInputError(ValueError):
    """The BIDS input cannot be used; the message names the path or label at fault."""


@dataclass
class DwiRunSpec:
    """One diffusion run: its files and BIDS entities."""

    dwi: Path
    bval: Path
    bvec: Path
    entities: dict[str, str]
    metadata: dict[str, Any] = field(default_factory=dict)
    mask: Path | None = None

    @property
    def short_entities(self) -> dict[str, str]:
        """Entities with their file-name keys (sub, ses, acq, dir, run ...), in BIDS order."""
        return {SHORT[k]: str(self.entities[k]) for k in RUN_ENTITIES if self.entities.get(k) not in (None, "")}

    @property
    def label(self) -> str:
        return "_".join(f"{k}-{v}" for k, v in self.short_entities.items())


def _layout(bids_dir: Path, validate: bool):
    from bids import BIDSLayout

    try:
        # with the derivatives entities (desc, res, den …): a preprocessed dataset's runs can be told apart by them
        return BIDSLayout(str(bids_dir), validate=validate, derivatives=False, config=["bids", "derivatives"])
    except Exception as exc:  # pybids raises many types; name the file when it is a sidecar we can parse
        broken = _unreadable_json(bids_dir)
        if broken is not None:
            raise BidsInputError(f"cannot read the JSON sidecar {broken[0]}: {broken[1]}") from None
        raise BidsInputError(f"pybids cannot index {bids_dir}: {' '.join(str(exc).split())[:200]}") from None


def broken_link(path: Path) -> str | None:
    """What a path that is a symbolic link to nothing is (a DataLad / git-annex dataset whose content was not
    fetched, as OpenNeuro's come), for an error naming it; None for any other path."""
    if not path.is_symlink() or path.exists():
        return None
    annexed = ".git/annex/objects" in os.readlink(path)
    return "a symbolic link to a missing file" + (" (its content is not in this git-annex/DataLad dataset: datalad "
                                                  "get it)" if annexed else "")


def _unreadable_json(root: Path) -> tuple[Path, str] | None:
    """The first JSON file under ``root`` that does not parse (skipping derivatives and hidden folders)."""
    for path in sorted(root.rglob("*.json")):
        if any(part.startswith(".") or part == "derivatives" for part in path.relative_to(root).parts[:-1]):
            continue
        try:
            json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            return path, str(exc).split(":")[0]
        except OSError as exc:
            return path, broken_link(path) or exc.strerror or type(exc).__name__
    return None


# the DWI query's own entities: a filter may narrow the selection, not change what a DWI run is
FIXED_QUERY = {"suffix": "dwi", "extension": [".nii.gz", ".nii"], "datatype": "dwi"}
# the keys of BIDS file names whose pybids entity (the name a filter file uses, as in fMRIPrep and QSIRecon) differs
FILENAME_KEYS = {"sub": "subject", "ses": "session", "acq": "acquisition", "dir": "direction", "rec": "reconstruction",
                 "ce": "ceagent", "trc": "tracer", "mod": "modality"}


def _their_dwi(layout, subjects: list[str] | None, narrowed: str) -> str:
    """What DWI the dataset (or ``subjects``) has, for an error that found none among those selected (``narrowed``:
    by session or filter): their number and sessions; nothing when nothing narrowed the selection."""
    if not narrowed:
        return " (sub-<label>/[ses-<label>/]dwi/*_dwi.nii[.gz])"
    found = layout.get(**dict(FIXED_QUERY, **({"subject": subjects} if subjects else {})))
    if not found:
        return " (none in any session)"
    sessions = sorted({f.entities["session"] for f in found if "session" in f.entities})
    return (f" (DWI runs: {len(found)}, in session(s) {', '.join(sessions)})" if sessions
            else f" (DWI runs: {len(found)}, without sessions)")


def find_dwi_runs(
    bids_dir: str | Path,
    participant_labels: list[str] | None = None,
    session_labels: list[str] | None = None,
    bids_filters: dict[str, Any] | None = None,
    mask_dir: str | Path | None = None,
    validate: bool = False,
) -> list[DwiRunSpec]:
    """Every DWI run of the selected participants/sessions, with bval, bvec, metadata and mask.

    Raises
    ------
    BidsInputError
        Not a BIDS dataset; a requested participant without DWI; a run without .bval/.bvec.
    """
    root = Path(bids_dir)
    if not (root / "dataset_description.json").is_file():
        raise BidsInputError(f"{root} is not a BIDS dataset (no dataset_description.json)")
    description = root / "dataset_description.json"
    try:
        content = json.loads(description.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BidsInputError(f"cannot read {description}: {str(exc).split(':')[0]}") from None
    if not isinstance(content, dict):
        raise BidsInputError(f"{description} is not a JSON object (BIDS: a mapping of Name, BIDSVersion …)")
    layout = _layout(root, validate)
    query: dict[str, Any] = dict(FIXED_QUERY)
    filters: dict[str, Any] = {}
    for key, value in (bids_filters or {}).items():  # a file-name key (acq) stands for its entity (acquisition)
        entity = FILENAME_KEYS.get(key, key)
        if entity != key and entity in (bids_filters or {}):
            raise BidsInputError(f"BIDS filter: {key!r} and {entity!r} name the same entity; give one")
        filters[entity] = value
    known = set(layout.get_entities())
    for key, value in filters.items():
        if key in FIXED_QUERY:
            raise BidsInputError(f"BIDS filter {key!r}: dwiflow selects DWI images itself ({key} "
                                 f"{FIXED_QUERY[key]}); a filter may only narrow the runs (e.g. acquisition, run)")
        if key not in known:
            import difflib

            entities = sorted(set(layout.get_entities(metadata=False)) - set(FIXED_QUERY))
            close = difflib.get_close_matches(key, sorted(known), n=1)
            raise BidsInputError(f"BIDS filter {key!r}: not an entity of {root}"
                                 + (f" (did you mean {close[0]!r}?)" if close else "")
                                 + f"; its entities: {', '.join(entities)}, or a key of the DWI sidecars")
        values = value if isinstance(value, list) else [value]
        if not all(v is None or isinstance(v, (str, int)) and not isinstance(v, bool) for v in values):
            raise BidsInputError(f"BIDS filter {key!r}: expected a label, a number, null or a list of them, got "
                                 f"{value!r}")
    query.update(filters)
    available = set(layout.get_subjects())
    if participant_labels:
        labels = [p.removeprefix("sub-") for p in participant_labels]
        missing = [p for p in labels if p not in available]
        if missing:
            raise BidsInputError(f"participant(s) {missing} not found in {root}; available: {sorted(available)}")
        query["subject"] = labels
    if session_labels:
        query["session"] = [s.removeprefix("ses-") for s in session_labels]
    files = layout.get(**query)
    other_parts = [f for f in files if f.entities.get("part") not in MAGNITUDE_PARTS]
    files = [f for f in files if f.entities.get("part") in MAGNITUDE_PARTS]
    if other_parts and not files:
        raise BidsInputError(f"the selected DWI images of {root} are all part-{other_parts[0].entities['part']} "
                             f"images ({Path(other_parts[0].path).name} …): dwiflow analyses diffusion magnitudes "
                             "(part-mag or no part entity)")
    narrowed = "".join([f" in session(s) {', '.join(query['session'])}" if session_labels else "",
                        " matching the BIDS filter file" if filters else ""])
    if participant_labels:
        with_dwi = {f.entities["subject"] for f in files}
        without = sorted(set(query["subject"]) - with_dwi)
        if without:
            raise BidsInputError(f"no DWI run found for participant(s) {', '.join(without)} in {root}{narrowed}"
                                 + _their_dwi(layout, without, narrowed))
    if not files:
        raise BidsInputError(f"no DWI run found in {root}{narrowed}" + _their_dwi(layout, None, narrowed))
    masks = _mask_index(Path(mask_dir)) if mask_dir else {}
    if mask_dir and not masks:
        raise BidsInputError(f"--mask-dir {mask_dir} holds no *_desc-brain_mask.nii[.gz] image")
    runs = []
    for f in sorted(files, key=lambda x: x.path):
        path = Path(f.path)
        base = path.name[: -len(".nii.gz")] if path.name.endswith(".nii.gz") else path.stem
        bval, bvec = path.with_name(base + ".bval"), path.with_name(base + ".bvec")
        if not bval.is_file():
            bval = Path(layout.get_bval(f.path)) if _safe(layout.get_bval, f.path) else bval
        if not bvec.is_file():
            bvec = Path(layout.get_bvec(f.path)) if _safe(layout.get_bvec, f.path) else bvec
        for kind, p in (("bval", bval), ("bvec", bvec)):
            if not p.is_file():
                raise BidsInputError(f"DWI run {path} has no .{kind} file (expected {p})")
        entities = {k: str(f.entities[k]) for k in RUN_ENTITIES if k in f.entities}
        try:
            metadata = layout.get_metadata(f.path)
        except Exception as exc:
            raise BidsInputError(f"cannot read the JSON metadata of {path}: {' '.join(str(exc).split())[:200]}") from None
        spec = DwiRunSpec(path, bval, bvec, entities, metadata)
        if mask_dir:
            spec.mask = masks.get(spec.label)
        else:  # a preprocessed derivative's own brain mask beside the DWI (QSIPrep: <run>_desc-brain_mask.nii.gz)
            spec.mask = next((p for p in (path.with_name(f"{spec.label}_desc-brain_mask{ext}")
                                          for ext in (".nii.gz", ".nii")) if p.is_file()), None)
        same = next((run for run in runs if run.label == spec.label), None)
        if same is not None:  # their outputs would have the same names: the second would replace the first's
            desc = same.dwi.name.split("desc-")[1].split("_")[0] if "desc-" in same.dwi.name else None
            example = f' (e.g. {{"desc": "{desc}"}})' if desc else ""
            raise BidsInputError(f"DWI runs {same.dwi.name} and {path.name} have the same entities ({spec.label}): "
                                 f"their outputs would share names; select one with --bids-filter-file{example}")
        runs.append(spec)
    if mask_dir and not any(run.mask for run in runs):
        raise BidsInputError(f"--mask-dir {mask_dir} has a brain mask for none of the {len(runs)} selected run(s) "
                             f"(its masks: {', '.join(sorted(masks)[:5])}{' …' if len(masks) > 5 else ''}; a mask "
                             "is matched by the run's entities, e.g. sub-01_acq-x_desc-brain_mask.nii.gz)")
    return runs


def _safe(fn, arg) -> bool:
    try:
        return bool(fn(arg))
    except Exception:
        return False


def _mask_index(mask_dir: Path) -> dict[str, Path]:
    """``desc-brain_mask`` files of a derivative dataset, keyed by their run label."""
    if not mask_dir.is_dir():
        raise BidsInputError(f"mask directory {mask_dir} does not exist")
    index = {}
    for p in mask_dir.rglob("*_desc-brain_mask.nii*"):
        label = p.name.split("_desc-brain_mask")[0]
        index[label] = p
    return index


def read_filter_text(path: str | Path) -> str:
    """The text of a ``--bids-filter-file``, read once: it may be a pipe (``<(echo '{…}')``), which a second read
    finds empty."""
    p = Path(path)
    if not p.exists():
        link = broken_link(p)
        raise BidsInputError(f"BIDS filter file {p} is {link}" if link else f"BIDS filter file not found: {p}")
    if p.is_dir():
        raise BidsInputError(f"BIDS filter file {p} is a folder, not a JSON file")
    try:
        with open(p, "rb") as stream:
            return stream.read(1 << 20).decode()
    except (OSError, UnicodeDecodeError) as exc:
        raise BidsInputError(f"cannot read BIDS filter file {p}: {exc}") from None


def load_filter_file(path: str | Path, text: str | None = None) -> dict[str, Any]:
    """A ``--bids-filter-file`` (JSON): pybids query entities applied to the DWI query; ``text``: the file's, when
    already read (:func:`read_filter_text`)."""
    p = Path(path)
    try:
        content = json.loads(read_filter_text(p) if text is None else text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BidsInputError(f"BIDS filter file {p} is not valid JSON: {str(exc)[:120]}") from None
    if not isinstance(content, dict):
        raise BidsInputError(f"BIDS filter file {p} must hold a JSON object")
    selection = content.get("dwi", content)
    if not isinstance(selection, dict):
        raise BidsInputError(f"BIDS filter file {p}: the 'dwi' entry must be a JSON object of entities, got "
                             f"{type(selection).__name__}")
    return selection
