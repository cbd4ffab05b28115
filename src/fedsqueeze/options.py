"""One option system for run, method and codec options: declare, coerce, check, parse, describe.

An option is a dataclass field made with :func:`option`; its metadata carries the help text, the
allowed ``choices`` and a range or other :class:`Check`. :func:`parse_options` turns a dict of raw
values (TOML literals, ``--set`` strings) into an options object: unknown names, renamed names,
wrong types, non-finite numbers, non-members and out-of-range values are each a one-line :class:`ConfigError` that
names the option and its valid values. A class may add cross-field checks in a ``validate()``
method (called after every field passed). ``RunConfig``, every method's ``Options`` and every
codec's ``Options`` use these same functions, and ``fedsqueeze methods`` and the CLI flags are
generated from the same metadata.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any

from fedsqueeze.errors import ConfigError

Choices = Sequence[Any] | Callable[[], Sequence[Any]]  # a callable: the set is a registry filled at import

_BOOL_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
_KINDS: dict[Any, type] = {"bool": bool, "int": int, "float": float, "str": str, bool: bool, int: int, float: float, str: str}
_KIND_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


@dataclass(frozen=True)
class Check:
    """A value rule: ``test(value)`` is True for good values; ``text`` says which ("in (0, 1]").

    ``bad`` is one value the rule rejects (tests feed it to every option that has the rule).
    """

    test: Callable[[Any], bool]
    text: str
    bad: Any


def between(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Check:
    """``lo <= x <= hi``, with either end open."""

    def test(x: float) -> bool:
        return (lo < x if lo_open else lo <= x) and (x < hi if hi_open else x <= hi)

    text = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    return Check(test, text, hi + 1)


def at_least(lo: float) -> Check:
    """``x >= lo``."""
    return Check(lambda x: x >= lo, f">= {lo:g}", lo - 1)


def above(lo: float) -> Check:
    """``x > lo``."""
    return Check(lambda x: x > lo, f"> {lo:g}", lo)


def names_list() -> Check:
    """A comma-separated list with at least one name in it."""
    return Check(lambda s: any(part.strip() for part in s.split(",")), "a non-empty comma-separated list of names", ",")


def option(default: Any, help: str, *, choices: Choices | None = None, check: Check | None = None) -> Any:
    """Declare an option (a dataclass field) with its default, help text and allowed values."""
    return field(default=default, metadata={"help": help, "choices": choices, "check": check})


def choices_of(f: Field) -> list[Any] | None:
    """The allowed values of option ``f``, or None if any value of its type goes."""
    choices = f.metadata.get("choices")
    if choices is None:
        return None
    return list(choices() if callable(choices) else choices)


def kind_of(f: Field) -> type:
    """The Python type of option ``f``: its annotation, else the type of its default."""
    kind = _KINDS.get(f.type)
    if kind is None and f.default is not MISSING:
        kind = type(f.default)
    return kind or object


def coerce(value: Any, kind: type, name: str, owner: str) -> Any:
    """``value`` as ``kind`` (bool, int, float or str); a ConfigError when it is not one.

    A float must be finite: NaN slips through every range check (``nan >= 0`` is False, but so is
    ``nan < 0``) and infinity through every lower bound, so both are refused here, for every option.
    """
    out = _convert(value, kind)
    if out is _BAD:
        raise ConfigError(f"option {name!r} of {owner} must be {_KIND_WORDS.get(kind, kind.__name__)}; got {value!r}")
    if kind is float and not math.isfinite(out):  # no option means NaN or infinity; range checks would pass inf
        raise ConfigError(f"option {name!r} of {owner} must be a finite number; got {value!r}")
    return out


_BAD = object()


def _convert(value: Any, kind: type) -> Any:
    """``value`` as ``kind``, or ``_BAD``. Booleans are never numbers, and numbers never booleans but 0/1."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        return _BOOL_WORDS.get(value.lower(), _BAD) if isinstance(value, str) else _BAD
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return _BAD
    if kind is str:
        return str(value)  # a TOML-looking --set value (`name_filter=1`) is still a fine string
    try:
        number = float(value)
    except ValueError:
        return _BAD
    if kind is float:
        return number
    if kind is int:
        if isinstance(value, int):
            return value
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value)  # exact, even beyond float precision
        return int(number) if math.isfinite(number) and number.is_integer() else _BAD
    return value


def describe_values(f: Field) -> str:
    """What option ``f`` accepts, in words: its choices and/or its range ('' if any value of its type)."""
    parts = []
    choices = choices_of(f)
    if choices is not None:
        parts.append("one of: " + ", ".join(str(c) for c in choices))
    check: Check | None = f.metadata.get("check")
    if check is not None:
        parts.append(check.text)
    return "; ".join(parts)


def check_value(f: Field, value: Any, owner: str) -> None:
    """Raise a one-line ConfigError unless ``value`` is among ``f``'s choices and passes its check."""
    choices = choices_of(f)
    check: Check | None = f.metadata.get("check")
    if (choices is not None and value not in choices) or (check is not None and not check.test(value)):
        raise ConfigError(f"option {f.name!r} of {owner} must be {describe_values(f)}; got {value!r}")


def check_fields(obj: Any, owner: str) -> None:
    """Check every option of the dataclass instance ``obj``: its type (normalised in place, e.g. an
    int given for a float option becomes a float), its declared choices and its range.

    For objects built directly (``RunConfig(**json_values)``) rather than through :func:`parse_options`.
    """
    for f in option_fields(type(obj)):
        value = coerce(getattr(obj, f.name), kind_of(f), f.name, owner)
        check_value(f, value, owner)
        setattr(obj, f.name, value)


def option_fields(cls: type) -> list[Field]:
    """The declared options of ``cls``: the fields made with :func:`option` (others, e.g. a dict, are not)."""
    return [f for f in fields(cls) if "check" in f.metadata and f.init]


def renamed_options(cls: type) -> dict[str, str]:
    """``{old name: new name}`` a class declares in its ``renamed`` class attribute."""
    return dict(getattr(cls, "renamed", {}) or {})


def unknown_option(key: str, cls: type, owner: str, suggest: Iterable[str] = ()) -> ConfigError:
    """The error for an option ``cls`` does not declare: a renamed one says its new name."""
    new = renamed_options(cls).get(key)
    if new is not None:
        return ConfigError(f"option {key!r} of {owner} was renamed to {new!r}")
    known = [f.name for f in option_fields(cls)]
    hint = difflib.get_close_matches(key, known + list(suggest), n=1)
    extra = f" (did you mean {hint[0]!r}?)" if hint else ""
    return ConfigError(f"unknown option {key!r} for {owner}{extra}; its options are: {', '.join(sorted(known)) or 'none'}")


def parse_options(cls: type, given: dict[str, Any], owner: str, suggest: Iterable[str] = ()) -> Any:
    """Build ``cls`` from raw values ``given``: each is coerced to its option's type and checked.

    ``owner`` names the options' owner in errors ("method 'fedpm'"); ``suggest`` adds names to
    the "did you mean" hint of an unknown key (e.g. the run options, for a method's options).
    Unset options keep their defaults. Cross-field rules run last, in ``cls.validate()`` if any.
    """
    known = {f.name: f for f in option_fields(cls)}
    values = {}
    for key, raw in given.items():
        if key not in known:
            raise unknown_option(key, cls, owner, suggest)
        f = known[key]
        values[key] = coerce(raw, kind_of(f), key, owner)
        check_value(f, values[key], owner)
    opts = cls(**values)
    validate = getattr(opts, "validate", None)
    if callable(validate):
        validate()
    return opts


def describe_options(cls: type) -> list[tuple[str, Any, str]]:
    """``(name, default, help)`` of each option; the help ends with the allowed values, if limited."""
    rows = []
    for f in option_fields(cls):
        values = describe_values(f)
        help_ = f.metadata["help"] + (f" ({values})" if values else "")
        rows.append((f.name, f.default if f.default is not MISSING else None, help_))
    return rows
