"""Settings as data: config dataclass fields that carry their own help text, and the one integer validator.

Every model config and :class:`jnnex.train.TrainConfig` declares its fields with :func:`setting`, so the help a user
reads next to ``jnnex train --n-hidden`` is written once, beside the field it describes, and a new model's settings
become command-line flags without editing the CLI.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def setting(default, help: str, *, choices: tuple | None = None):
    """A dataclass field with its help text (and, for strings, the allowed values)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


def positive_int(name: str, value, minimum: int = 1) -> None:
    """A ``ValueError`` naming ``name`` unless ``value`` is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
