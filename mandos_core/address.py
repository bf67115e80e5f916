"""Key server addresses as users write them: ``HOST:PORT``, ``[V6ADDR]:PORT``, ``[fe80::1%eth0]:PORT``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Server:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_server(text: str) -> Server:
    """Parse ``HOST:PORT``, ``[V6ADDR]:PORT`` or ``[fe80::1%eth0]:PORT``."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"{text!r}: expected [ADDRESS]:PORT")
        port_s = rest[1:]
    else:
        host, sep, port_s = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{text!r}: expected HOST:PORT")
        if ":" in host:
            raise ValueError(f"{text!r}: write IPv6 addresses as [ADDRESS]:PORT")
    try:
        port = int(port_s)
    except ValueError:
        raise ValueError(f"{text!r}: port must be a number") from None
    if not 0 < port < 65536:
        raise ValueError(f"{text!r}: port out of range")
    return Server(host, port)
