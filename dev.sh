#!/bin/sh
# Set up a development machine and run the demo or the test suite.
#
#   sudo ./dev.sh demo    install what the demo needs, then run the end-to-end demo
#   sudo ./dev.sh test    install everything, then run the whole test suite
#   ./dev.sh install      only install everything (Debian packages need root; the venv does not)
#
# The demo's Debian packages are listed in .ci/apt-packages-demo; the tests need
# those and .ci/apt-packages (QEMU, a kernel, Mandos, tang, Xvfb...).  The
# virtualenv in .venv is built on Debian's /usr/bin/python3 (the interpreter the
# initrd uses); the demo installs the project alone, the tests add '.[test]'.
set -eu
cd "$(dirname "$0")"
VENV=.venv
PY=/usr/bin/python3
DEMO_PACKAGES=.ci/apt-packages-demo
TEST_PACKAGES=.ci/apt-packages

install_apt() {  # the package list files to install
    pkgs=$(cat "$@" | grep -v '^[[:space:]]*#' | tr '\n' ' ')
    missing=""
    for p in $pkgs; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
    done
    [ -z "$missing" ] && return 0
    if [ "$(id -u)" != 0 ]; then
        echo "dev.sh: need root to install Debian packages:$missing" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    case " $missing " in
        *" mandos-client "*)
            # The kernel and dracut first: mandos-client's postinst edits the initrd.
            apt-get install -y -q --no-install-recommends linux-image-amd64 dracut ;;
    esac
    apt-get install -y -q --no-install-recommends $missing || dpkg --configure -a
}

install_venv() {  # the pip requirement: '.' or '.[test]'
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e "$1"
}

case "${1:-}" in
    install) install_apt "$DEMO_PACKAGES" "$TEST_PACKAGES"; install_venv '.[test]' ;;
    demo) install_apt "$DEMO_PACKAGES"; install_venv .
          exec "$VENV/bin/python" scripts/demo.py ;;
    test) install_apt "$DEMO_PACKAGES" "$TEST_PACKAGES"; install_venv '.[test]'; shift
          exec "$VENV/bin/python" -m pytest -ra "$@" ;;
    *) sed -n '2,11p' "$0"; exit 2 ;;
esac
