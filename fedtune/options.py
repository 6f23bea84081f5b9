"""Typed option dataclasses built from untyped mappings.

Strategies and client recipes each declare their options as a small dataclass. Values arrive as
TOML values (config files), as strings (``--option key=value`` on the command line, and the
task header's options map on the wire). ``build_options`` turns either into the dataclass,
rejecting unknown names and wrong types with a message that names the option, so a typo never
falls back to a default silently.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Mapping, TypeVar

T = TypeVar("T")


class OptionsError(ValueError):
    """An option that is unknown, of the wrong type, or out of range; the message names it."""


@dataclasses.dataclass(frozen=True)
class MethodOptions:
    """Base of option dataclasses that combine by inheritance: a method's options (read by its
    strategy on the coordinator and its recipe on the device) and the options every recipe
    understands (``fedtune.contract.local_options``). Each ``__post_init__`` checks its own
    fields and then calls ``super().__post_init__()``, so a combination runs every check."""

    def __post_init__(self) -> None:
        pass


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """For strategies and recipes without options."""


def option_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def build_options(cls: type[T], values: Mapping[str, Any], where: str) -> T:
    """``cls(**values)`` with every value checked against the field's type (strings are parsed),
    and the dataclass's own checks (``__post_init__`` raising ValueError) reported as
    OptionsError. ``where`` prefixes messages, e.g. ``"strategy fedadam"``."""
    hints = typing.get_type_hints(cls)
    fields = option_names(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        valid = ", ".join(fields) or "none"
        raise OptionsError(f"{where}: unknown option {unknown[0]!r} (valid options: {valid})")
    typed = {key: _coerce(hints[key], value, f"{where}: option {key!r}") for key, value in values.items()}
    try:
        return cls(**typed)
    except (TypeError, ValueError) as exc:
        raise OptionsError(f"{where}: {exc}") from None


def options_to_wire(options: Any) -> dict[str, str]:
    """A dataclass of options as the string map the task header carries."""
    out = {}
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        out[f.name] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return out


def parse_scalar(text: str) -> Any:
    """A command-line value: a TOML number or boolean when it reads as one, else the string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _coerce(hint: Any, value: Any, what: str) -> Any:
    try:
        return coerce_scalar(hint, value, from_text=True)
    except ValueError as exc:
        raise OptionsError(f"{what}: {exc}, got {value!r}") from None


def coerce_scalar(hint: Any, value: Any, *, from_text: bool) -> Any:
    """``value`` as a bool, int, float or str (``hint``), or ValueError saying what was expected.
    With ``from_text``, strings are parsed (command-line and wire values); a config file's
    values are typed by TOML and must match as they are."""
    if from_text and isinstance(value, str) and hint is not str:
        text = value.strip().lower()
        if hint is bool and text in ("true", "false", "1", "0"):
            return text in ("true", "1")
        try:
            value = int(value) if hint is int else float(value) if hint is float else value
        except ValueError:
            pass
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError("expected true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("expected an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("expected a number")
        if not math.isfinite(value):
            raise ValueError("expected a finite number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError("expected a string")
        return value
    raise ValueError(f"unsupported type {hint}")  # pragma: no cover - a developer error
