#!/bin/bash
# dracut module "mandos-nbde": answer the LUKS passphrase question in the initrd
# with a secret from a Mandos key server (the password_agent package).
#
# Installed as /usr/lib/dracut/modules.d/90mandos-nbde/; sourced by dracut.
# Settings (dracut.conf.d, sourced shell; all optional):
#   mandos_keydir=DIR        the client's keys (default /etc/keys/mandos)
#   mandos_servers="H:P ..." the static server list (default: MANDOS_AGENT_CONNECT
#                            from /etc/mandos/password-agent.conf)
#   mandos_zeroconf=yes|no   also find servers with mDNS/DNS-SD (default: yes when
#                            python3-zeroconf is installed and no static server is set)
#   mandos_pythonpath=DIR    where the password_agent package is, when
#                            /usr/bin/python3 cannot import it by itself
#   mandos_python_sources=yes  keep the .py files next to the byte code (default: no,
#                            only byte code, ~0.6 MB smaller; tracebacks lack source lines)
# See docs/initrd.md.

# The distribution's interpreter, which the unit runs: never a venv or a pyenv shim.
mandos_python() {
    echo /usr/bin/python3
}

mandos_keydir() {
    echo "${mandos_keydir:-/etc/keys/mandos}"
}

# The Python files to install: "SOURCE<TAB>DEST" lines, from a real import.
mandos_python_files() {
    local -a args=(--package password_agent --package mandos_core --exclude mandos_core.escrow_packet --exclude mandos_core.escrow_wire)
    local p
    for p in ${mandos_pythonpath-}; do
        args+=(--path "$p")
    done
    if [[ $(mandos_zeroconf_wanted) == yes ]]; then
        args+=(--package zeroconf --optional ifaddr)
    else
        args+=(--exclude zeroconf)
    fi
    "$(mandos_python)" -I "$moddir/python-files.py" "${args[@]}" "$@"
}

mandos_static_servers() {
    if [[ ${mandos_servers+set} ]]; then
        echo "$mandos_servers"
    elif [[ -r /etc/mandos/password-agent.conf ]]; then
        # shellcheck disable=SC1091
        (. /etc/mandos/password-agent.conf 2>/dev/null && echo "${MANDOS_AGENT_CONNECT-}")
    fi
}

mandos_zeroconf_wanted() {
    case "${mandos_zeroconf:-auto}" in
        yes) echo yes ;;
        no) echo no ;;
        *)
            if [[ -z $(mandos_static_servers) ]] \
                && "$(mandos_python)" -I -c 'import zeroconf' 2> /dev/null; then
                echo yes
            else
                echo no
            fi
            ;;
    esac
}

# called by dracut
check() {
    local keydir
    keydir=$(mandos_keydir)
    require_binaries "$(mandos_python)" gpg gpg-agent gpgconf || return 1
    # Without this machine's keys the module has nothing to do.
    [[ -r $keydir/seckey.txt && -r $keydir/tls-privkey.pem && -r $keydir/tls-pubkey.pem ]] \
        || return 1
    if ! "$(mandos_python)" -I "$moddir/python-files.py" ${mandos_pythonpath:+--path "$mandos_pythonpath"} \
        password_agent.agent > /dev/null; then
        dwarning "mandos-nbde: $(mandos_python) cannot import password_agent.agent"
        return 1
    fi
    if [[ $hostonly ]]; then
        local fs
        for fs in "${host_fs_types[@]}"; do
            [[ $fs == crypto_LUKS ]] && return 0
        done
    fi
    # Not host-only, or no LUKS volume: only when asked for (-a mandos-nbde).
    return 255
}

# called by dracut
depends() {
    echo crypt systemd systemd-ask-password network
    return 0
}

# called by dracut
cmdline() {
    echo " rd.neednet=1"
}

mandos_install_python() {
    local py src dest so lib
    local -a pyfiles=()
    py=$(mandos_python)
    inst_binary "$py" || return 1 # a symlink (python3 -> python3.11) comes with its target
    while IFS=$'\t' read -r src dest; do
        inst_simple "$src" "$dest" || return 1
        [[ $dest == *.py ]] && pyfiles+=("$initdir$dest")
    done < <(mandos_python_files)
    # dracut resolves library dependencies of executables only: the extension
    # modules (0644) would lose theirs (libssl, libffi...).
    while read -r so; do
        while read -r lib; do
            inst_library "$lib"
        done < <(ldd "$so" 2> /dev/null | awk '$2 == "=>" && $3 ~ /^\// { print $3 }')
    done < <(mandos_python_files --shared-objects)
    # libgnutls is loaded through ctypes (raw public keys, as Mandos 1.8): no
    # executable links it, so name it, and dracut brings its libraries along.
    inst_libdir_file "libgnutls.so.30*" || return 1
    for so in "$initdir"/usr/lib/*/libgnutls.so.30 "$initdir"/lib/*/libgnutls.so.30; do
        [[ -e $so ]] || continue
        while read -r lib; do
            inst_library "$lib"
        done < <(ldd "$so" 2> /dev/null | awk '$2 == "=>" && $3 ~ /^\// { print $3 }')
    done
    # Byte-compile what we installed, so that nothing is compiled at boot.
    if [[ ${mandos_python_sources:-no} == yes ]]; then
        "$py" -I -m compileall -q --invalidation-mode unchecked-hash \
            -s "$initdir" -p / "${pyfiles[@]}" > /dev/null || return 1
    else
        # Byte code in place of the sources (X.pyc beside, no X.py): Python
        # imports it as is.
        "$py" -I -m compileall -q -b -s "$initdir" -p / "${pyfiles[@]}" > /dev/null || return 1
        rm -f -- "${pyfiles[@]}"
    fi
}

mandos_install_keys() {
    local keydir f
    keydir=$(mandos_keydir)
    inst_dir /etc/keys/mandos
    chmod 0700 "$initdir/etc/keys/mandos"
    # The TLS key is presented as a raw public key (GnuTLS): no certificate needed.
    for f in tls-privkey.pem tls-pubkey.pem seckey.txt pubkey.txt server-pins; do
        [[ -e $keydir/$f ]] || continue
        inst_simple "$keydir/$f" "/etc/keys/mandos/$f"
        chmod 0600 "$initdir/etc/keys/mandos/$f"
    done
}

# The agent's settings in the initrd: the host's options file, then what
# dracut's configuration says (later lines win).
mandos_install_settings() {
    local conf=/etc/mandos/password-agent.conf servers
    servers=$(mandos_static_servers)
    inst_dir /etc/mandos
    {
        echo "# Generated by dracut (module mandos-nbde) on $(date -u +%Y-%m-%dT%H:%M:%SZ)."
        [[ -r $conf ]] && cat "$conf"
        echo "MANDOS_AGENT_KEYDIR=/etc/keys/mandos"
        [[ -n $servers ]] && echo "MANDOS_AGENT_CONNECT=\"$servers\""
        echo "MANDOS_AGENT_ZEROCONF=$(mandos_zeroconf_wanted)"
    } > "$initdir$conf"
    chmod 0600 "$initdir$conf"
    [[ -n $servers ]] || [[ $(mandos_zeroconf_wanted) == yes ]] \
        || dwarning "mandos-nbde: no key server configured (mandos_servers=) and no zeroconf"
}

# called by dracut
install() {
    mandos_install_python || {
        derror "mandos-nbde: cannot install $(mandos_python) and the agent"
        return 1
    }
    inst_multiple gpg gpg-agent gpgconf
    mandos_install_keys
    mandos_install_settings

    inst_simple "$moddir/mandos-nbde-agent.path" "$systemdsystemunitdir/mandos-nbde-agent.path"
    inst_simple "$moddir/mandos-nbde-agent.service" "$systemdsystemunitdir/mandos-nbde-agent.service"
    $SYSTEMCTL -q --root "$initdir" add-wants sysinit.target mandos-nbde-agent.path
    if [[ ${mandos_agent_early:-yes} == yes ]]; then
        # Also start the agent at once, so that Python and the keys are loaded
        # while udev finds the disk: the question is then answered within the
        # fetch time.  It waits (inotify) and stops at the switch to the root.
        $SYSTEMCTL -q --root "$initdir" add-wants sysinit.target mandos-nbde-agent.service
    fi
    # Local additions (drop-ins) for the initrd agent.
    inst_multiple -H -o "$systemdsystemconfdir/mandos-nbde-agent.service.d/*.conf"

    # Networking only because this module is in: the network stack reads
    # rd.neednet; an ip= from the user's kernel command line still wins.
    mkdir -p "$initdir/etc/cmdline.d"
    echo "rd.neednet=1" > "$initdir/etc/cmdline.d/90mandos-nbde.conf"
    if dracut_module_included systemd-networkd; then
        inst_simple "$moddir/90-mandos-nbde-dhcp.network" \
            "$systemdnetworkconfdir/90-mandos-nbde-dhcp.network"
    fi
}
