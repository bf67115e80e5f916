"""Time-driven behaviour with an injected clock: no sleeping, no sockets.

Deadlines, extended timeout, disable on expiry (through the real SQLite
store), approval delay, duration and default.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from mandosd import policy
from mandosd.config import Client
from mandosd.policy import Verdict, decide, decide_waiting
from mandosd.state import CheckRecord, ClientState, SQLiteStore

T0 = 1_700_000_000.0


def client(**kw: object) -> Client:
    base = dict(name="web1", key_id="A" * 64, fingerprint="", secret=b"pgp", host="web1",
                checker="fping -q -- %(host)s", timeout=300.0, interval=120.0,
                extended_timeout=900.0, approval_delay=0.0, approval_duration=1.0,
                approved_by_default=True, enabled=True)
    base.update(kw)
    return Client(**base)  # type: ignore[arg-type]


def state(**kw: object) -> ClientState:
    base: dict[str, object] = dict(name="web1", key_id="A" * 64, enabled=True,
                                   deadline=T0 + 300)
    base.update(kw)
    return ClientState(**base)  # type: ignore[arg-type]


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_unknown_disabled_and_removed() -> None:
    assert decide(None, None, T0).verdict is Verdict.UNKNOWN
    assert decide(client(), None, T0).verdict is Verdict.UNKNOWN
    assert decide(client(), state(enabled=False), T0).verdict is Verdict.DISABLED
    assert decide(client(), state(source="removed"), T0).verdict is Verdict.UNKNOWN


def test_deadline() -> None:
    c, s = client(), state()
    assert decide(c, s, T0 + 299).verdict is Verdict.SEND
    assert decide(c, s, T0 + 300).verdict is Verdict.SEND  # the deadline itself still counts
    assert decide(c, s, T0 + 300.001).verdict is Verdict.TIMED_OUT


def test_checker_success_and_extended_timeout_move_the_deadline() -> None:
    c = client()
    # checker success: now + timeout
    assert policy.deadline_after_checker_success(c, T0 + 100, T0 + 300) == T0 + 400
    # a secret sent: now + extended_timeout, which a later checker never shortens
    ext = policy.deadline_after_secret(c, T0 + 100, T0 + 300)
    assert ext == T0 + 1000
    assert policy.deadline_after_checker_success(c, T0 + 200, ext) == ext
    assert decide(c, state(deadline=ext), T0 + 999).verdict is Verdict.SEND
    assert decide(c, state(deadline=ext), T0 + 1001).verdict is Verdict.TIMED_OUT


def test_expiry_disables_through_the_store(tmp_path: Path) -> None:
    """Store + clock: success moves the deadline, passing it disables the client."""
    clock = Clock()
    store = SQLiteStore(tmp_path, durable=False)
    c = client()
    store.sync_clients([c], clock())
    assert store.get("web1").deadline == T0 + 300  # type: ignore[union-attr]
    clock.t = T0 + 200
    store.record_checks([CheckRecord("web1", T0 + 199, clock(), 0, T0 + 319,
                                     deadline=clock() + c.timeout)])
    st = store.get("web1")
    assert st is not None and st.deadline == T0 + 500 and st.last_checked_ok == T0 + 200
    clock.t = T0 + 499
    assert store.disable_expired(clock()) == []
    # a failed check does not move the deadline
    store.record_checks([CheckRecord("web1", T0 + 480, clock(), 1, T0 + 600)])
    clock.t = T0 + 501
    gone = store.disable_expired(clock())
    assert [s.name for s in gone] == ["web1"]
    st = store.get("web1")
    assert st is not None and not st.enabled
    assert decide(c, st, clock()).verdict is Verdict.DISABLED
    # a checker success after that does not re-enable it (only an admin does)
    store.record_checks([CheckRecord("web1", T0 + 501, T0 + 502, 0, T0 + 621,
                                     deadline=T0 + 802)])
    st = store.get("web1")
    assert st is not None and not st.enabled and st.deadline == T0 + 500
    store.close()


def test_late_checker_success_does_not_revive_a_passed_deadline(tmp_path: Path) -> None:
    """A checker that started in time but reports after the deadline passed (before any
    pass or request disabled the client) must not extend it: timed out stays timed out."""
    store = SQLiteStore(tmp_path, durable=False)
    c = client()
    store.sync_clients([c], T0)  # deadline T0 + 300
    store.record_checks([CheckRecord("web1", T0 + 250, T0 + 301, 0, T0 + 421,
                                     deadline=T0 + 301 + c.timeout)])
    st = store.get("web1")
    assert st is not None and st.deadline == T0 + 300
    assert decide(c, st, T0 + 302).verdict is Verdict.TIMED_OUT
    store.close()


def test_claim_checks_due_once(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path, durable=False)
    store.sync_clients([client()], T0)
    assert store.claim_checks({"web1": 120}, T0) == ["web1"]
    # already running: a second pass does not claim it
    assert store.claim_checks({"web1": 120}, T0 + 1) == []
    # lost (older than twice the interval): claimable again
    assert store.claim_checks({"web1": 120}, T0 + 241) == ["web1"]
    store.record_checks([CheckRecord("web1", T0 + 241, T0 + 242, 0, T0 + 361, T0 + 542)])
    assert store.claim_checks({"web1": 120}, T0 + 300) == []  # not due before next_check
    assert store.claim_checks({"web1": 120}, T0 + 300, force=True) == ["web1"]
    store.close()


def test_no_delay_approved_or_denied_by_default() -> None:
    assert decide(client(), state(), T0).verdict is Verdict.SEND
    d = decide(client(approved_by_default=False), state(), T0)
    assert d.verdict is Verdict.DENIED


def test_approval_delay_then_default() -> None:
    c = client(approval_delay=30.0)
    d = decide(c, state(), T0)
    assert d.verdict is Verdict.WAIT and d.wait_until == T0 + 30
    w = decide_waiting(c, state(), T0 + 29.9, T0, T0 + 30)
    assert w.verdict is Verdict.WAIT
    assert decide_waiting(c, state(), T0 + 30, T0, T0 + 30).verdict is Verdict.SEND
    deny_default = dataclasses.replace(c, approved_by_default=False)
    assert (decide_waiting(deny_default, state(), T0 + 30, T0, T0 + 30).verdict
            is Verdict.APPROVAL_EXPIRED)


def test_approve_or_deny_while_waiting() -> None:
    c = client(approval_delay=30.0, approved_by_default=False)
    approved = state(approval_decision="approve", approval_decided_at=T0 + 5)
    assert decide_waiting(c, approved, T0 + 6, T0, T0 + 30).verdict is Verdict.SEND
    denied = state(approval_decision="deny", approval_decided_at=T0 + 5)
    assert decide_waiting(c, denied, T0 + 6, T0, T0 + 30).verdict is Verdict.DENIED
    # a decision older than the request does not answer it
    old = state(approval_decision="approve", approval_decided_at=T0 - 5)
    assert decide_waiting(c, old, T0 + 6, T0, T0 + 30).verdict is Verdict.WAIT
    # disabled while waiting ends the wait
    assert (decide_waiting(c, state(enabled=False), T0 + 6, T0, T0 + 30).verdict
            is Verdict.DISABLED)


@pytest.mark.parametrize("duration", [1.0, 60.0])
def test_approval_and_denial_hold_for_their_duration(duration: float) -> None:
    c = client(approval_delay=30.0, approval_duration=duration, approved_by_default=False)
    ok = state(approval_decision="approve", approval_decided_at=T0,
               approved_until=T0 + duration)
    assert decide(c, ok, T0 + duration - 0.01).verdict is Verdict.SEND
    assert decide(c, ok, T0 + duration).verdict is Verdict.WAIT
    no = state(approval_decision="deny", approval_decided_at=T0)
    assert decide(c, no, T0 + duration - 0.01).verdict is Verdict.DENIED
    assert decide(c, no, T0 + duration).verdict is Verdict.WAIT


def test_pending_approval_window() -> None:
    assert policy.approval_pending(state(approval_pending_until=T0 + 10), T0)
    assert not policy.approval_pending(state(approval_pending_until=T0 + 10), T0 + 10)
    assert not policy.approval_pending(state(), T0)


def test_overrides_apply() -> None:
    s = state(overrides={"timeout": 60.0, "host": "10.0.0.1", "approved_by_default": False,
                         "secret": "bmV3"})
    e = policy.effective(client(), s)
    assert (e.timeout, e.host, e.approved_by_default, e.secret) == (60.0, "10.0.0.1",
                                                                    False, b"new")
