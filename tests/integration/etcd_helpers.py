"""Reading an etcd backend's keys straight from etcd, for the etcd tests."""

from __future__ import annotations

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
