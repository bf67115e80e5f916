"""Key servers announced with mDNS/DNS-SD as ``_mandos._tcp`` (python-zeroconf, optional).

Mandos servers announce themselves through Avahi; python-zeroconf speaks the
same protocol in pure Python.  It is imported only when discovery is used, and
when it is not installed the agent works with its static ``--connect`` list
alone.  IPv6 link-local addresses keep their interface (``fe80::1%2``), so the
connection goes out of the interface the announcement came in on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from .client import Server

log = logging.getLogger("mandos-password-agent.discovery")

SERVICE_TYPE = "_mandos._tcp.local."
#: Anyone on the link can announce: keep at most this many announced services (and
#: their first MAX_ADDRESSES addresses each); later ones are ignored until some go away.
MAX_SERVICES = 64
MAX_ADDRESSES = 4


def servers_from_addresses(addresses: Iterable[str], port: int | None) -> list[Server]:
    """Servers for the (scoped) address strings of one announcement; IPv4 first."""
    if not port:
        return []
    addrs = sorted(set(addresses), key=lambda a: (":" in a, a))
    return [Server(a, port) for a in addrs[:MAX_ADDRESSES]]


class Discovery:
    """Browse for ``_mandos._tcp`` services; call *on_change* when the set changes."""

    def __init__(self, on_change: Callable[[], None], service_type: str = SERVICE_TYPE,
                 interfaces: list[str] | None = None) -> None:
        self.on_change = on_change
        self.service_type = service_type
        self.interfaces = interfaces
        self._lock = threading.Lock()
        self._found: dict[str, list[Server]] = {}
        self._zc: Any = None
        self._browser: Any = None
        self._full_warned = False

    def start(self) -> bool:
        """Start browsing; False (with one debug line) when python-zeroconf is missing."""
        try:
            import zeroconf
        except ImportError:
            log.debug("python-zeroconf is not installed: no server discovery, "
                      "only --connect servers are used")
            return False
        kwargs: dict[str, Any] = {"ip_version": zeroconf.IPVersion.All}
        if self.interfaces:
            kwargs["interfaces"] = self.interfaces
        try:
            self._zc = zeroconf.Zeroconf(**kwargs)
            self._browser = zeroconf.ServiceBrowser(self._zc, self.service_type,
                                                    handlers=[self._on_service])
        except Exception as e:  # no multicast-capable interface, no IPv6, ...
            log.warning("zeroconf discovery unavailable: %s", e)
            self.close()
            return False
        log.debug("browsing for %s", self.service_type)
        return True

    def _on_service(self, zeroconf: Any, service_type: str, name: str,
                    state_change: Any) -> None:
        try:
            if state_change.name == "Removed":
                with self._lock:
                    gone = self._found.pop(name, None)
                if gone:
                    log.info("key server %s withdrawn (%s)", name,
                             ", ".join(map(str, gone)))
                    self.on_change()
                return
            info = zeroconf.get_service_info(service_type, name, timeout=3000)
            if info is None:
                log.debug("no address for %s yet", name)
                return
            found = servers_from_addresses(info.parsed_scoped_addresses(), info.port)
            with self._lock:
                if name not in self._found and len(self._found) >= MAX_SERVICES:
                    if not self._full_warned:
                        log.warning("more than %d key servers announced: ignoring %s and "
                                    "further ones", MAX_SERVICES, name)
                        self._full_warned = True
                    return
                changed = self._found.get(name) != found
                self._found[name] = found
            if changed and found:
                log.info("key server %s announced at %s", name, ", ".join(map(str, found)))
                self.on_change()
        except Exception as e:  # a bad announcement must not stop the browser
            log.warning("ignoring the announcement of %s: %s", name, e)

    def servers(self) -> list[Server]:
        with self._lock:
            out: list[Server] = []
            for servers in self._found.values():
                out.extend(s for s in servers if s not in out)
            return out

    def close(self) -> None:
        browser, zc = self._browser, self._zc
        self._browser = self._zc = None
        try:
            if browser is not None:
                browser.cancel()
            if zc is not None:
                zc.close()
        except Exception as e:
            log.debug("closing zeroconf: %s", e)
