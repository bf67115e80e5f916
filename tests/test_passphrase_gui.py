"""The window as a person uses it: under Xvfb, real X key events (xdotool, through
XTEST, as a keyboard would send them) into the window, the volume checked with
cryptsetup, the real ``luks-passphrase gui`` command watched through its journal
records, and a screenshot of that real window (xwd) checked and saved as PNG
(``LUKS_PASSPHRASE_SCREENSHOT``; docs/passphrase-gui.png is made this way)."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from luks_passphrase.flows import Tool
from luks_passphrase.messages import CHANGED
from luks_passphrase.state import StateStore
from luks_passphrase.volumes import list_volumes
from tests.helpers import wait_for
from tests.lukslib import ROOT, USER0, make_escrow_keys, make_image, opens
from tests.uxlib import Journal

NEW = "gui new passphrase"
TITLE = "Change disk passphrase"
SCREENSHOT = Path(os.environ.get("LUKS_PASSPHRASE_SCREENSHOT", "/tmp/luks-passphrase-gui.png"))


def _xvfb(num: int) -> Iterator[str]:
    for tool in ("Xvfb", "xwd", "xdotool"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install xvfb x11-apps xdotool)")
    try:
        import tkinter  # noqa: F401
    except ImportError:
        pytest.skip("tkinter is not installed (apt-get install python3-tk)")
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


@pytest.fixture(scope="module")
def display() -> Iterator[str]:
    """The display for windows made in this process."""
    yield from _xvfb(90 + os.getpid() % 500)


@pytest.fixture(autouse=True)
def _tk_freed_on_the_main_thread() -> Iterator[None]:
    """Collect each test's Tk objects on the main thread, before and after it.

    A Tk interpreter freed by the garbage collector runs Tcl's deletion in whatever
    thread triggered the collection; when that is the window's worker thread (a change
    in progress), Tcl aborts the whole process ("async handler deleted by the wrong
    thread").  The window itself makes one Tk per process, so only tests meet this.
    """
    import gc

    gc.collect()
    yield
    gc.collect()


@pytest.fixture
def own_display() -> Iterator[str]:
    """A display of its own, with no window of this process ever on it."""
    yield from _xvfb(600 + os.getpid() % 500)


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



def xdo(*args: str) -> str:
    """One xdotool command: real input through XTEST, as a keyboard or a window manager."""
    return subprocess.run(["xdotool", *args], check=True, capture_output=True, text=True,
                          timeout=60).stdout.strip()


def find_window(timeout: int = 30) -> str:
    return xdo("search", "--sync", "--limit", "1", "--name", f"^{TITLE}$").splitlines()[0]


def pump(root: object, condition: object, timeout: float = 60) -> None:
    """Let Tk handle events until *condition()* holds."""
    def done() -> bool:
        root.update()  # type: ignore[attr-defined]
        return bool(condition())  # type: ignore[operator]

    wait_for(done, timeout, "the window to get there", interval=0.01)


class Held:
    """The window's backend, held at the start of each change until the test lets it go:
    the window's "working" state is then seen for certain, however fast the change is
    (a wrong passphrase is refused in milliseconds, faster than one look at the window)."""

    def __init__(self, backend: object) -> None:
        self.backend = backend
        self.go = threading.Event()

    def change(self, *args: object, **kw: object) -> object:
        if not self.go.wait(60):
            raise TimeoutError("the test never let the change go")
        self.go.clear()
        return self.backend.change(*args, **kw)  # type: ignore[attr-defined]

    def problem(self) -> str | None:
        return self.backend.problem()  # type: ignore[attr-defined, no-any-return]


def _volumes(tmp_path: Path) -> tuple[Path, Path, Path]:
    image = make_image(tmp_path / "disk.img", "luks2")
    other = make_image(tmp_path / "data.img", "luks1")
    crypttab = tmp_path / "crypttab"
    crypttab.write_text(f"root {image} none luks\ndata {other} none luks\n")
    return image, other, crypttab


def test_the_window_as_a_person_uses_it(tmp_path: Path, display: str) -> None:
    """Typed keys, Tab and Return, as a person: nothing moves before they ask, a wrong
    current passphrase clears that field alone, success in plain words."""
    import tkinter as tk

    from luks_passphrase.gui import App, InProcessBackend

    keys = make_escrow_keys(tmp_path / "escrow")
    image, other, crypttab = _volumes(tmp_path)
    volumes = list_volumes(crypttab, Path(os.devnull))
    tool = Tool(StateStore(tmp_path / "state"), certificate=keys.cert_pem)
    root = tk.Tk()
    try:
        held = Held(InProcessBackend(tool))
        app = App(root, held, volumes)  # type: ignore[arg-type]
        pump(root, lambda: app.current.winfo_ismapped())
        assert app.volume.get().startswith("root")
        # before anything happens: no progress bar, no strength, no result
        assert not app.progress.winfo_ismapped()
        assert app.strength.cget("text") == "" and app.result.cget("text") == ""
        xdo("windowfocus", "--sync", find_window())
        pump(root, lambda: root.focus_get() is app.current)
        xdo("type", "--delay", "5", "not it")
        pump(root, lambda: app.current.get() == "not it")
        assert app.strength.cget("text") == ""  # nothing typed as the new one yet
        xdo("key", "Tab")
        xdo("type", "--delay", "5", NEW)
        pump(root, lambda: app.new.get() == NEW)
        assert app.strength.cget("text") == "strong"
        xdo("key", "Tab")
        xdo("type", "--delay", "5", NEW)
        pump(root, lambda: app.repeat.get() == NEW)
        xdo("key", "Return")  # Return submits
        pump(root, lambda: app.busy)
        root.update_idletasks()
        assert app.progress.winfo_ismapped()  # shown while it works
        assert app.change_button.instate(["disabled"])  # and asked only once
        held.go.set()
        pump(root, lambda: not app.busy)
        assert app.result.cget("text") == "✘ The current passphrase is wrong."
        # only the wrong field was cleared, and the cursor is back in it
        assert app.current.get() == "" and app.new.get() == NEW and app.repeat.get() == NEW
        assert root.focus_get() is app.current
        assert not app.progress.winfo_ismapped()
        xdo("type", "--delay", "5", USER0.decode())
        pump(root, lambda: app.current.get() == USER0.decode())
        xdo("key", "Return")
        pump(root, lambda: app.busy)
        held.go.set()
        pump(root, lambda: not app.busy)
        assert app.result.cget("text") == "✔ " + CHANGED
        assert not any(c.isdigit() for c in app.result.cget("text"))  # no key slot numbers
        assert app.current.get() == app.new.get() == app.repeat.get() == ""
        assert app.strength.cget("text") == "" and not app.progress.winfo_ismapped()
    finally:
        root.destroy()
    assert opens(image, NEW.encode()) and not opens(image, USER0)
    assert opens(other, USER0)


def test_a_recovery_is_asked_before_anything_changes(tmp_path: Path, display: str) -> None:
    """The backup passphrase typed as the current one: a dialog says what a recovery
    does, Cancel (the default, Escape) leaves the disk as it was, Recover runs it."""
    import tkinter as tk

    from luks_passphrase.gui import App, InProcessBackend
    from tests.lukslib import BACKUP0, setup_volume

    keys = make_escrow_keys(tmp_path / "escrow")
    image, store = setup_volume(tmp_path / "v", "luks2", keys, extra_user=True)
    crypttab = tmp_path / "crypttab"
    crypttab.write_text(f"root {image} none luks\n")
    tool = Tool(store, certificate=keys.cert_pem)
    root = tk.Tk()
    try:
        app = App(root, InProcessBackend(tool), list_volumes(crypttab, Path(os.devnull)))
        pump(root, lambda: app.current.winfo_ismapped())
        main = find_window()
        xdo("windowfocus", "--sync", main)
        pump(root, lambda: root.focus_get() is app.current)
        for field, text in ((app.current, BACKUP0.decode()), (app.new, NEW), (app.repeat, NEW)):
            if field is not app.current:
                xdo("key", "Tab")
            xdo("type", "--delay", "5", text)
            pump(root, lambda f=field, t=text: f.get() == t)  # type: ignore[misc]
        xdo("key", "Return")
        pump(root, lambda: app.dialog is not None and app.dialog.winfo_ismapped())
        assert opens(image, USER0) and not opens(image, NEW.encode())  # nothing yet
        dialog = xdo("search", "--sync", "--limit", "1", "--name", "^Recovery$").split()[0]
        xdo("windowfocus", "--sync", dialog)
        xdo("key", "Return")  # on Cancel, the default
        pump(root, lambda: app.dialog is None)
        assert app.result.cget("text") == "✘ Recovery cancelled; nothing was changed."
        assert opens(image, USER0) and not opens(image, NEW.encode())

        xdo("windowfocus", "--sync", main)
        xdo("key", "Return")
        pump(root, lambda: app.dialog is not None and app.dialog.winfo_ismapped())
        dialog = xdo("search", "--sync", "--limit", "1", "--name", "^Recovery$").split()[0]
        xdo("windowfocus", "--sync", dialog)
        pump(root, lambda: root.focus_get() is app.cancel_recovery)
        xdo("key", "Tab")
        pump(root, lambda: root.focus_get() is app.confirm_recovery)
        xdo("key", "Return")
        pump(root, lambda: app.dialog is None and app.busy)
        pump(root, lambda: not app.busy)
        assert app.result.cget("text").startswith("✔ "), app.result.cget("text")
    finally:
        root.destroy()
    assert opens(image, NEW.encode()) and not opens(image, USER0)


def test_a_missing_pkexec_is_said_when_the_window_opens(tmp_path: Path, display: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import tkinter as tk

    from luks_passphrase.gui import App, PkexecBackend

    xdotool = shutil.which("xdotool")
    assert xdotool is not None
    image, _, crypttab = _volumes(tmp_path)
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # a desktop without pkexec
    root = tk.Tk()
    try:
        app = App(root, PkexecBackend("/usr/bin/luks-passphrase"),
                  list_volumes(crypttab, Path(os.devnull)))
        pump(root, lambda: app.current.winfo_ismapped())
        said = app.result.cget("text")
        assert said.startswith("✘ pkexec is not installed, so this window cannot change a "
                               "passphrase for you"), said
        assert app.change_button.instate(["disabled"])
        wid = subprocess.run([xdotool, "search", "--sync", "--limit", "1", "--name",
                              f"^{TITLE}$"], check=True, capture_output=True,
                             text=True).stdout.split()[0]
        subprocess.run([xdotool, "windowfocus", "--sync", wid], check=True)
        subprocess.run([xdotool, "type", "--delay", "5", USER0.decode()], check=True)
        pump(root, lambda: app.current.get() == USER0.decode())
        subprocess.run([xdotool, "key", "Return"], check=True)
        root.update()
        assert not app.busy and app.result.cget("text") == said  # nothing started
    finally:
        root.destroy()
        monkeypatch.undo()
    assert opens(image, USER0)


# The real command in a private mount namespace whose /dev holds the disk as /dev/vda3,
# so that the window (and the screenshot in docs/) shows what a machine shows.
NAMESPACE = """set -e
mount --make-rprivate /
mkdir -p "$1/olddev"
mount --rbind /dev "$1/olddev"
mount -t tmpfs -o mode=0755 none /dev
for n in null zero full random urandom tty; do
    touch "/dev/$n"; mount --bind "$1/olddev/$n" "/dev/$n"
done
touch /dev/vda3
mount --bind "$2" /dev/vda3
shift 2
exec "$@"
"""


def test_the_real_window(tmp_path: Path, own_display: str) -> None:
    """``luks-passphrase gui`` itself: typed into, watched through its journal records,
    photographed; no other X client can run code in it through Tk's send."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare (a private mount namespace)")
    display = own_display
    image = make_image(tmp_path / "disk.img", "luks2")
    crypttab = tmp_path / "crypttab"
    crypttab.write_text("root /dev/vda3 none luks\n")
    journal = Journal(tmp_path / "journal.sock")
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "DISPLAY": display,
           "LC_ALL": "C.UTF-8", "MANDOS_JOURNAL_SOCKET": str(journal.path)}
    proc = subprocess.Popen(
        ["unshare", "--mount", "--", "sh", "-c", NAMESPACE, "sh", str(tmp_path), str(image),
         sys.executable, "-m", "luks_passphrase", "--state-dir", str(tmp_path / "state"),
         "--crypttab", str(crypttab), "--dmsetup-table", os.devnull, "gui"],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=(tmp_path / "stderr").open("wb"))

    def said() -> str:
        return "its stderr: " + (tmp_path / "stderr").read_text(errors="replace")

    wid = ""

    try:
        wid = find_window()
        _attack_through_send(tmp_path)
        xdo("windowfocus", "--sync", wid)
        xdo("mousemove", "--window", wid, "380", "82", "click", "1")  # into the first field
        xdo("type", "--delay", "5", "not it")
        xdo("key", "Tab")
        xdo("type", "--delay", "5", NEW)
        xdo("key", "Tab")
        xdo("type", "--delay", "5", NEW)
        xdo("key", "Return")
        assert journal.wait_for("window: ", said) == "window: The current passphrase is wrong."
        # the new passphrase is still typed twice: only the current one is needed again
        xdo("type", "--delay", "5", USER0.decode())
        xdo("key", "Return")
        assert journal.wait_for("window: ", said) == "window: " + CHANGED
        png = _screenshot_when_shown(wid, display)
        (tmp_path / "gui.png").write_bytes(png)
        try:
            SCREENSHOT.write_bytes(png)
        except OSError:
            pass
        xdo("key", "Escape")  # closes the window
        assert proc.wait(timeout=30) == 0, said()
        assert (tmp_path / "stderr").read_bytes() == b""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        journal.sock.close()
    assert opens(image, NEW.encode()) and not opens(image, USER0)


def _screenshot_when_shown(wid: str, display: str) -> bytes:
    """The window as PNG, once its result line (green) is drawn."""
    deadline = time.monotonic() + 30
    while True:
        shot = subprocess.run(["xwd", "-id", wid, "-silent", "-display", display],
                              capture_output=True)
        if shot.returncode == 0:  # (it fails while the window is being resized)
            width, height, png, colours = xwd_to_png(shot.stdout)
            if any(g > 100 and r < 60 and b < 90 for r, g, b in colours):
                assert 300 < width < 640 and 150 < height < 480, (width, height)
                return png
        if time.monotonic() > deadline:
            raise AssertionError(f"the result never showed in the window {shot.stderr!r}")


ATTACKER = """import sys, tkinter
r = tkinter.Tk()
r.withdraw()
me = r.tk.call("tk", "appname")
names = [n for n in r.tk.splitlist(r.tk.call("winfo", "interps")) if n != me]
names += [n for n in ("tk", "tk #2", "__main__", "luks-passphrase") if n != me]
for name in names:
    try:
        r.tk.call("send", name, "exec touch " + sys.argv[1])
        print("sent to", name)
    except tkinter.TclError as e:
        print(name, e)
"""


def _attack_through_send(tmp_path: Path) -> None:
    """Another X client of the display (the user's, when root opened the window there)
    sends Tcl to the window: refused, because the window removed Tk's send."""
    marker = tmp_path / "ran-as-root"
    out = subprocess.run([sys.executable, "-c", ATTACKER, str(marker)], capture_output=True,
                         text=True, timeout=60, env={**os.environ})
    assert "sent to" not in out.stdout, out.stdout
    assert not marker.exists(), "another X client ran a command inside the window"


def test_pkexec_backend_hands_passphrases_on_stdin(tmp_path: Path) -> None:
    """As a user the GUI runs `pkexec luks-passphrase change`; a stand-in pkexec runs it."""
    from luks_passphrase.gui import PkexecBackend
    from mandos_core.secret import Secret

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
        assert not bad.ok and bad.wrong_current and bad.message == "The current passphrase is wrong."
        res = backend.change(str(image), Secret(USER0), Secret(NEW.encode()), seen.append)
    finally:
        os.environ["PATH"] = old_path
    assert res.ok, res.message
    assert res.message == CHANGED and seen
    # the backup passphrase: asked first, not run (the stand-in pkexec passes no --recovery)
    from tests.lukslib import BACKUP0, setup_volume
    from tests.lukslib import make_escrow_keys as escrow_keys

    keys = escrow_keys(tmp_path / "escrow")
    disk, store = setup_volume(tmp_path / "v", "luks2", keys)
    os.environ["PATH"] = f"{bindir}:{old_path}"
    try:
        backend = PkexecBackend(str(wrapper), ["--state-dir", str(store.dir),
                                               "--certificate", str(keys.cert)])
        asked = backend.change(str(disk), Secret(BACKUP0), Secret(NEW.encode()), seen.append)
        assert not asked.ok and asked.recovery, asked
        assert opens(disk, USER0)
        done = backend.change(str(disk), Secret(BACKUP0), Secret(NEW.encode()), seen.append,
                              recovery=True)
    finally:
        os.environ["PATH"] = old_path
    assert done.ok, done.message
    assert opens(disk, NEW.encode()) and not opens(disk, USER0)
    assert opens(image, NEW.encode()) and not opens(image, USER0)
