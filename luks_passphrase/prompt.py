"""Reading passphrases: from the terminal without echo, or one per line from stdin.

When standard input is not a terminal, passphrases are read from it one per
line, in the order the prompts would ask (as ``cryptsetup --key-file -``
reads a key), so the tool is scriptable.  Only the line feed ends a line;
every other byte belongs to the passphrase.

On a terminal the prompts talk with a person: a new passphrase is checked
(:meth:`Prompter.ask_new`'s *check*) before it is asked again, a weak one
needs a yes, and Ctrl-C at a prompt ends the line before the program says
anything (:class:`Interrupted`).  What the program has to say goes to
standard error, between the prompts, and nothing else does (log lines go
to the journal).
"""

from __future__ import annotations

import getpass
import os
import sys
from collections.abc import Callable
from typing import BinaryIO

from mandos_core.secret import Secret

MAX_PASSPHRASE = 512
TRIES = 3


class InputError(Exception):
    pass


class Mismatch(InputError):
    """The new passphrase was not accepted (nothing was changed)."""


class Interrupted(InputError):
    """Ctrl-C at a prompt: nothing was changed yet."""


#: A check of a new passphrase: a reason to refuse it, or None.
Check = Callable[[Secret], "str | None"]
#: How strong a new passphrase is: the line to show, and whether to ask before using it.
Strength = Callable[[Secret], "tuple[str, bool]"]


class Prompter:
    def __init__(self, stdin: BinaryIO | None = None, interactive: bool | None = None) -> None:
        self.stdin = stdin if stdin is not None else sys.stdin.buffer
        if interactive is None:
            try:
                interactive = os.isatty(self.stdin.fileno())
            except (OSError, ValueError, AttributeError):
                interactive = False
        self.interactive = interactive

    # -- talking on the terminal ---------------------------------------------

    @staticmethod
    def say(text: str) -> None:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def _line(self, prompt: str) -> str:
        """A line typed at *prompt* (with echo); Ctrl-C ends the line first."""
        sys.stderr.write(prompt)
        sys.stderr.flush()
        try:
            answer = sys.stdin.readline()
        except KeyboardInterrupt:
            sys.stderr.write("\n")
            raise Interrupted("interrupted; nothing was changed") from None
        if not answer:
            sys.stderr.write("\n")
        return answer

    def confirm(self, question: str) -> bool:
        """A yes/no question on the terminal; anything but yes is no."""
        return self._line(f"{question} [y/N]: ").strip().lower() in ("y", "yes")

    # -- passphrases ---------------------------------------------------------

    def ask(self, prompt: str) -> Secret:
        if self.interactive:
            try:
                text = getpass.getpass(prompt)
            except EOFError:
                sys.stderr.write("\n")
                raise InputError("no passphrase given") from None
            except KeyboardInterrupt:
                sys.stderr.write("\n")  # the cursor is still after the prompt
                raise Interrupted("interrupted; nothing was changed") from None
            value = text.encode()
        else:
            line = self.stdin.readline(MAX_PASSPHRASE + 2)
            if not line:
                raise InputError(f"standard input ended; expected a line for {prompt.strip()!r}")
            if len(line) > MAX_PASSPHRASE and not line.endswith(b"\n"):
                raise InputError(f"passphrase longer than {MAX_PASSPHRASE} bytes")
            value = line[:-1] if line.endswith(b"\n") else line
        if not value:
            raise InputError("empty passphrase")
        return Secret(value)

    def ask_new(self, what: str = "New passphrase", check: Check | None = None,
                strength: Strength | None = None) -> Secret:
        """The new passphrase, typed twice.

        On a terminal: up to three tries; before the repeat is asked for,
        *check* may refuse it, and *strength* gives a line to show and whether
        the person must say yes to keep it.  From stdin: two lines, no second chance (the
        flow checks the passphrase itself).
        """
        repeat = f"Repeat {what[0].lower() + what[1:]}: "
        if not self.interactive:
            first = self.ask(f"{what}: ")
            again = self.ask(repeat)
            return self._same(first, again)
        for left in range(TRIES - 1, -1, -1):
            retry = f" Try again ({left} {'try' if left == 1 else 'tries'} left)." if left else ""
            try:
                first = self.ask(f"{what}: ")
            except Interrupted:
                raise
            except InputError:
                self.say("Nothing typed." + retry)
                continue
            problem = check(first) if check else None
            if problem is None and strength is not None:
                line, ask = strength(first)
                self.say(line)
                if ask and not self.confirm("Use it anyway?"):
                    problem = "Choose another one."
            if problem is not None:
                first.wipe()
                self.say(problem + retry)
                continue
            try:
                again = self.ask(repeat)
            except Interrupted:
                first.wipe()
                raise
            except InputError:
                again = Secret(b"")
            if first == again:
                again.wipe()
                return first
            first.wipe()
            again.wipe()
            self.say("The two passphrases differ." + retry)
        raise Mismatch("no new passphrase was accepted; nothing was changed")

    @staticmethod
    def _same(first: Secret, again: Secret) -> Secret:
        if first != again:
            first.wipe()
            again.wipe()
            raise Mismatch("the two new passphrases differ; nothing was changed")
        again.wipe()
        return first

    def choose(self, prompt: str, options: list[str]) -> int:
        """Index of the chosen option (terminal only)."""
        for i, opt in enumerate(options, 1):
            print(f"  {i}) {opt}", file=sys.stderr)
        while True:
            answer = self._line(f"{prompt} [1-{len(options)}]: ")
            if not answer:
                raise InputError("no volume chosen")
            if answer.strip().isdigit() and 1 <= int(answer) <= len(options):
                return int(answer) - 1
