"""Reading passphrases: from the terminal without echo, or one per line from stdin.

When standard input is not a terminal, passphrases are read from it one per
line, in the order the prompts would ask (as ``cryptsetup --key-file -``
reads a key), so the tool is scriptable.  Only the line feed ends a line;
every other byte belongs to the passphrase.
"""

from __future__ import annotations

import getpass
import os
import sys
from typing import BinaryIO

from mandos_core.secret import Secret

MAX_PASSPHRASE = 512


class InputError(Exception):
    pass


class Mismatch(InputError):
    pass


class Prompter:
    def __init__(self, stdin: BinaryIO | None = None, interactive: bool | None = None) -> None:
        self.stdin = stdin if stdin is not None else sys.stdin.buffer
        if interactive is None:
            try:
                interactive = os.isatty(self.stdin.fileno())
            except (OSError, ValueError, AttributeError):
                interactive = False
        self.interactive = interactive

    def ask(self, prompt: str) -> Secret:
        if self.interactive:
            try:
                text = getpass.getpass(prompt)
            except EOFError:
                raise InputError("no passphrase given") from None
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

    def ask_new(self, what: str = "New passphrase") -> Secret:
        first = self.ask(f"{what}: ")
        again = self.ask(f"Repeat {what[0].lower() + what[1:]}: ")
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
            sys.stderr.write(f"{prompt} [1-{len(options)}]: ")
            sys.stderr.flush()
            answer = sys.stdin.readline()
            if not answer:
                raise InputError("no volume chosen")
            if answer.strip().isdigit() and 1 <= int(answer) <= len(options):
                return int(answer) - 1
