"""Third-party codecs and methods, found through Python entry points.

A package adds a codec or a method by declaring, in its own pyproject.toml::

    [project.entry-points."fedsqueeze.codecs"]
    uniform8 = "my_package.codec:Uniform8Codec"      # name = the codec's codec_id

    [project.entry-points."fedsqueeze.methods"]
    fedavg-u8 = "my_package.method:FedAvgUniform8"   # name = the method's name

Importing :mod:`fedsqueeze.codecs` (or :mod:`fedsqueeze.methods`) loads every installed entry point
of its group once and registers the class under its name. An entry point that cannot be imported,
is not a subclass of the base class, does not carry the name it is declared under, or would
replace a class fedsqueeze already registered under that name is not registered: a warning says
why, and :data:`FAILED` keeps the reason (``fedsqueeze methods`` lists what did load).
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points
from typing import Any

log = logging.getLogger("fedsqueeze")

CODEC_GROUP = "fedsqueeze.codecs"
METHOD_GROUP = "fedsqueeze.methods"

FAILED: dict[str, str] = {}  # "group:name" -> why that entry point was not registered

# A plugin's codec module may import fedsqueeze.methods, whose own plugin scan would then find that
# module half-imported; scans asked for during a scan wait and run once the outer one is done.
_scanning: list[bool] = []
_waiting: list[tuple[str, dict[str, Any], type, str]] = []


def load_group(group: str, registry: dict[str, Any], base: type, id_attr: str) -> None:
    """Register every entry point of ``group`` into ``registry``.

    ``id_attr`` is the class attribute that must equal the entry point's name (``codec_id`` for a
    codec, ``name`` for a method). Entry points already registered with the same class are skipped.
    """
    if _scanning:
        _waiting.append((group, registry, base, id_attr))
        return
    _scanning.append(True)
    try:
        _scan(group, registry, base, id_attr)
        while _waiting:
            _scan(*_waiting.pop(0))
    finally:
        _scanning.clear()


def _scan(group: str, registry: dict[str, Any], base: type, id_attr: str) -> None:
    for ep in entry_points(group=group):
        key = f"{group}:{ep.name}"
        before = registry.get(ep.name)  # loading may register the class itself (@register_codec)
        why: str | None
        try:
            cls = ep.load()
        except Exception as exc:  # a broken plugin must not break fedsqueeze itself
            why = f"cannot be imported: {type(exc).__name__}: {exc}"
        else:
            why = _refusal(cls, ep.name, before, base, id_attr)
        if why is None:
            registry[ep.name] = cls
            FAILED.pop(key, None)
            continue
        if before is not None:  # a refused plugin's own @register_codec may have replaced it on import
            registry[ep.name] = before
        if FAILED.get(key) != why:  # warn once per reason, not on every reload
            log.warning("plugin %s = %s not registered: %s", key, ep.value, why)
        FAILED[key] = why


def _refusal(cls: Any, name: str, held: Any, base: type, id_attr: str) -> str | None:
    """Why ``cls`` may not be registered as ``name``, which ``held`` holds now (None if it may)."""
    if not (isinstance(cls, type) and issubclass(cls, base)):
        return f"{cls!r} is not a subclass of {base.__module__}.{base.__qualname__}"
    own = getattr(cls, id_attr, None)
    if own != name:
        return f"the class's {id_attr} is {own!r}, not the entry point's name {name!r}"
    if held is not None and held is not cls:
        return f"{name!r} is already {held.__module__}.{held.__qualname__}; a plugin never replaces a registered class"
    return None
