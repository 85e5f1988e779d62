"""The sidecar rules of the BEP016 draft (bids-standard/bids-bep016, branch bep-016,
src/derivatives/05-diffusion-derivatives.md: "Metadata fields", "Orientation encoding types") and of BIDS 1.9's
common derivative fields (src/derivatives/common-data-types.md: ``Sources`` as BIDS URIs whose dataset names are in
``DatasetLinks``; ``SpatialReference`` required without a standard-template ``space``), as a checker the tests apply
to every sidecar a run writes."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Callable

import nibabel as nib

TYPES = {"scalar", "dec", "unitspherical", "spherical", "unit3vector", "3vector", "tensor", "sh", "amplitudes"}
ONLY_FOR = {"SphericalHarmonicBasis": "sh", "SphericalHarmonicDegree": "sh", "AmplitudesDirections": "amplitudes",
            "TensorRank": "tensor"}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


BIDS_URI = re.compile(r"^bids:([A-Za-z0-9_-]*):(.+)$")


def uri_problems(key: str, uri, resolve: Callable[[str, str], Path | None]) -> list[str]:
    """A ``bids:<dataset>:<path>`` URI that names a linked dataset and a file that exists in it."""
    match = BIDS_URI.match(uri) if isinstance(uri, str) else None
    if match is None:
        return [f"{key} {uri!r} is not a BIDS URI (bids:<dataset>:<path>)"]
    target = resolve(match.group(1), match.group(2))
    if target is None:
        return [f"{key} {uri!r}: dataset {match.group(1)!r} is not in DatasetLinks"]
    return [] if target.is_file() else [f"{key} {uri!r}: no such file {target}"]


def sidecar_problems(sidecar: Path, resolve: Callable[[str, str], Path | None] | None = None) -> list[str]:
    """What in ``sidecar`` (and the NIfTI image beside it, if any) breaks a BEP016 rule; empty when none does.
    With ``resolve`` (dataset name, path → file), ``Sources`` and ``SpatialReference`` are checked too."""
    content = json.loads(sidecar.read_text())
    if not isinstance(content, dict):
        return ["not a JSON object"]
    problems = []
    image = next((p for p in (sidecar.with_suffix(".nii.gz"), sidecar.with_suffix(".nii")) if p.is_file()), None)
    shape = nib.load(image).shape if image is not None else ()
    if resolve is not None:
        sources = content.get("Sources")
        if sidecar.name.endswith(("_dwimap.json", "_mask.json")) and not sources:
            problems.append("Sources (the files it was computed from) are missing")
        for uri in sources or []:
            problems += uri_problems("Sources entry", uri, resolve)
        if image is not None:
            if "SpatialReference" not in content:
                problems.append("SpatialReference is REQUIRED (no standard-template space entity)")
            else:
                problems += uri_problems("SpatialReference", content["SpatialReference"], resolve)
    if sidecar.name.endswith("_dwimap.json") and not isinstance(content.get("Model"), dict):
        problems.append("a model parameter map needs the REQUIRED Model dictionary")
    encoding = content.get("OrientationEncoding")
    if len(shape) > 3 and not isinstance(encoding, dict):
        problems.append(f"a {len(shape)}D image needs the REQUIRED OrientationEncoding")
    if isinstance(encoding, dict):
        kind = encoding.get("Type")
        if kind not in TYPES:
            problems.append(f"OrientationEncoding.Type {kind!r} is not one of {sorted(TYPES)}")
        if kind != "scalar":
            axis = encoding.get("EncodingAxis")
            if not isinstance(axis, int) or (shape and not 0 <= axis < len(shape)):
                problems.append(f"OrientationEncoding.EncodingAxis is REQUIRED (an image axis), got {axis!r}")
            if encoding.get("Reference") not in ("ijk", "xyz"):
                problems.append(f"OrientationEncoding.Reference must be ijk or xyz, got {encoding.get('Reference')!r}")
        for key, only in ONLY_FOR.items():
            if key in encoding and kind != only:
                problems.append(f"OrientationEncoding.{key} MUST NOT be given for Type {kind}")
        if kind == "sh":
            if encoding.get("SphericalHarmonicBasis") not in ("mrtrix3", "descoteaux"):
                problems.append("Type sh needs SphericalHarmonicBasis mrtrix3 or descoteaux")
            degree = encoding.get("SphericalHarmonicDegree")
            if degree is not None and len(shape) == 4 and (degree + 1) * (degree + 2) // 2 != shape[3]:
                problems.append(f"SphericalHarmonicDegree {degree} does not fit {shape[3]} volumes")
        if kind == "amplitudes":
            directions = encoding.get("AmplitudesDirections")
            if not isinstance(directions, list) or (len(shape) == 4 and len(directions) != shape[3]):
                problems.append("Type amplitudes needs AmplitudesDirections, one per volume")
        if "Directions" in encoding:
            problems.append("OrientationEncoding.Directions is not a BEP016 key (AmplitudesDirections)")
        if "FillValue" in encoding and encoding["FillValue"] not in (0, 0.0, "NaN"):
            problems.append(f"FillValue must be 0 or NaN, got {encoding['FillValue']!r}")
    response = content.get("ResponseFunction")
    if response is not None:
        kind = response.get("Type") if isinstance(response, dict) else None
        coefficients = response.get("Coefficients") if isinstance(response, dict) else None
        if kind == "eigen":
            if not (isinstance(coefficients, list) and len(coefficients) == 4 and all(map(_number, coefficients))):
                problems.append("ResponseFunction eigen needs 4 numbers")
        elif kind == "zsh":
            rows = coefficients if coefficients and isinstance(coefficients[0], list) else [coefficients]
            if not all(isinstance(r, list) and r and all(map(_number, r)) for r in rows) or \
                    len({len(r) for r in rows}) != 1:
                problems.append("ResponseFunction zsh needs a list of numbers or of equally long lists")
        else:
            problems.append(f"ResponseFunction.Type must be eigen or zsh, got {kind!r}")
        if isinstance(encoding, dict) and encoding.get("Type") != "sh":
            problems.append("ResponseFunction belongs to spherical-harmonics images")
    if content.get("NonNegativity") not in (None, "regularized", "constrained"):
        problems.append(f"NonNegativity must be regularized or constrained, got {content['NonNegativity']!r}")
    return problems


def dataset_problems(root: Path) -> dict[str, list[str]]:
    """Problems of every sidecar under ``root`` (by path), and of its dataset_description.json."""
    description = json.loads((root / "dataset_description.json").read_text())
    links = description.get("DatasetLinks") or {}

    def resolve(dataset: str, path: str) -> Path | None:
        if dataset == "":
            return root / path
        url = links.get(dataset)
        return Path(url.removeprefix("file://")) / path if isinstance(url, str) and url.startswith("file://") else None

    found = {str(p.relative_to(root)): sidecar_problems(p, resolve) for p in sorted(root.rglob("sub-*/**/*.json"))
             if p.parent.name != "figures"}
    if not (isinstance(description.get("Authors"), list) and description["Authors"]):
        found["dataset_description.json"] = ["Authors (a non-empty list) is missing"]
    return {path: problems for path, problems in found.items() if problems}


def validator_errors(root: Path) -> list[str]:
    """The error codes and files bids-validator (the deno release in the test extra) reports for ``root``."""
    import shutil
    import subprocess
    import sys

    validator = shutil.which("bids-validator-deno") or str(Path(sys.executable).parent / "bids-validator-deno")
    run = subprocess.run([validator, str(root), "--datasetTypes", "derivative", "--json"], capture_output=True,
                         text=True, timeout=300)
    issues = json.loads(run.stdout)["issues"]["issues"]
    return sorted({f"{i['code']} {i.get('location', '')}" for i in issues if i["severity"] == "error"})


def unneeded_bidsignore_entries(root: Path) -> list[str]:
    """The .bidsignore entries that today's validator does not need: without one of them, no new error. An entry
    that matches no file of ``root`` cannot be judged here and is not listed."""
    import fnmatch

    ignore = root / ".bidsignore"
    entries = [line for line in ignore.read_text().splitlines() if line.strip()]
    files = [p.relative_to(root).as_posix() for p in root.rglob("*")]
    baseline = set(validator_errors(root))
    unneeded = []
    try:
        for entry in entries:
            if not any(fnmatch.fnmatch(Path(f).name, entry) or fnmatch.fnmatch(f, entry) for f in files):
                continue
            ignore.write_text("\n".join(e for e in entries if e != entry) + "\n")
            if not set(validator_errors(root)) - baseline:
                unneeded.append(entry)
    finally:
        ignore.write_text("\n".join(entries) + "\n")
    return unneeded
