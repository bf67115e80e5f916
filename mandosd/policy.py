"""May this client have its secret now?  Pure functions of (config, state, time).

No sockets, no clocks, no database: the server and the tests pass everything in.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass

from .audit import Kind
from .config import Client
from .state import ClientState

#: Attributes that ``mandos-ctl`` may change on top of clients.conf.
OVERRIDABLE = {
    "checker", "timeout", "interval", "extended_timeout", "approval_delay",
    "approval_duration", "approved_by_default", "host", "secret",
}


class Verdict(enum.Enum):
    SEND = Kind.SECRET_SENT
    WAIT = Kind.APPROVAL_REQUESTED
    UNKNOWN = Kind.REFUSED_UNKNOWN
    DISABLED = Kind.REFUSED_DISABLED
    TIMED_OUT = Kind.REFUSED_TIMED_OUT
    DENIED = Kind.REFUSED_DENIED
    APPROVAL_EXPIRED = Kind.REFUSED_APPROVAL_EXPIRED

    @property
    def refused(self) -> bool:
        return self not in (Verdict.SEND, Verdict.WAIT)


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reason: str
    #: for WAIT: when the approval delay ends and approved_by_default decides
    wait_until: float | None = None


def effective(client: Client, state: ClientState | None) -> Client:
    """The client as configured, with ``mandos-ctl`` overrides from the state store."""
    if state is None or not state.overrides:
        return client
    changes = {k: v for k, v in state.overrides.items() if k in OVERRIDABLE}
    if "secret" in changes:
        import base64

        changes["secret"] = base64.b64decode(changes["secret"])
    return dataclasses.replace(client, **changes)


def decide(client: Client | None, state: ClientState | None, now: float) -> Decision:
    """The decision when a request arrives."""
    if client is None and state is not None:
        # a pool: the shared state knows it, this server's clients.conf does not
        return Decision(Verdict.UNKNOWN, "client is not in this server's clients.conf")
    if client is None or state is None:
        return Decision(Verdict.UNKNOWN, "no client has this key_id")
    if state.source == "removed":
        return Decision(Verdict.UNKNOWN, "client was removed with mandos-ctl --remove")
    if not state.enabled:
        return Decision(Verdict.DISABLED, "client is disabled")
    if state.deadline is not None and now > state.deadline:
        return Decision(Verdict.TIMED_OUT, "client's timeout has passed (checker not "
                        "successful in time)")
    if state.approved_until is not None and now < state.approved_until:
        return Decision(Verdict.SEND, "approved (approval still in effect)")
    if denial_in_effect(client, state, now):
        return Decision(Verdict.DENIED, "denied by an administrator (denial still in effect)")
    if client.approval_delay <= 0:
        if client.approved_by_default:
            return Decision(Verdict.SEND, "approved by default")
        return Decision(Verdict.DENIED, "not approved by default and no approval delay")
    return Decision(Verdict.WAIT, "waiting for approval", wait_until=now + client.approval_delay)


def denial_in_effect(client: Client, state: ClientState, now: float) -> bool:
    """A ``mandos-ctl --deny`` holds for approval_duration, like an approval (Mandos)."""
    return (state.approval_decision == "deny" and state.approval_decided_at is not None
            and now < state.approval_decided_at + client.approval_duration)


def approval_pending(state: ClientState, now: float) -> bool:
    """A request is waiting for approve/deny right now."""
    return state.approval_pending_until is not None and now < state.approval_pending_until


def decide_waiting(client: Client, state: ClientState | None, now: float,
                   requested_at: float, wait_until: float) -> Decision:
    """Re-decide a request that waits for approval (called as state changes or time passes)."""
    if state is None:
        return Decision(Verdict.UNKNOWN, "client was removed while waiting")
    if not state.enabled:
        return Decision(Verdict.DISABLED, "client was disabled while waiting")
    if (state.approval_decided_at is not None and state.approval_decided_at >= requested_at
            and state.approval_decision in ("approve", "deny")):
        if state.approval_decision == "approve":
            return Decision(Verdict.SEND, "approved by an administrator")
        return Decision(Verdict.DENIED, "denied by an administrator")
    if state.approved_until is not None and now < state.approved_until:
        return Decision(Verdict.SEND, "approved (approval still in effect)")
    if now >= wait_until:
        if client.approved_by_default:
            return Decision(Verdict.SEND, "approval delay passed; approved by default")
        return Decision(Verdict.APPROVAL_EXPIRED, "approval delay passed without approval")
    return Decision(Verdict.WAIT, "waiting for approval", wait_until=wait_until)


def deadline_after_secret(client: Client, now: float, current: float | None) -> float:
    """A secret handed out moves the deadline to now + extended_timeout (never earlier)."""
    new = now + client.extended_timeout
    return max(new, current) if current is not None else new


def deadline_after_checker_success(client: Client, now: float, current: float | None) -> float:
    new = now + client.timeout
    return max(new, current) if current is not None else new
