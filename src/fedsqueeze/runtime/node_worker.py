"""A SuperNode's long-lived fedsqueeze worker: the prepared task stays in memory between messages.

Flower 1.41 starts a fresh ClientApp process for every message (one token per process), so each
round would import torch and transformers and rebuild the task (data, tokenization, model) on
every node. With the node config ``worker-idle-s=SECONDS`` (``fedsqueeze federation`` sets it),
the ClientApp instead hands the round's work to this worker over a Unix socket in the node's
state directory, starting it if none answers; the worker keeps the method and task it prepared
(keyed by the run config) and exits after that many idle seconds.

The ClientApp keeps everything else: reading and checking the server's message, the client
state (context and state directory), the reply. The worker sees the train request and the
client state as bytes and returns the payload, the metrics and the new state as bytes.

Wire (no pickle): ``MAGIC``, a u32 length and a JSON header, a u32 count of blobs, then each blob
as a u64 length and its bytes. Every length is checked against a cap before anything is read.
The socket's directory is the node's own (created 0700), the socket itself 0600: only the
node's user can talk to the worker.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

MAGIC = b"FSQW1\n"
MAX_HEADER = 1 << 22  # the header holds the run config: small
MAX_BLOB = 1 << 36  # a payload or a client state
MAX_BLOBS = 4
SOCKET_NAME = "fsq-worker.sock"
START_TIMEOUT_S = 900.0  # a first start imports torch and builds the task on a loaded machine


class WorkerError(RuntimeError):
    """The worker could not be reached, or broke the protocol."""


# ---- framing ---------------------------------------------------------------------------------------
def _read_exact(f: Any, n: int) -> bytes:
    data = f.read(n)
    if data is None or len(data) != n:
        raise WorkerError(f"connection closed after {0 if data is None else len(data)} of {n} bytes")
    return data


def send(f: Any, header: dict[str, Any], blobs: list[bytes]) -> None:
    head = json.dumps(header).encode()
    f.write(MAGIC + struct.pack("<I", len(head)) + head + struct.pack("<I", len(blobs)))
    for blob in blobs:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
    f.flush()


def receive(f: Any) -> tuple[dict[str, Any], list[bytes]]:
    if _read_exact(f, len(MAGIC)) != MAGIC:
        raise WorkerError("not a fedsqueeze worker frame")
    (n,) = struct.unpack("<I", _read_exact(f, 4))
    if n > MAX_HEADER:
        raise WorkerError(f"header of {n} bytes is over the cap")
    header = json.loads(_read_exact(f, n))
    if not isinstance(header, dict):
        raise WorkerError("header is not an object")
    (count,) = struct.unpack("<I", _read_exact(f, 4))
    if count > MAX_BLOBS:
        raise WorkerError(f"{count} blobs is over the cap")
    blobs = []
    for _ in range(count):
        (size,) = struct.unpack("<Q", _read_exact(f, 8))
        if size > MAX_BLOB:
            raise WorkerError(f"blob of {size} bytes is over the cap")
        blobs.append(_read_exact(f, size))
    return header, blobs


# ---- the worker process -----------------------------------------------------------------------------
def handle(header: dict[str, Any], blobs: list[bytes]) -> tuple[dict[str, Any], list[bytes]]:
    """One train request: the method's client update on the prepared task."""
    from fedsqueeze.runtime.flower_client import client_work, request_from_header
    from fedsqueeze.treeio import pack_tree, unpack_tree

    message, state_bytes = blobs
    req = request_from_header(header, message)
    initial = req.state_version is None
    t0 = time.perf_counter()
    out = client_work(req, None if initial else unpack_tree(state_bytes), initial)
    log_line(f"round {req.round} client {req.client}: {time.perf_counter() - t0:.2f}s")
    return {"ok": True, "metrics": dict(out.metrics)}, [bytes(out.payload), pack_tree(out.state)]


def log_line(text: str) -> None:
    print(f"[fsq-worker {os.getpid()} {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def serve(path: Path, idle_s: float, owner_pid: int = 0) -> None:
    """Answer requests on the Unix socket ``path`` one at a time until ``idle_s`` pass without one,
    or the process that started the ClientApps (``owner_pid``: the node's SuperExec) is gone."""
    path.unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        old = os.umask(0o177)
        try:
            server.bind(str(path))
        finally:
            os.umask(old)
        server.listen(4)
        server.settimeout(1.0)
        inode = path.stat().st_ino
        path.with_suffix(".pid").write_text(str(os.getpid()))
        log_line(f"serving {path} (exits after {idle_s:.0f}s idle, or when process {owner_pid} ends)")
        try:
            _serve_loop(server, path, inode, idle_s, owner_pid)
        finally:
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_ino == inode:  # still ours: another worker may have taken the name over
                    path.unlink()
                    path.with_suffix(".pid").unlink()
            log_line("exiting")


def _serve_loop(server: socket.socket, path: Path, inode: int, idle_s: float, owner_pid: int) -> None:
    last = time.monotonic()
    while True:
        try:
            conn, _ = server.accept()
        except TimeoutError:
            if time.monotonic() - last > idle_s or (owner_pid and not _alive(owner_pid)):
                return
            continue
        with conn, conn.makefile("rwb") as f:
            try:
                header, blobs = receive(f)
                if len(blobs) != 2:
                    raise WorkerError("a train request has two blobs: message and client state")
                reply, out = handle(header, blobs)
            except Exception as exc:  # reported to the ClientApp, which replies with the error
                log_line(traceback.format_exc())
                reply, out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}, []
            with contextlib.suppress(OSError):
                send(f, reply, out)
        last = time.monotonic()
        if not path.exists() or path.stat().st_ino != inode:
            return  # another worker took the socket over: leave it to that one


def _leave(signum: int, frame: Any) -> None:
    raise SystemExit(0)  # through serve()'s clean-up: the socket and PID file go too


def main() -> None:
    signal.signal(signal.SIGTERM, _leave)
    signal.signal(signal.SIGHUP, _leave)
    ap = argparse.ArgumentParser(description="fedsqueeze node worker (started by the ClientApp)")
    ap.add_argument("--socket", required=True)
    ap.add_argument("--idle-s", type=float, required=True)
    ap.add_argument("--owner-pid", type=int, default=0)
    args = ap.parse_args()
    serve(Path(args.socket), args.idle_s, args.owner_pid)


# ---- the ClientApp's side ---------------------------------------------------------------------------
def socket_path(state_dir: str) -> Path:
    """The worker's socket: in the node's state directory, or (a Unix socket path is at most 107
    bytes) in a private directory of this user under the temporary directory, named by a hash of it."""
    directory = Path(state_dir).resolve()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / SOCKET_NAME
    if len(str(path).encode()) <= 100:
        return path
    private = Path(tempfile.gettempdir()) / f"fsq-workers-{os.getuid()}"
    private.mkdir(mode=0o700, exist_ok=True)
    if private.stat().st_uid != os.getuid() or private.stat().st_mode & 0o077:
        raise WorkerError(f"{private} is not a private directory of this user")
    return private / f"{hashlib.sha256(str(directory).encode()).hexdigest()[:20]}.sock"


def _connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        return None
    return sock


def _start(path: Path, idle_s: float) -> None:
    log = path.with_suffix(".log").open("ab")
    subprocess.Popen(
        # its owner is this ClientApp's parent, which lives as long as the node does
        [
            sys.executable,
            "-m",
            "fedsqueeze.runtime.node_worker",
            "--socket",
            str(path),
            "--idle-s",
            str(idle_s),
            "--owner-pid",
            str(os.getppid()),
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,  # outlives this ClientApp process, which exits after its one message
        env=os.environ.copy(),
    )
    log.close()


def connect(path: Path, idle_s: float, timeout_s: float = START_TIMEOUT_S) -> socket.socket:
    """A connection to the node's worker, starting one if none answers (only one starts at a time)."""
    sock = _connect(path)
    if sock is not None:
        return sock
    with path.with_suffix(".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        sock = _connect(path)
        if sock is None:
            _start(path, idle_s)
            end = time.monotonic() + timeout_s
            while sock is None and time.monotonic() < end:
                time.sleep(0.2)
                sock = _connect(path) if path.exists() else None
    if sock is None:
        raise WorkerError(f"the node worker did not start within {timeout_s:.0f}s (see {path.with_suffix('.log')})")
    return sock


def stop(path: Path) -> bool:
    """Stop the worker serving ``path`` (by the PID it wrote, once that PID is seen to be this very
    worker, never a process that reused the number); whether one was running."""
    try:
        pid = int(path.with_suffix(".pid").read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return False
    if b"fedsqueeze.runtime.node_worker" not in cmdline or str(path).encode() not in cmdline:
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except OSError:
        return False
    return True


def call(path: Path, idle_s: float, header: dict[str, Any], blobs: list[bytes]) -> tuple[dict[str, Any], list[bytes]]:
    """Send one request to the node's worker and return its reply."""
    with connect(path, idle_s) as sock, sock.makefile("rwb") as f:
        send(f, header, blobs)
        return receive(f)


if __name__ == "__main__":
    main()
