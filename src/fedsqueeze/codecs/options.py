"""Codec options on the command line: ``--set <codec>_<option>=value``, e.g. ``sz3_bound=1e-3``.

A key ``<codec>_<option>`` applies to that codec wherever the run uses it (uplink or downlink);
``uplink_<codec>_<option>`` or ``downlink_<codec>_<option>`` to one direction only (it wins over
the plain form). Keys are checked: an option the codec lacks, a bad value, or an option for a codec
the run does not use is a ConfigError, so a typo never passes silently.
"""

from __future__ import annotations

from typing import Any

from fedsqueeze.codecs.base import CODECS, Codec, get_codec
from fedsqueeze.errors import ConfigError

DIRECTIONS = ("uplink", "downlink")
CodecOptions = dict[tuple[str | None, str], dict[str, Any]]  # (direction or None, codec id) -> options


def parse_codec_key(key: str) -> tuple[str | None, str, str] | None:
    """``(direction, codec id, option)`` if ``key`` names a codec option, else None."""
    direction, rest = None, key
    for d in DIRECTIONS:
        if key.startswith(d + "_"):
            direction, rest = d, key[len(d) + 1 :]
            break
    for cid in sorted(CODECS, key=len, reverse=True):
        if rest.startswith(cid + "_") and len(rest) > len(cid) + 1:
            return direction, cid, rest[len(cid) + 1 :]
    return None


def split_codec_options(given: dict[str, Any], reserved: set[str]) -> tuple[dict[str, Any], CodecOptions]:
    """Separate codec option keys from the rest; names in ``reserved`` always stay with the rest."""
    rest: dict[str, Any] = {}
    codec_opts: CodecOptions = {}
    for key, value in given.items():
        parsed = None if key in reserved else parse_codec_key(key)
        if parsed is None:
            rest[key] = value
        else:
            direction, cid, opt = parsed
            codec_opts.setdefault((direction, cid), {})[opt] = value
    return rest, codec_opts


def link_codecs(
    uplink: str,
    downlink: str,
    codec_opts: CodecOptions,
    uplink_defaults: dict[str, dict[str, Any]] | None = None,
    *,
    downlink_updates: bool = False,
) -> tuple[Codec, Codec]:
    """The uplink and downlink codecs with their options; reject options no used codec takes.

    ``downlink_updates``: the downlink carries changes (a delta downlink), so any codec may code
    it; otherwise it carries model weights and must be a weight codec.
    """
    used = {"uplink": uplink, "downlink": downlink}
    for (direction, cid), opts in codec_opts.items():
        targets = [direction] if direction else list(DIRECTIONS)
        if not any(used[d] == cid for d in targets):
            where = f"the {direction}" if direction else "either direction"
            keys = ", ".join(f"{direction + '_' if direction else ''}{cid}_{k}" for k in sorted(opts))
            raise ConfigError(
                f"option {keys} is for codec {cid!r}, which {where} does not use (uplink_codec={uplink!r}, downlink_codec={downlink!r})"
            )
    codecs = []
    for d in DIRECTIONS:
        cid = used[d]
        if cid not in CODECS:
            raise ConfigError(f"unknown {d}_codec {cid!r}; choose one of: {', '.join(sorted(CODECS))}")
        opts = {
            **((uplink_defaults or {}).get(cid, {}) if d == "uplink" else {}),
            **codec_opts.get((None, cid), {}),
            **codec_opts.get((d, cid), {}),
        }
        codecs.append(get_codec(cid, **opts))
    if not codecs[1].for_weights and not downlink_updates:
        raise ConfigError(
            f"downlink_codec={downlink!r} is meant for updates, not model weights; use raw, zstd, fp16 or sz3 on the "
            "downlink, or send the change with downlink=delta"
        )
    return codecs[0], codecs[1]
