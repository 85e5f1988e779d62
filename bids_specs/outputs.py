"""Output naming and sidecar text, read from ``outputs.yaml``."""

from __future__ import annotations

import hashlib
import json
from copy import deepcopy
from functools import lru_cache
from importlib import resources
from typing import Any

# outputs.yaml parsed, as JSON with the SHA-256 of the YAML text it came from: written by tools/update_readme.py
COMPILED_SPECS = "outputs.json"


@lru_cache(maxsize=1)
def output_specs() -> dict[str, Any]:
    """The parsed ``outputs.yaml``: its compiled copy (``outputs.json``) while that copy was made from the YAML's
    present text, else the YAML itself. Every command reads the specs: the JSON takes 0.5 ms, importing PyYAML and
    parsing the YAML ~30 ms (libyaml's loader included). An edited YAML is never read from a stale copy."""
    folder = resources.files("dwiflow.bids_specs")
    try:
        compiled = folder.joinpath(COMPILED_SPECS).read_text()
    except OSError:
        compiled = None
    return specs_from(folder.joinpath("outputs.yaml").read_text(), compiled)


def specs_from(yaml_text: str, compiled: str | None) -> dict[str, Any]:
    """The specs of ``yaml_text``: from ``compiled`` (the text :func:`compile_specs` wrote) when it names that
    text's digest, else parsed from the YAML."""
    if compiled is not None:
        try:
            parsed = json.loads(compiled)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and parsed.get("source_sha256") == _digest(yaml_text):
            return parsed["specs"]
    import yaml

    # libyaml's loader when PyYAML has it (10x faster than PyYAML's own)
    return yaml.load(yaml_text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def compile_specs(yaml_text: str) -> str:
    """The compiled copy of ``yaml_text`` (JSON text); raises ValueError if the specs do not survive JSON unchanged
    (a YAML type JSON lacks)."""
    specs = specs_from(yaml_text, None)
    text = json.dumps({"source_sha256": _digest(yaml_text), "specs": specs}, indent=None, sort_keys=True) + "\n"
    if json.loads(text)["specs"] != specs:
        raise ValueError("outputs.yaml holds values JSON cannot represent unchanged")
    return text


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def output_spec(key: str) -> dict[str, Any]:
    """The spec of one output key; raises KeyError naming the known keys."""
    outputs = output_specs()["outputs"]
    if key not in outputs:
        raise KeyError(f"unknown output {key!r}; known: {sorted(outputs)}")
    return outputs[key]


class _Wildcards(dict):
    """Naming whose every placeholder is ``*``: output names as glob patterns, whatever placeholders the specs use."""

    def __missing__(self, key: str) -> str:
        return "*"


WILDCARDS: dict[str, str] = _Wildcards()


def output_entities(key: str, naming: dict[str, str] | None = None) -> dict[str, str]:
    """The output's own entities, with ``{placeholders}`` filled from ``naming`` (an entity whose placeholder
    ``naming`` does not give is left out; :data:`WILDCARDS` gives ``*`` for every one)."""
    out = {}
    for name, value in output_spec(key).get("entities", {}).items():
        value = str(value)
        if "{" in value:
            try:
                value = "".join(c for c in value.format_map({} if naming is None else naming) if c.isalnum() or c == "*")  # a label (or a glob)
            except KeyError:
                continue
        out[name] = value
    return out


def output_filename(key: str, source_entities: dict[str, str], naming: dict[str, str] | None = None) -> str:
    """BIDS derivative file name of output ``key`` for a source run's entities.

    ``source_entities`` holds the run's entities (``sub``, ``ses``, ``acq``, ``dir``,
    ``run`` …); the output's own entities (``model``, ``param``, ``desc``) are added and
    everything is written in the spec's entity order. ``naming`` fills the entities that depend
    on the configuration (``{fod_model}``: the model whose FOD feeds the peaks; ``{method}``: the
    response method).
    """
    spec = output_spec(key)
    entities = {k: v for k, v in source_entities.items() if v not in (None, "")}
    entities.update(output_entities(key, naming))
    order = output_specs()["entity_order"]
    parts = [f"{name}-{entities[name]}" for name in order if name in entities]
    return "_".join(parts + [spec["suffix"]]) + spec["extension"]


def entities_from_filename(path: str) -> dict[str, str]:
    """BIDS entities of a file name (``sub-01_acq-x_dwi.nii.gz`` → {sub: 01, acq: x}); empty for other names."""
    from pathlib import Path

    name = Path(path).name.split(".")[0]
    entities = {}
    for part in name.split("_")[:-1]:
        if "-" in part:
            key, value = part.split("-", 1)
            entities[key] = value
    return entities


_SIDECAR_KEYS = ("Description", "Units", "OrientationEncoding", "Levels", "Type", "TensorElementOrder")


def figure_panels() -> dict[str, Any]:
    """The QC mosaic panels (title, caption, report section) that outputs' figure hints fill."""
    return output_specs().get("figure_panels", {})


def sidecar(
    key: str, parameters: dict[str, Any] | None = None, orientation: dict[str, Any] | None = None,
    levels: dict[str, str] | None = None, **extra: Any
) -> dict[str, Any]:
    """JSON sidecar content for output ``key``: its description, units, the model and parameters.

    ``orientation`` adds run-specific ``OrientationEncoding`` fields (e.g. the SH degree); ``levels``
    the ``Levels`` of a status map (generated from the fit status enum by the stage).
    """
    spec = output_spec(key)
    spec = {**spec, "Levels": levels} if levels is not None else spec
    content: dict[str, Any] = {k: deepcopy(spec[k]) for k in _SIDECAR_KEYS if k in spec}
    if orientation:
        content.setdefault("OrientationEncoding", {}).update(orientation)
    model_name = spec.get("model")
    if model_name:
        model = deepcopy(output_specs()["models"][model_name])
        if parameters:
            model["Parameters"] = parameters
        content = {"Model": model, **content}
    elif parameters:
        content["Parameters"] = parameters
    content.update(extra)
    return content


ORIENTATION_TYPES = ("scalar", "dec", "unitspherical", "spherical", "unit3vector", "3vector", "tensor", "sh",
                     "amplitudes")


def complete_sidecar(content: dict[str, Any], ndim: int) -> dict[str, Any]:
    """A sidecar made to follow BEP016's orientation rules for an image of ``ndim`` dimensions: a 4D image always
    has an ``OrientationEncoding`` (``{"Type": "scalar"}`` for a stack of scalar maps), every encoding but
    ``scalar`` names its ``EncodingAxis`` (3: the volumes), and the sample directions of an ``amplitudes`` image
    are ``AmplitudesDirections``."""
    content = dict(content)
    encoding = dict(content.get("OrientationEncoding") or {})
    if not encoding and ndim <= 3:
        return content
    encoding.setdefault("Type", "scalar")
    if encoding["Type"] != "scalar":
        encoding.setdefault("EncodingAxis", 3)
    if "Directions" in encoding:
        encoding["AmplitudesDirections"] = encoding.pop("Directions")
    content["OrientationEncoding"] = encoding
    return content

