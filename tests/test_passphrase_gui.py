"""The GUI driven for real under Xvfb: keys typed into the window, the button pressed,
the volume checked with cryptsetup, and a screenshot (xwd) checked and saved as PNG."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from luks_passphrase.flows import Tool
from luks_passphrase.state import StateStore
from luks_passphrase.volumes import list_volumes
from tests.helpers import wait_for
from tests.lukslib import USER0, make_escrow_keys, make_image, opens

NEW = "gui new passphrase"
SCREENSHOT = Path(os.environ.get("LUKS_PASSPHRASE_SCREENSHOT", "/tmp/luks-passphrase-gui.png"))


@pytest.fixture(scope="module")
def display() -> Iterator[str]:
    for tool in ("Xvfb", "xwd"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install xvfb x11-apps)")
    try:
        import tkinter  # noqa: F401
    except ImportError:
        pytest.skip("tkinter is not installed (apt-get install python3-tk)")
    num = 90 + os.getpid() % 500
    proc = subprocess.Popen(["Xvfb", f":{num}", "-screen", "0", "640x480x24", "-nolisten", "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sock = Path(f"/tmp/.X11-unix/X{num}")

    def up() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"Xvfb :{num} exited with {proc.returncode}")
        return sock.exists()

    wait_for(up, 30, "Xvfb's socket")
    old = os.environ.get("DISPLAY")
    os.environ["DISPLAY"] = f":{num}"
    try:
        yield f":{num}"
    finally:
        proc.terminate()
        proc.wait(5)
        if old is None:
            os.environ.pop("DISPLAY", None)
        else:
            os.environ["DISPLAY"] = old


def xwd_to_png(xwd: bytes) -> tuple[int, int, bytes, set[tuple[int, int, int]]]:
    """Convert a 24/32-bit TrueColor ZPixmap XWD dump to PNG; return size, PNG, colours."""
    h = struct.unpack(">25I", xwd[:100])
    header_size, width, height = h[0], h[4], h[5]
    byte_order, bpp, bpl = h[7], h[11], h[12]
    masks, ncolors = h[14:17], h[19]
    assert bpp == 32, "expected a 32 bits-per-pixel dump"
    data = xwd[header_size + 12 * ncolors:]
    shifts = [(m & -m).bit_length() - 1 for m in masks]
    fmt = "<I" if byte_order == 0 else ">I"
    rows = []
    colours: set[tuple[int, int, int]] = set()
    for y in range(height):
        row = bytearray(b"\0")
        line = data[y * bpl:y * bpl + width * 4]
        for x in range(width):
            (px,) = struct.unpack_from(fmt, line, x * 4)
            rgb = tuple((px & m) >> s for m, s in zip(masks, shifts, strict=True))
            row += bytes(rgb)
            if x % 7 == 0 and y % 7 == 0:
                colours.add(rgb)  # type: ignore[arg-type]
        rows.append(bytes(row))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2,
                                                            0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"".join(rows), 6)) + chunk(b"IEND", b""))
    return width, height, png, colours


def _type(app_root: object, entry: object, text: str) -> None:
    """Type *text* into *entry* key by key, as X key events."""
    entry.focus_force()  # type: ignore[attr-defined]
    app_root.update()  # type: ignore[attr-defined]
    for ch in text:
        entry.event_generate("<KeyPress>", keysym="space" if ch == " " else ch)  # type: ignore[attr-defined]
        entry.event_generate("<KeyRelease>", keysym="space" if ch == " " else ch)  # type: ignore[attr-defined]
    app_root.update()  # type: ignore[attr-defined]


def _wait(root: object, app: object, timeout: float = 60) -> None:
    def finished() -> bool:
        root.update()  # type: ignore[attr-defined]
        return not app.busy and bool(app.result.cget("text"))  # type: ignore[attr-defined]

    wait_for(finished, timeout, "the GUI to finish")


def test_gui_change_under_xvfb(tmp_path: Path, display: str) -> None:
    import tkinter as tk

    from luks_passphrase.gui import App, InProcessBackend

    keys = make_escrow_keys(tmp_path / "escrow")
    image = make_image(tmp_path / "disk.img", "luks2")
    other = make_image(tmp_path / "data.img", "luks1")
    crypttab = tmp_path / "crypttab"
    crypttab.write_text(f"root {image} none luks\ndata {other} none luks\n")
    volumes = list_volumes(crypttab, Path(os.devnull))
    tool = Tool(StateStore(tmp_path / "state"), certificate=keys.cert_pem)
    root = tk.Tk()
    try:
        app = App(root, InProcessBackend(tool), volumes)
        root.update()
        assert app.volume.get().startswith("root")
        # a wrong current passphrase first
        _type(root, app.current, "not it")
        _type(root, app.new, NEW)
        _type(root, app.repeat, NEW)
        app.change_button.invoke()
        _wait(root, app)
        assert "wrong" in app.result.cget("text")
        app.result.configure(text="")
        # now for real
        _type(root, app.current, USER0.decode())
        _type(root, app.new, NEW)
        _type(root, app.repeat, NEW)
        assert app.strength.cget("text") in ("fair", "good", "strong")
        app.change_button.invoke()
        _wait(root, app)
        assert "Passphrase changed" in app.result.cget("text"), app.result.cget("text")
        for w in (app.volume, app.current, app.new, app.repeat, app.strength, app.progress,
                  app.change_button, app.close_button, app.result):
            assert w.winfo_ismapped()
        assert app.current.get() == "" and app.new.get() == ""  # the fields were cleared
        root.update()
        root.winfo_pointerxy()  # a round trip: the X server has drawn everything sent before
        xwd = subprocess.run(["xwd", "-root", "-silent", "-display", display], check=True,
                             capture_output=True).stdout
        width, height, png, colours = xwd_to_png(xwd)
        assert (width, height) == (640, 480)
        assert len(colours) >= 4, "the screenshot shows no window"
        # the result line is green (success colour) somewhere in the window
        assert any(g > 100 and r < 60 and b < 90 for r, g, b in colours)
        (tmp_path / "gui.png").write_bytes(png)
        try:
            SCREENSHOT.write_bytes(png)
        except OSError:
            pass
    finally:
        root.destroy()
    assert opens(image, NEW.encode()) and not opens(image, USER0)
    assert opens(other, USER0)


def test_pkexec_backend_hands_passphrases_on_stdin(tmp_path: Path) -> None:
    """As a user the GUI runs `pkexec luks-passphrase change`; a stand-in pkexec runs it."""
    import sys

    from luks_passphrase.gui import PkexecBackend
    from mandos_core.secret import Secret
    from tests.lukslib import ROOT

    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "pkexec").write_text('#!/bin/sh\nexec "$@"\n')
    wrapper = bindir / "luks-passphrase"
    wrapper.write_text(f'#!/bin/sh\ncd {ROOT} && exec {sys.executable} -m luks_passphrase "$@"\n')
    for f in (bindir / "pkexec", wrapper):
        f.chmod(0o755)
    image = make_image(tmp_path / "disk.img", "luks1")
    old_path = os.environ["PATH"]
    os.environ["PATH"] = f"{bindir}:{old_path}"
    try:
        backend = PkexecBackend(str(wrapper), ["--state-dir", str(tmp_path / "state")])
        seen: list[str] = []
        bad = backend.change(str(image), Secret(b"wrong"), Secret(NEW.encode()), seen.append)
        assert not bad.ok and "wrong" in bad.message
        res = backend.change(str(image), Secret(USER0), Secret(NEW.encode()), seen.append)
    finally:
        os.environ["PATH"] = old_path
    assert res.ok, res.message
    assert "Passphrase changed" in res.message and seen
    assert opens(image, NEW.encode()) and not opens(image, USER0)
