"""Typed stage options: one declaration per option gives its type, default, help, range and aliases.

A stage's options are a frozen dataclass deriving from :class:`StageOptions` whose fields are
declared with :func:`option`. From that one declaration come:

* validation of recon-spec values (:meth:`StageOptions.from_mapping`), with errors naming the
  key path (``stages.csd.lmax: must be an even integer, got 7``);
* the ``dwirecon`` command-line options (:func:`add_cli_options`, dashes instead of underscores)
  and their parsing, with errors naming the flag (``--lmax``);
* deprecated spellings (:class:`Alias`) that still work and warn, as DIPY's ``deprecated_params``;
* the README's table of options (:func:`markdown_rows`).

Rules between options live in the class's :meth:`StageOptions.check`, and which outputs a
configuration writes in :meth:`StageOptions.writes`.
"""

from __future__ import annotations

import argparse
import difflib
import math
import types
import typing
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

from dwiflow.core.errors import DwiflowInputError

_UNSET = object()


class OptionError(DwiflowInputError):
    """A bad option value or combination of options.

    ``template`` names the options as ``{name}`` placeholders; :meth:`render` spells them as the
    front end does (``--lmax``, ``stages.csd.lmax``). ``str(error)`` spells them as Python names.
    """

    def __init__(self, template: str, *names: str) -> None:
        self.template = template
        self.names = names
        super().__init__(self.render(lambda name: name), parameters=names)

    def render(self, spell: Callable[[str], str]) -> str:
        return self.template.format(**{name: spell(name) for name in self.names})


def render_error(error: DwiflowInputError, spell: Callable[[str], str]) -> str:
    """An input error's message with its parameters spelled by ``spell``.

    :class:`OptionError` templates are filled in; a core error that names parameters (as the
    Python API spells them) is prefixed with their front-end spelling.
    """
    if isinstance(error, OptionError):
        return error.render(spell)
    if error.parameters:
        return f"{', '.join(spell(p) for p in error.parameters)}: {error}"
    return str(error)


@dataclass(frozen=True)
class Alias:
    """A deprecated spelling of an option.

    ``name``: the old name (underscores; dashes on the command line). ``const``: for an old
    command-line switch that set a fixed value (``--isotropic`` for ``anisotropic_scaling=False``),
    that value; otherwise the old option took a value like the new one. ``cli``/``spec``: where the
    old spelling existed.
    """

    name: str
    const: Any = _UNSET
    cli: bool = True
    spec: bool = True


@dataclass(frozen=True)
class OptionInfo:
    """What :func:`option` records about one option (in the dataclass field's metadata)."""

    help: str
    choices: tuple | None = None
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    even: bool = False
    length: tuple[int, ...] | None = None
    aliases: tuple[Alias, ...] = ()
    cli: bool = True
    spec: bool = True
    metavar: str | None = None
    units: str = ""


def option(
    default: Any = MISSING,
    *,
    help: str,
    choices: Iterable | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
    even: bool = False,
    length: int | tuple[int, ...] | None = None,
    aliases: Iterable[Alias] = (),
    cli: bool = True,
    spec: bool = True,
    metavar: str | None = None,
    units: str = "",
) -> Any:
    """Declare an option of a :class:`StageOptions` class.

    Parameters
    ----------
    default
        The default (a list default is copied per instance).
    help : str
        One sentence: what the option does (shown by ``--help`` and in the README table).
    choices
        Allowed values (for strings: also the allowed strings of a number-or-string option).
    minimum, maximum, exclusive_minimum
        Range of a number (or of every element of a list).
    even : bool
        An even integer.
    length : int or tuple of int
        Allowed lengths of a list.
    aliases : iterable of Alias
        Deprecated spellings that keep working with a warning.
    cli, spec : bool
        Whether ``dwirecon`` / recon specs expose the option.
    metavar, units : str
        How the value is shown on the command line; its units (for the README).
    """
    info = OptionInfo(help=help, choices=tuple(choices) if choices is not None else None, minimum=minimum,
                      maximum=maximum, exclusive_minimum=exclusive_minimum, even=even,
                      length=(length,) if isinstance(length, int) else length, aliases=tuple(aliases), cli=cli,
                      spec=spec, metavar=metavar, units=units)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"option": info})
    return field(default=default, metadata={"option": info})


# ------------------------------------------------------------------------------------------------ types
def _members(annotation: Any) -> tuple:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def type_text(annotation: Any) -> str:
    """Readable type of an annotation (``int or null``, ``list of float``)."""
    parts = []
    for member in _members(annotation):
        if member is type(None):
            parts.append("null")
        elif typing.get_origin(member) in (list, tuple):
            args = typing.get_args(member)
            parts.append(f"list of {args[0].__name__}")
        else:
            parts.append(member.__name__)
    return " or ".join(parts)


def _coerce_scalar(kind: type, value: Any) -> Any:
    """``value`` as ``kind`` or ``_UNSET`` when it is not one (no silent conversions between types)."""
    if kind is bool:
        return value if isinstance(value, bool) else _UNSET
    if kind is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _UNSET
    if kind is float:
        if isinstance(value, bool):
            return _UNSET
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                return _UNSET
        return _UNSET
    if kind is str:
        return value if isinstance(value, str) else _UNSET
    raise TypeError(f"unsupported option type {kind!r}")


def coerce(annotation: Any, value: Any) -> Any:
    """``value`` converted to the option's annotated type, or ``_UNSET`` when it is not of that type."""
    for member in _members(annotation):
        if member is type(None):
            if value is None:
                return None
            continue
        origin = typing.get_origin(member)
        if origin in (list, tuple):
            if not isinstance(value, (list, tuple)):
                continue
            item = typing.get_args(member)[0]
            items = [_coerce_scalar(item, v) for v in value]
            if any(v is _UNSET for v in items):
                continue
            return tuple(items) if origin is tuple else list(items)
        if value is None:
            continue
        converted = _coerce_scalar(member, value)
        if converted is not _UNSET:
            return converted
    return _UNSET


def _check_number(name: str, value: float, info: OptionInfo, what: str = "") -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise OptionError(f"{{{name}}}: {what}must be a finite number, got {value!r}", name)
    if info.minimum is not None:
        if (value <= info.minimum) if info.exclusive_minimum else (value < info.minimum):
            bound = f"> {info.minimum:g}" if info.exclusive_minimum else f">= {info.minimum:g}"
            raise OptionError(f"{{{name}}}: {what}must be {bound}, got {value!r}", name)
    if info.maximum is not None and value > info.maximum:
        raise OptionError(f"{{{name}}}: {what}must be <= {info.maximum:g}, got {value!r}", name)
    if info.even and isinstance(value, int) and value % 2:
        raise OptionError(f"{{{name}}}: {what}must be an even integer, got {value!r}", name)


def validate_value(name: str, annotation: Any, info: OptionInfo, value: Any) -> Any:
    """Check one option's value against its declaration; returns it converted. Raises OptionError."""
    converted = coerce(annotation, value)
    if converted is _UNSET and not isinstance(value, (list, tuple)) and (info.length is None or 1 in info.length):
        lists = [m for m in _members(annotation) if typing.get_origin(m) in (list, tuple)]
        if lists and coerce(lists[0], [value]) is not _UNSET:  # one value for a list: a list of one
            converted = coerce(lists[0], [value])
    if converted is _UNSET:
        raise OptionError(f"{{{name}}}: must be {type_text(annotation)}, got {value!r}", name)
    if isinstance(converted, str):
        if info.choices is not None and converted not in info.choices:
            others = [m for m in _members(annotation) if m not in (str, type(None))]
            kinds = f"{type_text(others[0])} or " if others else ""
            raise OptionError(f"{{{name}}}: must be {kinds}one of {', '.join(map(str, info.choices))}, got "
                              f"{converted!r}", name)
    elif isinstance(converted, (list, tuple)):
        if info.length is not None and len(converted) not in info.length:
            counts = " or ".join(map(str, info.length))
            raise OptionError(f"{{{name}}}: must have {counts} values, got {len(converted)}", name)
        for item in converted:
            if isinstance(item, str):
                if info.choices is not None and item not in info.choices:
                    raise OptionError(f"{{{name}}}: every value must be one of {', '.join(map(str, info.choices))}, "
                                      f"got {item!r}", name)
            else:
                _check_number(name, item, info, "every value ")
    elif isinstance(converted, (int, float)) and not isinstance(converted, bool):
        _check_number(name, converted, info)
    return converted


# ------------------------------------------------------------------------------------------------ options class
@dataclass(frozen=True)
class StageOptions:
    """Base of every stage's options: a frozen dataclass of :func:`option` fields.

    Subclasses add rules between options in :meth:`check` and say which outputs a configuration
    writes in :meth:`writes`.
    """

    # the option (if any) listing the outputs a run writes; on the command line the output flags set it
    outputs_option: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            info = f.metadata.get("option")
            if info is None:
                continue
            value = validate_value(f.name, hints[f.name], info, getattr(self, f.name))
            object.__setattr__(self, f.name, value)
        self.check()

    def check(self) -> None:
        """Rules between options; raise :class:`OptionError` naming them."""

    def writes(self) -> Iterable[str] | None:
        """The outputs this configuration writes (None: every output of the stage)."""
        return None

    @classmethod
    def option_fields(cls) -> list[tuple[Any, OptionInfo, Any]]:
        """(field, info, annotation) of every option, in declaration order."""
        hints = typing.get_type_hints(cls)
        return [(f, f.metadata["option"], hints[f.name]) for f in fields(cls) if "option" in f.metadata]

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        out = {}
        for f, _, _ in cls.option_fields():
            out[f.name] = f.default_factory() if f.default_factory is not MISSING else f.default
        return out

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None, *, warn: Callable[[str], None] | None = None,
                     spell: Callable[[str], str] = lambda name: name) -> "StageOptions":
        """Options from a recon spec's mapping: unknown keys, wrong types, ranges and rules are errors
        (:class:`OptionError`); deprecated keys are renamed with a warning (``warn``, default
        :func:`warnings.warn`)."""
        values = dict(values or {})
        known = {f.name: info for f, info, _ in cls.option_fields() if info.spec}
        renamed: dict[str, Any] = {}
        for key, value in values.items():
            if key in known:
                renamed[key] = value
                continue
            alias = _find_alias(cls, key, spec=True)
            if alias is None:
                allowed = ", ".join(sorted(known)) or "none"
                if key in {f.name for f, _, _ in cls.option_fields()}:  # declared with spec=False
                    raise OptionError(f"{{{key}}}: a command-line option only (--{key.replace('_', '-')}), not one "
                                      f"of a recon spec (allowed here: {allowed})", key)
                raise OptionError(f"{{{key}}}: unknown option (allowed: {allowed})", key)
            target, entry = alias
            (warn or _warn)(f"{spell(key)} is deprecated; use {spell(target)}")
            if target in values or target in renamed:
                raise OptionError(f"{{{key}}} and {{{target}}} are the same option: give only {{{target}}}", key, target)
            renamed[target] = entry.const if entry.const is not _UNSET else value
        return cls(**renamed)

    def to_dict(self, spec_only: bool = False) -> dict[str, Any]:
        """Plain values (lists for tuples), for hashing and for sidecars; ``spec_only``: the options a recon
        spec can set."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f, info, _ in self.option_fields() if info.spec or not spec_only}


def _warn(message: str) -> None:
    warnings.warn(message, FutureWarning, stacklevel=3)


def _find_alias(cls: type[StageOptions], key: str, *, spec: bool) -> tuple[str, Alias] | None:
    for f, info, _ in cls.option_fields():
        for alias in info.aliases:
            if alias.name == key and (alias.spec if spec else alias.cli):
                return f.name, alias
    return None


# ------------------------------------------------------------------------------------------------ command line
def flag(name: str) -> str:
    """``lambda_par_bounds`` → ``--lambda-par-bounds``."""
    return "--" + name.replace("_", "-")


def _cli_value(annotation: Any, name: str) -> Callable[[str], Any]:
    """argparse ``type=`` for an option: splits lists on commas, reads numbers and ``none``; the options
    class validates the result."""
    members = _members(annotation)

    def scalar(kind: type, text: str) -> Any:
        if kind is bool:
            if text.lower() in ("true", "yes", "1"):
                return True
            if text.lower() in ("false", "no", "0"):
                return False
            return _UNSET
        if kind is int:
            try:
                return int(text)
            except ValueError:
                return _UNSET
        if kind is float:
            try:
                return float(text)
            except ValueError:
                return _UNSET
        return text

    def parse(text: str) -> Any:
        stripped = text.strip()
        if type(None) in members and stripped.lower() in ("none", "null"):
            return None
        for member in members:
            if member is type(None):
                continue
            if typing.get_origin(member) in (list, tuple):
                if "," not in stripped and len(members) > 1 and str in members:
                    continue  # a single word for a list-or-string option is the string (e.g. a file name)
                item = typing.get_args(member)[0]
                parts = [scalar(item, p) for p in stripped.replace(" ", "").split(",") if p != ""]
                if parts and all(p is not _UNSET for p in parts):
                    return parts
                continue
            value = scalar(member, stripped)
            if value is not _UNSET:
                return value
        raise argparse.ArgumentTypeError(f"expected {type_text(annotation)}, got {text!r}")

    return parse


def unrecognized_arguments(parser: argparse.ArgumentParser, unknown: list[str],
                           foreign: dict[str, str] | None = None, argv: Sequence[str] = ()) -> str:
    """The error for arguments ``parser`` does not take, naming the option meant when one is misspelt (argparse says
    only "unrecognized arguments"), or what ``foreign`` says of another tool's option (option → note); with the
    command line ``argv``, a value given to a switch (MRtrix3's ``-afd afd.mif``; here ``--afd`` takes none)."""
    known = [option for action in parser._actions for option in action.option_strings]
    switches = {option for action in parser._actions if action.nargs == 0 for option in action.option_strings}
    hints = []
    for before, argument in zip(argv, argv[1:]):
        if argument in unknown and not argument.startswith("-") and before in switches:
            hints.append(f"{before} takes no value")
    for argument in unknown:
        name = argument.split("=", 1)[0]
        compared = name
        if len(name) > 2 and name[0] == "-" and name[1].isalpha():
            compared = "-" + name  # MRtrix3's single-dash spelling (-lmax): compared as the double-dash one
        close = difflib.get_close_matches(compared, known, n=1, cutoff=0.6) if compared.startswith("--") else []
        if foreign and name in foreign:
            hints.append(f"{name}: {foreign[name]}")
        elif name.lstrip("-") in ("fslgrad", "grad") and "bval" in {a.dest for a in parser._actions}:
            hints.append(f"{name}: the gradients are the positional BVAL BVEC after the DWI, b-values first "
                         f"(-fslgrad takes bvecs first)")
        elif close:
            hints.append(f"{name}: did you mean {close[0]}?")
    return f"unrecognized arguments: {' '.join(unknown)}" + (f" ({'; '.join(hints)})" if hints else "")


def add_cli_options(parser: argparse.ArgumentParser, options: type[StageOptions]) -> None:
    """Add one command-line option per option of ``options`` (and hidden deprecated spellings)."""
    for f, info, annotation in options.option_fields():
        if not info.cli:
            continue
        default_text = options.defaults()[f.name]
        if isinstance(default_text, (list, tuple)):
            default_text = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default_text)
        text = info.help if "default" in info.help else \
            f"{info.help} (default: {'none' if default_text is None else default_text})"
        if annotation is bool:
            parser.add_argument(flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=_UNSET,
                                help=text)
        else:
            metavar = info.metavar or (
                "{" + ",".join(map(str, info.choices)) + "}" if info.choices and str in _members(annotation) else None)
            parser.add_argument(flag(f.name), dest=f.name, type=_cli_value(annotation, f.name), default=_UNSET,
                                metavar=metavar, help=text)
        for alias in info.aliases:
            if not alias.cli:
                continue
            dest = f"_alias__{f.name}__{alias.name}"
            if alias.const is not _UNSET:
                parser.add_argument(flag(alias.name), dest=dest, action="store_const", const=alias.const,
                                    default=_UNSET, help=argparse.SUPPRESS)
            else:
                parser.add_argument(flag(alias.name), dest=dest, type=_cli_value(annotation, f.name), default=_UNSET,
                                    help=argparse.SUPPRESS)


def options_from_cli(args: argparse.Namespace, options: type[StageOptions], *,
                     warn: Callable[[str], None] | None = None, **fixed: Any) -> StageOptions:
    """The options given on the command line (unset ones take their defaults), with ``fixed`` values set
    by the command itself (e.g. which maps its output flags asked for). Raises OptionError."""
    values: dict[str, Any] = dict(fixed)
    for f, info, _ in options.option_fields():
        if not info.cli:
            continue
        given = getattr(args, f.name, _UNSET)
        if given is not _UNSET:
            values[f.name] = given
        for alias in info.aliases:
            old = getattr(args, f"_alias__{f.name}__{alias.name}", _UNSET)
            if old is _UNSET:
                continue
            instead = flag(f.name) if alias.const is not False else "--no-" + flag(f.name)[2:]
            (warn or _warn)(f"{flag(alias.name)} is deprecated; use {instead}")
            if given is not _UNSET:
                raise OptionError(f"{{{f.name}}} and {flag(alias.name)} are the same option: give only {{{f.name}}}",
                                  f.name)
            values[f.name] = old
    return options(**values)


# ------------------------------------------------------------------------------------------------ documentation
def markdown_rows(options: type[StageOptions]) -> list[str]:
    """README table rows (``| option | type | default | help |``) of an options class."""
    rows = []
    for f, info, annotation in options.option_fields():
        default = options.defaults()[f.name]
        where = [] if info.spec and info.cli else ["command line only"] if info.cli else ["recon spec only"]
        if info.choices:
            where.append("one of " + ", ".join(f"`{c}`" for c in info.choices))
        if info.minimum is not None or info.maximum is not None:
            low = "" if info.minimum is None else f"{'>' if info.exclusive_minimum else '≥'} {info.minimum:g}"
            high = "" if info.maximum is None else f"≤ {info.maximum:g}"
            where.append(" and ".join(p for p in (low, high) if p))
        if info.aliases:
            where.append("formerly " + ", ".join(f"`{a.name}`" for a in info.aliases))
        extra = f" ({'; '.join(where)})" if where else ""
        units = f" [{info.units}]" if info.units else ""
        if info.even:
            where.insert(0, "even")
        extra = f" ({'; '.join(where)})" if where else ""
        names = " / ".join(n for n in (f"`{f.name}`" if info.spec else "", f"`{flag(f.name)}`" if info.cli else "") if n)
        rows.append(f"| {names} | {type_text(annotation)} | `{_yaml_text(default)}` | {info.help}{units}{extra} |")
    return rows


def _yaml_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_text(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
