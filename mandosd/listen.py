"""Listening sockets: from systemd (``LISTEN_FDS``) or made from ``--listen ADDR:PORT``."""

from __future__ import annotations

import os
import socket

from mandos_core.address import parse_server

SD_LISTEN_FDS_START = 3


class ListenError(Exception):
    pass


def systemd_sockets() -> list[socket.socket]:
    """Sockets passed by systemd socket activation, or ``[]``.  Unsets the variables."""
    pid = os.environ.get("LISTEN_PID")
    fds = os.environ.get("LISTEN_FDS")
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    if not fds or not pid:
        return []
    try:
        if int(pid) != os.getpid():
            return []
        count = int(fds)
    except ValueError:
        raise ListenError("LISTEN_PID/LISTEN_FDS are not numbers") from None
    socks = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)
        s = socket.socket(fileno=fd)
        if s.type != socket.SOCK_STREAM:
            raise ListenError(f"socket-activated fd {fd} is not a stream socket")
        socks.append(s)
    return socks


def bind(spec: str) -> socket.socket:
    """A listening socket for ``ADDR:PORT`` or ``[V6ADDR]:PORT`` (port 0: any free port)."""
    try:
        srv = parse_server(spec) if not spec.endswith(":0") else None
    except ValueError as e:
        raise ListenError(f"--listen {e}") from None
    host, _, port_s = spec.rpartition(":")
    host = host.strip("[]") if srv is None else srv.host
    port = int(port_s) if srv is None else srv.port
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ListenError(f"--listen {spec}: {e.strerror}") from None
    family, type_, proto, _, addr = infos[0]
    s = socket.socket(family, type_, proto)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if host else 0)
        s.bind(addr)
        s.listen(1024)
    except OSError as e:
        s.close()
        raise ListenError(f"--listen {spec}: {e.strerror}") from None
    return s


def describe(s: socket.socket) -> str:
    addr = s.getsockname()
    return f"[{addr[0]}]:{addr[1]}" if s.family == socket.AF_INET6 else f"{addr[0]}:{addr[1]}"
