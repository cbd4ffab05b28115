"""``flower-superlink`` with its Control and Runtime APIs answering loopback clients only.

Flower 1.41 serves the Fleet API (SuperNodes), the Control API (``flwr run``: job submission,
which runs the submitted ServerApp code on this machine) and the Runtime API (the ServerApp's own
link) on one HTTP port, and the open-source Control API has no authentication. A SuperLink that
SuperNodes on other machines can reach would therefore run anyone's code. Run as

    python -m fedsqueeze.runtime.superlink_guard [flower-superlink arguments]

it is the same ``flower-superlink``, with one ASGI middleware in front of Flower's app: a request
from a non-loopback address gets 403 unless its path is the Fleet API (``/v1/fleet/...``, itself
guarded by TLS and SuperNode authentication) or ``/health``. ``FSQ_SUPERLINK_OPEN_CONTROL=1``
turns the filter off (the Control API then answers anyone who reaches the port).

Built against flwr 1.41.0 (pinned): it wraps ``flwr.superlink.main.create_app``, which
``flower-superlink`` imports when it starts serving.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]

OPEN_CONTROL_ENV = "FSQ_SUPERLINK_OPEN_CONTROL"
PUBLIC_PREFIXES = ("/v1/fleet/", "/health")


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host == "localhost"
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def public_path(path: str) -> bool:
    return path == "/health" or path.startswith(PUBLIC_PREFIXES)


class LoopbackControl:
    """ASGI middleware: every path for loopback clients, only the Fleet API and /health for the rest."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Any]], send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] in ("http", "websocket"):
            client = scope.get("client")
            host = client[0] if client else None
            if not is_loopback(host) and not public_path(scope.get("path", "")):
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                body = json.dumps({"detail": "fedsqueeze: the Control and Runtime APIs answer loopback clients only"}).encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": 403,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def install() -> None:
    """Wrap Flower's ``create_app`` so that every SuperLink app it makes has :class:`LoopbackControl` outermost."""
    import flwr.superlink.main as superlink_main

    original = superlink_main.create_app
    if getattr(original, "_fsq_guarded", False):
        return

    def create_app(*args: Any, **kwargs: Any) -> Any:
        app = original(*args, **kwargs)
        app.add_middleware(LoopbackControl)  # added last: runs first
        return app

    create_app._fsq_guarded = True  # type: ignore[attr-defined]
    superlink_main.create_app = create_app


def main() -> None:
    if os.environ.get(OPEN_CONTROL_ENV) != "1":
        install()
    from flwr.superlink.cli import flower_superlink

    sys.argv[0] = "flower-superlink"
    flower_superlink()


if __name__ == "__main__":
    main()
