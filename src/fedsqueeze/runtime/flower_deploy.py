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
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from fedsqueeze.errors import FedsqueezeError
from fedsqueeze.runtime.flower import flower_bin, flower_env
from fedsqueeze.runtime.superlink_guard import OPEN_CONTROL_ENV


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


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def make_certs(directory: str | Path, names: list[str] | tuple[str, ...] = ()) -> TLSFiles:
    """A private CA and a SuperLink certificate signed by it, as scripts/make_certs.sh makes them.

    The certificate is valid for localhost, 127.0.0.1, ::1 and every extra host name or IP in
    ``names`` (the SuperLink's address as SuperNodes on other machines dial it). ``ca.key`` and
    ``server.key`` are written 0600.
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    d = Path(directory).expanduser().resolve()
    d.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=365)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("fedsqueeze-ca"))
        .issuer_name(name("fedsqueeze-ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)  # key_cert_sign, crl_sign
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    sans: list[x509.GeneralName] = []
    for host in ["localhost", "127.0.0.1", "::1", *names]:
        if host in WILDCARD_HOSTS:
            continue
        try:
            entry: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            entry = x509.DNSName(host)
        if entry not in sans:
            sans.append(entry)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(name("fedsqueeze-superlink"))
        .issuer_name(ca.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_format = dict(encoding=pem, format=serialization.PrivateFormat.PKCS8, encryption_algorithm=serialization.NoEncryption())
    _write_private(d / "ca.key", ca_key.private_bytes(**key_format))  # type: ignore[arg-type]
    _write_private(d / "server.key", server_key.private_bytes(**key_format))  # type: ignore[arg-type]
    (d / "ca.crt").write_bytes(ca.public_bytes(pem))
    (d / "server.pem").write_bytes(server.public_bytes(pem))
    return TLSFiles(str(d / "ca.crt"), str(d / "server.pem"), str(d / "server.key"))


def make_node_key(path: str | Path) -> tuple[str, str]:
    """A SuperNode authentication key pair (EC P-384, OpenSSH format): ``path`` (0600) and ``path.pub``.

    The SuperNode signs with the private key (``--auth-supernode-private-key``); the SuperLink
    admits it only once its public key is registered (``flwr supernode register path.pub``).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private = Path(path).expanduser().resolve()
    public = private.with_name(private.name + ".pub")
    _write_private(
        private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
    return str(private), str(public)


@dataclass
class TLSFiles:
    """A CA and a SuperLink certificate signed by it (:func:`make_certs` or scripts/make_certs.sh)."""

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

    @classmethod
    def ensure(cls, directory: str | Path, names: list[str] | tuple[str, ...] = ()) -> TLSFiles:
        """The certificates in ``directory``, made there first if none of them exist yet."""
        d = Path(directory).expanduser().resolve()
        if not any((d / f).exists() for f in ("ca.crt", "server.pem", "server.key")):
            return make_certs(d, names)
        return cls.from_dir(d)


def superlink_command(
    host: str, port: int, tls: TLSFiles | None, node_auth: bool = True, guard: bool = True, database: str | None = None
) -> list[str]:
    """The SuperLink's command: TLS with ``tls`` (and SuperNode authentication unless ``node_auth`` is
    False), ``--insecure`` without. With ``guard`` it runs through :mod:`fedsqueeze.runtime.superlink_guard`,
    whose Control and Runtime APIs answer loopback clients only."""
    import sys

    exe = [sys.executable, "-m", "fedsqueeze.runtime.superlink_guard"] if guard else [flower_bin("flower-superlink")]
    cmd = exe + ["--host", host, "--port", str(port), "--disable-runtime-dependency-installation"]
    if database:
        cmd += ["--database", database]
    if tls:
        cmd += ["--ssl-ca-certfile", tls.ca, "--ssl-certfile", tls.cert, "--ssl-keyfile", tls.key]
        return cmd + (["--enable-supernode-auth"] if node_auth else [])
    return cmd + ["--insecure"]


def supernode_command(
    superlink: str,
    partition: int,
    partitions: int,
    runtime_port: int,
    tls: TLSFiles | None,
    state_dir: str | None = None,
    node_key: str | None = None,
    worker_idle_s: float = 0.0,
) -> list[str]:
    """A SuperNode holding ``partition``; with ``state_dir`` it keeps its client state there (resumable runs),
    and with ``worker_idle_s`` > 0 its prepared task in a node worker (:mod:`fedsqueeze.runtime.node_worker`).

    With ``tls`` it verifies the SuperLink against ``tls.ca``; ``node_key`` is its private
    authentication key (:func:`make_node_key`), whose public half the SuperLink must have registered.
    """
    node_config = f"partition-id={partition} num-partitions={partitions}"
    if state_dir:
        node_config += f' state-dir="{state_dir}"'
    if worker_idle_s > 0:
        node_config += f" worker-idle-s={float(worker_idle_s)}"
    cmd = [flower_bin("flower-supernode"), "--superlink", superlink, "--port", str(runtime_port), "--node-config", node_config]
    if node_key:
        cmd += ["--auth-supernode-private-key", node_key]
    return cmd + (["--root-certificates", tls.ca] if tls else ["--insecure"])


def flwr_command(args: list[str], superlink: str, tls: TLSFiles | None, home: Path, timeout_s: float = 60.0) -> str:
    """Run ``flwr ARGS... fedsqueeze`` against ``superlink`` from a private FLWR_HOME; its stdout."""
    from fedsqueeze.runtime.flower import CONNECTION, write_flwr_config

    write_flwr_config(home, superlink, tls.ca if tls else None)
    proc = subprocess.run(
        [flower_bin("flwr"), *args, CONNECTION],
        env=flower_env(home),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        start_new_session=True,
    )
    if proc.returncode != 0:
        raise FedsqueezeError(f"`flwr {' '.join(args)}` failed ({proc.returncode}): {(proc.stdout + proc.stderr).strip()[-2000:]}")
    return proc.stdout


def list_nodes(superlink: str, tls: TLSFiles | None, home: Path) -> list[dict]:
    """The SuperLink's SuperNodes (``flwr supernode list --format json``): node-id, status, ..."""
    import json

    out = flwr_command(["supernode", "list", "--format", "json"], superlink, tls, home)
    data = json.loads(out[out.index("{") :])
    return list(data.get("nodes", []))


@dataclass
class Federation:
    """A SuperLink and ``nodes`` SuperNodes on this machine; use as a context manager.

    Secure by default: TLS (certificates from ``tls``, else made in ``WORKDIR/certs`` valid for
    ``host`` and ``tls_names``), SuperNode authentication (a key pair per node in
    ``WORKDIR/node-keys``, each public key registered with the SuperLink before its node starts,
    so no other node can join), and Control and Runtime APIs that answer loopback clients only.
    ``insecure=True`` turns all of it off, with a warning.
    """

    nodes: int
    host: str = "127.0.0.1"
    port: int = 0  # 0: a free port
    tls: TLSFiles | None = None
    workdir: str | None = None  # logs, FLWR_HOMEs, certificates and node keys; a temporary directory if None
    insecure: bool = False
    tls_names: tuple[str, ...] = ()  # extra host names / IPs for a generated certificate
    open_control: bool = False  # True: the Control API answers any client that reaches the port
    public_keys: tuple[str, ...] = ()  # SuperNodes on other machines to admit: their OpenSSH public key files
    worker_idle_s: float = 600.0  # each node keeps its prepared task in a worker this long idle (0: rebuild per message)
    procs: list[subprocess.Popen] = field(default_factory=list)
    node_keys: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        """The address this machine's clients dial (loopback when the SuperLink listens on all interfaces)."""
        host = "127.0.0.1" if self.host in WILDCARD_HOSTS else self.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @property
    def root_certificates(self) -> str | None:
        return self.tls.ca if self.tls else None

    def _spawn(self, cmd: list[str], name: str, env: dict[str, str]) -> subprocess.Popen:
        assert self.workdir is not None  # set by start()
        log = open(Path(self.workdir) / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        try:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.workdir)
        finally:
            log.close()
        self.procs.append(proc)
        return proc

    def _secure_setup(self) -> None:
        assert self.workdir is not None
        if self.insecure:
            if self.tls:
                raise FedsqueezeError("insecure=True and TLS files: choose one")
            if self.public_keys:
                raise FedsqueezeError("SuperNode authentication (registered public keys) needs TLS: drop --insecure")
            warnings.warn(
                "insecure Flower federation: no TLS, no SuperNode authentication; any process that reaches "
                f"{self.host}:{self.port} can join as a node or read the traffic",
                stacklevel=3,
            )
            return
        if self.tls is None:
            names = [*self.tls_names]
            if self.host not in LOOPBACK_HOSTS and self.host not in WILDCARD_HOSTS:
                names.append(self.host)
            elif self.host in WILDCARD_HOSTS:
                names.append(socket.gethostname())
            self.tls = TLSFiles.ensure(Path(self.workdir) / "certs", names)
        keys = Path(self.workdir) / "node-keys"
        self.node_keys = []
        for i in range(self.nodes):
            key = keys / f"node-{i}"
            if not key.is_file():
                make_node_key(key)
            self.node_keys.append(str(key))

    def register_node(self, public_key: str) -> None:
        """Admit the SuperNode whose public key (OpenSSH format) is in ``public_key`` (Control API, loopback)."""
        assert self.workdir is not None
        flwr_command(["supernode", "register", public_key], self.address, self.tls, Path(self.workdir) / "cli-home")

    def list_nodes(self) -> list[dict]:
        """The SuperLink's SuperNodes as ``flwr supernode list`` reports them (node-id, status, ...)."""
        assert self.workdir is not None
        return list_nodes(self.address, self.tls, Path(self.workdir) / "cli-home")

    def start(self, ready_timeout_s: float = 60.0) -> Federation:
        """Start the SuperLink, wait until it listens, register the node keys, then start the SuperNodes."""
        self.workdir = str(Path(self.workdir or tempfile.mkdtemp(prefix="fsq-federation-")).expanduser().resolve())
        Path(self.workdir).mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port("127.0.0.1" if self.host in WILDCARD_HOSTS else self.host)
        self._secure_setup()
        env = flower_env(Path(self.workdir) / "superlink-home")
        if self.open_control:
            env[OPEN_CONTROL_ENV] = "1"
        try:
            self._spawn(superlink_command(self.host, self.port, self.tls, node_auth=not self.insecure), "superlink", env)
            self._wait_listening(ready_timeout_s)
            for key in self.node_keys:
                self.register_node(key + ".pub")
            for public in self.public_keys:
                self.register_node(str(Path(public).expanduser().resolve()))
            for i in range(self.nodes):
                self._spawn(
                    supernode_command(
                        self.address,
                        i,
                        self.nodes,
                        free_port(),
                        self.tls,
                        str(Path(self.workdir) / f"node-{i}-state"),
                        node_key=self.node_keys[i] if self.node_keys else None,
                        worker_idle_s=self.worker_idle_s,
                    ),
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
                with socket.create_connection((self.address.rsplit(":", 1)[0].strip("[]"), self.port), timeout=1.0):
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
        from fedsqueeze.runtime import node_worker

        for i in range(self.nodes):  # the node workers left their SuperNode's process tree when they started
            state_dir = Path(self.workdir or "") / f"node-{i}-state"
            if self.workdir and state_dir.is_dir():
                node_worker.stop(node_worker.socket_path(str(state_dir)))

    def __enter__(self) -> Federation:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
