"""The readable signature stored with a task's owner, and the owner's stored JSON."""

from __future__ import annotations

from types import SimpleNamespace

from celery_singleton_lock.backends.owner import SIGNATURE_CHARS, Owner, call_signature, split_stored
from celery_singleton_lock.task import lock_signature


def test_an_owner_without_a_signature_is_stored_as_before_signatures_existed():
    assert Owner("h", 1, "t").as_json() == '{"host":"h","pid":1,"task_id":"t"}'


def test_an_owner_round_trips_through_its_stored_value():
    owner = Owner("h", 7, "t-1", signature="shop.report(42,)")
    token, parsed = split_stored(owner.stored_with("abc"))
    assert (token, parsed) == ("abc", owner)
    assert Owner.from_json(b"not json") is None
    assert Owner.from_json('{"host": 1, "pid": 2}') is None


def test_the_signature_prefers_the_messages_argsrepr_which_may_hide_secrets():
    request = SimpleNamespace(argsrepr="('***',)", kwargsrepr="{'user': 7}")
    shown = lock_signature("shop.pay", request, ("card-number",), {"user": 7})
    assert shown == "shop.pay('***',) {'user': 7}"
    eager = SimpleNamespace()
    assert lock_signature("shop.report", eager, [42], {}) == "shop.report(42,)"


def test_a_long_signature_is_cut_to_a_bounded_length():
    text = call_signature("t", "(" + "x" * 500 + ",)", "{}")
    assert len(text) == SIGNATURE_CHARS
    assert text.endswith("...")
