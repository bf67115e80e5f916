"""A small Tk window for ``luks-passphrase change``, on the same core.

Choose the volume, type the current passphrase and the new one twice, watch
a strength hint, press Change, read the result.  The window itself never
needs root: as root it calls the core in-process; as a user it runs
``pkexec luks-passphrase change VOLUME`` and hands it the passphrases on
standard input (the CLI's scripted mode), so polkit asks for authorisation
and only the small CLI runs privileged.  See docs/passphrase-tool.md for the
polkit action.
"""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import sys
import threading
import tkinter as tk
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from tkinter import ttk

from mandos_core.secret import Secret

from .flows import Refused, Tool, strength_hint
from .libcryptsetup import LuksError, WrongPassphrase
from .volumes import Volume

PKEXEC_CLI = "/usr/bin/luks-passphrase"


@dataclass(frozen=True)
class Result:
    ok: bool
    message: str


Progress = Callable[[str], None]


class InProcessBackend:
    """Running as root: call the core directly."""

    def __init__(self, tool: Tool) -> None:
        self.tool = tool

    def change(self, device: str, current: Secret, new: Secret, progress: Progress) -> Result:
        from .flows import FlowError
        from .prompt import InputError
        from .state import StateError

        self.tool.progress = progress
        try:
            out = self.tool.change(device, current, lambda: new)
        except WrongPassphrase:
            return Result(False, "The current passphrase is wrong.")
        except (Refused, FlowError, LuksError, StateError, InputError) as e:
            return Result(False, str(e))
        return Result(True, out.message)


class PkexecBackend:
    """Running as a user: ``pkexec luks-passphrase change``, passphrases on stdin."""

    def __init__(self, cli: str | None = None, extra_args: list[str] | None = None) -> None:
        # pkexec needs an absolute path; the polkit action names /usr/bin/luks-passphrase
        self.cli = cli or shutil.which("luks-passphrase") or PKEXEC_CLI
        self.extra = extra_args or []

    def change(self, device: str, current: Secret, new: Secret, progress: Progress) -> Result:
        if shutil.which("pkexec") is None:
            return Result(False, "pkexec is not installed (apt-get install pkexec)")
        progress("Asking for authorisation…")
        data = current.prefixed(b"") + b"\n" + new.prefixed(b"") + b"\n" + new.prefixed(b"") + b"\n"
        try:
            proc = subprocess.run(["pkexec", self.cli, *self.extra, "change", device],
                                  input=bytes(data), capture_output=True, timeout=600)
        finally:
            for i in range(len(data)):
                data[i] = 0
        if proc.returncode in (126, 127):
            return Result(False, "Not authorised.")
        if proc.returncode == 3:
            return Result(False, "The current passphrase is wrong.")
        if proc.returncode == 0:
            return Result(True, proc.stdout.decode(errors="replace").strip())
        errors = [ln.removeprefix("luks-passphrase: ")
                  for ln in proc.stderr.decode(errors="replace").splitlines()
                  if ln.startswith("luks-passphrase: ")]
        return Result(False, errors[-1] if errors else f"failed (exit code {proc.returncode})")


class App:
    """The window.  Widgets are attributes so tests can drive them like a person."""

    def __init__(self, root: tk.Tk, backend: InProcessBackend | PkexecBackend,
                 volumes: list[Volume], preselect: str | None = None) -> None:
        self.root = root
        self.backend = backend
        self.volumes = volumes
        self.events: queue.Queue[tuple[str, object]] = queue.Queue()
        self.busy = False
        root.title("Change disk passphrase")
        root.resizable(False, False)
        frm = ttk.Frame(root, padding=14)
        frm.grid(sticky="nsew")
        ttk.Label(frm, text="Change the passphrase of an encrypted disk",
                  font=("TkDefaultFont", 11, "bold")).grid(row=0, column=0, columnspan=2,
                                                          sticky="w", pady=(0, 10))
        ttk.Label(frm, text="Volume:").grid(row=1, column=0, sticky="w")
        names = [str(v) for v in volumes]
        self.volume = ttk.Combobox(frm, values=names, width=40)
        if preselect:
            self.volume.set(preselect)
        elif names:
            self.volume.current(0)
        self.volume.grid(row=1, column=1, sticky="ew", pady=2)
        self.current = self._entry(frm, 2, "Current passphrase:")
        self.new = self._entry(frm, 3, "New passphrase:")
        self.repeat = self._entry(frm, 4, "Repeat new passphrase:")
        ttk.Label(frm, text="Strength:").grid(row=5, column=0, sticky="w")
        self.strength = ttk.Label(frm, text="-")
        self.strength.grid(row=5, column=1, sticky="w")
        self.new.bind("<KeyRelease>", lambda _e: self._update_strength())
        self.progress = ttk.Progressbar(frm, mode="indeterminate", length=300)
        self.progress.grid(row=6, column=0, columnspan=2, sticky="ew", pady=(10, 2))
        self.status = ttk.Label(frm, text="", wraplength=420, justify="left")
        self.status.grid(row=7, column=0, columnspan=2, sticky="w")
        self.result = tk.Label(frm, text="", wraplength=420, justify="left")
        self.result.grid(row=8, column=0, columnspan=2, sticky="w", pady=(4, 8))
        buttons = ttk.Frame(frm)
        buttons.grid(row=9, column=0, columnspan=2, sticky="e")
        self.close_button = ttk.Button(buttons, text="Close", command=root.destroy)
        self.close_button.grid(row=0, column=0, padx=4)
        self.change_button = ttk.Button(buttons, text="Change", command=self.start)
        self.change_button.grid(row=0, column=1)
        self.current.focus_set()
        root.after(100, self._poll)

    def _entry(self, frm: ttk.Frame, row: int, label: str) -> ttk.Entry:
        ttk.Label(frm, text=label).grid(row=row, column=0, sticky="w", padx=(0, 8))
        e = ttk.Entry(frm, show="•", width=40)
        e.grid(row=row, column=1, sticky="ew", pady=2)
        return e

    def _update_strength(self) -> None:
        self.strength.configure(text=strength_hint(self.new.get().encode()))

    def _device(self) -> str:
        text = self.volume.get().strip()
        for v in self.volumes:
            if text in (str(v), v.name, v.device):
                return v.device
        return text

    def start(self) -> None:
        if self.busy:
            return
        device = self._device()
        current = Secret(self.current.get().encode())
        new = Secret(self.new.get().encode())
        again = Secret(self.repeat.get().encode())
        if not device:
            return self._show(Result(False, "Choose a volume."))
        if not current:
            return self._show(Result(False, "Type the current passphrase."))
        if new != again:
            return self._show(Result(False, "The two new passphrases differ."))
        for e in (self.current, self.new, self.repeat):
            e.delete(0, "end")
        self.busy = True
        self.change_button.state(["disabled"])
        self.result.configure(text="")
        self.progress.configure(mode="indeterminate")
        self.progress.start(12)

        def work() -> None:
            try:
                res = self.backend.change(device, current, new,
                                          lambda m: self.events.put(("progress", m)))
            except Exception as e:  # noqa: BLE001 - shown to the user, never a traceback
                res = Result(False, f"Unexpected error: {e}")
            finally:
                current.wipe()
                new.wipe()
            self.events.put(("done", res))

        threading.Thread(target=work, daemon=True, name="change").start()

    def _poll(self) -> None:
        try:
            while True:
                kind, value = self.events.get_nowait()
                if kind == "progress":
                    self.status.configure(text=str(value))
                elif kind == "done":
                    assert isinstance(value, Result)
                    self.busy = False
                    self.progress.stop()
                    self.progress.configure(mode="determinate", value=100 if value.ok else 0)
                    if value.ok:
                        self.status.configure(text="")
                    self.change_button.state(["!disabled"])
                    self._show(value)
        except queue.Empty:
            pass
        self.root.after(100, self._poll)

    def _show(self, res: Result) -> None:
        self.result.configure(text=("✔ " if res.ok else "✘ ") + res.message,
                              fg="#1a7f37" if res.ok else "#b42318")


def run_gui(tool: Tool, volumes: list[Volume], preselect: str | None,
            screenshot: Path | None = None) -> None:
    if os.geteuid() == 0:
        backend: InProcessBackend | PkexecBackend = InProcessBackend(tool)
    else:
        backend = PkexecBackend()
    try:
        root = tk.Tk()
    except tk.TclError as e:
        from .flows import FlowError

        raise FlowError(f"cannot open a window: {e}") from None
    App(root, backend, volumes, preselect)
    if screenshot is not None:  # used by hand: an XWD dump of the screen, then quit
        def shoot() -> None:
            subprocess.run(["xwd", "-root", "-silent", "-out", str(screenshot)], check=False)
            root.destroy()

        root.after(1500, shoot)
    root.mainloop()
    sys.stdout.flush()
