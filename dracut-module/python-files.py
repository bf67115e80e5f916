"""List the Python files the agent needs in the initrd, from a real import.

Run by module-setup.sh with the interpreter that goes into the initrd
(``/usr/bin/python3 -I python-files.py [--path DIR] MODULE...``).  It imports
MODULE... (and the codecs and modules that are only imported lazily, at run
time), then prints one ``SOURCE<TAB>DESTINATION`` line per file that was
loaded: the standard library and its ``lib-dynload`` extensions keep their
paths; everything else (our package, its third-party imports) goes under the
interpreter's ``dist-packages`` directory, wherever it was installed on the
build host.  With ``--shared-objects`` it prints the extension modules only,
for their library dependencies.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import os
import pkgutil
import sys
import sysconfig

#: Imported at run time only, so that an import trace of the agent's modules misses them.
LAZY = [
    "encodings.idna",      # socket.create_connection() encodes even numeric host names
    "encodings.ascii", "encodings.latin_1", "encodings.utf_8", "encodings.aliases",
    "runpy",               # python3 -m
    "ctypes.util",
]
#: Not wanted: this script, what site.py imports only through .pth files, and
#: sitecustomize (Debian's apport hook; site.py does without).
SKIP = {"__main__", "_distutils_hack", "sitecustomize"}

#: Imported by other paths at run time (str.encode("idna") needs these as well).
LAZY_CALLS = [
    lambda: "localhost".encode("idna"),
    lambda: "x".encode("latin-1").decode("ascii"),
]


def dist_packages() -> str:
    """Where the initrd's interpreter finds third-party modules (Debian: dist-packages)."""
    for p in sys.path:
        if p.endswith("/dist-packages") and p.startswith("/usr/lib/python3"):
            return "/usr/lib/python3/dist-packages"
    return sysconfig.get_paths()["purelib"]


def excluded(name: str, exclude: list[str]) -> bool:
    return any(name == x or name.startswith(x + ".") for x in exclude)


def lazy_imports(mod: object, exclude: list[str]) -> list[str]:
    """Every module that *mod*'s source imports anywhere (functions, try blocks)."""
    path = getattr(mod, "__file__", None)
    if not path or not path.endswith(".py"):
        return []
    with open(path, "rb") as f:
        tree = ast.parse(f.read(), path)
    pkg = getattr(mod, "__package__", "") or ""
    # "if TYPE_CHECKING:" blocks are for the type checker; they never run
    for node in ast.walk(tree):
        if (isinstance(node, ast.If) and isinstance(node.test, ast.Name)
                and node.test.id == "TYPE_CHECKING"):
            node.body = []
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            names.append(base)
            # "from . import log": the names may be modules of a package
            if base and not excluded(base, exclude) and _is_package(base):
                names += [f"{base}.{a.name}" for a in node.names
                          if not excluded(f"{base}.{a.name}", exclude)
                          and _exists(f"{base}.{a.name}")]
    return [n for n in names if n and n != "__future__" and not excluded(n, exclude)]


def _is_package(name: str) -> bool:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return False
    return spec is not None and spec.submodule_search_locations is not None


def _exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--path", action="append", default=[],
                    help="put DIR first on sys.path (where our package lives)")
    ap.add_argument("--optional", action="append", default=[],
                    help="import this module too when it is installed")
    ap.add_argument("--package", action="append", default=[],
                    help="import every module of this package (those that import)")
    ap.add_argument("--exclude", action="append", default=[],
                    help="with --package: leave this module out")
    ap.add_argument("--shared-objects", action="store_true")
    ap.add_argument("modules", nargs="*")
    args = ap.parse_args()
    extra = [os.path.abspath(p) for p in args.path]
    sys.path[:0] = extra
    for name in [*args.modules, *LAZY]:
        importlib.import_module(name)
    for pkg in args.package:
        mod = importlib.import_module(pkg)
        for info in pkgutil.walk_packages(mod.__path__, pkg + "."):
            if excluded(info.name, args.exclude):
                continue
            try:
                sub = importlib.import_module(info.name)
            except ImportError as e:  # an optional part (e.g. needs cryptography)
                print(f"python-files: leaving out {info.name}: {e}", file=sys.stderr)
                continue
            # Imports inside functions run only later, at boot: import them now.
            for name in lazy_imports(sub, args.exclude):
                if excluded(name, args.exclude):
                    continue
                try:
                    importlib.import_module(name)
                except ImportError as e:
                    print(f"python-files: {info.name} imports {name} lazily, not "
                          f"installed: {e}", file=sys.stderr)
    for name in args.optional:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    for call in LAZY_CALLS:
        call()

    stdlib = sysconfig.get_paths()["stdlib"]
    platstdlib = sysconfig.get_paths()["platstdlib"]
    target = dist_packages()
    roots = sorted({os.path.abspath(p) for p in sys.path if p and os.path.isdir(p)},
                   key=len, reverse=True)
    seen: set[str] = set()
    for name, mod in list(sys.modules.items()):
        src = getattr(mod, "__file__", None)
        if not src or name in SKIP or name.split(".")[0] in SKIP:
            continue  # built in, frozen, a namespace package, or ours to skip
        src = os.path.abspath(src)
        if src in seen:
            continue
        seen.add(src)
        is_so = src.endswith(".so")
        if args.shared_objects:
            if is_so:
                print(src)
            continue
        if src.startswith((stdlib + "/", platstdlib + "/")) and "-packages/" not in src:
            dest = src
        else:
            root = next((r for r in roots if src.startswith(r + "/")), None)
            # outside sys.path (Debian's /etc/python3.X/sitecustomize.py): keep the path
            dest = src if root is None else os.path.join(target, os.path.relpath(src, root))
        print(f"{src}\t{dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
