"""``dwirecon``: file-level diffusion reconstruction commands, one subcommand per stage.

Every subcommand, its positional file arguments and its options are generated from the stage
registry (:mod:`dwiflow.tasks.registry`), and runs the same stage function as the corresponding
Pydra task. Option names are the stage options' names with dashes. Bad input ends with a
one-line error on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from dwiflow._version import __version__
from dwiflow.tasks.console import complain, tell

EXIT_INPUT_ERROR = 2


def _out_dest(name: str) -> str:
    return f"out__{name}"


def _stage_parser(sub, command: str, stage) -> argparse.ArgumentParser:
    """A subcommand for one stage: positional inputs and outputs, input/output flags, then its options."""
    from dwiflow.tasks.options import add_cli_options

    p = sub.add_parser(command, help=stage.summary, description=stage.description)
    required_pairs = stage.cli_pairs[:stage.cli_pairs_required]
    paired_inputs, paired_outputs = {kind for kind, _ in required_pairs}, {name for _, name in required_pairs}
    for given in stage.inputs:
        if not given.cli or given.kind in paired_inputs:
            continue
        if given.flag:
            p.add_argument(f"--{given.kind.replace('_', '-')}", dest=given.kind, metavar=given.metavar,
                           required=given.required, help=given.help)
        else:
            p.add_argument(given.kind, metavar=given.metavar, help=given.help)
    for kind, name in required_pairs:  # MRtrix3's order: each input followed by its output
        given, out = next(g for g in stage.inputs if g.kind == kind), stage.output(name)
        p.add_argument(kind, metavar=given.metavar, help=given.help)
        p.add_argument(_out_dest(name), metavar=out.metavar or name.upper(), help=f"where to write {out.help}")
    if len(stage.cli_pairs) > stage.cli_pairs_required:
        later = ", ".join(f"--{kind.replace('_', '-')} with --{name.replace('_', '-')}"
                          for kind, name in stage.cli_pairs[stage.cli_pairs_required:])
        p.add_argument("more_pairs", nargs="*", metavar=stage.cli_pairs_metavar,
                       help=f"further (input, output) pairs as MRtrix3 takes them, in the order {later} (or name "
                            "them with those options)")
    for out in stage.outputs:
        if out.cli == "positional" and out.name not in paired_outputs:
            p.add_argument(_out_dest(out.name), metavar=out.metavar or out.name.upper(), help=f"where to write {out.help}")
    if any(out.cli == "dir" for out in stage.outputs):
        p.add_argument("out_dir", metavar="OUT_DIR",
                       help="folder the maps are written to, named from the input's BIDS entities")
    for out in stage.outputs:
        if out.cli == "flag":
            p.add_argument(f"--{out.name.replace('_', '-')}", dest=_out_dest(out.name), metavar=out.metavar or "FILE",
                           help=f"write {out.help}")
    add_cli_options(p, stage.options)
    if stage.threads:
        p.add_argument("--nthreads", type=int, help="threads for the per-voxel solver (default: all cores)")
    p.add_argument("--force", action="store_true",
                   help="overwrite outputs that exist (without it, as MRtrix3 without -force, an existing output "
                        "stops the command before it computes anything)")
    loudness = p.add_mutually_exclusive_group()
    loudness.add_argument("-q", "--quiet", action="store_true", help="print only warnings and errors")
    loudness.add_argument("-v", "--verbose", action="store_true", help="also print the time each step took")
    p.set_defaults(stage=stage, stage_parser=p)
    return p


def build_parser(command: str | None = None, method: str | None = None) -> argparse.ArgumentParser:
    """The command line of every stage, or of ``command``'s alone when it names one, and of that group's ``method``
    alone when it names one of its methods (a command's start then spends no time building the other subcommands'
    options)."""
    from dwiflow.tasks.registry import StageGroup, command_entry, stages

    parser = argparse.ArgumentParser(
        prog="dwirecon",
        description="File-level diffusion MRI reconstruction stages (NIfTI + FSL/BIDS bval/bvec in, "
        "NIfTI + JSON sidecar out). Gradient directions are converted to world coordinates on reading.",
    )
    parser.add_argument("--version", action="version", version=f"dwiflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    named = command_entry(command) if command and not command.startswith("-") else None
    entries = [named] if named is not None else list(stages().values())
    for entry in entries:
        if isinstance(entry, StageGroup):
            p = sub.add_parser(entry.command, help=f"{entry.title.lower()}: {', '.join(entry.methods)}",
                               description=f"{entry.title}: one method per algorithm ({', '.join(entry.methods)}).")
            methods = p.add_subparsers(dest="stage_method", required=True, metavar="METHOD")
            chosen = [method] if method in entry.methods and entry is named else list(entry.methods)
            for name in chosen:
                _stage_parser(methods, name, entry.methods[name])
        else:
            _stage_parser(sub, entry.command, entry)
    return parser


def _set_threads(n: int | None) -> None:
    """numba's threads for the command's kernels: ``n``, at most what numba allows. Before numba is imported, through
    ``NUMBA_NUM_THREADS``, which numba reads when a stage imports it (a stage without kernels never does; one with
    them imports it on a thread while it reads its data: ~0.1 s that the command no longer waits for)."""
    if not n:
        return
    if "numba" in sys.modules:
        import numba

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
        return
    from dwiflow.tasks.stagelib import thread_count

    os.environ["NUMBA_NUM_THREADS"] = str(min(n, thread_count(None)))


def _progress(command: str, unit: str):
    def report(done: int, total: int) -> None:
        complain(f"{command}: {done}/{total} {unit}")

    return report


def _assign_pairs(stage, more: list[Path], files: dict, outputs: dict) -> None:
    """Give the (input, output) pairs that follow the required ones on the command line their places: the stage's
    pairs not already named by a flag, in order (or as the stage's ``cli_pair_slots`` says)."""
    from dwiflow.tasks.options import OptionError

    if not more:
        return
    if len(more) % 2:
        raise OptionError(f"{len(more)} file(s) after the first {stage.cli_pairs_required} pair(s): the further "
                          f"files must come in ({stage.cli_pairs_metavar.replace(' ', ', ')}) pairs")
    free = [k for k in range(stage.cli_pairs_required, len(stage.cli_pairs))
            if files.get(stage.cli_pairs[k][0]) is None and stage.cli_pairs[k][1] not in outputs]
    inputs = more[0::2]
    if len(inputs) > len(free):
        raise OptionError(f"{stage.cli_pairs_required + len(inputs)} (input, output) pairs given, with "
                          f"{len(stage.cli_pairs) - stage.cli_pairs_required - len(free)} named by options: "
                          f"{stage.command} takes at most {len(stage.cli_pairs)} "
                          f"({', '.join(kind for kind, _ in stage.cli_pairs)})")
    slots = stage.cli_pair_slots(inputs, free) if stage.cli_pair_slots else free[:len(inputs)]
    for source, target, slot in zip(more[0::2], more[1::2], slots):
        kind, name = stage.cli_pairs[slot]
        files[kind], outputs[name] = source, target


def refuse_existing_outputs(stage, outputs: dict[str, Path], files: dict) -> None:
    """Refuse output files that exist, as MRtrix3's commands do without ``-force``. Left to the stage's own checks,
    which say more: an output that is one of the inputs or a folder, and a folder output (a stage writing one says
    what it may hold: an earlier output of its own, replaced, or nothing else)."""
    from dwiflow.tasks.options import OptionError

    inputs = {Path(p).resolve() for p in files.values() if p is not None}
    existing = []
    for name, path in outputs.items():
        path = Path(path)
        if stage.output(name).folder or path.is_dir() or path.resolve() in inputs:
            continue
        if path.exists() or path.is_symlink():
            existing.append(str(path))
    if existing:
        them = "them" if len(existing) > 1 else "it"
        raise OptionError(f"output{'s' * (len(existing) > 1)} {', '.join(existing)} exist{'s' * (len(existing) == 1)}:"
                          f" give --force to overwrite {them}")


def run_command(args: argparse.Namespace, warn) -> int:
    """Run the stage a parsed command line names."""
    from dwiflow.bids_specs.outputs import entities_from_filename
    from dwiflow.tasks.options import OptionError, options_from_cli
    from dwiflow.tasks.registry import RunContext
    from dwiflow.tasks.stagelib import describe_outputs, names_in_dir

    stage = args.stage
    requested_flags = [o.name for o in stage.outputs if o.cli == "flag" and getattr(args, _out_dest(o.name), None)]
    fixed = {}
    outputs_option = getattr(stage.options, "outputs_option", None)
    if outputs_option:  # the output flags say which maps the command writes
        if not requested_flags:
            raise OptionError(f"no output requested; give at least one of "
                              f"{', '.join('--' + o.name.replace('_', '-') for o in stage.outputs)}")
        fixed[outputs_option] = requested_flags
    options = options_from_cli(args, stage.options, warn=warn, **fixed)
    files = {given.kind: getattr(args, given.kind, None) for given in stage.inputs}
    outputs = {o.name: Path(getattr(args, _out_dest(o.name))) for o in stage.outputs
               if o.cli in ("positional", "flag") and getattr(args, _out_dest(o.name), None)}
    _assign_pairs(stage, [Path(p) for p in getattr(args, "more_pairs", None) or []], files, outputs)
    source = next((files[g.kind] for g in stage.inputs if not g.flag and files.get(g.kind)), None)
    naming = {"fod_model": getattr(options, "model", None)
              or (entities_from_filename(str(source)).get("model") if source else None) or "csd"}
    if hasattr(args, "out_dir"):
        written = set(stage.writes(options))
        in_dir = [o.name for o in stage.outputs if o.cli == "dir" and o.name in written]
        outputs.update(names_in_dir(stage, in_dir, args.out_dir, source or args.out_dir, naming))
    if not getattr(args, "force", False):
        refuse_existing_outputs(stage, outputs, files)
    _set_threads(getattr(args, "nthreads", None))
    unit = "iterations" if getattr(options, "global_fit", False) else stage.progress
    quiet, verbose = getattr(args, "quiet", False), getattr(args, "verbose", False)
    context = RunContext(progress=_progress(stage.command, unit) if unit and not quiet else None,
                         n_threads=getattr(args, "nthreads", None), naming=naming)
    started = time.perf_counter()
    written = stage.execute({k: (None if v is None else Path(v)) for k, v in files.items()}, outputs, options, context)
    if quiet:
        return 0
    if written:
        tell(f"{stage.label} wrote:\n" + describe_outputs(written))
    if "response" in written and Path(written["response"]).suffix == ".txt":
        tell(Path(written["response"]).read_text().rstrip())
    if verbose:
        tell(f"{stage.label}: done in {time.perf_counter() - started:.2f} s (reading, fitting, writing)")
    return 0


def collect_less_in_this_process() -> None:
    """Garbage-collection settings for a process that runs one command and exits.

    Importing numba and loading its compiled kernels creates a few hundred thousand long-lived objects, which
    CPython's collector walks again and again (generation 2), and several times more while the interpreter tears its
    modules down at exit: ~0.2 s and ~0.3 s of a NODDI command's 2.5 s. Reference cycles are still collected among
    young objects (every 20,000 allocations instead of 700); the full collections of old objects are left out, and
    at exit every object is frozen (``gc.freeze``: the final collections skip them; atexit handlers and the
    modules' teardown run as usual, and the operating system takes the memory back). Not for a long-lived process
    (a test run or a worker calling :func:`main`).
    """
    gc.set_threshold(20_000, 20, 1_000)
    atexit.register(gc.freeze)


def _long_options(parser: argparse.ArgumentParser) -> set[str]:
    """Every ``--option`` of ``parser`` and of the subcommands built into it."""
    found = set()
    for action in parser._actions:
        found.update(o for o in action.option_strings if o.startswith("--"))
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found |= _long_options(child)
    return found


def with_mrtrix3_style_options(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``argv`` with MRtrix3's single-dash spelling of an option (``-mask m.nii.gz``, ``-nthreads 2``, ``-force``,
    ``-quiet``) turned into the double-dash one the command has; a token is changed only when the double-dash
    form is one of the command's options, so values such as ``-0.5`` pass unchanged."""
    known = _long_options(parser)
    converted = []
    for token in argv:
        name = token.split("=", 1)[0]
        if len(name) > 2 and name[0] == "-" and name[1].isalpha() and "-" + name in known:
            token = "-" + token
        converted.append(token)
    return converted


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command ``argv`` (default: the process's arguments, with :func:`collect_less_in_this_process`);
    returns the exit code."""
    from dwiflow.core.errors import DwiflowInputError
    from dwiflow.tasks.options import flag, render_error, unrecognized_arguments

    if argv is None:
        collect_less_in_this_process()
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(*argv[:2])
    argv = with_mrtrix3_style_options(parser, argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the command's own parser, with its usage, not the top level's
        args.stage_parser.error(unrecognized_arguments(args.stage_parser, unknown, argv=argv))
    command = args.command + (f" {args.stage_method}" if getattr(args, "stage_method", None) else "")
    notes: list[str] = []
    error, code = None, 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            code = run_command(args, notes.append)
        except DwiflowInputError as exc:
            error, code = render_error(exc, flag), EXIT_INPUT_ERROR
        except (OSError, MemoryError) as exc:
            error, code = str(exc), 1
    notes += [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    for note in notes:
        complain(f"dwirecon {command}: warning: {note}")
    if error is not None:
        complain(f"dwirecon {command}: error: {error}")
    return code


if __name__ == "__main__":
    sys.exit(main())
