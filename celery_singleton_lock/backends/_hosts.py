"""Reading the host list of a URL that names several servers (``h1:port,[ipv6]:port``),
for the backends that parse one themselves (Redis Cluster, Sentinel)."""

from __future__ import annotations

import ipaddress
from urllib.parse import SplitResult, urlsplit

from celery_singleton_lock.errors import ConfigurationError, mask_url

__all__ = ["host_list", "split_url"]


def split_url(url: str, *, kind: str, option: str) -> tuple[SplitResult, str]:
    """The parts of ``url`` and the URL as shown in messages (its password masked).

    :raises ConfigurationError: naming ``option`` and ``kind`` (``"sentinel://"``),
        where the URL cannot be parsed (brackets that hold no IPv6 address).
    """
    try:
        return urlsplit(url), mask_url(url)
    except ValueError as exc:
        msg = f"{option}: a {kind} URL that cannot be parsed: {exc}"
        raise ConfigurationError(msg, option=option) from None


def host_list(
    hosts: str, *, default_port: int, what: str, shown: str, option: str
) -> tuple[tuple[str, int], ...]:
    """``(host, port)`` of every entry of a comma-separated host list, in order; IPv6
    addresses in brackets.

    :param default_port: the port of an entry that names none.
    :param what: what an entry names, for the message ("node", "Sentinel").
    :param shown: the whole URL, its password masked, for the message.
    :raises ConfigurationError: naming ``option``, for an entry that is not ``host[:port]``
        or ``[ipv6][:port]``, or a port that is not a number from 1 to 65535.
    """
    return tuple(_host_and_port(host.strip(), default_port, what, shown, option) for host in hosts.split(","))


def _host_and_port(host: str, default_port: int, what: str, shown: str, option: str) -> tuple[str, int]:
    if host.startswith("["):
        name, bracket, rest = host[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        valid = bool(bracket) and (not rest or rest.startswith(":")) and _is_ipv6(name)
    else:
        name, _, port = host.partition(":")
        valid = bool(name) and ":" not in port
    if not valid:
        msg = f"{option}: bad {what} address {host!r} in {shown!r} (host:port, [ipv6]:port)"
        raise ConfigurationError(msg, option=option)
    if not port:
        return name, default_port
    if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        msg = f"{option}: port {port!r} of {shown!r} is not a number from 1 to 65535"
        raise ConfigurationError(msg, option=option)
    return name, int(port)


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True
