"""The newcomer's first look: enroll a machine and fetch its passphrase, on one machine.

No root-only paths, no systemd: everything lives in a temporary directory and the
server listens on 127.0.0.1.  Run it with ``./dev.sh demo`` (or ``.venv/bin/python
scripts/demo.py`` once installed).
"""

from __future__ import annotations

import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
BOLD, DIM, END = ("\033[1m", "\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "", "")


def say(text: str) -> None:
    print(f"\n{BOLD}== {text}{END}", flush=True)


def show(argv: list[str], **kw: object) -> subprocess.CompletedProcess[bytes]:
    shown = [Path(a).name if a.startswith(str(BIN)) else a for a in argv]
    print(f"{DIM}$ {shlex.join(shown)}{END}", flush=True)
    return subprocess.run(argv, **kw)  # type: ignore[call-overload]


def main() -> int:
    passphrase = b"my LUKS passphrase"
    with tempfile.TemporaryDirectory(prefix="mandos-demo-") as tmp:
        base = Path(tmp)
        keys, conf, state = base / "keys", base / "conf", base / "state"
        conf.mkdir()
        say("1. Make the client's keys (Ed25519 for TLS, Curve25519 OpenPGP), Mandos's file names")
        show([str(BIN / "mandos-keygen"), "--dir", str(keys), "--name", "web1"], check=True)
        for f in sorted(keys.iterdir()):
            print(f"   {oct(f.stat().st_mode & 0o777)}  {f.name}")

        say("2. Enroll the passphrase: encrypted to the client's key, printed as a clients.conf "
            "section (the passphrase goes in on stdin)")
        section = show([str(BIN / "mandos-keygen"), "--dir", str(keys), "--name", "web1",
                        "--host", "127.0.0.1", "--passfile", "/dev/stdin"], input=passphrase,
                       check=True, capture_output=True).stdout.decode()
        (conf / "clients.conf").write_text(section)
        (conf / "clients.conf").chmod(0o600)  # it holds secrets: mandosd refuses it otherwise
        print("   " + "\n   ".join(section.splitlines()[:6]) + "\n   ...")

        say("3. Start the key server on 127.0.0.1 (no systemd needed: --listen)")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log = (base / "server.log").open("w+")
        server = subprocess.Popen([str(BIN / "mandosd"), "--configdir", str(conf),
                                   "--statedir", str(state), "--listen", f"127.0.0.1:{port}"],
                                  stdout=log, stderr=log)
        print(f"{DIM}$ mandosd --configdir {conf} --statedir {state} "
              f"--listen 127.0.0.1:{port} &{END}")
        try:
            for _ in range(200):
                if "serving" in (base / "server.log").read_text():
                    break
                time.sleep(0.02)

            say("4. Fetch it as the client would at boot: TLS 1.3, then decrypt with gpg")
            t0 = time.monotonic()
            r = show([str(BIN / "mandos-client"), "--connect", f"127.0.0.1:{port}",
                      "--keydir", str(keys)], capture_output=True)
            ms = (time.monotonic() - t0) * 1000
            print(f"   exit {r.returncode}, printed {r.stdout!r} in {ms:.0f} ms"
                  + (" -- the enrolled passphrase" if r.stdout == passphrase else ""))

            say("5. A machine the server does not know gets nothing (and learns nothing)")
            show([str(BIN / "mandos-keygen"), "--dir", str(base / "stranger"), "--name", "x"],
                 check=True, capture_output=True)
            r2 = show([str(BIN / "mandos-client"), "--connect", f"127.0.0.1:{port}",
                       "--keydir", str(base / "stranger")], capture_output=True)
            print(f"   exit {r2.returncode}: {r2.stderr.decode().strip()}")
            time.sleep(0.2)
        finally:
            server.terminate()
            server.wait(10)

        say("6. The server's audit log: every decision, with its reason; never the secret")
        for line in (base / "server.log").read_text().splitlines():
            if "asyncio" not in line:
                print("   " + line)
        ok = r.returncode == 0 and r.stdout == passphrase and r2.returncode != 0
        say("Demo " + ("succeeded" if ok else "FAILED"))
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
