"""Which endpoints may be loaded: loopback only, unless the user says otherwise.

A load test sends many requests quickly; aimed at the wrong host by a typo it
is a nuisance or worse. Every address the host name resolves to must be a
loopback address unless ``--allow-remote`` is given. Literal IPs are checked
without any network traffic.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit


class TargetError(ValueError):
    """A base URL that is malformed or not allowed."""


def completions_url(base_url: str, endpoint: str) -> str:
    return base_url.rstrip("/") + "/" + endpoint.lstrip("/")


def check_target(base_url: str, *, allow_remote: bool) -> None:
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TargetError(f"--base-url {base_url!r}: expected http(s)://HOST[:PORT]")
    if allow_remote:
        return
    host = parts.hostname
    try:
        addresses = {ipaddress.ip_address(host)}
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, parts.port or 80, proto=socket.IPPROTO_TCP)
        except socket.gaierror as e:
            raise TargetError(f"--base-url host {host!r} does not resolve: {e}") from None
        addresses = {ipaddress.ip_address(info[4][0]) for info in infos}
    remote = sorted(str(a) for a in addresses if not a.is_loopback)
    if remote:
        raise TargetError(f"--base-url host {host!r} is not a loopback address ({', '.join(remote)}); "
                          "pass --allow-remote to load a remote endpoint on purpose")
