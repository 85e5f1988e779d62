"""Recon specs: which stages a run goes through and with which options (YAML, validated)."""

from __future__ import annotations

from copy import deepcopy
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from dwiflow.bids_specs.inputs import BidsInputError

STAGE_OPTIONS: dict[str, set[str]] = {
    "mask": set(),
    "tensor": set(),
    "response": {"method", "options"},
    "csd": {"lmax"},
    "rumba": {"use_response", "wm_response", "gm_response", "csf_response", "n_iter", "recon_type", "n_coils", "R",
              "global_fit", "use_tv", "sh_lmax", "amplitudes", "sphere", "precision"},
    "smt": {"fod", "n_fod", "free_water", "lambda_par_bounds"},
    "mapmri": {"radial_order", "anisotropic", "laplacian_weighting", "positivity", "pos_grid", "pos_radius", "solver",
               "compare",
               "big_delta", "small_delta", "bval_threshold"},
    "peaks": {"npeaks", "rel_threshold", "min_separation", "subtract_psf"},
    "fod_metrics": set(),
}
STAGE_REQUIRES = {"csd": "response", "fod_metrics": "peaks", "response": "mask"}
FOD_STAGES = ("csd", "rumba", "mapmri", "smt")  # stages producing an FOD (MAP-MRI: its ODF; SMT: Watson)
RESPONSE_METHODS = ("fa", "ssst", "tournier", "tax")


def builtin_specs() -> list[str]:
    folder = resources.files("dwiflow.bids_specs").joinpath("recon_specs")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_recon_spec(name_or_file: str | Path) -> dict[str, Any]:
    """A built-in preset by name, or a YAML file; validated (errors name the offending key)."""
    candidate = Path(name_or_file)
    if candidate.suffix in (".yaml", ".yml") or candidate.is_file():
        if not candidate.is_file():
            raise BidsInputError(f"recon spec file not found: {candidate}")
        text, source = candidate.read_text(), str(candidate)
    else:
        if str(name_or_file) not in builtin_specs():
            raise BidsInputError(f"unknown recon spec {name_or_file!r}; built-in: {builtin_specs()} (or give a YAML file)")
        text = resources.files("dwiflow.bids_specs").joinpath("recon_specs", f"{name_or_file}.yaml").read_text()
        source = f"built-in recon spec {name_or_file!r}"
    try:
        spec = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise BidsInputError(f"{source} is not valid YAML: {exc}") from None
    return validate_recon_spec(spec, source)


def validate_recon_spec(spec: Any, source: str = "recon spec") -> dict[str, Any]:
    if not isinstance(spec, dict) or not isinstance(spec.get("stages"), dict):
        raise BidsInputError(f"{source}: expected a mapping with a 'stages' mapping")
    stages = deepcopy(spec["stages"])
    for name, options in stages.items():
        if name not in STAGE_OPTIONS:
            raise BidsInputError(f"{source}: unknown stage 'stages.{name}'; known stages: {sorted(STAGE_OPTIONS)}")
        options = options or {}
        if not isinstance(options, dict):
            raise BidsInputError(f"{source}: 'stages.{name}' must be a mapping of options")
        unknown = set(options) - STAGE_OPTIONS[name]
        if unknown:
            raise BidsInputError(f"{source}: unknown option(s) {sorted(unknown)} in 'stages.{name}'; "
                                 f"allowed: {sorted(STAGE_OPTIONS[name]) or 'none'}")
        stages[name] = options
    for stage, needed in STAGE_REQUIRES.items():
        if stage in stages and needed not in stages:
            raise BidsInputError(f"{source}: stage 'stages.{stage}' needs 'stages.{needed}'")
    if "peaks" in stages and not any(s in stages for s in FOD_STAGES):
        raise BidsInputError(f"{source}: stage 'stages.peaks' needs an FOD stage ({' or '.join(FOD_STAGES)})")
    if "csd" in stages and "rumba" in stages:
        raise BidsInputError(f"{source}: give one deconvolution stage per recon spec (csd or rumba), not both")
    method = stages.get("response", {}).get("method", "fa")
    if "response" in stages and method not in RESPONSE_METHODS:
        raise BidsInputError(f"{source}: 'stages.response.method' must be one of {RESPONSE_METHODS}, got {method!r}")
    subtract_psf = stages.get("peaks", {}).get("subtract_psf", False)
    if not isinstance(subtract_psf, bool):
        raise BidsInputError(f"{source}: 'stages.peaks.subtract_psf' must be true or false, got {subtract_psf!r}")
    resources = check_resources(spec.get("resources"), list(stages), source)
    unknown = set(spec) - {"name", "description", "stages", "resources"}
    if unknown:
        raise BidsInputError(f"{source}: unknown key(s) {sorted(unknown)}; allowed: name, description, stages, resources")
    return {"name": spec.get("name", "custom"), "description": spec.get("description", ""), "stages": stages,
            "resources": resources}


RESOURCE_KEYS = ("cpus", "mem_gb", "time", "sbatch_args")
ALWAYS_PRESENT_TASKS = ("default", "mask", "stage_derivatives", "figures")


def check_resources(resources: Any, stages: list[str], source: str = "recon spec") -> dict[str, dict[str, Any]]:
    """A recon spec's ``resources`` section, validated: ``{default|<stage>: {cpus, mem_gb, time, sbatch_args}}``.

    Cluster workers turn each stage's entry (or ``default``'s) into its job's scheduler arguments.
    """
    if resources is None:
        return {}
    if not isinstance(resources, dict):
        raise BidsInputError(f"{source}: 'resources' must be a mapping of stage -> {{{', '.join(RESOURCE_KEYS)}}}")
    known = set(stages) | set(ALWAYS_PRESENT_TASKS)
    for stage, values in resources.items():
        where = f"{source}: 'resources.{stage}'"
        if stage not in known:
            raise BidsInputError(f"{where} is not a stage of this recon spec (known: {sorted(known)})")
        if not isinstance(values, dict):
            raise BidsInputError(f"{where} must be a mapping of {', '.join(RESOURCE_KEYS)}")
        unknown = set(values) - set(RESOURCE_KEYS)
        if unknown:
            raise BidsInputError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {', '.join(RESOURCE_KEYS)}")
        cpus = values.get("cpus", 1)
        if isinstance(cpus, bool) or not isinstance(cpus, int) or cpus < 1:
            raise BidsInputError(f"{where}.cpus must be a positive integer, got {cpus!r}")
        mem = values.get("mem_gb")
        if mem is not None and (isinstance(mem, bool) or not isinstance(mem, (int, float)) or mem <= 0):
            raise BidsInputError(f"{where}.mem_gb must be a positive number, got {mem!r}")
    return {k: dict(v) for k, v in resources.items()}
