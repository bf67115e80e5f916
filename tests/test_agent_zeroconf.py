"""Finding servers: mDNS/DNS-SD discovery (python-zeroconf) and IPv6 link-local addresses,
for real, in a network namespace.

Nothing leaves the test: server, announcement and agent all run inside a network namespace
of our own that has only its loopback interface (and a veth pair for link-local).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from password_agent.client import Server
from password_agent.discovery import servers_from_addresses
from tests.agentlib import AgentProc, FakeAsker
from tests.helpers import PASSWORD, Mandosd


def test_addresses_to_servers() -> None:
    got = servers_from_addresses(["fe80::1%2", "192.0.2.1", "2001:db8::1", "192.0.2.1"], 4711)
    assert got == [Server("192.0.2.1", 4711), Server("2001:db8::1", 4711),
                   Server("fe80::1%2", 4711)]
    assert str(got[2]) == "[fe80::1%2]:4711"
    assert servers_from_addresses(["192.0.2.1"], 0) == []


def test_discovery_without_zeroconf_module_is_quiet(tmp_path: Path) -> None:
    code = textwrap.dedent("""
        import builtins, logging, sys
        real = builtins.__import__
        def imp(name, *a, **k):
            if name == "zeroconf" or name.startswith("zeroconf."):
                raise ImportError(name)
            return real(name, *a, **k)
        builtins.__import__ = imp
        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(message)s")
        from password_agent.discovery import Discovery
        d = Discovery(lambda: None)
        print("started", d.start(), d.servers())
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=Path(__file__).parent.parent, timeout=60)
    assert p.stdout.strip() == "started False []", p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("DEBUG python-zeroconf is not")


@pytest.fixture()
def netns() -> Iterator[str]:
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("needs root and iproute2 for a network namespace")
    pytest.importorskip("zeroconf")
    name = f"mandos-agent-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for cmd in (["ip", "link", "set", "lo", "up"], ["ip", "link", "set", "lo", "multicast",
                                                        "on"],
                    ["ip", "route", "add", "224.0.0.0/4", "dev", "lo"]):
            subprocess.run(["ip", "netns", "exec", name, *cmd], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


ANNOUNCE = """
import signal, socket, sys
from zeroconf import IPVersion, ServiceInfo, Zeroconf
port = int(sys.argv[1])
zc = Zeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
info = ServiceInfo("_mandos._tcp.local.", "Mandos test._mandos._tcp.local.",
                   addresses=[socket.inet_aton("127.0.0.1")], port=port,
                   server="mandos-test.local.")
zc.register_service(info)
print("announced", flush=True)
signal.pause()  # announce until killed
"""


def test_agent_finds_an_announced_server(netns: str, tmp_path: Path, client_keys: Path,
                                         client_section: str) -> None:
    inns = ["ip", "netns", "exec", netns]
    srv = Mandosd(tmp_path / "srv", sections=[client_section])
    srv.start(inns + srv.argv())
    announcer = subprocess.Popen([*inns, sys.executable, "-c", ANNOUNCE, str(srv.port)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ask_dir = tmp_path / "ask"
    ask_dir.mkdir()
    agent = AgentProc(tmp_path, client_keys, [], ask_dir=ask_dir)
    agent.argv.remove("--no-zeroconf")
    agent.argv = inns + agent.argv
    try:
        assert announcer.stdout is not None
        assert announcer.stdout.readline().strip() == b"announced"
        with agent, FakeAsker(ask_dir, "cryptsetup:/dev/zc") as asker:
            assert asker.answer(20) == (b"+" + PASSWORD, 0), agent.log()
            log = agent.wait_log("answered question")
        assert "key server Mandos test._mandos._tcp.local. announced at 127.0.0.1:" in log
        assert f"MANDOS_SERVER=127.0.0.1:{srv.port}" in log
    finally:
        announcer.kill()
        announcer.wait()
        srv.stop()


def test_ipv6_link_local_server_with_scope(netns: str, tmp_path: Path, client_keys: Path,
                                           client_section: str) -> None:
    inns = ["ip", "netns", "exec", netns]
    for cmd in (["ip", "link", "add", "mveth0", "type", "veth", "peer", "name", "mveth1"],
                ["ip", "link", "set", "mveth1", "up"],
                ["ip", "link", "set", "mveth0", "up"],
                ["ip", "addr", "add", "fe80::4d41:4e44/64", "dev", "mveth0", "nodad"]):
        subprocess.run(inns + cmd, check=True)
    # the namespace is empty: any port is free there
    srv = Mandosd(tmp_path / "srv", sections=[client_section],
                  listen=["[fe80::4d41:4e44%mveth0]:4711"])
    srv.start(inns + srv.argv())
    ask_dir = tmp_path / "ask"
    ask_dir.mkdir()
    agent = AgentProc(tmp_path, client_keys, [srv.address], ask_dir=ask_dir)
    agent.argv = inns + agent.argv
    try:
        with agent, FakeAsker(ask_dir, "cryptsetup:/dev/ll") as asker:
            assert asker.answer(20) == (b"+" + PASSWORD, 0), agent.log()
            log = agent.wait_log("answered question")
        assert "MANDOS_SERVER=[fe80::4d41:4e44%mveth0]:" in log
    finally:
        srv.stop()
