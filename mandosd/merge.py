"""Config and state merge, as Mandos does it: a pure function of (config, state, time).

On every load of clients.conf (start, reload, ``mandos-ctl``, the checker pass) each
configured client is compared with the values stored at the previous load:

- a value that changed in clients.conf wins over the stored state (``enabled = False``
  written by the admin disables the client; a new ``timeout`` replaces one set with
  ``mandos-ctl``);
- a value that did not change leaves the stored state alone (a client disabled with
  ``mandos-ctl`` stays disabled while the admin edits something else);
- a client that disappears from a (readable) clients.conf is kept as a *tombstone*,
  refused as unknown; when its section (or its key, under another name) comes back, its
  state comes back with it: a disabled machine never returns enabled.

Every change applied is one audit event.  Nothing here reads files, clocks or the
database: :meth:`mandosd.state.SQLiteStore.sync_clients` applies the :class:`Plan`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .audit import Kind
from .config import CLIENT_SETTINGS, Client
from .state import ClientState

#: settings ``mandos-ctl`` may override (policy.OVERRIDABLE; repeated to stay import-free)
OVERRIDABLE = {
    "checker", "timeout", "interval", "extended_timeout", "approval_delay",
    "approval_duration", "approved_by_default", "host", "secret",
}
#: a client no longer in clients.conf, kept so that it cannot come back as new
GONE = "gone"


def config_values(c: Client) -> dict[str, Any]:
    """What is compared between loads: every setting, the key, and the secret's hash."""
    values: dict[str, Any] = {s.key: getattr(c, s.key) for s in CLIENT_SETTINGS}
    values["key_id"] = c.key_id
    values["fingerprint"] = c.fingerprint
    values["secret"] = hashlib.sha256(c.secret).hexdigest()
    return values


@dataclass(frozen=True)
class Event:
    kind: Kind
    message: str
    client: str
    key_id: str | None
    fields: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Plan:
    #: new rows, as column values
    inserts: list[dict[str, Any]] = field(default_factory=list)
    #: (stored name, column changes); a change of "name" renames the row
    updates: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    def apply(self, states: Iterable[ClientState]) -> list[ClientState]:
        """The states as they are once this plan is applied (for a read-only view)."""
        by_name = {s.name: s for s in states}
        for name, changes in self.updates:
            st = dataclasses.replace(by_name.pop(name), **changes)
            by_name[st.name] = st
        for row in self.inserts:
            fields = {k: v for k, v in row.items() if k in ClientState.__dataclass_fields__}
            by_name[row["name"]] = ClientState(**fields)
        return sorted(by_name.values(), key=lambda s: s.name)


def _show(key: str, value: Any) -> str:
    if isinstance(value, float) and key in {s.key for s in CLIENT_SETTINGS}:
        return f"{value:g} s"
    return str(value)


def _new_row(c: Client, now: float) -> dict[str, Any]:
    return {"name": c.name, "key_id": c.key_id, "enabled": c.enabled,
            "deadline": now + c.timeout, "last_enabled": now, "next_check": now,
            "created": now, "source": "config", "config": config_values(c)}


def _changes(c: Client, st: ClientState, now: float) -> tuple[dict[str, Any], list[Event]]:
    """Column changes and events for a stored client whose config is *c* now."""
    old, new = st.config, config_values(c)
    changes: dict[str, Any] = {} if old == new else {"config": new}
    events: list[Event] = []

    def event(kind: Kind, message: str, **fields: Any) -> None:
        events.append(Event(kind, message, c.name, c.key_id, fields))

    if old is None:  # stored before values were recorded: only a disable is applied
        if not c.enabled and st.enabled:
            changes["enabled"] = False
            event(Kind.CONFIG_CHANGED, f"{c.name} disabled: enabled = False in clients.conf",
                  change="enabled", value=False)
        return changes, events
    overrides = dict(st.overrides)
    enabled, deadline, next_check = st.enabled, st.deadline, st.next_check
    shifted = False
    for key, value in new.items():
        if old.get(key) == value:
            continue
        if key == "enabled":
            if value and not enabled:
                enabled, deadline, next_check = True, now + c.timeout, now
                changes.update(last_enabled=now)
                event(Kind.CONFIG_CHANGED, f"{c.name} enabled: enabled = True in "
                      "clients.conf", change="enabled", value=True)
            elif not value and enabled:
                enabled = False
                event(Kind.CONFIG_CHANGED, f"{c.name} disabled: enabled = False in "
                      "clients.conf", change="enabled", value=False)
            continue
        replaced = key in OVERRIDABLE and key in overrides
        if key == "timeout" and enabled and deadline is not None:
            before = float(overrides.get("timeout", old.get("timeout", value)))
            deadline += value - before  # as mandos-ctl --timeout: the deadline moves
            shifted = True
        if key == "interval" and next_check is not None:
            next_check = min(next_check, now + value)
        overrides.pop(key, None)
        if key == "secret":
            event(Kind.CONFIG_CHANGED, f"{c.name}: secret changed in clients.conf"
                  + ("; replaces the one set with mandos-ctl" if replaced else ""),
                  change=key)
            continue
        shown = f"{_show(key, old.get(key))} -> {_show(key, value)}"
        event(Kind.CONFIG_CHANGED, f"{c.name}: {key} changed in clients.conf ({shown})"
              + ("; replaces the value set with mandos-ctl" if replaced else ""),
              change=key, value=value)
    if shifted and enabled and deadline is not None and deadline <= now:
        enabled = False
        event(Kind.CLIENT_TIMED_OUT, f"{c.name}: new timeout from clients.conf has passed; "
              "client disabled", reason="timeout shortened")
    if overrides != dict(st.overrides):
        changes["overrides"] = overrides
    if c.key_id != st.key_id:
        changes["key_id"] = c.key_id
    for col, value, was in (("enabled", enabled, st.enabled), ("deadline", deadline,
                            st.deadline), ("next_check", next_check, st.next_check)):
        if value != was:
            changes[col] = value
    return changes, events


def plan(clients: Iterable[Client], stored: Iterable[ClientState], now: float) -> Plan:
    """What loading *clients* does to the *stored* states (with their last-loaded values)."""
    clients = list(clients)
    out = Plan()
    rows = {s.name: s for s in stored}
    configured = {c.name for c in clients}
    # rows whose section is gone (now or before): their key may return under a new name
    leaving = {s.key_id: s for s in rows.values() if s.name not in configured
               and s.source in (GONE, "config", "removed") and s.key_id}
    adopted: set[str] = set()
    for c in clients:
        st = rows.get(c.name)
        rename: dict[str, Any] = {}
        if st is None and c.key_id in leaving:
            st = leaving.pop(c.key_id)  # the same machine under a new name
            rename = {"name": c.name}
            adopted.add(st.name)
        if st is None:
            out.inserts.append(_new_row(c, now))
            continue
        changes, events = _changes(c, st, now)
        changes.update(rename)
        if st.source in (GONE, "ctl") or rename:
            changes.update(source="config", section=None)
            was = " (it was added with mandos-ctl)" if st.source == "ctl" else ""
            state = "enabled" if changes.get("enabled", st.enabled) else "disabled"
            named = f" (was {st.name})" if rename else ""
            events.insert(0, Event(Kind.CLIENT_RETURNED, f"{c.name}{named} is in clients.conf "
                                   f"again{was}; its stored state is kept: {state}",
                                   c.name, c.key_id, {"enabled": state == "enabled"}))
        if changes:
            out.updates.append((st.name, changes))
        out.events += events
    for st in rows.values():
        if (st.name in configured or st.name in adopted
                or st.source not in ("config", "removed")):
            continue
        out.updates.append((st.name, {"source": GONE}))
        state = "enabled" if st.enabled else "disabled"
        out.events.append(Event(Kind.CLIENT_GONE, f"{st.name} is no longer in clients.conf; "
                                f"refused as unknown, its state kept ({state}) in case it "
                                "returns", st.name, st.key_id, {"enabled": st.enabled}))
    return out
