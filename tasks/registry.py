"""The stage registry: one declaration per stage, from which everything else is derived.

A :class:`Stage` says what a stage is: its name (the recon-spec key, the ``dwirecon`` subcommand,
the Pydra node name and the prefix of its keys in ``bids_specs/outputs.yaml``), its typed options
(:mod:`dwiflow.tasks.options`), the function that runs it (files in → files out), the inputs it
reads and the outputs it can write, what it provides to later stages (and its priority when it
provides the FOD that peaks and FOD metrics read), and its place in the order of a run. A stage
with several methods (``response``: fa, ssst, tournier, tax, amp2response) is a
:class:`StageGroup` of stages sharing one name.

Every module of :mod:`dwiflow.tasks.stages` declares its stages in a module-level ``STAGES``
tuple; :func:`stages` collects them in dependency order. The ``dwirecon`` parsers
(:mod:`dwiflow.cli.dwirecon`), the Pydra tasks and derivative staging
(:mod:`dwiflow.tasks.pydra_tasks`), recon-spec validation (:mod:`dwiflow.tasks.recon_spec`), the
workflow wiring (:mod:`dwiflow.workflows.recon`), the figures and the report sections all read it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from threadpoolctl import threadpool_limits

from dwiflow.bids_specs.outputs import output_spec
from dwiflow.core.errors import DwiflowInputError
from dwiflow.tasks.io import check_output_paths
from dwiflow.tasks.options import StageOptions

PathLike = str | os.PathLike

# the kinds of file a run starts with; every other input kind is provided by an earlier stage
RUN_INPUTS = ("dwi", "bval", "bvec")


@dataclass(frozen=True)
class Input:
    """A file a stage reads.

    ``kind`` names what it is (``dwi``, ``mask``, ``response``, ``fod``, ``peaks`` …): in a run it
    comes from the run itself or from the stage that ``provides`` that kind. On the command line it
    is a positional argument ``metavar``, or the option ``--<kind>`` when ``flag`` is set.
    ``when(spec)`` (optional) says whether a recon spec connects an optional input.
    """

    kind: str
    metavar: str
    help: str
    required: bool = True
    flag: bool = False
    cli: bool = True
    when: Callable[[Any], bool] | None = None


@dataclass(frozen=True)
class Output:
    """A file a stage can write; ``bids_specs/outputs.yaml`` names and describes it under :meth:`Stage.output_key`.

    On the command line: ``positional`` (a required path), ``flag`` (``--<name> FILE``, optional), or
    ``dir`` (written into the command's OUT_DIR, named from the input's BIDS entities).
    """

    name: str
    help: str
    cli: str = "dir"
    metavar: str | None = None
    folder: bool = False  # a folder the stage fills (the phantom's dataset), not one file


@dataclass
class RunContext:
    """What a stage's run function gets besides files and options."""

    progress: Callable[[int, int], None] | None = None
    n_threads: int | None = None
    naming: dict[str, str] = field(default_factory=dict)  # e.g. {"fod_model": "csd"} for output names


RunFunction = Callable[[dict[str, Path | None], dict[str, Path], StageOptions, RunContext], dict[str, Path]]


@dataclass(frozen=True)
class Stage:
    """One stage: its declaration (see the module docstring)."""

    name: str
    order: int
    title: str
    summary: str
    description: str
    options: type[StageOptions]
    run: RunFunction
    inputs: tuple[Input, ...] = ()
    outputs: tuple[Output, ...] = ()
    method: str | None = None
    provides: Mapping[str, str] = field(default_factory=dict)
    fod_priority: int | None = None
    conflicts: tuple[str, ...] = ()
    check_data: Callable[[Any, StageOptions], None] | None = None  # raises when a run's data cannot support it
    # what the data support only poorly (one line each): printed by the pre-flight checks, written by the stage
    # into its outputs' sidecars ("Warnings") and listed in the report
    data_warnings: Callable[[Any, StageOptions], list[str]] | None = None
    pipeline: bool = True
    always: bool = False
    threads: bool = False
    progress: str | None = None
    # the run's methods paragraph (tasks/methods.py): one sentence from the options, citing ``references`` (keys of
    # tasks.methods.REFERENCES; a function of the options when they depend on them)
    methods: Callable[[Any], str] | None = None
    references: tuple[str, ...] | Callable[[Any], tuple[str, ...]] = ()
    # the stage's numba kernels call SciPy's BLAS: load it before limiting the BLAS threads (False: numpy-only stages,
    # and stages whose kernels call no BLAS, skip importing SciPy and its BLAS extension here, ~0.02 s of a command
    # (core/_scipy_blas.py); a function of the options when that depends on them)
    scipy_blas: bool | Callable[[Any], bool] = True
    # the stage runs numba kernels (always, or with the options for which this function is true): numba's one-time
    # set-up starts on a thread as the stage starts (prepare_compiler_in_background)
    compiled: bool | Callable[[Any], bool] = False
    # MRtrix3's (input, output) pairs on the command line (dwi2fod msmt_csd DWI RESP_1 OUT_1 RESP_2 OUT_2 …): the
    # first ``cli_pairs_required`` pairs are positional, in pair order; the others keep their flags and may also
    # follow positionally (``cli_pairs_metavar`` in the usage), filling the pairs not named by a flag in order, or
    # as ``cli_pair_slots(input paths, free pair indices)`` assigns them
    cli_pairs: tuple[tuple[str, str], ...] = ()
    cli_pairs_required: int = 1
    cli_pairs_metavar: str = "IN OUT"
    cli_pair_slots: Callable[[list[Path], list[int]], list[int]] | None = None

    @property
    def label(self) -> str:
        return self.name if self.method is None else f"{self.name} {self.method}"

    @property
    def command(self) -> str:
        """The ``dwirecon`` subcommand."""
        return self.name.replace("_", "-")

    def output_key(self, output: str) -> str:
        """The output's key in ``bids_specs/outputs.yaml``: ``<stage>_<output>`` (``<stage>`` when they are equal)."""
        return self.name if output == self.name else f"{self.name}_{output}"

    def output(self, name: str) -> Output:
        for out in self.outputs:
            if out.name == name:
                return out
        raise KeyError(f"stage {self.label} has no output {name!r}")

    def provided(self, options: StageOptions) -> dict[str, str]:
        """What this configuration provides to later stages: {kind: output} for outputs it writes."""
        written = self.writes(options)
        return {kind: out for kind, out in self.provides.items() if out in written}

    def writes(self, options: StageOptions) -> tuple[str, ...]:
        """The outputs a configuration writes, in declaration order."""
        chosen = options.writes()
        names = [o.name for o in self.outputs]
        if chosen is None:
            return tuple(names)
        chosen = set(chosen)
        unknown = chosen - set(names)
        if unknown:
            raise AssertionError(f"{self.label}: writes() names unknown outputs {sorted(unknown)}")
        return tuple(n for n in names if n in chosen)

    def __call__(self, outputs: Mapping[str, PathLike], *, progress=None, n_threads: int | None = None,
                 naming: Mapping[str, str] | None = None, **arguments: Any) -> dict[str, Path]:
        """Run the stage from Python: input files by kind, options by name, ``outputs`` by output name.

        >>> registry.get("csd")({"fod": "fod.nii.gz"}, dwi="dwi.nii.gz", bval="dwi.bval", bvec="dwi.bvec",
        ...                     response="wm.txt", mask="mask.nii.gz", lmax=8)  # doctest: +SKIP
        """
        kinds = {i.kind for i in self.inputs}
        files = {k: (None if v is None else Path(v)) for k, v in arguments.items() if k in kinds}
        options = self.options(**{k: v for k, v in arguments.items() if k not in kinds})
        return self.execute(files, {k: Path(v) for k, v in outputs.items()}, options,
                            RunContext(progress, n_threads, dict(naming or {})))

    def execute(self, files: Mapping[str, Path | None], outputs: Mapping[str, Path], options: StageOptions,
                context: RunContext | None = None) -> dict[str, Path]:
        """Check the requested outputs against the configuration, then run."""
        allowed = self.writes(options)
        unknown = set(outputs) - {o.name for o in self.outputs}
        if unknown:
            raise DwiflowInputError(f"{self.label}: unknown outputs {sorted(unknown)}; choose from "
                                    f"{[o.name for o in self.outputs]}")
        refused = set(outputs) - set(allowed)
        if refused:
            raise DwiflowInputError(f"{self.label}: this configuration does not write {sorted(refused)} "
                                    f"(it writes {', '.join(allowed)})")
        if not outputs and self.outputs:
            raise DwiflowInputError(f"{self.label}: no output requested; give at least one of {', '.join(allowed)}")
        for given in self.inputs:
            if given.required and files.get(given.kind) is None:
                raise DwiflowInputError(f"{self.label} needs its {given.kind} input ({given.metavar})")
        files_out = {name: path for name, path in outputs.items() if not self.output(name).folder}
        check_output_paths(files_out, dict(files),
                           {name: output_spec(self.output_key(name))["extension"] for name in files_out})
        for name, path in outputs.items():
            if self.output(name).folder and Path(path).exists() and not Path(path).is_dir():
                raise DwiflowInputError(f"output {name} {path} is a file, not a folder")
        retain_freed_memory()
        scipy_blas = self.scipy_blas(options) if callable(self.scipy_blas) else self.scipy_blas
        with single_threaded_blas(scipy_blas):  # the same bits whatever the thread count (see README)
            compiled = self.compiled(options) if callable(self.compiled) else self.compiled
            preparing = prepare_compiler_in_background() if compiled else None
            try:
                return self.run(dict(files), dict(outputs), options, context or RunContext())
            finally:
                if preparing is not None:
                    preparing.join()


@lru_cache(maxsize=1)
def retain_freed_memory() -> bool:
    """Let the process keep what it frees (glibc's allocator, once per process): blocks under 32 MB come from the
    heap, and up to 128 MB of free heap stays mapped. A voxel loop allocates the same temporaries chunk after
    chunk; given back to the kernel at once (glibc's defaults), each comes back as fresh zeroed pages — a
    553,000-voxel tensor fit took 460,000 page faults, a fifth of its time. Peak memory does not change. Returns
    whether the allocator took the settings (not glibc: nothing is changed)."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 128 << 20))


def prepare_compiler_in_background() -> threading.Thread:
    """Start numba's one-time set-up on a thread: its import and its compiler's registries, ~0.4–0.5 s (0.7 s while
    it also imported the package ``scipy.linalg``: :mod:`dwiflow.core._scipy_blas`) that a stage's first kernel call
    would otherwise spend before anything else. Meanwhile the stage reads its data, whose
    decompression releases the interpreter lock (a NODDI command on 53,000 voxels: 0.15 s less at one thread, 0.12 s
    at two). The set-up holds numba's compiler lock while it loads the registries, so a kernel called before it is
    done waits for it; a failure is left for the kernel's own call to report.

    While it runs, the interpreter hands its lock over every 0.1 ms instead of every 5 ms: the reading thread takes
    the lock back after each piece it decompresses, and waited up to the whole interval each time (reading a
    61 MB DWI took 0.35 s beside the set-up, 0.17 s alone; 0.28 s with this)."""

    def prepare() -> None:
        interval = sys.getswitchinterval()
        sys.setswitchinterval(min(interval, 1e-4))
        try:
            import dwiflow.core._numba_setup  # noqa: F401  (numba, with the kernels' threading layer)
            from numba.core.compiler_lock import global_compiler_lock
            from numba.core.registry import cpu_target

            # The contexts are built before the compiler lock is taken: building the target context takes that
            # context's own lock and then the compiler lock, and so does a kernel module imported meanwhile on the
            # stage's thread. Taken the other way round here, each thread held the lock the other waited for (a
            # msmt-csd command hung).
            typing_context, target_context = cpu_target.typing_context, cpu_target.target_context
            with global_compiler_lock:
                target_context.refresh()
                typing_context.refresh()
        except Exception:  # noqa: BLE001  (the kernel's call raises it again, where it can be reported)
            pass
        finally:
            sys.setswitchinterval(interval)

    thread = threading.Thread(target=prepare, name="numba set-up", daemon=True)
    thread.start()
    return thread


def single_threaded_blas(scipy_blas: bool = True):
    """A context in which every BLAS library runs on one thread: numpy's, and SciPy's (which numba's kernels call
    through ``scipy.linalg.cython_blas``). SciPy's is loaded first, since a limit reaches only the libraries already
    loaded; otherwise a multi-threaded gemv splits its sums differently with 1 and 2 threads and the last bits
    depend on the machine's thread count. ``scipy_blas=False``: a stage that calls no SciPy BLAS."""
    if scipy_blas:
        from dwiflow.core._scipy_blas import load_scipy_blas

        load_scipy_blas()  # SciPy's BLAS, so that the limit covers it

    return threadpool_limits(limits=1, user_api="blas")


@dataclass(frozen=True)
class StageGroup:
    """Stages sharing one name, chosen by ``method`` (the recon spec's ``<name>.method``)."""

    name: str
    order: int
    title: str
    summary: str
    methods: Mapping[str, Stage]
    default: str

    @property
    def command(self) -> str:
        return self.name.replace("_", "-")

    def method(self, name: str | None) -> Stage:
        name = self.default if name is None else name
        if name not in self.methods:
            raise DwiflowInputError(f"unknown {self.name} method {name!r}; choose from {', '.join(self.methods)}")
        return self.methods[name]

    @property
    def pipeline(self) -> bool:
        return any(s.pipeline for s in self.methods.values())


Entry = Stage | StageGroup


@lru_cache(maxsize=1)
def stages() -> dict[str, Entry]:
    """Every declared stage and stage group by name, in the order a run goes through them.

    Collected from the ``STAGES`` tuples of the modules of :mod:`dwiflow.tasks.stages`, so adding a
    stage is adding its module.
    """
    import dwiflow.tasks.stages as package

    found: dict[str, Entry] = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for entry in getattr(module, "STAGES", ()):
            if entry.name in found:
                raise AssertionError(f"stage {entry.name!r} is declared twice")
            found[entry.name] = entry
    # the FOD that feeds peaks and FOD metrics is the highest priority's: a tie would leave the choice to the
    # order of a recon spec's stages
    priorities: dict[int, str] = {}
    for stage in _each_stage(found.values()):
        if stage.fod_priority is not None:
            other = priorities.setdefault(stage.fod_priority, stage.name)
            if other != stage.name:
                raise AssertionError(f"stages {other!r} and {stage.name!r} share FOD priority {stage.fod_priority}")
    return dict(sorted(found.items(), key=lambda item: item[1].order))


def command_entry(command: str) -> Entry | None:
    """The stage or stage group whose ``dwirecon`` subcommand is ``command``, or None. A command's stages are
    usually declared in the module named after it (``msmt-csd``: ``dwiflow.tasks.stages.msmt_csd``): that module is
    tried first, and the others are imported only when it does not declare the command (a command's start then
    skips ~20 ms of importing every stage module)."""
    import dwiflow.tasks.stages as package

    module_name = command.replace("-", "_")
    if module_name.isidentifier() and importlib.util.find_spec(f"{package.__name__}.{module_name}") is not None:
        module = importlib.import_module(f"{package.__name__}.{module_name}")
        for entry in getattr(module, "STAGES", ()):
            if entry.command == command:
                return entry
    return next((entry for entry in stages().values() if entry.command == command), None)


def get(name: str, method: str | None = None) -> Stage:
    """The stage ``name`` (with ``method`` for a stage group)."""
    entry = stages().get(name)
    if entry is None:
        raise DwiflowInputError(f"unknown stage {name!r}; known stages: {', '.join(stages())}")
    if isinstance(entry, StageGroup):
        return entry.method(method)
    if method is not None:
        raise DwiflowInputError(f"stage {name!r} has no methods")
    return entry


def _each_stage(entries) -> list[Stage]:
    """The stages of registry entries, a group's methods one by one."""
    out: list[Stage] = []
    for entry in entries:
        out.extend(entry.methods.values() if isinstance(entry, StageGroup) else [entry])
    return out


def all_stages() -> list[Stage]:
    """Every stage, the methods of a group one by one."""
    return _each_stage(stages().values())


def stage_titles() -> dict[str, str]:
    """Report/figure section titles by stage name, in run order."""
    return {name: entry.title for name, entry in stages().items()}


def source_hash_files() -> list[Path]:
    """The files whose content shapes a stage's outputs: core, the stage code, I/O, output naming and sidecar
    text (the cache key covers them; see :func:`dwiflow.tasks.pydra_tasks.code_version`)."""
    tasks = Path(__file__).resolve().parent
    core = Path(importlib.import_module("dwiflow.core").__file__).resolve().parent
    specs = Path(importlib.import_module("dwiflow.bids_specs").__file__).resolve().parent
    files = sorted(core.glob("*.py")) + sorted((tasks / "stages").glob("*.py"))
    files += [tasks / name for name in ("registry.py", "options.py", "stagelib.py", "io.py", "recon_spec.py")]
    files += [specs / "outputs.py", specs / "outputs.yaml"]
    return files


def options_markdown() -> str:
    """The README's table of every stage's options, generated from the registry (``tools/update_readme.py``)."""
    from dwiflow.tasks.options import markdown_rows

    lines = []
    for entry in stages().values():
        for stage in entry.methods.values() if isinstance(entry, StageGroup) else [entry]:
            where = "" if stage.pipeline else " (command line only)"
            command = f"dwirecon {stage.command}" + (f" {stage.method}" if stage.method else "")
            key = f"`{stage.name}`" + (f" with `method: {stage.method}`" if stage.method else "")
            lines.append(f"**{key}** — `{command}`{where}: {stage.summary}.")
            lines.append("")
            rows = markdown_rows(stage.options)
            if rows:
                lines += ["| option (recon spec / command line) | type | default | meaning |", "|---|---|---|---|", *rows]
            else:
                lines.append("No options.")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"
