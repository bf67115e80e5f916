"""Mandos's shell checker lines, understood without a shell.

Mandos runs ``checker`` through ``/bin/sh -c``; mandosd runs no shell.  A site
moving over brings the lines Debian's ``mandos-keygen --password`` writes::

    checker = ssh-keyscan -t ecdsa-sha2-nistp256 %%(host)s 2>/dev/null | grep --fixed-strings --line-regexp --quiet --regexp=%%(host)s" %(ssh_fingerprint)s"
    ssh_fingerprint = ecdsa-sha2-nistp256 AAAA...

(``-t ed25519`` or ``-t rsa`` when the host had no ECDSA key, ``-q`` in later
versions) and the default ``fping -q -- %%(host)s``.  :func:`plan` reads a
checker (after clients.conf interpolation) into one of:

* :class:`Command`: a plain argv template, no shell syntax (redirections of
  output to /dev/null are dropped: a checker's output is discarded anyway);
* :class:`KeyScan`: ``ssh-keyscan ARGS | grep -F [-x] [-q] PATTERN``: run
  ``ssh-keyscan`` as an argv, then match its output lines against the pattern
  in Python exactly as ``grep --fixed-strings [--line-regexp]`` does.  The result
  is grep's: 0 when a line matches, else 1, whatever ssh-keyscan's own status;
* :class:`Unsupported`: other shell syntax, never run, with the rewrite to use.

Parsing only: nothing here runs a process.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
from dataclasses import dataclass

#: a placeholder in checker templates (``%(name)s``), kept whole while tokenizing
_PLACEHOLDER = re.compile(r"%\([^)]*\)[#0 +-]*[0-9]*(?:\.[0-9]+)?[a-zA-Z]|%%")
#: runs of characters with no meaning to sh, unquoted and inside double quotes
_PLAIN = re.compile(r"[^\s'\"\\$`|&;<>()%]+")
_DQ_PLAIN = re.compile(r'[^"\\$`%]+')
_OPERATORS = ("&&", "||", ";;", ">>", "<<", ">&", "<&", ">|", "&", "|", ";", "<", ">",
              "(", ")")


@dataclass(frozen=True)
class Command:
    words: tuple[str, ...]


@dataclass(frozen=True)
class KeyScan:
    #: ssh-keyscan's argv, as templates
    scan: tuple[str, ...]
    #: the fixed strings grep looks for (templates)
    patterns: tuple[str, ...]
    #: whole line (``-x``) or substring
    whole_line: bool


@dataclass(frozen=True)
class Unsupported:
    reason: str
    rewrite: str


Plan = Command | KeyScan | Unsupported


@dataclass(frozen=True)
class _Tok:
    text: str
    op: bool = False
    #: a word that a shell would expand ($VAR, $(...), `...`)
    expands: bool = False


def tokenize(line: str) -> list[_Tok]:
    """POSIX sh words and operators, enough to tell what a checker line needs.

    ``%(name)s`` placeholders are kept as they are.  Raises ValueError on an
    unterminated quote.
    """
    toks: list[_Tok] = []
    i, n = 0, len(line)
    word: list[str] = []
    in_word = expands = False

    def end_word() -> None:
        nonlocal in_word, expands
        if in_word:
            toks.append(_Tok("".join(word), expands=expands))
        word.clear()
        in_word = expands = False

    while i < n:
        c = line[i]
        m = _PLAIN.match(line, i) or (_PLACEHOLDER.match(line, i) if c == "%" else None)
        if m:
            word.append(m.group())
            in_word = True
            i = m.end()
        elif c in " \t\n":
            end_word()
            i += 1
        elif c == "'":
            j = line.find("'", i + 1)
            if j < 0:
                raise ValueError("no closing quotation")
            word.append(line[i + 1:j])
            in_word = True
            i = j + 1
        elif c == '"':
            i += 1
            while True:
                if i >= n:
                    raise ValueError("no closing quotation")
                c = line[i]
                m = _DQ_PLAIN.match(line, i) or (
                    _PLACEHOLDER.match(line, i) if c == "%" else None)
                if m:
                    word.append(m.group())
                    i = m.end()
                elif c == '"':
                    i += 1
                    break
                elif c == "\\" and i + 1 < n and line[i + 1] in '$`"\\\n':
                    word.append(line[i + 1])
                    i += 2
                else:
                    if c in "$`":
                        expands = True
                    word.append(c)
                    i += 1
            in_word = True
        elif c == "\\":
            if i + 1 < n:
                word.append(line[i + 1])
            in_word = True
            i += 2
        elif c in "$`":
            expands = True
            word.append(c)
            in_word = True
            i += 1
        elif c in "|&;<>()":
            # an IO number: digits right before a redirection belong to it
            io = ""
            if in_word and not expands and "".join(word).isdigit() and c in "<>":
                io = "".join(word)
                word.clear()
                in_word = False
            end_word()
            op = next(o for o in _OPERATORS if line.startswith(o, i))
            toks.append(_Tok(io + op, op=True))
            i += len(op)
        else:
            word.append(c)
            in_word = True
            i += 1
    end_word()
    return toks


def _drop_null_redirections(toks: list[_Tok]) -> list[_Tok] | None:
    """The tokens without ``>/dev/null``, ``2>/dev/null``, ``2>&1``...; None if others remain."""
    out: list[_Tok] = []
    i = 0
    while i < len(toks):
        t = toks[i]
        if t.op and t.text in (">", "1>", "2>", ">>", "1>>", "2>>"):
            nxt = toks[i + 1] if i + 1 < len(toks) else None
            if nxt is None or nxt.op or nxt.text != "/dev/null":
                return None
            i += 2
            continue
        if t.op and t.text in (">&", "2>&", "1>&"):
            nxt = toks[i + 1] if i + 1 < len(toks) else None
            if nxt is None or nxt.op or nxt.text not in ("1", "2"):
                return None
            i += 2
            continue
        if t.op:
            return None
        out.append(t)
        i += 1
    return out


_GREP_FLAGS = {"F": "fixed", "x": "line", "q": "quiet", "s": "quiet"}
_GREP_LONG = {"--fixed-strings": "fixed", "--line-regexp": "line", "--quiet": "quiet",
              "--silent": "quiet", "--no-messages": "quiet"}


def _grep(words: list[str]) -> tuple[tuple[str, ...], bool] | None:
    """(patterns, whole_line) for ``grep -F [-x] [-q] PATTERN`` reading stdin; else None."""
    flags: set[str] = set()
    patterns: list[str] = []
    operands: list[str] = []
    args = iter(words[1:])
    options_end = False
    for w in args:
        if options_end:
            operands.append(w)
        elif w == "--":
            options_end = True
        elif w in _GREP_LONG:
            flags.add(_GREP_LONG[w])
        elif w.startswith("--regexp="):
            patterns.append(w.removeprefix("--regexp="))
        elif w == "--regexp":
            patterns.append(next(args, ""))
        elif w.startswith("-") and len(w) > 1 and not w.startswith("--"):
            letters = w[1:]
            for k, ch in enumerate(letters):
                if ch in _GREP_FLAGS:
                    flags.add(_GREP_FLAGS[ch])
                elif ch == "e":
                    patterns.append(letters[k + 1:] or next(args, ""))
                    break
                else:
                    return None
        elif w.startswith("-"):
            return None
        else:
            operands.append(w)
    if not patterns and operands:
        patterns.append(operands.pop(0))
    if operands or not patterns or "fixed" not in flags:
        return None  # files to read, several operands, or a regular expression
    lines = tuple(p for pat in patterns for p in pat.split("\n"))
    return lines, "line" in flags


REWRITE = ("put the pipeline in a script that takes the host as its argument, and set "
           "checker = /usr/local/lib/mandos/checkers/SCRIPT %%(host)s")


@functools.lru_cache(maxsize=1 << 16)
def plan(checker: str) -> Plan:
    """What running *checker* (a clients.conf value after interpolation) means here."""
    try:
        toks = tokenize(checker)
    except ValueError as e:
        return Unsupported(f"cannot be split into words: {e}", REWRITE)
    if not toks:
        return Unsupported("is empty", "checker = fping -q -- %%(host)s")
    stages: list[list[_Tok]] = [[]]
    for t in toks:
        if t.op and t.text == "|":
            stages.append([])
        else:
            stages[-1].append(t)
    clean = [_drop_null_redirections(s) for s in stages]
    if any(c is None or not c for c in clean) or any(t.expands for t in toks):
        return Unsupported("needs a shell (operators, redirections or expansions), and "
                           "mandosd runs none", REWRITE)
    words = [[t.text for t in c] for c in clean if c is not None]
    if len(words) == 1:
        return Command(tuple(words[0]))
    if (len(words) == 2 and os.path.basename(words[0][0]) == "ssh-keyscan"
            and os.path.basename(words[1][0]) == "grep"):
        grep = _grep(words[1])
        if grep is not None:
            return KeyScan(tuple(words[0]), grep[0], grep[1])
        return Unsupported("pipes ssh-keyscan into a grep other than the fixed-string match "
                           "mandos-keygen writes", REWRITE)
    return Unsupported("is a pipeline, and mandosd runs no shell", REWRITE)


def matches(output: bytes, patterns: tuple[str, ...], whole_line: bool) -> bool:
    """``grep -F [-x] -q`` over *output*: does any line hold (or equal) a pattern?"""
    for raw in output.split(b"\n"):
        line = raw.decode("utf-8", errors="surrogateescape")
        for p in patterns:
            if (line == p) if whole_line else (p in line):
                return True
    return False


def describe(p: Plan) -> str:
    """One line for logs: the command a plan runs."""
    if isinstance(p, Command):
        return shlex.join(p.words)
    if isinstance(p, KeyScan):
        return f"{shlex.join(p.scan)} (output matched in mandosd)"
    return f"not run: {p.reason}"
