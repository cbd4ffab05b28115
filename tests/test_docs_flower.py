"""docs/flower.md tells users to deploy securely (issue 15: it used to show ``--host 0.0.0.0 --insecure``).

The commands in its shell blocks are what users copy: each one that listens on every interface must
use TLS (and the SuperLink node authentication), and nodes must connect with the federation's CA
and their own key. Only the "Insecure mode" section may mention ``--insecure``, in prose.
"""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "flower.md"


def shell_commands(text: str) -> list[str]:
    """Every command of the doc's ```bash blocks, continuation lines joined."""
    commands: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]
    return commands


def test_shell_commands_are_found():
    # the helper must see the documented deployment, or the checks below check nothing
    cmds = shell_commands(DOC.read_text())
    assert any("fedsqueeze federation" in c for c in cmds)
    assert any(c.startswith("flower-supernode") for c in cmds)
    assert any("superlink_guard" in c for c in cmds)


def test_no_documented_command_is_insecure():
    for cmd in shell_commands(DOC.read_text()):
        assert "--insecure" not in cmd, cmd


def test_every_command_listening_on_all_interfaces_uses_tls():
    listening = [c for c in shell_commands(DOC.read_text()) if "0.0.0.0" in c]
    assert listening
    for cmd in listening:
        assert "--tls-name" in cmd or "--ssl-certfile" in cmd, cmd
    guard = [c for c in listening if "superlink_guard" in c]
    assert guard and all("--enable-supernode-auth" in c for c in guard)


def test_nodes_connect_with_the_ca_and_their_own_key():
    for cmd in shell_commands(DOC.read_text()):
        if cmd.startswith("flower-supernode"):
            assert "--root-certificates" in cmd and "--auth-supernode-private-key" in cmd, cmd


def test_the_threat_model_and_insecure_mode_are_documented():
    text = DOC.read_text()
    assert re.search(r"^## Threat model$", text, flags=re.M)
    insecure = text.split("### Insecure mode", 1)
    assert len(insecure) == 2 and "warns" in insecure[1].split("\n## ", 1)[0]
