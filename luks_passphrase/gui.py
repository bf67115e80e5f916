"""A small Tk window for ``luks-passphrase change``, on the same core.

Choose the volume, type the current passphrase and the new one twice, watch
a strength hint, press Change (or Return), read the result in plain words.
Nothing moves before the person asks for something: the progress bar shows
only while a change runs, the strength only once something is typed, and a
missing pkexec is said as the window opens.  A wrong current passphrase
clears that field alone.  The disk's backup passphrase typed as the current one
means a recovery (every other passphrase of the disk removed): nothing is
changed until the person has read that and pressed "Recover" in a dialog of
its own (Cancel is the default, and Escape).

Tk's ``send`` (any client of the X display may run Tcl in a Tk program
through it) is removed before the window is shown: this window may run as
root on someone's display.  The window itself never
needs root: as root it calls the core in-process; as a user it runs
``pkexec luks-passphrase change VOLUME`` and hands it the passphrases on
standard input (the CLI's scripted mode), so polkit asks for authorisation
and only the small CLI runs privileged.  See docs/passphrase-tool.md for the
polkit action.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import subprocess
import sys
import threading
import tkinter as tk
from collections.abc import Callable
from dataclasses import dataclass
from tkinter import ttk

from mandos_core.log import event
from mandos_core.secret import Secret

from .flows import MIN_PASSPHRASE, RecoveryNotConfirmed, Refused, Tool, strength_hint
from .libcryptsetup import LuksError, WrongPassphrase
from .messages import RECOVERY_WARNING, plain
from .volumes import Volume

log = logging.getLogger("luks_passphrase.gui")

PKEXEC_CLI = "/usr/bin/luks-passphrase"


WRONG = "The current passphrase is wrong."


@dataclass(frozen=True)
class Result:
    ok: bool
    message: str
    wrong_current: bool = False
    #: the current passphrase is the backup one: a recovery, to be confirmed first
    recovery: bool = False


#: the exit status of ``luks-passphrase change`` for a recovery not confirmed
EXIT_RECOVERY = 6


Progress = Callable[[str], None]


class InProcessBackend:
    """Running as root: call the core directly."""

    def __init__(self, tool: Tool) -> None:
        self.tool = tool

    def change(self, device: str, current: Secret, new: Secret, progress: Progress, *,
               recovery: bool = False) -> Result:
        from .flows import FlowError
        from .prompt import InputError
        from .state import StateError

        self.tool.progress = progress
        try:
            out = self.tool.change(device, current, lambda: new, recovery=recovery)
        except WrongPassphrase:
            return Result(False, WRONG, wrong_current=True)
        except RecoveryNotConfirmed:
            return Result(False, RECOVERY_WARNING, recovery=True)
        except (Refused, FlowError, LuksError, StateError, InputError) as e:
            return Result(False, str(e))
        return Result(True, plain(out))

    def problem(self) -> str | None:
        return None


class PkexecBackend:
    """Running as a user: ``pkexec luks-passphrase change``, passphrases on stdin."""

    def __init__(self, cli: str | None = None, extra_args: list[str] | None = None) -> None:
        # pkexec needs an absolute path; the polkit action names /usr/bin/luks-passphrase
        self.cli = cli or shutil.which("luks-passphrase") or PKEXEC_CLI
        self.extra = extra_args or []

    def problem(self) -> str | None:
        """What stops this window from working at all, said as it opens."""
        if shutil.which("pkexec") is None:
            return ("pkexec is not installed, so this window cannot change a passphrase for you: "
                    "ask an administrator to install it (apt-get install pkexec), or run "
                    "luks-passphrase change as root.")
        return None

    def change(self, device: str, current: Secret, new: Secret, progress: Progress, *,
               recovery: bool = False) -> Result:
        problem = self.problem()
        if problem is not None:
            return Result(False, problem)
        progress("Asking for authorisation…")
        data = current.prefixed(b"") + b"\n" + new.prefixed(b"") + b"\n" + new.prefixed(b"") + b"\n"
        try:
            proc = subprocess.run(["pkexec", self.cli, *self.extra, "change",
                                   *(["--recovery"] if recovery else []), device],
                                  input=bytes(data), capture_output=True, timeout=600)
        finally:
            for i in range(len(data)):
                data[i] = 0
        if proc.returncode in (126, 127):
            return Result(False, "Not authorised.")
        if proc.returncode == 3:
            return Result(False, WRONG, wrong_current=True)
        if proc.returncode == EXIT_RECOVERY:
            return Result(False, RECOVERY_WARNING, recovery=True)
        if proc.returncode == 0:
            return Result(True, proc.stdout.decode(errors="replace").strip())
        errors = [ln.removeprefix("luks-passphrase: ")
                  for ln in proc.stderr.decode(errors="replace").splitlines()
                  if ln.startswith("luks-passphrase: ")]
        return Result(False, errors[-1] if errors else f"failed (exit code {proc.returncode})")


class App:
    """The window.  Widgets are attributes so tests can look at them."""

    def __init__(self, root: tk.Tk, backend: InProcessBackend | PkexecBackend,
                 volumes: list[Volume], preselect: str | None = None) -> None:
        self.root = root
        self.backend = backend
        self.volumes = volumes
        self.events: queue.Queue[tuple[str, object]] = queue.Queue()
        self.busy = False
        #: the recovery question, while it is open
        self.dialog: tk.Toplevel | None = None
        disable_send(root)
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
        self.strength = ttk.Label(frm, text="")
        self.strength.grid(row=5, column=1, sticky="w")
        self.new.bind("<KeyRelease>", lambda _e: self._update_strength())
        # shown only while a change runs
        self.progress = ttk.Progressbar(frm, mode="indeterminate", length=300)
        self.progress.grid(row=6, column=0, columnspan=2, sticky="ew", pady=(10, 2))
        self.progress.grid_remove()
        self.status = ttk.Label(frm, text="", wraplength=540, justify="left")
        self.status.grid(row=7, column=0, columnspan=2, sticky="w")
        self.result = tk.Label(frm, text="", wraplength=540, justify="left")
        self.result.grid(row=8, column=0, columnspan=2, sticky="w", pady=(4, 8))
        buttons = ttk.Frame(frm)
        buttons.grid(row=9, column=0, columnspan=2, sticky="e")
        self.close_button = ttk.Button(buttons, text="Close", command=root.destroy)
        self.close_button.grid(row=0, column=0, padx=4)
        self.change_button = ttk.Button(buttons, text="Change", command=self.start,
                                        default="active")
        self.change_button.grid(row=0, column=1)
        for key in ("<Return>", "<KP_Enter>"):
            root.bind(key, lambda _e: self.start())
        root.bind("<Escape>", lambda _e: root.destroy())
        problem = backend.problem()
        if problem is not None:  # said now, not after the person typed everything
            self.change_button.state(["disabled"])
            self._show(Result(False, problem))
        self.current.focus_set()
        self._after = root.after(100, self._poll)
        root.bind("<Destroy>", self._destroyed, add="+")

    def _entry(self, frm: ttk.Frame, row: int, label: str) -> ttk.Entry:
        ttk.Label(frm, text=label).grid(row=row, column=0, sticky="w", padx=(0, 8))
        e = ttk.Entry(frm, show="•", width=40)
        e.grid(row=row, column=1, sticky="ew", pady=2)
        return e

    def _update_strength(self) -> None:
        typed = self.new.get().encode()
        self.strength.configure(text=strength_hint(typed) if typed else "")

    def _device(self) -> str:
        text = self.volume.get().strip()
        for v in self.volumes:
            if text in (str(v), v.name, v.device):
                return v.device
        return text

    def _refuse(self, message: str, field: ttk.Entry) -> None:
        self._show(Result(False, message))
        field.focus_set()

    def start(self, recovery: bool = False) -> None:
        """Change (Return): check the fields, then run the change off the Tk thread.
        *recovery*: the person confirmed the recovery in :meth:`ask_recovery`."""
        if self.busy or self.change_button.instate(["disabled"]) or self.dialog is not None:
            return
        device = self._device()
        if not device:
            return self._refuse("Choose a volume.", self.current)
        if not self.current.get():
            return self._refuse("Type the current passphrase.", self.current)
        if len(self.new.get().encode()) < MIN_PASSPHRASE:
            return self._refuse(f"The new passphrase is too short (at least {MIN_PASSPHRASE} "
                                "characters).", self.new)
        if self.new.get() != self.repeat.get():
            self.repeat.delete(0, "end")
            return self._refuse("The two new passphrases differ: type the new one again.",
                                self.repeat)
        if self.new.get() == self.current.get():
            return self._refuse("The new passphrase is the same as the current one.", self.new)
        current = Secret(self.current.get().encode())
        new = Secret(self.new.get().encode())
        self.busy = True
        self.change_button.state(["disabled"])
        self.result.configure(text="")
        self.progress.grid()
        self.progress.start(12)

        def work() -> None:
            try:
                res = self.backend.change(device, current, new,
                                          lambda m: self.events.put(("progress", m)),
                                          recovery=recovery)
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
                    self._done(value)
        except queue.Empty:
            pass
        self._after = self.root.after(100, self._poll)

    def _destroyed(self, event: tk.Event) -> None:  # type: ignore[type-arg]
        if event.widget is self.root:
            self.root.after_cancel(self._after)

    def _done(self, res: Result) -> None:
        self.busy = False
        self.progress.stop()
        self.progress.grid_remove()
        self.status.configure(text="")
        self.change_button.state(["!disabled"])
        if res.ok:
            for e in (self.current, self.new, self.repeat):
                e.delete(0, "end")
            self._update_strength()
        elif res.wrong_current:  # only that field: the new passphrase was fine
            self.current.delete(0, "end")
            self.current.focus_set()
        elif res.recovery:  # nothing changed yet: ask, and run again only on "Recover"
            event(log, logging.INFO, "window: the backup passphrase was typed; asking "
                  "before a recovery", LUKS_PATH=self._device())
            self.ask_recovery()
            return
        self._show(res)
        event(log, logging.INFO, f"window: {res.message}",
              LUKS_PATH=self._device())

    def ask_recovery(self) -> None:
        """The recovery question, in a dialog of its own: Cancel is the default."""
        d = self.dialog = tk.Toplevel(self.root)
        d.title("Recovery")
        d.transient(self.root)
        d.resizable(False, False)
        frm = ttk.Frame(d, padding=14)
        frm.grid(sticky="nsew")
        ttk.Label(frm, text=RECOVERY_WARNING, wraplength=420, justify="left").grid(
            row=0, column=0, columnspan=2, sticky="w", pady=(0, 12))
        self.cancel_recovery = ttk.Button(frm, text="Cancel", default="active",
                                          command=lambda: self._recovery_answer(False))
        self.cancel_recovery.grid(row=1, column=0, sticky="e", padx=4)
        self.confirm_recovery = ttk.Button(frm, text="Recover",
                                           command=lambda: self._recovery_answer(True))
        self.confirm_recovery.grid(row=1, column=1, sticky="e")
        for key in ("<Return>", "<KP_Enter>"):  # the focused button, as a person expects
            d.bind(key, lambda e: e.widget.invoke() if isinstance(e.widget, ttk.Button)
                   else None)
        d.bind("<Escape>", lambda _e: self._recovery_answer(False))
        d.protocol("WM_DELETE_WINDOW", lambda: self._recovery_answer(False))
        self.cancel_recovery.focus_set()

    def _recovery_answer(self, recover: bool) -> None:
        if self.dialog is not None:
            self.dialog.destroy()
            self.dialog = None
        if recover:
            self.start(recovery=True)
            return
        self._show(Result(False, "Recovery cancelled; nothing was changed."))
        self.current.focus_set()

    def _show(self, res: Result) -> None:
        self.result.configure(text=("✔ " if res.ok else "✘ ") + res.message,
                              fg="#1a7f37" if res.ok else "#b42318")


def disable_send(root: tk.Tk) -> None:
    """Remove Tk's ``send``: deleting the command unregisters the program, so no other
    X client can run Tcl in it (as root, when an administrator opens the window)."""
    try:
        root.tk.call("rename", "send", "")
    except tk.TclError:
        pass  # already gone


def run_gui(tool: Tool, volumes: list[Volume], preselect: str | None) -> None:
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
    root.mainloop()
    sys.stdout.flush()
