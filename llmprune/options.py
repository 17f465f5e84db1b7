"""A registered part's typed options, and what is generated from them.

Each scorer carries a frozen dataclass of its options (`RIA.Options`: `alpha`; `SparseGPT.Options`: `blocksize`,
`percdamp`). Everything else is generated from its fields, so adding an option is one line in the scorer's
own file:

    field             alpha: float = field(default=0.5, metadata={"help": "...", "label": "..."})
    command line      --ria-alpha 0.5         (--<method>-<field>, "_" -> "-"; type, default and help from the field)
    recipe, config    options: {alpha: 0.5}   (PruneConfig.options; the flat key ria_alpha is accepted too)
    llmprune.json     "options": {"alpha": 0.5}
    model card        the reproduce command's --ria-alpha 0.5 and a table row labelled by `metadata["label"]`

Field types: bool, int, float, str, or a Literal of strings (choices). Validation beyond the type goes in the
dataclass's `__post_init__` (raise LLMPruneError). On the ground floor: imports nothing of llmprune but errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Iterable

from .errors import LLMPruneError

_TYPES = (bool, int, float, str)


@dataclass(frozen=True)
class NoOptions:
    """A part without options."""


@dataclass(frozen=True)
class OptionSpec:
    """One option as the generators see it: its field name, type, default, help text and card label."""

    name: str
    type: type
    default: Any
    help: str
    label: str
    choices: tuple[str, ...] | None = None


def option_specs(options_cls: type) -> tuple[OptionSpec, ...]:
    """The fields of an options dataclass, with their resolved types (checked: see `check_options_class`)."""
    hints = typing.get_type_hints(options_cls, localns={"Literal": typing.Literal})  # also for a class in a function
    out = []
    for f in dataclasses.fields(options_cls):
        typ, choices = hints[f.name], None
        if typing.get_origin(typ) is typing.Literal:
            choices = tuple(typing.get_args(typ))
            if not all(isinstance(c, str) for c in choices):
                raise TypeError(f"{options_cls.__name__}.{f.name}: a Literal option takes strings only")
            typ = str
        if typ not in _TYPES:
            raise TypeError(f"{options_cls.__name__}.{f.name}: option type {typ!r} is not one of bool, int, float, "
                            "str or a Literal of strings")
        if f.default is dataclasses.MISSING:
            raise TypeError(f"{options_cls.__name__}.{f.name}: an option needs a default")
        meta = f.metadata or {}
        out.append(OptionSpec(f.name, typ, f.default, str(meta.get("help", "")), str(meta.get("label", f.name)),
                              choices))
    return tuple(out)


def check_options_class(options_cls: type, owner: str) -> None:
    """Fail at registration (not at the user's first run) when `options_cls` is not a frozen dataclass whose
    fields all have a supported type and a default; its defaults must pass its own validation."""
    if not (dataclasses.is_dataclass(options_cls) and isinstance(options_cls, type)):
        raise TypeError(f"{owner}: Options must be a dataclass, got {options_cls!r}")
    if not options_cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        raise TypeError(f"{owner}: Options {options_cls.__name__} must be frozen (@dataclass(frozen=True))")
    option_specs(options_cls)
    options_cls()


def flat_key(method: str, name: str) -> str:
    """The flat config key of an option: method "ria", field "alpha" -> "ria_alpha"."""
    return f"{method.replace('-', '_')}_{name}"


def flag(method: str, name: str) -> str:
    """The command-line flag of an option: "--ria-alpha"."""
    return "--" + flat_key(method, name).replace("_", "-")


def _coerce(value: Any, spec: OptionSpec, key: str) -> Any:
    """`value` as the option's type (an int where a float goes is a float); a wrong type is an LLMPruneError."""
    typ = spec.type
    ok = (isinstance(value, bool) if typ is bool else
          isinstance(value, int) and not isinstance(value, bool) if typ is int else
          isinstance(value, (int, float)) and not isinstance(value, bool) if typ is float else
          isinstance(value, str))
    if not ok:
        raise LLMPruneError(f"{key} must be {'a' if typ is not int else 'an'} {typ.__name__}, got {value!r}")
    if typ is float:
        value = float(value)
    if spec.choices is not None and value not in spec.choices:
        from .registry import unknown_name_message

        raise LLMPruneError(unknown_name_message(f"value of {key}", value, list(spec.choices)))
    return value


def make_options(options_cls: type, given: Any, method: str) -> Any:
    """The options instance of `method` from `given`: None (the defaults), an instance of `options_cls`, or a
    mapping of field names to plain values (a recipe's, llmprune.json's). Unknown names and wrong types are
    errors that name the method and the flat key."""
    if given is None:
        return options_cls()
    if isinstance(given, options_cls):
        return given
    if dataclasses.is_dataclass(given) and not isinstance(given, type):
        raise LLMPruneError(f"options {type(given).__name__} are not the options of method {method!r} "
                            f"({options_cls.__name__}); give its own, or options=None for its defaults")
    if not isinstance(given, Mapping):
        raise LLMPruneError(f"options of method {method!r} must be a mapping of its option names, got {given!r}")
    specs = {s.name: s for s in option_specs(options_cls)}
    unknown = sorted(set(given) - set(specs))
    if unknown:
        from .registry import unknown_name_message

        if not specs:
            raise LLMPruneError(f"method {method!r} has no options; got {', '.join(map(str, unknown))}")
        raise LLMPruneError(f"method {method!r}: " + unknown_name_message("option", str(unknown[0]), sorted(specs)))
    values = {k: _coerce(v, specs[k], flat_key(method, k)) for k, v in given.items()}
    try:
        return options_cls(**values)
    except (TypeError, ValueError) as e:
        if isinstance(e, LLMPruneError):
            raise
        raise LLMPruneError(f"options of method {method!r}: {e}") from None


def options_dict(options: Any) -> dict[str, Any]:
    """Plain field -> value of an options instance (or a copy of a mapping)."""
    if options is None:
        return {}
    if isinstance(options, Mapping):
        return dict(options)
    return dataclasses.asdict(options)


# ---------------------------------------------------------------- the command line


def add_option_flags(group, parts: Iterable[tuple[str, type]]) -> None:
    """Add `--<method>-<field>` to an argparse group for every option of every (method, Options) in `parts`."""
    for method, options_cls in parts:
        for s in option_specs(options_cls):
            help_ = (s.help or f"option {s.name} of method {method}").rstrip(".")
            kw: dict[str, Any] = {"default": s.default, "help": f"{help_} (method {method}; default {s.default})"}
            if s.type is bool:
                kw["action"] = argparse.BooleanOptionalAction
            else:
                kw["type"], kw["metavar"] = s.type, s.type.__name__.upper()
                if s.choices:
                    kw["choices"] = s.choices
            group.add_argument(flag(method, s.name), dest=flat_key(method, s.name), **kw)


def options_from_args(args: argparse.Namespace, method: str, parts: Iterable[tuple[str, type]]) -> dict[str, Any]:
    """PruneConfig keyword arguments from parsed flags: `options` of `method`, plus the flat keys of other
    methods' flags given at a value other than their default (PruneConfig validates them and says they are
    ignored)."""
    out: dict[str, Any] = {}
    for m, options_cls in parts:
        values = {s.name: getattr(args, flat_key(m, s.name)) for s in option_specs(options_cls)}
        if m == method:
            out["options"] = values
        else:
            out.update({flat_key(m, s.name): values[s.name] for s in option_specs(options_cls)
                        if values[s.name] != s.default})
    return out


def format_arg(value: Any) -> str:
    """An option's value as a command-line argument that parses back to the same value."""
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    return str(value)


def option_args(method: str, values: Mapping[str, Any]) -> list[str]:
    """The reproduce command's arguments for a method's options: ["--ria-alpha", "0.5", ...]."""
    args: list[str] = []
    for name, value in values.items():
        if isinstance(value, bool):
            args.append(flag(method, name) if value else "--no-" + flag(method, name)[2:])
        else:
            args += [flag(method, name), format_arg(value)]
    return args


def recorded_options(options_cls: type | None, method: str, prune: Mapping[str, Any]) -> dict[str, Any]:
    """A method's options as a record gives them: `options`, or (records before options existed) the flat
    keys `<method>_<field>`, each filled in with the default where missing. `options_cls` None (a method not
    registered here): the recorded ones as they are."""
    given = dict(prune.get("options") or {})
    if options_cls is None:
        return given
    out = {}
    for s in option_specs(options_cls):
        out[s.name] = given.get(s.name, prune.get(flat_key(method, s.name), s.default))
    return out


__all__ = ["NoOptions", "OptionSpec", "option_specs", "check_options_class", "flat_key", "flag", "make_options",
           "options_dict", "add_option_flags", "options_from_args", "format_arg", "option_args", "recorded_options"]
