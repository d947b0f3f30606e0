"""``celery locks`` exit codes and messages, in-process on memory:// (the real command is
run as a subprocess against real servers in tests/integration/test_cli.py)."""

from __future__ import annotations

import json
from types import SimpleNamespace

from click.testing import CliRunner

from celery_singleton_lock.backends.owner import Owner
from celery_singleton_lock.cli import EXIT_NOT_HELD, EXIT_NOT_RELEASED, EXIT_UNAVAILABLE, EXIT_USAGE, locks
from tests.integration.cli_app import make_app


def _run(app, *args, stdin=None):
    return CliRunner().invoke(locks, list(args), obj=SimpleNamespace(app=app), input=stdin)


def test_exit_codes_for_what_an_operator_gets_wrong_or_finds_free():
    app = make_app("memory://cli-unit")
    assert _run(app, "list").output.startswith("No locks held under 'singleton-lock'")
    assert json.loads(_run(app, "list", "--json").output) == []
    shown = _run(app, "show", "task:cli.report:nothing")
    assert (shown.exit_code, shown.output) == (EXIT_NOT_HELD, "task:cli.report:nothing: not held\n")
    assert _run(app, "release", "task:cli.report:nothing", "--yes").exit_code == EXIT_NOT_HELD
    unknown = _run(app, "key", "shop.nope", "1")
    assert unknown.exit_code == EXIT_USAGE
    assert "'shop.nope' is not a task of this app; singleton tasks: cli.report" in unknown.output
    assert _run(app, "key", "cli.report", "1", "--kwargs", "[1]").exit_code == EXIT_USAGE
    assert _run(app, "key", "cli.report", "1", "--kwargs", "{nope").exit_code == EXIT_USAGE
    assert _run(app, "key", "cli.report", "1", "2", "3").exit_code == EXIT_USAGE  # does not bind


def test_key_reads_arguments_as_json_so_types_make_different_keys():
    app = make_app("memory://cli-unit")
    number = _run(app, "key", "cli.report", "42").output.splitlines()[0]
    text = _run(app, "key", "cli.report", '"42"').output.splitlines()[0]
    assert number != text
    task = app.tasks["cli.report"]
    assert number == f"key: {task.lock_key_for((42,), {})}"
    assert _run(app, "key", "cli.report", "forty-two").output.startswith(
        f"key: {task.lock_key_for(('forty-two',), {})}"
    )


def test_a_declined_release_leaves_the_lock_and_a_confirmed_one_frees_it():
    app = make_app("memory://cli-unit")
    backend = app.tasks["cli.report"].lock_options().settings.backend()
    held = backend.acquire("res:invoice:9", ttl=30, owner=Owner.here("t-9", signature="shop.bill(9,)"))
    declined = _run(app, "release", "res:invoice:9", stdin="n\n")
    assert declined.exit_code == EXIT_NOT_RELEASED
    assert "call:          shop.bill(9,)" in declined.output
    assert backend.lock_info("res:invoice:9")
    assert _run(app, "release", "res:invoice:9", stdin="y\n").exit_code == 0
    assert backend.lock_info("res:invoice:9") == []
    assert held.release() is False


def test_an_unreachable_server_is_exit_code_1_with_the_password_masked():
    app = make_app("redis://:s3cret@127.0.0.1:1/0", connect_timeout=0.5)  # nobody listens on port 1
    for args in (("list",), ("show", "res:x"), ("release", "res:x", "--yes")):
        result = _run(app, *args)
        assert result.exit_code == EXIT_UNAVAILABLE, args
        assert "redis://:***@127.0.0.1:1/0" in result.output
        assert "s3cret" not in result.output
