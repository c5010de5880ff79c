"""How one setting is declared: the check its value must pass, and its secret and per-instance marks.

A check runs whenever a section is built (at load, and on ``attrs.evolve``), so a value that passed is
well typed and in range wherever it is read. A failing check raises :class:`ConfigError` with one line
``<VARIABLE>: <why>``, the variable being the field's name in upper case, never a traceback.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NoReturn
from urllib.parse import urlsplit

import attrs

Check = Callable[[Any, "attrs.Attribute[Any]", Any], None]


class ConfigError(Exception):
    """A setting is missing or malformed; the message names the variable and is one line.

    ``subject`` (when given) is what the message names before its reason, e.g. a place in the instances
    file (``INSTANCES_FILE [instances."acme-bot"].max_messages``): shown as written, never redacted."""

    def __init__(self, message: str, *, subject: str | None = None) -> None:
        super().__init__(f"{subject}: {message}" if subject is not None else message)
        self.subject = subject
        self.reason = message if subject is not None else None


def setting(check: Check, *, per_instance: bool = False, lower: bool = False) -> Any:
    """A setting that ``check`` validates. ``per_instance``: an instance may override it (see
    actors/settings/sections.py). ``lower``: text is stripped and lower-cased first (names, enums)."""
    return attrs.field(validator=check, converter=_lowered if lower else None,
                       metadata={"secret": False, "per_instance": per_instance})


def secret(*, per_instance: bool = False) -> Any:
    """A secret: read from the environment or .env only, empty when unset, left out of ``repr``."""
    return attrs.field(default="", validator=text(), repr=False,
                       metadata={"secret": True, "per_instance": per_instance})


def _lowered(value: Any) -> Any:
    if isinstance(value, str):
        return value.strip().lower()
    if isinstance(value, tuple) and all(isinstance(item, str) for item in value):
        return tuple(item.strip().lower() for item in value)
    return value   # the wrong type: the check says so


def _fail(attribute: attrs.Attribute[Any], why: str) -> NoReturn:
    raise ConfigError(f"{attribute.name.upper()}: {why}")


def _typed(attribute: attrs.Attribute[Any], value: Any, kinds: tuple[type, ...], expected: str) -> None:
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        _fail(attribute, f"expected {expected}, got {type(value).__name__}")


def _alternatives(choices: tuple[str, ...]) -> str:
    return choices[0] if len(choices) == 1 else f"{', '.join(choices[:-1])} or {choices[-1]}"


def integer(minimum: int, maximum: int | None = None) -> Check:
    """A whole number of at least ``minimum`` (and at most ``maximum``)."""
    def check(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        _typed(attribute, value, (int,), "int")
        if maximum is not None and not minimum <= value <= maximum:
            _fail(attribute, f"must be between {minimum} and {maximum}")
        if value < minimum:
            _fail(attribute, "must be 0 or more" if minimum == 0 else f"must be at least {minimum}")
    return check


def at_least_setting(minimum: int, other: str) -> Check:
    """A whole number of at least ``minimum`` and at least the section's setting ``other``."""
    own = integer(minimum)

    def check(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        own(instance, attribute, value)
        if value < getattr(instance, other):
            _fail(attribute, f"must be at least {other.upper()}")
    return check


def number(*, positive: bool = False) -> Check:
    """A finite number (seconds, minutes, a rate): 0 or more, or above 0 when ``positive``."""
    def check(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        _typed(attribute, value, (int, float), "float")
        if not math.isfinite(value):
            _fail(attribute, "must be a finite number")
        if positive and value <= 0:
            _fail(attribute, "must be positive")
        if value < 0:
            _fail(attribute, "must be 0 or more")
    return check


def of_type(kind: type) -> Check:
    """A value of ``kind`` and nothing more to check: a flag (bool), a path (Path)."""
    def check(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        _typed(attribute, value, (kind,), kind.__name__)
    return check


def text(*choices: str, required: bool = False, upper: bool = False,
         why: Callable[[str], str] | None = None) -> Check:
    """Text: one of ``choices`` when given (compared in upper case when ``upper``), not empty when
    ``required``. ``why`` words the refusal of a value that is not among the choices."""
    def check(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        _typed(attribute, value, (str,), "str")
        if required and not value.strip():
            _fail(attribute, "must not be empty")
        if choices and (value.upper() if upper else value) not in choices:
            _fail(attribute, why(value) if why is not None else f"must be {_alternatives(choices)}")
    return check


def names(*choices: str, why: Callable[[str], str] | None = None) -> Check:
    """A comma-separated list (a tuple of text), each item one of ``choices`` when given."""
    def check(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        _typed(attribute, value, (tuple,), "tuple[str, ...]")
        for item in value:
            if not isinstance(item, str):
                _fail(attribute, f"expected text items, got {type(item).__name__}")
            if choices and item not in choices:
                _fail(attribute, why(item) if why is not None else f"{item!r} must be {_alternatives(choices)}")
    return check


def url() -> Check:
    """Empty (not set), or an http:// or https:// URL that names a host."""
    def check(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        _typed(attribute, value, (str,), "str")
        if not value:
            return
        if not value.startswith(("http://", "https://")):
            _fail(attribute, "must start with http:// or https://")
        if any(c.isspace() for c in value):
            _fail(attribute, "must not contain spaces")
        try:
            parts = urlsplit(value)
            parts.port   # noqa: B018 - raises ValueError on a malformed port
        except ValueError:
            _fail(attribute, "is not a valid URL")
        if not parts.hostname:
            _fail(attribute, "must name a host (http://host[:port][/path])")
    return check


def domain() -> Check:
    """A mail domain: not empty, no "@", no spaces."""
    def check(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        _typed(attribute, value, (str,), "str")
        if not value or "@" in value or any(c.isspace() for c in value):
            _fail(attribute, "must be a domain name such as example.invalid")
    return check
