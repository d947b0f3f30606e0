"""Reading an etcd backend's keys straight from etcd, for the etcd tests."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from typing import Any

from pyetcd import etcdrpc


def entries(backend: Any, key: str) -> list[Any]:
    """The lock's line (holder first), read straight from etcd."""
    directory = backend._full_key(key).encode()
    reply = backend._cluster.call("KV", "Range", etcdrpc.RangeRequest(
        key=directory, range_end=directory[:-1] + b"0",
        sort_target=etcdrpc.RangeRequest.CREATE, sort_order=etcdrpc.RangeRequest.ASCEND,
    ))
    return list(reply.kvs)


def revision(backend: Any) -> int:
    """The cluster's current revision."""
    reply = backend._cluster.call("KV", "Range", etcdrpc.RangeRequest(key=b"\0", count_only=True))
    return int(reply.header.revision)


def names_written(backend: Any, key: str, since: int) -> set[bytes]:
    """Every key name written under the lock's directory after revision ``since``.

    etcd keeps each of them in its index, deleted or not, until a compaction, and a
    compare or read of the directory visits them all. Read from the server's history: a
    watch that starts at ``since + 1`` replays every event in revision order. It also
    covers the key just past the directory (``<prefix>/<key>0``, never a lock's entry),
    where a marker written now tells when the replay has reached the present.
    """
    directory = backend._full_key(key).encode()
    marker = directory[:-1] + b"0"
    requests: queue.Queue[Any] = queue.Queue()
    requests.put(etcdrpc.WatchRequest(create_request=etcdrpc.WatchCreateRequest(
        key=directory, range_end=marker + b"\0", start_revision=since + 1,
    )))

    def send() -> Iterator[Any]:
        while (request := requests.get()) is not None:
            yield request

    call = backend._cluster.stub("Watch").Watch(send(), timeout=30)
    names: set[bytes] = set()
    try:
        for reply in call:
            if reply.created:
                backend._cluster.call("KV", "Put", etcdrpc.PutRequest(key=marker, value=b"x"))
            for event in reply.events:
                if event.kv.key == marker:
                    return names
                names.add(event.kv.key)
    finally:
        requests.put(None)
        call.cancel()
        backend._cluster.call("KV", "DeleteRange", etcdrpc.DeleteRangeRequest(key=marker))
    raise AssertionError("the watch ended before it caught up")
