"""The agent's settings (command line, environment, options file) and its light footprint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from password_agent.agentconf import AgentConfig, ConfigError, load
from password_agent.client import Server
from tests.agentlib import clean_env
from tests.helpers import ROOT


def test_defaults() -> None:
    cfg = load(["--config", "/dev/null"], environ={})
    assert cfg == AgentConfig()
    assert cfg.ask_dir == Path("/run/systemd/ask-password")
    assert cfg.id_prefix == ("cryptsetup:",)
    assert cfg.zeroconf and not cfg.once and not cfg.exit_when_idle


def test_command_line() -> None:
    cfg = load(["--config", "/dev/null", "--connect", "10.0.0.1:4711", "--connect",
                "[fe80::1%eth0]:4711", "--no-zeroconf", "--id-prefix", "cryptsetup:",
                "--id-prefix", "home:", "--once", "--timeout", "2.5", "--connect-timeout", "1",
                "--ask-dir", "/tmp/a", "--keydir", "/k", "--retry-max", "9", "--exit-when-idle"],
               environ={})
    assert cfg.connect == (Server("10.0.0.1", 4711), Server("fe80::1%eth0", 4711))
    assert str(cfg.connect[1]) == "[fe80::1%eth0]:4711"
    assert cfg.id_prefix == ("cryptsetup:", "home:")
    assert (cfg.zeroconf, cfg.once, cfg.exit_when_idle) == (False, True, True)
    assert (cfg.timeout, cfg.connect_timeout, cfg.retry_max) == (2.5, 1.0, 9.0)
    assert (cfg.ask_dir, cfg.keydir) == (Path("/tmp/a"), Path("/k"))


def test_file_then_environment_then_command_line(tmp_path: Path) -> None:
    conf = tmp_path / "agent.conf"
    conf.write_text(
        "# written by the dracut module\n"
        "MANDOS_AGENT_CONNECT=10.0.0.1:1 , 10.0.0.2:2\n"
        "MANDOS_AGENT_ZEROCONF=no\n"
        'MANDOS_AGENT_TIMEOUT="4"\n'
        "export MANDOS_AGENT_KEYDIR=/etc/keys/x\n"
        "OTHER_PROGRAM_SETTING=whatever\n")
    cfg = load(["--config", str(conf)], environ={"MANDOS_AGENT_TIMEOUT": "6"})
    assert cfg.connect == (Server("10.0.0.1", 1), Server("10.0.0.2", 2))
    assert not cfg.zeroconf
    assert cfg.timeout == 6.0  # environment beats the file
    assert cfg.keydir == Path("/etc/keys/x")
    cfg = load(["--timeout", "7"], environ={"MANDOS_AGENT_TIMEOUT": "6",
                                            "MANDOS_AGENT_CONFIG": str(conf)})
    assert cfg.timeout == 7.0 and not cfg.zeroconf


def test_empty_id_prefix_means_every_question() -> None:
    assert load(["--config", "/dev/null", "--id-prefix", ""], environ={}).id_prefix == ()
    assert load(["--config", "/dev/null"], environ={"MANDOS_AGENT_ID_PREFIX": ""}).id_prefix == ()


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--connect", "nohost"], {}, "--connect=nohost: 'nohost': expected HOST:PORT"),
        (["--connect", "h:99999"], {}, "port out of range"),
        (["--timeout", "0"], {}, "--timeout=0: must be more than 0"),
        (["--timeout", "soon"], {}, "--timeout=soon"),
        ([], {"MANDOS_AGENT_ZEROCONF": "perhaps"}, "environment: MANDOS_AGENT_ZEROCONF=perhaps"),
        ([], {"MANDOS_AGENT_CONNECT": "1.2.3.4"}, "MANDOS_AGENT_CONNECT=1.2.3.4"),
    ],
)
def test_bad_values(argv: list[str], env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load(["--config", "/dev/null", *argv], environ=env)


def test_bad_options_file(tmp_path: Path) -> None:
    conf = tmp_path / "agent.conf"
    conf.write_text("MANDOS_AGENT_CONECT=10.0.0.1:1\n")
    with pytest.raises(ConfigError, match=r"agent.conf:1: unknown setting MANDOS_AGENT_CONECT"):
        load(["--config", str(conf)], environ={})
    conf.write_text("\n\nMANDOS_AGENT_TIMEOUT=-1\n")
    with pytest.raises(ConfigError, match=r"agent.conf:3: MANDOS_AGENT_TIMEOUT=-1"):
        load(["--config", str(conf)], environ={})
    conf.write_text("just words\n")
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load(["--config", str(conf)], environ={})
    with pytest.raises(ConfigError, match="No such file"):
        load(["--config", str(tmp_path / "missing")], environ={})


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "password_agent.agent", *args],
                          capture_output=True, text=True, cwd=ROOT, env=clean_env(env),
                          timeout=60)


def test_exit_codes_and_messages(tmp_path: Path) -> None:
    p = _run("--config", "/dev/null", "--connect", "nohost")
    assert p.returncode == 2
    assert p.stderr.startswith("mandos-password-agent: --connect=nohost")
    assert "Traceback" not in p.stderr
    p = _run("--config", "/dev/null", "--no-zeroconf")
    assert p.returncode == 2 and "no server to ask" in p.stderr
    p = _run("--config", "/dev/null", "--no-zeroconf", "--connect", "127.0.0.1:1",
             "--ask-dir", str(tmp_path / "ask"), "--keydir", str(tmp_path / "nokeys"))
    assert p.returncode == 3 and "Traceback" not in p.stderr, p.stderr
    p = _run("--help")
    assert p.returncode == 0
    for word in ("--connect", "--exit-when-idle", "MANDOS_AGENT_CONNECT", "exit status",
                 "root"):
        assert word in p.stdout


def test_initrd_python_imports_only_the_stdlib() -> None:
    """Debian's /usr/bin/python3, as in the initrd: no zeroconf, asyncio, cryptography, server."""
    py = "/usr/bin/python3"
    if not Path(py).exists():
        pytest.skip("no /usr/bin/python3")
    code = ("import sys, password_agent.agent\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('asyncio', 'zeroconf', 'cryptography', 'mandosd', 'mandos_keygen')]\n"
            "print(bad)")
    p = subprocess.run([py, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={"PATH": "/usr/bin:/bin"}, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"
