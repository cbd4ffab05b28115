"""Start and stop a Flower deployment: one ``flower-superlink`` and N ``flower-supernode`` processes.

:class:`Federation` is what ``fedsqueeze federation`` and the integration test use on one machine;
across machines, run the same commands it prints (see docs/flower.md). Each SuperNode holds one
partition: ``--node-config 'partition-id=i num-partitions=N'``.

Every process runs in its own process group and is stopped by its PID (SIGTERM to the group, then
SIGKILL), also when starting fails half-way.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedsqueeze.errors import FedsqueezeError
from fedsqueeze.runtime.flower import flower_bin, flower_env


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host``."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _proc_or_none(pid: int):
    import psutil

    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


@dataclass
class TLSFiles:
    """Certificates made by scripts/make_certs.sh: a CA and a server certificate signed by it."""

    ca: str
    cert: str
    key: str

    @classmethod
    def from_dir(cls, directory: str | Path) -> TLSFiles:
        d = Path(directory).expanduser().resolve()
        files = cls(str(d / "ca.crt"), str(d / "server.pem"), str(d / "server.key"))
        for f in (files.ca, files.cert, files.key):
            if not Path(f).is_file():
                raise FedsqueezeError(f"TLS file {f} is missing; create them with scripts/make_certs.sh {d}")
        return files


def superlink_command(host: str, port: int, tls: TLSFiles | None) -> list[str]:
    cmd = [flower_bin("flower-superlink"), "--host", host, "--port", str(port), "--disable-runtime-dependency-installation"]
    if tls:
        return cmd + ["--ssl-ca-certfile", tls.ca, "--ssl-certfile", tls.cert, "--ssl-keyfile", tls.key]
    return cmd + ["--insecure"]


def supernode_command(
    superlink: str,
    partition: int,
    partitions: int,
    runtime_port: int,
    tls: TLSFiles | None,
    state_dir: str | None = None,
) -> list[str]:
    """A SuperNode holding ``partition``; with ``state_dir`` it keeps its client state there (resumable runs)."""
    node_config = f"partition-id={partition} num-partitions={partitions}"
    if state_dir:
        node_config += f' state-dir="{state_dir}"'
    cmd = [flower_bin("flower-supernode"), "--superlink", superlink, "--port", str(runtime_port), "--node-config", node_config]
    return cmd + (["--root-certificates", tls.ca] if tls else ["--insecure"])


@dataclass
class Federation:
    """A SuperLink and ``nodes`` SuperNodes on this machine; use as a context manager."""

    nodes: int
    host: str = "127.0.0.1"
    port: int = 0  # 0: a free port
    tls: TLSFiles | None = None
    workdir: str | None = None  # logs and FLWR_HOME; a temporary directory if None
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _spawn(self, cmd: list[str], name: str, env: dict[str, str]) -> subprocess.Popen:
        assert self.workdir is not None  # set by start()
        log = open(Path(self.workdir) / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        try:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.workdir)
        finally:
            log.close()
        self.procs.append(proc)
        return proc

    def start(self, ready_timeout_s: float = 60.0) -> Federation:
        """Start the SuperLink, wait until it listens, then start the SuperNodes."""
        self.workdir = self.workdir or tempfile.mkdtemp(prefix="fsq-federation-")
        Path(self.workdir).mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port(self.host)
        try:
            self._spawn(superlink_command(self.host, self.port, self.tls), "superlink", flower_env(Path(self.workdir) / "superlink-home"))
            self._wait_listening(ready_timeout_s)
            for i in range(self.nodes):
                self._spawn(
                    supernode_command(self.address, i, self.nodes, free_port(), self.tls, str(Path(self.workdir) / f"node-{i}-state")),
                    f"supernode-{i}",
                    flower_env(Path(self.workdir) / f"supernode-{i}-home"),
                )
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_listening(self, timeout_s: float) -> None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.procs[0].poll() is not None:
                raise FedsqueezeError(f"flower-superlink exited early; see {self.workdir}/superlink.log")
            try:
                with socket.create_connection((self.host, self.port), timeout=1.0):
                    return
            except OSError:
                time.sleep(0.3)
        raise FedsqueezeError(f"flower-superlink did not listen on {self.address} within {timeout_s:.0f}s")

    def process_tree(self) -> list[int]:
        """PIDs of the started processes and all their descendants (SuperExec, ServerApp, ClientApp)."""
        import psutil

        pids: list[int] = []
        for proc in self.procs:
            pids.append(proc.pid)
            try:
                pids += [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        return pids

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop every process this federation started, and their children, by PID: SIGTERM, then SIGKILL.

        Flower's SuperExec starts its own process group, so killing our groups is not enough: the
        whole tree is listed first (before a parent's death re-parents its children) and each PID
        and process group in it is signalled.
        """
        import psutil

        pids = self.process_tree()
        groups = set()
        for pid in pids:
            try:
                groups.add(os.getpgid(pid))
            except ProcessLookupError:
                pass
        groups.discard(os.getpgrp())  # never our own group
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in reversed(pids):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            for pgid in groups:
                try:
                    os.killpg(pgid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            if sig == signal.SIGTERM:
                _, alive = psutil.wait_procs([p for p in map(_proc_or_none, pids) if p], timeout=grace_s)
                if not alive:
                    break
        for proc in self.procs:
            proc.wait()
        self.procs.clear()

    def __enter__(self) -> Federation:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
