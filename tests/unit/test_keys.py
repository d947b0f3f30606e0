"""Lock keys: which calls share a key, which do not, and which cannot have one."""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import hashlib
import inspect
import json
import os
import subprocess
import sys
import uuid
from typing import Any

import pytest

from celery_singleton_lock.errors import ConfigurationError, LockKeyError
from celery_singleton_lock.keys import derive_key, validate_key_spec

TASK = "shop.rebuild_report"


def pair(a: Any, b: Any = 2) -> None: ...


def one(value: Any) -> None: ...


def invoice_task(invoice_id: Any, reason: str = "") -> None: ...


def other_invoice_task(invoice_id: Any, amount: int = 0) -> None: ...


def key_of(fun: Any, spec: Any = None, *args: Any, name: str = TASK, **kwargs: Any) -> str:
    signature = inspect.signature(fun)
    return derive_key(name, signature, validate_key_spec(spec, signature), args, kwargs)


def key_of_value(value: Any) -> str:
    return key_of(one, None, value)


# -- binding: the same call written three ways --------------------------------------------


@pytest.mark.parametrize("spec", [None, ("a", "b")])
def test_positional_keyword_and_default_arguments_give_one_key(spec: Any) -> None:
    positional = key_of(pair, spec, 1, 2)
    assert key_of(pair, spec, 1, b=2) == positional
    assert key_of(pair, spec, a=1, b=2) == positional
    assert key_of(pair, spec, a=1) == positional  # b=2 is the default
    assert key_of(pair, spec, 1) == positional


def test_different_values_give_different_keys() -> None:
    assert key_of(pair, None, 1, 2) != key_of(pair, None, 1, 3)
    assert key_of(pair, None, 1, 2) != key_of(pair, None, 2, 1)
    assert key_of(pair, None, 1) != key_of(pair, None, "1")
    assert key_of(pair, None, True) != key_of(pair, None, 1)


def test_default_key_is_scoped_to_the_task_name() -> None:
    key = key_of(pair, None, 1, 2)
    assert key.startswith(f"task:{TASK}:")
    assert key_of(pair, None, 1, 2, name="shop.other") != key


def test_arguments_that_do_not_fit_the_signature_raise_lock_key_error() -> None:
    with pytest.raises(LockKeyError):
        key_of(pair, None, 1, 2, 3)
    with pytest.raises(LockKeyError):
        key_of(pair, None, 1, c=3)


# -- tuple of argument names ---------------------------------------------------------------


def test_tuple_key_ignores_other_arguments() -> None:
    assert key_of(invoice_task, ("invoice_id",), 42, "first") == key_of(
        invoice_task, ("invoice_id",), 42, reason="second"
    )
    assert key_of(invoice_task, ("invoice_id",), 42) != key_of(invoice_task, ("invoice_id",), 43)


def test_tuple_key_includes_the_task_name() -> None:
    a = key_of(invoice_task, ("invoice_id",), 42, name="billing.send")
    b = key_of(other_invoice_task, ("invoice_id",), 42, name="billing.cancel")
    assert a.startswith("task:billing.send:")
    assert b.startswith("task:billing.cancel:")
    assert a != b


def test_a_list_of_names_is_taken_as_a_tuple() -> None:
    signature = inspect.signature(invoice_task)
    assert validate_key_spec(["invoice_id"], signature) == ("invoice_id",)


# -- format-string keys: resource names ----------------------------------------------------


def test_template_key_is_exactly_the_filled_template() -> None:
    assert key_of(invoice_task, "invoice:{invoice_id}", 42) == "res:invoice:42"


def test_template_key_is_shared_by_every_task_using_it() -> None:
    a = key_of(invoice_task, "invoice:{invoice_id}", 42, "late", name="billing.send")
    b = key_of(other_invoice_task, "invoice:{invoice_id}", invoice_id=42, amount=7, name="billing.cancel")
    assert a == b == "res:invoice:42"


def test_template_key_ignores_arguments_it_does_not_name() -> None:
    assert key_of(invoice_task, "invoice:{invoice_id}", 42, "a") == key_of(
        invoice_task, "invoice:{invoice_id}", 42, "b"
    )


def test_template_separator_cannot_be_forged_by_a_value() -> None:
    def two(a: str, b: str) -> None: ...

    first = key_of(two, "{a}:{b}", "x:y", "z")
    second = key_of(two, "{a}:{b}", "x", "y:z")
    assert first != second
    assert first != "res:x:y:z"
    assert second != "res:x:y:z"


@pytest.mark.parametrize("unsafe", ["a:b", "a}b", "a{b", "a b", "a/b", "x" * 65, "é"])
def test_unsafe_template_values_are_hashed_not_copied(unsafe: str) -> None:
    key = key_of(one, "res:{value}", unsafe)
    assert unsafe not in key
    assert key.startswith("res:")
    assert key != key_of(one, "res:{value}", unsafe + "!")
    assert key == key_of(one, "res:{value}", unsafe)  # hashed, yet stable


def test_safe_template_values_keep_their_text() -> None:
    value = "Acct-7_x.y@z"
    assert key_of(one, "acct:{value}", value) == f"res:acct:{value}"


# -- callable keys -------------------------------------------------------------------------


def test_callable_key_receives_the_arguments_with_defaults_applied() -> None:
    received: list[tuple[Any, Any]] = []

    def spec(a: Any, b: Any) -> str:
        received.append((a, b))
        return f"pair:{a}:{b}"

    assert key_of(pair, spec, 1) == "res:pair:1:2"
    assert key_of(pair, spec, a=5) == "res:pair:5:2"
    assert received == [(1, 2), (5, 2)]


def test_callable_key_is_not_scoped_to_the_task_name() -> None:
    def spec(value: Any) -> str:
        return f"account:{value}"

    assert key_of(one, spec, 9, name="x.a") == key_of(one, spec, 9, name="x.b") == "res:account:9"


@pytest.mark.parametrize("returned", ["", None, 42])
def test_callable_key_must_return_a_non_empty_string(returned: Any) -> None:
    with pytest.raises(LockKeyError):
        key_of(one, lambda value: returned, 1)


def test_callable_key_with_unsafe_characters_is_bounded_and_distinct() -> None:
    a = key_of(one, lambda value: "report for " + value, "x" * 5000)
    b = key_of(one, lambda value: "report for " + value, "x" * 4999 + "y")
    assert a != b
    assert len(a) <= 200
    assert len(b) <= 200


# -- namespaces: no argument value crosses into another key ------------------------------


def charge(amount: Any, customer: Any) -> None: ...


def refer(kind: Any, ref: Any) -> None: ...


def test_a_template_cannot_forge_another_tasks_default_key() -> None:
    # The reported attack: "{kind}:{ref}" filled with a task name and a digest.
    victim = key_of(charge, None, 42, 10, name="shop.charge")
    _, _, digest = victim.rpartition(":")
    forged = key_of(refer, "{kind}:{ref}", "shop.charge", digest, name="shop.note")
    assert forged != victim
    for kind, ref in [("task", f"shop.charge:{digest}"), ("task:shop.charge", digest), (victim, "")]:
        assert key_of(refer, "{kind}:{ref}", kind, ref) != victim
        assert key_of(refer, "{kind}{ref}", kind, ref) != victim
    assert key_of(one, "{value}", victim) != victim
    assert key_of(one, "task:shop.charge:{value}", digest) != victim  # even the literal text


def test_a_tuple_key_template_and_callable_of_one_call_are_three_keys() -> None:
    tuple_key = key_of(charge, ("amount", "customer"), 42, 10, name="shop.charge")
    assert tuple_key == key_of(charge, None, 42, 10, name="shop.charge")  # same arguments: same key
    assert tuple_key.startswith("task:shop.charge:")
    assert key_of(charge, "{amount}", 42, 10).startswith("res:")
    assert key_of(charge, lambda amount, customer: "c", 42, 10).startswith("res:")


@pytest.mark.parametrize(
    "returned",
    [
        lambda victim: victim,
        lambda victim: victim.removeprefix("task:"),
        lambda victim: victim.rpartition(":")[2],
        lambda victim: "task:" + victim,
    ],
)
def test_a_callable_cannot_return_another_tasks_default_key(returned: Any) -> None:
    victim = key_of(charge, None, 42, 10, name="shop.charge")
    assert key_of(one, returned, victim, name="shop.note") != victim


def test_a_callable_cannot_reproduce_a_templates_hashed_value() -> None:
    # A value that is not copied (here a space) becomes "~" + a digest; a callable that
    # returns that text computes the same digest but must not get the same key.
    template_key = key_of(one, "{value}", "a b")
    candidates = [
        "~" + hashlib.sha256(json.dumps("a b").encode()).hexdigest()[:32],  # unsalted digest
        template_key.removeprefix("res:"),
        template_key,
    ]
    for candidate in candidates:
        assert key_of(one, lambda value: value, candidate) != template_key, candidate


#: Values that try to forge a separator, a hash marker or another value's digest.
CRAFTED = [
    "a", "b", "ab", "ba", "a-b", "b-a", "a-", "-b", "-", "a.b", "b.a", "a.", ".", "a@b",
    "b@a", "a_b", ":", "a:b", "a:", "~", "a~b",
    "{", "}", "{a}", "", " ", "x" * 64, "x" * 65,
    "~" + hashlib.sha256(json.dumps("a b").encode()).hexdigest()[:32],
]


@pytest.mark.parametrize(
    "template",
    ["{a}{b}", "{a}-{b}", "{a}:{b}", "{a}.{b}", "{a}@{b}", "x{a}y{b}z", "{a}~{b}", "{a}a{b}",
     "{a}ab{b}-", "{a}{{}}{b}", "{a} {b}", "{b}-{a}-{b}"],
)
def test_no_two_argument_pairs_share_a_template_key(template: str) -> None:
    def two(a: Any, b: Any) -> None: ...

    keys: dict[str, tuple[str, str]] = {}
    for a in CRAFTED:
        for b in CRAFTED:
            key = key_of(two, template, a, b)
            assert keys.setdefault(key, (a, b)) == (a, b), f"{(a, b)} forges {keys[key]}: {key}"


def test_a_field_followed_by_a_separator_in_its_value_is_hashed() -> None:
    def two(a: Any, b: Any) -> None: ...

    assert key_of(two, "{a}-{b}", "x", "y-z") == key_of(two, "{a}-{b}", "x", "y-z")
    assert key_of(two, "{a}-{b}", "x", "y-z") != key_of(two, "{a}-{b}", "x-y", "z")
    assert key_of(two, "{a}-{b}", "2024", "7") == "res:2024-7"  # plain values stay readable
    assert key_of(two, "{a}-{b}", "x-y", "z").startswith("res:~")


def test_keys_of_text_with_lone_surrogates_are_valid_utf8_and_distinct() -> None:
    keys = {
        key_of(one, lambda value: value, "x\udc80"),
        key_of(one, lambda value: value, "x\udc81"),
        key_of(one, "r:{value}", "x\udc80"),
        key_of(one, "r:{value}", "x\udc81"),
        key_of(one, None, "x\udc80"),
        key_of(one, None, "x\udc81"),
    }
    assert len(keys) == 6
    for key in keys:
        key.encode()  # what a backend sends


def test_a_template_with_long_or_unusual_literal_text_gives_a_bounded_key() -> None:
    long_key = key_of(one, "x" * 500 + ":{value}", "y" * 60)
    assert len(long_key) <= 4 + 64 + 33
    assert long_key != key_of(one, "x" * 500 + ":{value}", "y" * 59)
    spaced = key_of(one, "report for {value}", 42)
    assert spaced.startswith("res:report_for_42~")
    assert spaced != key_of(one, lambda value: f"report for {value}", 42)  # salted apart


# -- canonical forms -----------------------------------------------------------------------


def test_equal_uuids_give_one_key_and_different_ones_differ() -> None:
    text = "3f2504e0-4f89-11d3-9a0c-0305e82c3301"
    assert key_of_value(uuid.UUID(text)) == key_of_value(uuid.UUID(text.upper()))
    assert key_of_value(uuid.UUID(text)) != key_of_value(uuid.uuid4())


def test_aware_datetimes_of_one_instant_give_one_key_whatever_the_zone() -> None:
    utc = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.timezone.utc)
    paris = dt.datetime(2024, 5, 1, 14, 0, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    new_york = dt.datetime(2024, 5, 1, 8, 0, tzinfo=dt.timezone(dt.timedelta(hours=-4)))
    assert key_of_value(utc) == key_of_value(paris) == key_of_value(new_york)
    assert key_of_value(utc) != key_of_value(utc + dt.timedelta(microseconds=1))


def test_dates_give_one_key_per_day() -> None:
    assert key_of_value(dt.date(2024, 5, 1)) == key_of_value(dt.date.fromisoformat("2024-05-01"))
    assert key_of_value(dt.date(2024, 5, 1)) != key_of_value(dt.date(2024, 5, 2))
    assert key_of_value(dt.date(2024, 5, 1)) != key_of_value("2024-05-01")


def test_decimals_equal_in_value_give_one_key() -> None:
    assert key_of_value(decimal.Decimal("1.0")) == key_of_value(decimal.Decimal("1.00"))
    assert key_of_value(decimal.Decimal("1.0")) == key_of_value(decimal.Decimal("1"))
    assert key_of_value(decimal.Decimal("1.0")) != key_of_value(decimal.Decimal("1.01"))


def test_tuples_and_lists_give_one_key() -> None:
    assert key_of_value((1, "a", (2, 3))) == key_of_value([1, "a", [2, 3]])
    assert key_of_value([1, 2]) != key_of_value([2, 1])


def test_nested_dicts_give_one_key_whatever_their_key_order() -> None:
    first = {"a": {"x": 1, "y": [1, {"p": 1, "q": 2}]}, "b": 3}
    second = {"b": 3, "a": {"y": [1, {"q": 2, "p": 1}], "x": 1}}
    assert key_of_value(first) == key_of_value(second)
    assert key_of_value(first) != key_of_value({**first, "b": 4})


def test_dict_keys_of_different_types_do_not_collide() -> None:
    assert key_of_value({1: "x"}) != key_of_value({"1": "x"})


def test_sets_give_one_key_whatever_their_order() -> None:
    words = [f"w{i}" for i in range(50)]
    assert key_of_value(set(words)) == key_of_value(set(reversed(words)))
    assert key_of_value(set(words)) == key_of_value(frozenset(words))
    assert key_of_value({1, 2}) != key_of_value({1, 3})
    assert key_of_value({1, 2}) != key_of_value([1, 2])


def test_keys_are_the_same_in_every_process_whatever_the_hash_seed() -> None:
    # Workers are separate processes: a set or dict of strings iterates in an order that
    # depends on PYTHONHASHSEED, and the key must not.
    program = (
        "import inspect, json\n"
        "from celery_singleton_lock.keys import derive_key\n"
        "def f(tags, options): ...\n"
        "tags = {f'tag-{i}' for i in range(40)}\n"
        "options = {f'opt-{i}': {f'v{j}' for j in range(5)} for i in range(20)}\n"
        "print(json.dumps(derive_key('t', inspect.signature(f), None, (tags, options), {})))\n"
    )
    keys = set()
    for seed in ("1", "2", "3"):
        out = subprocess.run(
            [sys.executable, "-c", program],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        keys.add(json.loads(out.stdout))
    assert len(keys) == 1


def test_key_length_is_bounded_for_huge_arguments() -> None:
    huge = {"rows": list(range(100_000)), "text": "x" * 1_000_000}
    small = key_of_value(1)
    assert len(key_of_value(huge)) == len(small) < 100
    assert len(key_of(one, "res:{value}", "y" * 1_000_000)) < 100
    assert len(key_of(one, ("value",), huge)) == len(small)


# -- arguments without a canonical form ----------------------------------------------------


def test_an_object_argument_raises_lock_key_error_naming_it() -> None:
    def task(account_id: int, payload: Any) -> None: ...

    with pytest.raises(LockKeyError) as info:
        key_of(task, None, 1, object())
    assert info.value.argument == "payload"
    assert "payload" in str(info.value)


def test_an_object_nested_in_an_argument_is_reported_by_the_argument_name() -> None:
    def task(payload: Any) -> None: ...

    with pytest.raises(LockKeyError) as info:
        key_of(task, None, {"rows": [1, object()]})
    assert info.value.argument == "payload"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), [1.0, float("nan")]])
def test_nan_and_infinity_raise_lock_key_error(bad: Any) -> None:
    def task(ratio: Any) -> None: ...

    with pytest.raises(LockKeyError) as info:
        key_of(task, None, bad)
    assert info.value.argument == "ratio"
    assert "ratio" in str(info.value)


def test_an_argument_outside_the_tuple_key_needs_no_canonical_form() -> None:
    def task(account_id: int, connection: Any) -> None: ...

    assert key_of(task, ("account_id",), 1, object()) == key_of(task, ("account_id",), 1, object())


# -- validate_key_spec: mistakes found at decoration time ----------------------------------


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        (("nope",), "nope"),
        (("invoice_id", "nope"), "nope"),
        ((), "non-empty"),
        ((1,), "non-empty"),
        ("invoice:{nope}", "nope"),
        ("invoice:{}", "name arguments"),
        ("invoice:{0}", "name arguments"),
        ("invoice:{invoice_id", "not a valid format string"),
        ("   ", "empty"),
        (42, "got 42"),
        (b"invoice", "got b'invoice'"),
        ("invoice:{invoice_id:{reason}}", "format spec"),
        ("invoice:{invoice_id!x}", "conversion"),
    ],
)
def test_bad_key_specs_are_configuration_errors_naming_lock_key(spec: Any, words: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        validate_key_spec(spec, inspect.signature(invoice_task))
    assert info.value.option == "lock_key"
    assert "lock_key" in str(info.value)
    assert words in str(info.value)


def invoice_name(invoice_id: Any, reason: str = "") -> str:
    return f"invoice:{invoice_id}"


def any_arguments(*args: Any, **kwargs: Any) -> str:
    return "all"


@pytest.mark.parametrize(
    "spec",
    [
        None,
        ("invoice_id",),
        ("invoice_id", "reason"),
        "invoice:{invoice_id}",
        "invoice:{invoice_id!r:>8}",
        "fixed-name",
        invoice_name,
        any_arguments,
        lambda *args: "x",
        lambda first, *rest: "x",
    ],
)
def test_good_key_specs_are_returned(spec: Any) -> None:
    assert validate_key_spec(spec, inspect.signature(invoice_task)) == spec


def only_the_id(invoice_id: Any) -> str:
    return f"invoice:{invoice_id}"


def keyword_only_task(account_id: int, *, full: bool = False) -> None: ...


@pytest.mark.parametrize(
    ("spec", "task"),
    [
        (only_the_id, invoice_task),  # the task also passes reason
        (lambda: "x", invoice_task),
        (lambda a, b, c: "x", invoice_task),
        (len, invoice_task),
        (lambda account_id: "x", keyword_only_task),  # full= is passed by keyword
        (lambda account_id, fully=False: "x", keyword_only_task),
    ],
)
def test_a_callable_that_cannot_take_the_tasks_arguments_is_refused_at_definition(
    spec: Any, task: Any
) -> None:
    with pytest.raises(ConfigurationError) as info:
        validate_key_spec(spec, inspect.signature(task))
    assert info.value.option == "lock_key"
    assert "lock_key" in str(info.value)
    assert str(inspect.signature(task)) in str(info.value)


def test_a_callable_that_fails_at_run_time_is_a_lock_key_error_naming_lock_key_and_task() -> None:
    def lookup(value: Any) -> str:
        return {"known": "res-1"}[value]

    assert key_of(one, lookup, "known", name="shop.sync") == "res:res-1"
    with pytest.raises(LockKeyError) as info:
        key_of(one, lookup, "unknown", name="shop.sync")
    message = str(info.value)
    assert "lock_key" in message
    assert "lookup" in message
    assert "'shop.sync'" in message
    assert "KeyError" in message
    assert isinstance(info.value.__cause__, KeyError)


def test_a_callable_of_a_task_with_varargs_failing_at_run_time_is_a_lock_key_error() -> None:
    def many(*ids: Any) -> None: ...

    def first_two(a: Any, b: Any = None) -> str:
        return f"ids:{a}:{b}"

    assert key_of(many, first_two, 1, 2) == "res:ids:1:2"
    with pytest.raises(LockKeyError) as info:  # three ids: only known at run time
        key_of(many, first_two, 1, 2, 3, name="shop.many")
    assert "'shop.many'" in str(info.value)
    assert "lock_key" in str(info.value)


# -- the keys themselves stay the same across releases ------------------------------------


def keyword_only(a: Any, b: Any = 2, *, c: Any = None) -> None: ...


def variadic(x: Any, *rest: Any, **extra: Any) -> None: ...


class _Colour(enum.IntEnum):
    RED = 1


@pytest.mark.parametrize(
    ("fun", "spec", "args", "kwargs", "expected"),
    [
        (keyword_only, None, (1,), {}, "task:shop.f:446678994da7bf39b57e736d037187f6"),
        (keyword_only, None, (), {"a": 1, "b": 2, "c": None}, "task:shop.f:446678994da7bf39b57e736d037187f6"),
        (
            keyword_only, None, ("x", [1.5, True, None]), {"c": {"k": _Colour.RED, 2: b"\0"}},
            "task:shop.f:c22315307d4d5a4dec51dd51016e11d6",
        ),
        (keyword_only, ("a",), (7, "ignored"), {}, "task:shop.f:906162c307d04d1b08bacae28759f8c0"),
        (variadic, None, (1, 2, 3), {"z": "w"}, "task:shop.f:489e598eb1c60f51a9a36b0e2213b78e"),
        (
            keyword_only, None, (decimal.Decimal("1.50"), uuid.UUID(int=5)), {"c": dt.date(2024, 1, 2)},
            "task:shop.f:9c1801ea1d4411dd3de7e05d983bca3f",
        ),
    ],
)
def test_keys_are_those_earlier_releases_derived(
    fun: Any, spec: Any, args: tuple[Any, ...], kwargs: dict[str, Any], expected: str
) -> None:
    # Workers of two releases run side by side during a deploy: a key that changed would
    # let both run the same call at once. (Values derived before the fast binding path.)
    assert key_of(fun, spec, *args, name="shop.f", **kwargs) == expected


def test_a_call_that_does_not_fit_the_signature_is_refused_by_the_fast_path_too() -> None:
    for args, kwargs in [((1, 2, 3), {}), ((1,), {"a": 1}), ((), {"b": 1}), ((1,), {"d": 1})]:
        with pytest.raises(LockKeyError):
            key_of(keyword_only, None, *args, name="shop.f", **kwargs)
