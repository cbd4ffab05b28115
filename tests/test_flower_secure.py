"""A Flower deployment is secure by default (issue 15, item 4).

- ``fedsqueeze federation`` starts a TLS SuperLink with SuperNode authentication: a SuperNode
  without a registered key (or without TLS) never joins, while the federation's own node does.
- ``run --runtime flower`` refuses to connect without ``--root-certificates`` unless ``--insecure``.
- The SuperLink's Control and Runtime APIs answer loopback clients only (the guard middleware,
  driven here with a forged client address: the tests use loopback addresses only).

Every process started here is stopped by PID, also when something fails.
"""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from fedsqueeze.runtime.flower import flower_env
from fedsqueeze.runtime.flower_deploy import (
    Federation,
    TLSFiles,
    free_port,
    list_nodes,
    make_certs,
    make_node_key,
    superlink_command,
    supernode_command,
)
from fedsqueeze.runtime.superlink_guard import LoopbackControl, is_loopback

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": SRC, "FLWR_TELEMETRY_ENABLED": "0"}


def _kill_tree(pid: int) -> None:
    """SIGTERM ``pid`` (the federation command stops its own processes), then SIGKILL whatever of its tree is left."""
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    os.kill(pid, signal.SIGTERM)
    _, alive = psutil.wait_procs([root], timeout=30)
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


# ---- defaults ----------------------------------------------------------------------------------
def test_commands_are_secure_by_default(tmp_path):
    tls = make_certs(tmp_path / "certs")
    link = superlink_command("127.0.0.1", 9093, tls)
    assert "--enable-supernode-auth" in link and "--insecure" not in link
    assert link[link.index("--ssl-certfile") + 1] == tls.cert and link[1:3] == ["-m", "fedsqueeze.runtime.superlink_guard"]
    assert "--insecure" in superlink_command("127.0.0.1", 9093, None)
    node = supernode_command("127.0.0.1:9093", 0, 2, 9094, tls, node_key="/k/node-0")
    assert node[node.index("--root-certificates") + 1] == tls.ca and node[node.index("--auth-supernode-private-key") + 1] == "/k/node-0"
    fed = Federation(nodes=1)
    assert not fed.insecure and not fed.open_control


def test_generated_certificates_and_node_keys(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    tls = make_certs(tmp_path / "certs", ["server.example", "10.1.2.3"])
    ca = x509.load_pem_x509_certificate(Path(tls.ca).read_bytes())
    cert = x509.load_pem_x509_certificate(Path(tls.cert).read_bytes())
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "server.example"} <= set(sans.get_values_for_type(x509.DNSName))
    assert {"127.0.0.1", "10.1.2.3"} <= {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    assert (Path(tls.key).stat().st_mode & 0o777) == 0o600 and (Path(tmp_path / "certs" / "ca.key").stat().st_mode & 0o777) == 0o600
    assert TLSFiles.ensure(tmp_path / "certs") == tls  # existing files are kept, not remade
    private, public = make_node_key(tmp_path / "node-0")
    key = load_ssh_private_key(Path(private).read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert isinstance(load_ssh_public_key(Path(public).read_bytes()), ec.EllipticCurvePublicKey)
    assert (Path(private).stat().st_mode & 0o777) == 0o600


# ---- the Control API answers loopback only -------------------------------------------------------
def _status(client_host: str, path: str) -> int:
    async def inner(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b""}

    scope = {"type": "http", "path": path, "client": (client_host, 40000), "method": "POST", "headers": []}
    asyncio.run(LoopbackControl(inner)(scope, receive, send))
    return sent[0]["status"]


@pytest.mark.parametrize("host", ["10.0.0.5", "192.168.1.20", "2001:db8::1", "::ffff:10.0.0.5"])
def test_remote_clients_reach_only_the_fleet_api(host):
    assert _status(host, "/v1/control/start-run") == 403  # job submission
    assert _status(host, "/v1/runtime/pull-messages") == 403  # the ServerApp's link
    assert _status(host, "/docs") == 403
    assert _status(host, "/v1/fleet/pull-messages") == 200  # SuperNodes: TLS + node authentication
    assert _status(host, "/health") == 200


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1"])
def test_loopback_clients_reach_every_api(host):
    assert is_loopback(host)
    assert _status(host, "/v1/control/start-run") == 200 and _status(host, "/v1/runtime/pull-messages") == 200


# ---- run --runtime flower needs certificates or --insecure ---------------------------------------
RUN_ARGS = [
    "run",
    "--runtime",
    "flower",
    "--model",
    "tiny",
    "--dataset",
    "wordnet",
    "--clients",
    "2",
    "--clients-per-round",
    "2",
    "--quiet",
]


def _cli_here(capsys, monkeypatch, *args: str) -> tuple[int, str]:
    """``fedsqueeze ARGS`` in this process (the refusals come before anything starts): exit code, stderr."""
    from fedsqueeze import cli

    monkeypatch.setattr(sys, "argv", ["fedsqueeze", *args])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    return int(exit_.value.code or 0), capsys.readouterr().err


def test_run_without_certificates_is_refused(tmp_path, capsys, monkeypatch):
    port = free_port()  # nothing listens there: the refusal comes before any connection
    code, err = _cli_here(capsys, monkeypatch, *RUN_ARGS, "--superlink", f"127.0.0.1:{port}", "--out", str(tmp_path / "r"))
    assert code == 2, err
    assert "refusing an unencrypted connection" in err and "--insecure" in err
    assert "Traceback" not in err and not (tmp_path / "r" / "results.json").exists()
    code, err = _cli_here(
        capsys,
        monkeypatch,
        *RUN_ARGS,
        "--superlink",
        f"127.0.0.1:{port}",
        "--insecure",
        "--root-certificates",
        "ca.crt",
        "--out",
        str(tmp_path / "r"),
    )
    assert code == 2 and "choose one" in err


def test_run_with_insecure_connects_in_plain_text(tmp_path, monkeypatch, caplog):
    """--insecure is accepted, warns, and writes an insecure connection for `flwr run` (stopped there)."""
    import tomllib

    from fedsqueeze import cli
    from fedsqueeze.runtime import flower

    seen: dict = {}

    class FakePopen:
        def __init__(self, cmd, env, **kw):
            seen["cmd"] = cmd
            seen["conf"] = tomllib.loads((Path(env["FLWR_HOME"]) / "config.toml").read_text())
            self.pid = -1

        def wait(self, timeout=None):
            return 0

        def poll(self):
            return 0

    monkeypatch.setattr(flower.subprocess, "Popen", FakePopen)
    monkeypatch.setattr(sys, "argv", ["fedsqueeze", *RUN_ARGS, "--superlink", "127.0.0.1:1", "--insecure", "--out", str(tmp_path / "r")])
    with caplog.at_level("WARNING", logger="fedsqueeze"), pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 2  # no results.json: the fake `flwr run` ran nothing
    assert seen["cmd"][1] == "run" and seen["conf"]["superlink"]["fedsqueeze"] == {"address": "127.0.0.1:1", "insecure": True}
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "--insecure" in r.getMessage()]
    assert warned and "unencrypted" in warned[0] and "127.0.0.1:1" in warned[0]


# ---- a SuperNode without valid credentials cannot join ------------------------------------------
def _wait_for(predicate, timeout_s: float, what: str):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_federation_admits_only_its_own_nodes(tmp_path):
    workdir, port = tmp_path / "federation", free_port()
    guest_key, guest_public = make_node_key(tmp_path / "guest")  # a node "on another machine", admitted with --register
    fed_proc = subprocess.Popen(
        [sys.executable, "-m", "fedsqueeze", "federation", "--nodes", "1", "--port", str(port), "--workdir", str(workdir)]
        + ["--register", guest_public],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    intruders: list[subprocess.Popen] = []
    try:
        tls = _wait_for(lambda: (workdir / "certs" / "server.key").is_file() and TLSFiles.from_dir(workdir / "certs"), 60, "certificates")
        home = tmp_path / "cli-home"
        address = f"127.0.0.1:{port}"

        def online() -> list[dict]:
            if fed_proc.poll() is not None:
                raise AssertionError(f"fedsqueeze federation exited: {fed_proc.stdout.read().decode() if fed_proc.stdout else ''}")
            try:
                return [n for n in list_nodes(address, tls, home) if n["status"] == "online"]
            except Exception:
                return []  # not listening or the node key not registered yet

        own = _wait_for(online, 90, "the federation's own SuperNode")
        assert len(own) == 1
        known = {n["node-id"] for n in list_nodes(address, tls, home)}
        assert len(known) == 2  # its own node and the registered guest

        # the guest (registered key) joins; intruders: the right CA but a key the SuperLink never
        # registered, no key at all, no TLS
        stranger_key, _ = make_node_key(tmp_path / "stranger")
        nodes_to_start = [(guest_key, True), (stranger_key, True), (None, True), (None, False)]
        for i, (key, use_tls) in enumerate(nodes_to_start):
            cmd = supernode_command(address, 0, 2, free_port(), tls if use_tls else None, str(tmp_path / f"x{i}"), node_key=key)
            log = open(tmp_path / f"intruder-{i}.log", "wb")  # noqa: SIM115 - closed right after the start
            try:
                intruders.append(
                    subprocess.Popen(
                        cmd, env=flower_env(tmp_path / f"x{i}-home"), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                    )
                )
            finally:
                log.close()
        _wait_for(lambda: len(online()) == 2, 60, "the registered guest SuperNode")
        time.sleep(8)  # the intruders, started with the guest, have had several connection attempts
        nodes = list_nodes(address, tls, home)
        assert {n["node-id"] for n in nodes} == known, nodes  # no intruder ever registered
        assert [n["status"] for n in nodes] == ["online", "online"]
        # the port speaks TLS only, with a certificate that only the federation's CA verifies
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://{address}/health", timeout=5)
        with pytest.raises(OSError, match="CERTIFICATE_VERIFY_FAILED"):
            urllib.request.urlopen(f"https://{address}/health", timeout=5, context=ssl.create_default_context())
        assert (
            urllib.request.urlopen(f"https://{address}/health", timeout=5, context=ssl.create_default_context(cafile=tls.ca)).status == 200
        )
        assert list_nodes(address, None, tmp_path / "plain-home") == []  # `flwr` in plain text sees nothing
    finally:
        for proc in intruders:
            _kill_tree(proc.pid)
        _kill_tree(fed_proc.pid)
        if fed_proc.stdout:
            fed_proc.stdout.close()
    assert not psutil.pid_exists(fed_proc.pid) or psutil.Process(fed_proc.pid).status() == psutil.STATUS_ZOMBIE
