#!/bin/sh
# Set up a development machine and run the demo or the test suite.
#
#   sudo ./dev.sh demo    install everything, then run the end-to-end demo
#   sudo ./dev.sh test    install everything, then run the whole test suite
#   ./dev.sh install      only install (Debian packages need root; the venv does not)
#
# Installs the Debian packages listed in .ci/apt-packages and a virtualenv in
# .venv built on Debian's /usr/bin/python3 (the interpreter the initrd uses).
set -eu
cd "$(dirname "$0")"
VENV=.venv
PY=/usr/bin/python3

install_apt() {
    pkgs=$(grep -v '^[[:space:]]*#' .ci/apt-packages | tr '\n' ' ')
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
    # The kernel and dracut first: mandos-client's postinst edits the initrd.
    apt-get install -y -q --no-install-recommends linux-image-amd64 dracut
    apt-get install -y -q --no-install-recommends $missing || dpkg --configure -a
}

install_venv() {
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e '.[test]'
}

case "${1:-}" in
    install) install_apt; install_venv ;;
    demo) install_apt; install_venv; exec "$VENV/bin/python" scripts/demo.py ;;
    test) install_apt; install_venv; shift; exec "$VENV/bin/python" -m pytest -ra "$@" ;;
    *) sed -n '2,12p' "$0"; exit 2 ;;
esac
