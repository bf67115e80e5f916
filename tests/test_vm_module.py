"""The dracut module's pieces that run without a VM: the Python file list and check().

Fast (no initrd is built): ``python-files.py`` run with Debian's interpreter,
and ``module-setup.sh``'s check() sourced by bash with dracut's helpers stubbed.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests import vmlib

MODULE = vmlib.MODULE_SRC
PY = "/usr/bin/python3"

needs_python = pytest.mark.skipif(not Path(PY).exists(), reason="no Debian /usr/bin/python3")


def python_files(*extra: str) -> dict[str, str]:
    out = subprocess.run(
        [PY, "-I", str(MODULE / "python-files.py"), "--path", str(vmlib.ROOT),
         "--package", "password_agent", "--package", "mandos_core",
         "--exclude", "mandos_core.escrow_packet", "--exclude", "mandos_core.escrow_wire",
         "--exclude", "zeroconf", *extra],
        capture_output=True, check=True, text=True).stdout
    return dict(line.split("\t") for line in out.splitlines())


@needs_python
def test_python_files_cover_the_agent_and_lazy_imports() -> None:
    files = python_files()
    dests = set(files.values())
    names = {Path(d).name for d in dests}
    pkg = "/usr/lib/python3/dist-packages/password_agent"
    assert f"{pkg}/agent.py" in dests and f"{pkg}/__init__.py" in dests
    # imported lazily at run time: a plain import trace misses these
    assert "idna.py" in names          # socket.create_connection()
    assert "runpy.py" in names         # python3 -m
    # TLS is GnuTLS through ctypes: no ssl module, no libssl
    assert "/usr/lib/python3/dist-packages/mandos_core/gnutls.py" in dests
    assert any(n.startswith("_ctypes.") and n.endswith(".so") for n in names)
    assert "ssl.py" not in names
    assert not any(n.startswith("_ssl.") for n in names)
    # never: the server, the certificate maker (python3-cryptography), zeroconf unasked,
    # the escrow formats (the passphrase tool's, not the agent's)
    assert not any("/mandosd/" in d for d in dests)
    assert not any("escrow" in d for d in dests)
    assert not any("certificate" in d or "/cryptography/" in d for d in dests)
    assert not any("zeroconf" in d for d in dests)
    # the standard library keeps its paths; our package goes to dist-packages
    for src, dest in files.items():
        if src.startswith(str(vmlib.ROOT)):
            assert dest.startswith((pkg + "/", "/usr/lib/python3/dist-packages/mandos_core/"))
        else:
            assert src == dest


@needs_python
def test_python_files_lists_extension_modules_for_ldd() -> None:
    out = subprocess.run(
        [PY, "-I", str(MODULE / "python-files.py"), "--path", str(vmlib.ROOT),
         "--package", "password_agent", "--package", "mandos_core",
         "--exclude", "mandos_core.escrow_packet", "--exclude", "mandos_core.escrow_wire",
         "--exclude", "zeroconf", "--shared-objects"],
        capture_output=True, check=True, text=True).stdout.split()
    assert out and all(p.endswith(".so") and Path(p).exists() for p in out)


def _check(tmp_path: Path, keydir: Path, *, hostonly: bool, fs_types: str = "") -> int:
    """Source module-setup.sh with dracut's helpers stubbed and return check()'s status."""
    script = f"""
        require_binaries() {{ local b; for b; do command -v "$b" >/dev/null || return 1; done; }}
        dwarning() {{ echo "W: $*" >&2; }}
        declare -A host_fs_types=({fs_types})
        hostonly={"yes" if hostonly else ""}
        mandos_keydir={keydir}
        mandos_pythonpath={vmlib.ROOT}
        moddir={MODULE}
        . {MODULE}/module-setup.sh
        check
    """
    return subprocess.run(["bash", "-c", script], capture_output=True).returncode


@needs_python
@pytest.mark.skipif(shutil.which("gpg-agent") is None, reason="no gpg-agent")
def test_check_needs_keys_and_includes_itself_for_a_luks_host(
        tmp_path: Path, client_keys: Path) -> None:
    empty = tmp_path / "nokeys"
    empty.mkdir()
    assert _check(tmp_path, empty, hostonly=True, fs_types="[/dev/vda2]=crypto_LUKS") == 1
    assert _check(tmp_path, client_keys, hostonly=True,
                  fs_types="[/dev/vda2]=crypto_LUKS") == 0
    assert _check(tmp_path, client_keys, hostonly=True, fs_types="[/dev/vda1]=ext4") == 255
    assert _check(tmp_path, client_keys, hostonly=False) == 255  # only when asked


def test_units_are_valid_and_wired_declaratively() -> None:
    setup = (MODULE / "module-setup.sh").read_text()
    assert "add-wants sysinit.target mandos-nbde-agent.path" in setup
    assert "add-wants sysinit.target mandos-nbde-agent.service" in setup  # started early
    assert "sed " not in setup.replace("# ", "")  # units are never edited
    service = (MODULE / "mandos-nbde-agent.service").read_text()
    path = (MODULE / "mandos-nbde-agent.path").read_text()
    for unit in (service, path):
        assert "DefaultDependencies=no" in unit
        assert "ConditionKernelCommandLine=!mandos=off" in unit
        assert "Conflicts=shutdown.target initrd-switch-root.target" in unit
        assert "Before=" in unit and "cryptsetup.target" in unit
    assert "ExecStart=/usr/bin/python3 -I -m password_agent.agent" in service
    assert "--exit-when-idle" not in service  # would loop on questions it leaves alone
    if shutil.which("systemd-analyze"):
        proc = subprocess.run(["systemd-analyze", "security", "--offline=true",
                               "--threshold=30", str(MODULE / "mandos-nbde-agent.service")],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-500:]
