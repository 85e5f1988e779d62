"""Recon specs: which stages a run goes through, with which options — validated against the stage registry.

A recon spec is YAML: ``name``, ``description``, ``stages`` (stage name → options; a stage group
such as ``response`` takes ``method`` and ``options``), ``resources`` (per-stage CPUs, memory,
time and sbatch arguments for cluster workers) and ``response_dir`` (a group level's output folder
whose WM/GM/CSF group responses every run is deconvolved with, as ``--response-dir``; a relative
path is taken from the spec file's folder). Validation builds every stage's typed options
before anything runs, so a wrong type, a value out of range, an unknown key at any level, a
forbidden combination or a missing prerequisite is one error naming its key path
(``stages.csd.lmax: must be an even integer, got 7``). Built-in specs live in ``recon_specs/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources as package_files
from pathlib import Path
from typing import Any, Callable

import yaml

from dwiflow.core.errors import DwiflowInputError
from dwiflow.tasks.options import OptionError, StageOptions, render_error
from dwiflow.tasks.registry import RUN_INPUTS, Stage, StageGroup, stages

TOP_LEVEL_KEYS = ("name", "description", "stages", "resources", "response_dir")
RESOURCE_KEYS = ("cpus", "mem_gb", "time", "sbatch_args")
ALWAYS_PRESENT_TASKS = ("default", "stage_derivatives", "figures")  # Pydra nodes every run has besides its stages


# QSIRecon's built-in recon specs (qsirecon/data/pipelines/*.yaml) and what in dwiflow does their reconstruction;
# their tractography, ACT, atlases and DSI Studio / TORTOISE steps have no counterpart here
_MSMT = "--recon-spec msmt (dhollander, MSMT-CSD, mtnormalise, peaks; no tractography)"
_SS3T = "--recon-spec ss3t (dhollander, SS3T-CSD, mtnormalise, peaks; no tractography)"
_SCALARS = ("a recon spec YAML whose stages are mask, dki, mapmri and noddi (and msmt's for the FODs) gives "
            "its DKI, MAP-MRI and NODDI maps; 3D-SHORE and GQI have no counterpart")
QSIRECON_SPECS = {
    **dict.fromkeys(("mrtrix_multishell_msmt_ACT-hsvs", "mrtrix_multishell_msmt_ACT-fast",
                     "mrtrix_multishell_msmt_noACT", "mrtrix_multishell_msmt_pyafq_tractometry"), _MSMT),
    **dict.fromkeys(("mrtrix_multishell_msmt_noACT_estimate", "mrtrix_multishell_msmt_noACT_apply"),
                    "--recon-spec msmt with a group response: participant, then group, then participant "
                    "--response-dir OUTPUT_DIR"),
    **dict.fromkeys(("mrtrix_singleshell_ss3t_ACT-hsvs", "mrtrix_singleshell_ss3t_ACT-fast",
                     "mrtrix_singleshell_ss3t_noACT", "ss3t_autotrack", "ss3t_fod_autotrack"), _SS3T),
    "dipy_dki": "--recon-spec dki", "dipy_mapmri": "--recon-spec mapmri", "amico_noddi": "--recon-spec noddi",
    **dict.fromkeys(("multishell_scalarfest", "hbcd_scalar_maps", "abcd_recon"), _SCALARS),
    # None: no counterpart here
    **dict.fromkeys(("dsi_studio_gqi", "dsi_studio_autotrack", "dipy_3dshore", "csdsi_3dshore", "TORTOISE",
                     "pyafq_tractometry", "reorient_fslstd", "dipy_force")),
}


def qsirecon_hint(name: Any) -> str:
    """What to run instead of QSIRecon's recon spec ``name`` ('' when it is not one of QSIRecon's)."""
    if not isinstance(name, str) or name not in QSIRECON_SPECS:
        return ""
    if QSIRECON_SPECS[name] is None:
        return f"; {name!r} is QSIRecon's, and dwiflow has no counterpart of it"
    return f"; {name!r} is QSIRecon's: {QSIRECON_SPECS[name]}"


class ReconSpecError(DwiflowInputError):
    """A recon spec that cannot run; the message names the key path."""


@dataclass(frozen=True)
class ConfiguredStage:
    """A stage with its validated options."""

    stage: Stage
    options: StageOptions

    @property
    def name(self) -> str:
        return self.stage.name


@dataclass(frozen=True)
class ReconSpec:
    """A validated recon spec; ``stages`` in run order (the mask stage is always present)."""

    name: str
    description: str
    stages: dict[str, ConfiguredStage]
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    response_dir: Path | None = None  # group responses every run is deconvolved with (``--response-dir`` wins)

    def options(self, name: str) -> StageOptions | None:
        configured = self.stages.get(name)
        return None if configured is None else configured.options

    def method(self, name: str) -> str | None:
        configured = self.stages.get(name)
        return None if configured is None else configured.stage.method

    def fod_source(self) -> str | None:
        """The stage whose FOD feeds peaks and FOD metrics: the highest ``fod_priority`` among those that provide one."""
        best = None
        for name, configured in self.stages.items():
            stage = configured.stage
            if stage.fod_priority is not None and "fod" in stage.provided(configured.options):
                if best is None or stage.fod_priority > self.stages[best].stage.fod_priority:
                    best = name
        return best

    def tissue_source(self) -> str | None:
        """The multi-tissue deconvolution (the stage that provides a GM compartment, e.g. ``msmt_csd`` or
        ``ss3t_csd``), whose model names the normalised tissue images."""
        return next((name for name, configured in self.stages.items()
                     if "gm" in configured.stage.provided(configured.options)), None)

    def naming(self) -> dict[str, str]:
        """Values of the configuration-dependent entities of output names (see ``bids_specs/outputs.yaml``)."""
        return {"fod_model": self.fod_source() or "csd", "method": self.method("response") or "",
                "tissue_model": self.tissue_source() or "msmt_csd"}

    def summary(self) -> dict[str, Any]:
        """Name, description and every stage's method and options (for reports)."""
        return {"name": self.name, "description": self.description, "stages": self.to_plain()}

    def to_plain(self) -> dict[str, Any]:
        """Plain values (for a Pydra input and its hash): {stage: {"method": ..., "options": {...}}}."""
        return {name: {"method": c.stage.method, "options": c.options.to_dict(spec_only=True)}
                for name, c in self.stages.items()}

    @classmethod
    def from_plain(cls, plain: dict[str, Any]) -> "ReconSpec":
        """The inverse of :meth:`to_plain` (validated again)."""
        return validate_recon_spec({"stages": {name: ({"method": v["method"], "options": v["options"]}
                                                      if v["method"] is not None else v["options"])
                                               for name, v in plain.items()}})


def builtin_specs() -> list[str]:
    folder = package_files.files("dwiflow.tasks").joinpath("recon_specs")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def builtin_spec_file(name_or_file: str | Path) -> Path | None:
    """The YAML file of the built-in recon spec ``name_or_file`` names (to copy and change), or None when it names
    a file of the user's or no built-in spec."""
    if Path(name_or_file).suffix in (".yaml", ".yml") or Path(name_or_file).is_file():
        return None
    if str(name_or_file) not in builtin_specs():
        return None
    return Path(str(package_files.files("dwiflow.tasks").joinpath("recon_specs", f"{name_or_file}.yaml")))


def load_recon_spec(name_or_file: str | Path) -> ReconSpec:
    """A built-in preset by name, or a YAML file; validated (errors name the offending key path)."""
    candidate = Path(name_or_file)
    if candidate.suffix in (".yaml", ".yml") or candidate.is_file():
        if not candidate.is_file():
            raise ReconSpecError(f"recon spec file not found: {candidate}")
        try:
            text = candidate.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ReconSpecError(f"cannot read recon spec {candidate}: {exc}") from None
        source = str(candidate)
    else:
        if str(name_or_file) not in builtin_specs():
            raise ReconSpecError(f"unknown recon spec {name_or_file!r}; built-in: {', '.join(builtin_specs())} "
                                 f"(or give a YAML file){qsirecon_hint(str(name_or_file))}")
        text = package_files.files("dwiflow.tasks").joinpath("recon_specs", f"{name_or_file}.yaml").read_text()
        source = f"built-in recon spec {name_or_file!r}"
    try:
        spec = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ReconSpecError(f"{source} is not valid YAML{where}: {problem}") from None
    return validate_recon_spec(spec, source, base_dir=candidate.parent if source == str(candidate) else None)


def _fail(source: str, message: str) -> ReconSpecError:
    return ReconSpecError(f"{source}: {message}")


def _stage_options(entry: Stage | StageGroup, value: Any, source: str,
                   warn: Callable[[str], None]) -> ConfiguredStage:
    where = f"stages.{entry.name}"
    value = {} if value is None else value
    if not isinstance(value, dict):
        raise _fail(source, f"{where}: must be a mapping of options, got {value!r}")
    if isinstance(entry, StageGroup):
        unknown = set(value) - {"method", "options"}
        if unknown:
            raise _fail(source, f"{where}.{sorted(unknown)[0]}: unknown key (a {entry.name} stage takes method and "
                                f"options)")
        method = value.get("method", entry.default)
        pipeline_methods = [m for m, s in entry.methods.items() if s.pipeline]
        if method not in entry.methods:
            raise _fail(source, f"{where}.method: must be one of {', '.join(pipeline_methods)}, got {method!r}")
        stage = entry.methods[method]
        if not stage.pipeline:
            raise _fail(source, f"{where}.method: {method} needs inputs only a user can give (dwirecon {entry.command} "
                                f"{method}); in a run use one of {', '.join(pipeline_methods)}")
        options, prefix = value.get("options"), f"{where}.options"
    else:
        stage, options, prefix = entry, value, where
    if not isinstance(options, (dict, type(None))):
        raise _fail(source, f"{prefix}: must be a mapping of options, got {options!r}")
    spell = lambda name: f"{prefix}.{name}"  # noqa: E731
    try:
        built = stage.options.from_mapping(options if options is not None else {}, warn=warn, spell=spell)
    except OptionError as exc:
        raise _fail(source, exc.render(spell)) from None
    except DwiflowInputError as exc:
        raise _fail(source, render_error(exc, spell)) from None
    return ConfiguredStage(stage, built)


def validate_recon_spec(spec: Any, source: str = "recon spec", base_dir: Path | None = None) -> ReconSpec:
    """Validate a parsed recon spec against the registry; raises :class:`ReconSpecError` naming the key path.

    ``base_dir``: the folder a relative ``response_dir`` is taken from (the spec file's; default the current one).
    """
    if not isinstance(spec, dict):
        raise _fail(source, "expected a mapping with a 'stages' mapping")
    if "nodes" in spec and "stages" not in spec:
        raise _fail(source, "a QSIRecon recon spec (a list of nodes), which dwiflow does not read: dwiflow's name "
                            "their stages (see the built-in ones: dwiflow --help)" + qsirecon_hint(spec.get("name")))
    for key in spec:
        if key not in TOP_LEVEL_KEYS:
            raise _fail(source, f"{key}: unknown key (allowed: {', '.join(TOP_LEVEL_KEYS)})")
    for key in ("name", "description"):
        if key in spec and not isinstance(spec[key], str):
            raise _fail(source, f"{key}: must be text, got {spec[key]!r}")
    if not isinstance(spec.get("stages"), dict) or not spec["stages"]:
        raise _fail(source, "stages: must be a mapping of stage names to options")
    registry = stages()
    pipeline_names = [n for n, e in registry.items() if e.pipeline]
    warnings: list[str] = []
    configured: dict[str, ConfiguredStage] = {}
    for name, value in spec["stages"].items():
        entry = registry.get(name) if isinstance(name, str) else None
        if entry is None or not entry.pipeline:
            raise _fail(source, f"stages.{name}: unknown stage (known: {', '.join(pipeline_names)})")
        configured[name] = _stage_options(entry, value, source, warnings.append)
    for name, entry in registry.items():  # stages every run has (the brain mask)
        if isinstance(entry, Stage) and entry.always and name not in configured:
            configured[name] = ConfiguredStage(entry, entry.options())
    ordered = {name: configured[name] for name in registry if name in configured}
    result = ReconSpec(spec.get("name", "custom"), spec.get("description", ""), ordered, {}, tuple(warnings))
    _check_wiring(result, source)
    resources = check_resources(spec.get("resources"), list(ordered), source)
    response_dir = spec.get("response_dir")
    if response_dir is not None:
        if not isinstance(response_dir, str) or not response_dir.strip():
            raise _fail(source, f"response_dir: must be a folder path (text), got {response_dir!r}")
        response_dir = Path(response_dir).expanduser()
        if not response_dir.is_absolute() and base_dir is not None:
            response_dir = base_dir / response_dir
    return ReconSpec(result.name, result.description, ordered, resources, tuple(warnings), response_dir)


def _check_wiring(spec: ReconSpec, source: str) -> None:
    """Conflicts between stages, and every required input provided by the run or an earlier stage."""
    for name, configured in spec.stages.items():
        for other in configured.stage.conflicts:
            if other in spec.stages:
                raise _fail(source, f"stages.{name}: give one deconvolution stage per recon spec, not both "
                                    f"stages.{name} and stages.{other}")
    provided = {kind: "the run" for kind in RUN_INPUTS}
    for name, configured in spec.stages.items():
        stage = configured.stage
        for needed in stage.inputs:
            if not needed.required or needed.kind in provided:
                continue
            producers = [n for n, e in stages().items() if n != name and any(
                needed.kind in s.provides and s.pipeline
                for s in (e.methods.values() if isinstance(e, StageGroup) else [e]))]
            hint = f" (add {' or '.join(f'stages.{p}' for p in producers)})" if producers else ""
            if needed.kind == "fod" and "fod" in _all_provided(spec):
                hint = " (the FOD stage in this spec writes no FOD with these options)"
            raise _fail(source, f"stages.{name}: needs a {needed.kind} from an earlier stage{hint}")
        for kind in stage.provided(configured.options):
            provided.setdefault(kind, name)


def _all_provided(spec: ReconSpec) -> set[str]:
    return {kind for c in spec.stages.values() for kind in c.stage.provides}


def check_resources(resources: Any, stage_names: list[str], source: str = "recon spec") -> dict[str, dict[str, Any]]:
    """A recon spec's ``resources`` section, validated: ``{default|<stage>: {cpus, mem_gb, time, sbatch_args}}``.

    Cluster workers turn each stage's entry (or ``default``'s) into its job's scheduler arguments.
    """
    if resources is None:
        return {}
    if not isinstance(resources, dict):
        raise _fail(source, f"resources: must be a mapping of stage -> {{{', '.join(RESOURCE_KEYS)}}}")
    known = list(stage_names) + list(ALWAYS_PRESENT_TASKS)
    for stage, values in resources.items():
        where = f"resources.{stage}"
        if stage not in known:
            raise _fail(source, f"{where}: not a stage of this recon spec (known: {', '.join(known)})")
        if not isinstance(values, dict):
            raise _fail(source, f"{where}: must be a mapping of {', '.join(RESOURCE_KEYS)}")
        unknown = set(values) - set(RESOURCE_KEYS)
        if unknown:
            raise _fail(source, f"{where}.{sorted(unknown)[0]}: unknown key (allowed: {', '.join(RESOURCE_KEYS)})")
        cpus = values.get("cpus", 1)
        if isinstance(cpus, bool) or not isinstance(cpus, int) or cpus < 1:
            raise _fail(source, f"{where}.cpus: must be a positive integer, got {cpus!r}")
        mem = values.get("mem_gb")
        if mem is not None and (isinstance(mem, bool) or not isinstance(mem, (int, float)) or mem <= 0):
            raise _fail(source, f"{where}.mem_gb: must be a positive number, got {mem!r}")
        for key in ("time", "sbatch_args"):
            if key in values and not isinstance(values[key], str):
                raise _fail(source, f"{where}.{key}: must be text, got {values[key]!r}")
    return {k: dict(v) for k, v in resources.items()}
