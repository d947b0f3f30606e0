"""``celery -A proj locks ...``: see who holds which lock, release a stuck one, check the server.

Registered as a Celery sub-command through the entry point group ``celery.commands``, so it
runs with the app's own settings (``singleton_lock_backend``, ``singleton_lock_prefix``...).
Every line it prints goes through :func:`_Output.say`, which replaces the passwords of the
app's lock server URLs with ``***``: no error text of a client library can show one.

Exit codes (also in ``celery locks --help`` and docs/operating.md)::

    0  done (list and key: also when nothing is held)
    1  the lock server cannot be reached, or (ping) cannot grant locks
    2  a usage or configuration error (a bad option, an unknown task, a bad setting)
    3  no such lock: the key is not held (show, release)
    4  not released: the operator said no, or the store cannot release it from here
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import unquote, urlsplit

import click

from celery_singleton_lock.backends.base import LockBackend, LockInfo
from celery_singleton_lock.backends.owner import HOST
from celery_singleton_lock.config import Settings, settings_for
from celery_singleton_lock.errors import ConfigurationError, LockBackendUnavailable, LockError
from celery_singleton_lock.keys import TASK_NAMESPACE

__all__ = ["EXIT_NOT_HELD", "EXIT_NOT_RELEASED", "EXIT_UNAVAILABLE", "EXIT_USAGE", "locks"]

#: Who released what, by hand: one WARNING line per forced release (to stderr, and to
#: whatever handlers the app's logging configuration gives this logger).
logger = logging.getLogger("celery_singleton_lock.cli")

EXIT_UNAVAILABLE = 1
EXIT_USAGE = 2
EXIT_NOT_HELD = 3
EXIT_NOT_RELEASED = 4

_EXIT_CODES = """\b
Exit codes:
  0  done (list, key: also when nothing is held)
  1  the lock server cannot be reached; ping: it cannot grant locks
  2  a usage or configuration error
  3  the key is not held (show, release)
  4  not released (declined, or the store cannot release it from here)"""

#: The widest signature a table shows (``show`` and ``--json`` give all of it).
_CALL_WIDTH = 48


class _Output:
    """Prints for one command; every line masked with the app's lock server passwords."""

    def __init__(self, settings: Settings | None) -> None:
        self.secrets: list[str] = []
        if settings is not None:
            urls = [settings.backend_url] if isinstance(settings.backend_url, str) else settings.backend_url
            for url in urls:
                userinfo, at, _ = urlsplit(url).netloc.rpartition("@")
                password = userinfo.partition(":")[2] if at else ""
                self.secrets += [password, unquote(password)]
            for name, value in settings.backend_options.items():
                if "pass" in name.lower() and isinstance(value, str):
                    self.secrets.append(value)
        self.secrets = sorted({s for s in self.secrets if s}, key=len, reverse=True)

    def mask(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def say(self, text: str = "", *, err: bool = False) -> None:
        click.echo(self.mask(text), err=err)

    def fail(self, text: str, code: int) -> NoReturn:
        self.say(f"Error: {text}", err=True)
        sys.exit(code)


@dataclass
class _Command:
    """What every sub-command works with: the app's settings and backend, and the output."""

    app: Any
    settings: Settings
    out: _Output

    def backend(self) -> LockBackend:
        try:
            return self.settings.backend()
        except ConfigurationError as exc:
            self.out.fail(str(exc), EXIT_USAGE)

    def lock_info(self, key: str) -> list[LockInfo]:
        try:
            return self.backend().lock_info(_bare_key(key, self.settings.prefix))
        except ConfigurationError as exc:
            self.out.fail(str(exc), EXIT_USAGE)
        except LockError as exc:
            self.out.fail(str(exc), EXIT_UNAVAILABLE)


def _command(ctx: click.Context) -> _Command:
    app = getattr(ctx.find_root().obj, "app", None)
    if app is None:
        _Output(None).fail("no Celery app: run it as celery -A proj locks ...", EXIT_USAGE)
    try:
        settings = settings_for(app)
    except ConfigurationError as exc:
        _Output(None).fail(str(exc), EXIT_USAGE)
    _log_to_stderr()
    return _Command(app, settings, _Output(settings))


def _log_to_stderr() -> None:
    """Show this module's log lines on stderr, unless the app's logging already has a
    handler for them."""
    if not logger.hasHandlers():
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.WARNING:
        logger.setLevel(logging.WARNING)


def _bare_key(text: str, prefix: str) -> str:
    """A key as ``list`` shows it, also when pasted as Redis shows it (``{prefix:key}``)
    or with the prefix."""
    if text.startswith("{") and text.endswith("}"):
        text = text[1:-1]
    return text.removeprefix(f"{prefix}:")


def _task_of(info: LockInfo) -> str | None:
    """The task name of a lock: from the stored signature, else from a task key."""
    signature = info.owner.signature if info.owner else None
    if signature:
        for index, char in enumerate(signature):
            if char in "([ {":
                return signature[:index]
        return signature
    if info.key.startswith(TASK_NAMESPACE):
        return info.key[len(TASK_NAMESPACE):].rpartition(":")[0] or None
    return None


def _duration(seconds: float | None, *, none: str = "-") -> str:
    if seconds is None:
        return none
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours < 48 else f"{hours // 24}d{hours % 24:02d}h"


def _when(unix: float | None) -> str | None:
    if unix is None:
        return None
    return dt.datetime.fromtimestamp(unix, dt.timezone.utc).isoformat(timespec="seconds")


def _as_json(info: LockInfo) -> dict[str, Any]:
    owner = info.owner
    return {
        "key": info.key,
        "task": _task_of(info),
        "signature": owner.signature if owner else None,
        "task_id": owner.task_id if owner else None,
        "host": owner.host if owner else None,
        "pid": owner.pid if owner else None,
        "ttl": None if info.ttl is None else round(info.ttl, 3),
        "fencing_token": info.fencing_token,
        "held_since": _when(info.held_since),
        "waiting": info.waiting,
        "slot": info.slot,
        "limit": info.limit,
        "location": info.location,
    }


def _table(infos: Sequence[LockInfo]) -> list[str]:
    now = time.time()
    slots = any(info.limit > 1 for info in infos)
    header = ["KEY", "TASK ID", "HOLDER", "HELD FOR", "TTL", "FENCING TOKEN"]
    header += [*(["SLOT"] if slots else []), "CALL"]
    rows = [header]
    for info in infos:
        owner = info.owner
        call = (owner.signature if owner else None) or "-"
        if len(call) > _CALL_WIDTH:
            call = call[: _CALL_WIDTH - 3] + "..."
        holder = "?" if owner is None else f"{owner.host}:{owner.pid}" if owner.pid else "a queued message"
        rows.append([
            info.key,
            (owner.task_id if owner else None) or "-",
            holder,
            _duration(None if info.held_since is None else now - info.held_since),
            _duration(info.ttl, none="while alive"),
            "-" if info.fencing_token is None else str(info.fencing_token),
            *([f"{(info.slot or 0) + 1}/{info.limit}"] if slots else []),
            call,
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    return [
        "  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]]) for row in rows
    ]


def _describe(info: LockInfo) -> list[str]:
    owner = info.owner
    lines = [
        f"key:           {info.key}",
        f"call:          {(owner.signature if owner else None) or '-'}",
        f"task id:       {(owner.task_id if owner else None) or '-'}",
        f"host, pid:     {f'{owner.host}, {owner.pid}' if owner and owner.pid else '-'}",
        f"held since:    {_when(info.held_since) or 'not recorded by this store'}",
        f"ttl left:      {_duration(info.ttl, none='none: held while its holder lives')}",
        f"fencing token: {'-' if info.fencing_token is None else info.fencing_token}",
    ]
    if info.waiting is not None:
        lines.append(f"waiting:       {info.waiting}")
    if info.limit > 1:
        lines.append(f"slot:          {(info.slot or 0) + 1} of {info.limit}")
    if info.location:
        lines.append(f"stored at:     {info.location}")
    return lines


# -- the commands ------------------------------------------------------------------------


@click.group(name="locks", epilog=_EXIT_CODES)
def locks() -> None:
    """See and manage the locks of this app's singleton tasks.

    Uses the app's own lock settings (singleton_lock_backend, singleton_lock_prefix,
    singleton_lock_connect_timeout). Passwords in URLs are shown as ***.
    """


@locks.command(name="list", epilog=_EXIT_CODES, short_help="Every lock held now, with its holder.")
@click.option("--task", "task_name", metavar="NAME", help="Only the locks of this task (registered name).")
@click.option("--json", "as_json", is_flag=True, help="A JSON array of objects, one per lock, for scripts.")
@click.pass_context
def list_locks(ctx: click.Context, task_name: str | None, as_json: bool) -> None:
    """Every lock held now: the call that holds it, key, task id, host and pid, how long
    it has been held, TTL left and fencing token.

    A lock is shown from the moment it is granted until it is released or its lease
    expires; a task waiting for a lock is not a holder. Use a KEY from here with
    "locks show" and "locks release".
    """
    command = _command(ctx)
    backend = command.backend()
    try:
        infos = backend.held_locks()
    except LockError as exc:
        command.out.fail(str(exc), EXIT_UNAVAILABLE)
    if task_name is not None:
        infos = [info for info in infos if _task_of(info) == task_name]
    if as_json:
        command.out.say(json.dumps([_as_json(info) for info in infos], indent=2))
        return
    if not infos:
        which = f" of task {task_name}" if task_name else ""
        command.out.say(f"No locks{which} held under {command.settings.prefix!r} on {backend.url}.")
        return
    for line in _table(infos):
        command.out.say(line)
    command.out.say(f"\n{len(infos)} held on {backend.url}")


@locks.command(epilog=_EXIT_CODES, short_help="Who holds KEY, in full.")
@click.argument("key")
@click.option("--json", "as_json", is_flag=True, help="A JSON array (one object per holder).")
@click.pass_context
def show(ctx: click.Context, key: str, as_json: bool) -> None:
    """Who holds KEY: the call, task id, host and pid, since when, TTL left, fencing token,
    and where the server stores it.

    KEY as "locks list" shows it; "{singleton-lock:KEY}" as Redis shows it works too.
    Exits with 3 when nobody holds it.
    """
    command = _command(ctx)
    infos = command.lock_info(key)
    if as_json:
        command.out.say(json.dumps([_as_json(info) for info in infos], indent=2))
    if not infos:
        if not as_json:
            command.out.say(f"{_bare_key(key, command.settings.prefix)}: not held")
        sys.exit(EXIT_NOT_HELD)
    if not as_json:
        for index, info in enumerate(infos):
            if index:
                command.out.say()
            for line in _describe(info):
                command.out.say(line)


@locks.command(epilog=_EXIT_CODES, short_help="The key a call would take, and its holder.")
@click.argument("task_name", metavar="TASK")
@click.argument("args", nargs=-1)
@click.option(
    "--kwargs", "kwargs_json", metavar="JSON", default="{}",
    help="Keyword arguments as a JSON object, e.g. '{\"full\": true}'.",
)
@click.pass_context
def key(ctx: click.Context, task_name: str, args: tuple[str, ...], kwargs_json: str) -> None:
    """The lock key a call of TASK with ARGS would take, and who holds it now.

    Each ARG is read as JSON: 42 is a number, '"42"' a string, '[1, 2]' a list; text that
    is not JSON is taken as a string. Keys depend on types: 42 and "42" are different calls.
    """
    command = _command(ctx)
    from celery_singleton_lock.task import SingletonTask  # the Celery side, only here

    task = command.app.tasks.get(task_name)
    if not isinstance(task, SingletonTask):
        known = sorted(name for name, t in command.app.tasks.items() if isinstance(t, SingletonTask))
        why = "is not a singleton task" if task is not None else "is not a task of this app"
        command.out.fail(f"{task_name!r} {why}; singleton tasks: {', '.join(known) or 'none'}", EXIT_USAGE)
    try:
        kwargs = json.loads(kwargs_json)
    except ValueError as exc:
        command.out.fail(f"--kwargs is not JSON: {exc}", EXIT_USAGE)
    if not isinstance(kwargs, dict):
        command.out.fail("--kwargs must be a JSON object, like '{\"full\": true}'", EXIT_USAGE)
    try:
        lock_key = task.lock_key_for(tuple(_argument(arg) for arg in args), kwargs)
    except LockError as exc:
        command.out.fail(str(exc), EXIT_USAGE)
    command.out.say(f"key: {lock_key}")
    infos = command.lock_info(lock_key)
    if not infos:
        command.out.say("held: no")
    for info in infos:
        owner = info.owner
        who = f"task {owner.task_id or '-'} on {owner.host}, pid {owner.pid}" if owner else "an unknown owner"
        slot = "" if info.limit == 1 else f"slot {(info.slot or 0) + 1} of {info.limit}, "
        command.out.say(
            f"held: by {who} ({slot}fencing token {info.fencing_token}, ttl {_duration(info.ttl)})"
        )


def _argument(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


@locks.command(epilog=_EXIT_CODES, short_help="Release a stuck lock, whoever holds it.")
@click.argument("key")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation (for scripts).")
@click.option(
    "--fencing-token", "fencing_token", type=int, metavar="TOKEN",
    help="Release only the holder with this fencing token (one slot of a semaphore).",
)
@click.option("--all", "every", is_flag=True, help="Release every holder of KEY (all slots of a semaphore).")
@click.pass_context
def release(ctx: click.Context, key: str, yes: bool, fencing_token: int | None, every: bool) -> None:
    """Release KEY whoever holds it: for a lock left by a stuck or lost holder.

    A semaphore (lock_limit > 1) has one holder per slot taken. With several holders, say
    which: --fencing-token TOKEN (from "locks show KEY") releases that slot alone, --all
    releases every one; with neither, nothing is released (exit 2), --yes or not.

    Only the acquisition shown is released: if the lock changed hands meanwhile, the new
    holder keeps it. A holder that is still alive sees the lock lost at its next renewal
    (within a third of its TTL): it logs "lock ... lost" at ERROR and sends lock_lost, and
    current_lock().ensure_held() raises LockLost; its body is not stopped. The next waiter
    gets the lock at once. Each release is logged at WARNING with the user, host and pid
    that did it. file:// locks of a live process cannot be released from outside it: stop
    that process.
    """
    command = _command(ctx)
    if every and fencing_token is not None:
        command.out.fail("say --fencing-token TOKEN or --all, not both", EXIT_USAGE)
    infos = command.lock_info(key)
    name = _bare_key(key, command.settings.prefix)
    if fencing_token is not None:
        infos = [info for info in infos if info.fencing_token == fencing_token]
        if not infos:
            command.out.say(f"{name}: no holder with fencing token {fencing_token}; nothing to release")
            sys.exit(EXIT_NOT_HELD)
    if not infos:
        command.out.say(f"{name}: not held; nothing to release")
        sys.exit(EXIT_NOT_HELD)
    for index, info in enumerate(infos):
        if index:
            command.out.say()
        for line in _describe(info):
            command.out.say(line)
    if len(infos) > 1 and not every:
        # A semaphore's slots are separate runs: a script's "release KEY --yes", written
        # for an exclusive lock, must not free all of them at once.
        command.out.fail(
            f"{name} has {len(infos)} holders (slots of a semaphore): release one with "
            "--fencing-token TOKEN, or all of them with --all",
            EXIT_USAGE,
        )
    question = "Release it?" if len(infos) == 1 else f"Release all {len(infos)}?"
    if not yes and not click.confirm(
        f"{question} A live holder goes on running but sees the lock lost", default=False
    ):
        command.out.say("Not released.")
        sys.exit(EXIT_NOT_RELEASED)
    who = f"{_user()}@{HOST} (pid {os.getpid()})"
    released = 0
    for info in infos:
        try:
            broken = command.backend().break_lock(info)
        except ConfigurationError as exc:
            command.out.fail(str(exc), EXIT_USAGE)
        except LockBackendUnavailable as exc:
            command.out.fail(str(exc), EXIT_UNAVAILABLE)
        except LockError as exc:
            command.out.fail(str(exc), EXIT_NOT_RELEASED)
        if not broken:
            command.out.say(f"{info.key}: released or taken again meanwhile; left as it is")
            continue
        released += 1
        slot = "" if info.limit == 1 else f" (slot {(info.slot or 0) + 1} of {info.limit})"
        owner = info.owner
        holder = (
            "an unknown owner" if owner is None
            else f"task {owner.task_id or '-'} ({owner.signature or '-'}) on {owner.host}, pid {owner.pid}"
        )
        logger.warning(
            "%s", command.out.mask(
                f"lock {info.key!r}{slot} released by hand by {who}: it was held by {holder}, "
                f"fencing token {info.fencing_token}"
            ),
        )
        command.out.say(f"Released {info.key}{slot}.")
    if not released:
        sys.exit(EXIT_NOT_HELD)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container)
        return f"uid {os.getuid()}"


@locks.command(epilog=_EXIT_CODES, short_help="Reach every node, and take a lock.")
@click.pass_context
def ping(ctx: click.Context) -> None:
    """Check the lock server: every node's round trip (and clock offset, where the server
    tells its time), then take and release a lock to prove locks are granted.

    Warns when singleton_lock_connect_timeout is not below the shortest lock TTL of the
    app's tasks: a renewal stuck on a hung server would outlive the lease. Exits with 1
    when no lock can be granted (too few nodes answer, or the grant fails).
    """
    command = _command(ctx)
    backend = command.backend()
    report = backend.ping()
    width = max(len(node.url) for node in report.nodes)
    for node in report.nodes:
        if node.error is not None:
            command.out.say(f"{node.url.ljust(width)}  UNREACHABLE  {node.error}")
            continue
        assert node.round_trip is not None  # an answer has a round trip
        clock = "" if node.clock_offset is None else f"  clock {node.clock_offset * 1000:+.1f} ms"
        command.out.say(f"{node.url.ljust(width)}  ok  {node.round_trip * 1000:.1f} ms{clock}")
    answered = sum(node.error is None for node in report.nodes)
    if answered < len(report.nodes) and report.can_grant:
        command.out.say(
            f"WARNING: {len(report.nodes) - answered} of {len(report.nodes)} nodes do not answer; "
            f"{report.needed} must for locks to be granted"
        )
    for warning in _ttl_warnings(command):
        command.out.say(f"WARNING: {warning}")
    if not report.can_grant:
        command.out.fail(f"cannot grant locks: {report.grant_error}", EXIT_UNAVAILABLE)
    command.out.say(f"locks can be granted ({backend.url})")


def _ttl_warnings(command: _Command) -> list[str]:
    from celery_singleton_lock.task import SingletonTask

    timeout = command.settings.connect_timeout
    ttls = {"singleton_lock_ttl": command.settings.ttl}
    for name, task in sorted(command.app.tasks.items()):
        if isinstance(task, SingletonTask):
            try:
                ttls[f"lock_ttl of {name}"] = task.lock_options().ttl
            except LockError:
                continue  # a misconfigured task fails on its own, at decoration or start
    option, ttl = min(ttls.items(), key=lambda item: item[1])
    if timeout < ttl:
        return []
    return [
        f"singleton_lock_connect_timeout ({timeout:g}s) is not below {option} ({ttl:g}s): a "
        "renewal waiting on a hung server outlives the lease, so such locks are lost"
    ]
