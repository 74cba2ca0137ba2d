"""Settings as data: config dataclass fields that carry their own help text, and what is made from them — command-line
flags (:func:`add_flags`) and configs read back from JSON with every field checked (:func:`from_json`).

Every model config and :class:`jnnex.optim.TrainConfig` declares its fields with :func:`setting`, so the help a user
reads next to ``jnnex train --n-hidden`` is written once, beside the field it describes, and a new model's settings
become command-line flags without editing the CLI.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing

import numpy as np


_NO_NONE = object()  # a setting whose flag takes no ``none``


def setting(default, help: str, *, choices: tuple | None = None, flag: bool = True, none=_NO_NONE):
    """A dataclass field with its help text (and, for strings, the allowed values). ``flag=False``: a field code
    sets (the mesh axis of a synchronised BatchNorm), not a setting a user chooses — no command-line flag.

    ``none``: the value the flag's word ``none`` sets (``None`` for "no minibatch", ``()`` for "no boundaries"); the
    help must say what it means. Without it the flag takes no ``none`` — a field whose ``None`` means "the default,
    worked out from the others" is set by leaving its flag out."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "flag": flag,
                                                        "none": none})


def is_flag(f: dataclasses.Field) -> bool:
    """Whether a config field is a user's setting (a command-line flag)."""
    return f.metadata.get("flag", True)


def positive_int(name: str, value, minimum: int = 1) -> None:
    """A ``ValueError`` naming ``name`` unless ``value`` is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


# ----------------------------------------------------------------------------------------------------------------------
# Flags made from fields


def flag(name: str) -> str:
    """``n_hidden`` -> ``--n-hidden``."""
    return "--" + name.replace("_", "-")


def field_types(cls) -> dict[str, typing.Any]:
    """``name -> annotation`` of a config dataclass's fields, in declaration order."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _parser_of(annotation, name: str, none=_NO_NONE):
    """``(type callable, argparse extras)`` for a field's annotation (``int``, ``float | None``, ``tuple[int, ...]``,
    ``bool``, ``str``); ``none``: the value the word ``none`` gives (:func:`setting`)."""
    args = typing.get_args(annotation)
    if annotation is bool or set(args) == {bool, type(None)}:
        return None, {"action": argparse.BooleanOptionalAction}
    if type(None) in args:  # X | None: parsed as X, and "none" as the setting's ``none`` if it takes one
        inner, extra = _parser_of(next(a for a in args if a is not type(None)), name)
        if none is _NO_NONE:
            return inner, extra
        metavar = extra.get("metavar", getattr(inner, "__name__", "value").upper())
        return (lambda text: none if text.strip().lower() == "none" else inner(text)), {"metavar": f"{metavar}|none"}
    if typing.get_origin(annotation) is tuple:
        item = args[0]

        def items(text):
            try:
                return tuple(item(v) for v in text.split(",") if v.strip())
            except ValueError:
                raise argparse.ArgumentTypeError(f"{flag(name)}: expected comma-separated {item.__name__}s, "
                                                 f"got {text!r}") from None

        return items, {"metavar": f"{item.__name__.upper()},..."}
    return annotation, {}


def add_flags(parser, cls, applies_to: dict[str, list[str]] | None = None, skip=()) -> None:
    """One flag per field of ``cls``, its help from the field's :func:`setting`; ``applies_to`` names, per field, the
    models it applies to (shown in brackets). A flag left out sets no attribute on the parsed namespace (argparse's
    ``SUPPRESS``), so a flag given as ``none`` (an explicit ``None``) is told apart from one not given:
    :func:`given`."""
    for f in dataclasses.fields(cls):
        if f.name in skip or not is_flag(f):
            continue
        kind, extra = _parser_of(field_types(cls)[f.name], f.name, f.metadata.get("none", _NO_NONE))
        help_text = f.metadata.get("help", "")
        if applies_to is not None:
            help_text += f" [{', '.join(applies_to[f.name])}]"
        if kind is not None:
            extra["type"] = kind
        if f.metadata.get("choices"):
            extra["choices"] = f.metadata["choices"]
        parser.add_argument(flag(f.name), dest=f.name, default=argparse.SUPPRESS, help=help_text, **extra)


def given(args: argparse.Namespace, names) -> dict:
    """The settings among ``names`` given on the command line, by :func:`add_flags`' flags — ``None`` included, where
    a flag was given as ``none``."""
    return {name: getattr(args, name) for name in names if hasattr(args, name)}


# ----------------------------------------------------------------------------------------------------------------------
# Configs read back from JSON


def _json_value(annotation, value, where: str):
    """``value`` (as JSON gave it) checked against ``annotation`` and converted (lists to tuples); a ``ValueError``
    naming ``where`` otherwise."""
    args = typing.get_args(annotation)
    if type(None) in args:
        if value is None:
            return None
        annotation = next(a for a in args if a is not type(None))
        args = typing.get_args(annotation)
    if typing.get_origin(annotation) is tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{where} must be a list, got {value!r}")
        return tuple(_json_value(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if annotation is bool:
        ok = isinstance(value, bool)
    elif annotation is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif annotation is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    elif annotation is str:
        ok = isinstance(value, str)
    else:
        ok = True
    if not ok:
        raise ValueError(f"{where} must be {getattr(annotation, '__name__', annotation)}, got {value!r}")
    return value


def from_json(cls, doc, where: str):
    """The config dataclass ``cls`` from its ``dataclasses.asdict`` after a JSON round trip, every field checked:
    an unknown field, a wrong type or a value the config refuses is a ``ValueError`` that names ``where`` (say,
    ``"runs/x/config.json: model_config"``) and the field. A missing field takes its default (a field added to a
    config later leaves older files readable)."""
    if not isinstance(doc, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(doc).__name__}")
    types = field_types(cls)
    unknown = sorted(set(doc) - set(types))
    if unknown:
        raise ValueError(f"{where} has unknown field(s) {unknown}; {cls.__name__} has {list(types)}")
    values = {k: _json_value(types[k], v, f"{where}.{k}") for k, v in doc.items()}
    for f in dataclasses.fields(cls):
        if not is_flag(f) and f.name in values and values[f.name] != f.default:
            raise ValueError(f"{where}.{f.name} is set by code at run time, not by a file; it must be {f.default!r}, "
                             f"got {values[f.name]!r}")
    try:
        return cls(**values)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {e}") from None
