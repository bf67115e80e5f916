"""The man pages: each renders without a warning, and each documents every option.

The pages' sources are man/*.md, turned into roff by man/md2man.py (as the
package build does).  For each command, this runs its real ``--help`` (and
``SUB --help`` for each subcommand it lists), takes every option string out
of it, and checks that the page names it.  A failure names the command, the
page and the missing options, so that keeping a page in step with a new
option is one edit.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAN = ROOT / "man"

#: page -> (the module that runs the command, the command's name, subcommands
#: that its --help does not list as choices, e.g. mandos-ctl's escrow)
COMMANDS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "mandosd.8": ("mandosd", "mandosd", ()),
    "mandos-ctl.8": ("mandosd.ctl", "mandos-ctl", ("escrow",)),
    "mandos-client.8": ("password_agent.mandos_client", "mandos-client", ()),
    "mandos-keygen.8": ("mandos_keygen", "mandos-keygen", ()),
    "mandos-password-agent.8": ("password_agent.agent", "mandos-password-agent", ()),
    "luks-passphrase.8": ("luks_passphrase", "luks-passphrase", ()),
}
FILE_FORMATS = ["mandos.conf.5", "clients.conf.5"]
ALL_PAGES = [*COMMANDS, *FILE_FORMATS]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("man")
    sources = sorted(MAN.glob("*.md"))
    subprocess.run([sys.executable, str(MAN / "md2man.py"), "--outdir", str(out),
                    *map(str, sources)], check=True)
    return out


def test_every_page_has_a_source() -> None:
    have = {p.name.removesuffix(".md") for p in MAN.glob("*.md")}
    assert set(ALL_PAGES) <= have, f"no source for {sorted(set(ALL_PAGES) - have)}"


def test_debian_installs_every_page() -> None:
    listed = set()
    for f in (ROOT / "debian").glob("*.manpages"):
        listed |= {Path(line.strip()).name for line in f.read_text().splitlines() if line.strip()}
    assert set(ALL_PAGES) <= listed, f"not in debian/*.manpages: {sorted(set(ALL_PAGES) - listed)}"


@pytest.mark.parametrize("page", ALL_PAGES)
def test_page_renders_without_warnings(built: Path, page: str) -> None:
    groff = shutil.which("groff")
    if groff is None:
        pytest.skip("groff missing (apt-get install groff-base)")
    path = built / page
    proc = subprocess.run([groff, "-ww", "-z", "-man", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0 and not proc.stderr, f"groff on {page}:\n{proc.stderr}"
    # What lintian runs: man's own checks (line lengths, unknown macros...).
    if shutil.which("man"):
        env = {**os.environ, "LC_ALL": "C.UTF-8", "MANWIDTH": "80"}
        proc = subprocess.run(["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", str(path)],
                              capture_output=True, text=True, env=env)
        assert proc.returncode == 0 and not proc.stderr, f"man --warnings on {page}:\n{proc.stderr}"


# ------------------------------------------------------------ --help vs the page

_OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z0-9][\w-]*)")


def run_help(module: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", module, *args, "--help"], capture_output=True,
                          text=True, env=env, timeout=60)
    assert proc.returncode == 0, f"{module} {' '.join(args)} --help: {proc.stderr}"
    return proc.stdout


def help_options(text: str) -> set[str]:
    """Every option that argparse's help lists: the lines of its option tables."""
    opts = set()
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped.startswith("-"):
            continue
        # "-c COMMAND, --checker COMMAND   text": the flags end at the double space
        flags = re.split(r"\s{2,}", stripped, maxsplit=1)[0]
        for part in flags.split(", "):
            m = _OPTION.match(part.strip())
            if m:
                opts.add(m.group(1))
    return opts


def help_subcommands(text: str) -> list[str]:
    """Subcommands that a help text offers: ``{a,b}`` in the usage, or the indented
    list under "positional arguments" (argparse's layout with a metavar)."""
    subs: list[str] = []
    usage = text.split("\n\n", 1)[0]
    for group in re.findall(r"\{([\w,-]+)\}", usage):
        subs += group.split(",")
    section = re.search(r"^positional arguments:\n((?:[ \t].*\n?)*)", text, re.M)
    if section:
        for line in section.group(1).splitlines():
            m = re.match(r"^    (\w[\w-]*)(\s{2,}|$)", line)
            if m:
                subs.append(m.group(1))
    return list(dict.fromkeys(subs))


def command_options(module: str, extra_subs: tuple[str, ...]) -> dict[str, set[str]]:
    """'' -> the top-level options, 'SUB' / 'SUB SUB2' -> those of the subcommands."""
    found: dict[str, set[str]] = {}
    todo: list[tuple[str, ...]] = [()] + [(s,) for s in extra_subs]
    while todo:
        path = todo.pop(0)
        text = run_help(module, *path)
        found[" ".join(path)] = help_options(text)
        if len(path) < 2:
            for sub in help_subcommands(text):
                if (*path, sub) not in todo and " ".join((*path, sub)) not in found:
                    todo.append((*path, sub))
    return found


def page_text(built: Path, page: str) -> str:
    """The page as words: roff's \\- and font changes removed."""
    raw = (built / page).read_text()
    return re.sub(r"\\f[BIRP]", "", raw).replace("\\-", "-").replace("\\&", "")


def test_help_parser_finds_options_and_subcommands() -> None:
    sample = """usage: x [-h] {a,b} ...

positional arguments:
  {a,b}
    a           first
    b           second

options:
  -h, --help            show this help message and exit
  -c COMMAND, --checker COMMAND
                        set checker --not-an-option here
  --approve-by-default  set client
"""
    assert help_options(sample) == {"-h", "--help", "-c", "--checker", "--approve-by-default"}
    assert help_subcommands(sample) == ["a", "b"]


@pytest.mark.parametrize("page", list(COMMANDS))
def test_every_help_option_is_in_the_page(built: Path, page: str) -> None:
    module, command, extra = COMMANDS[page]
    text = page_text(built, page)
    missing = []
    for sub, opts in command_options(module, extra).items():
        for opt in sorted(opts):
            if not re.search(r"(?<![\w-])" + re.escape(opt) + r"(?![\w-])", text):
                missing.append(f"{command} {sub} {opt}".replace("  ", " "))
    assert not missing, (f"man/{page}.md does not mention these options of --help "
                         f"(add each under OPTIONS):\n  " + "\n  ".join(missing))
