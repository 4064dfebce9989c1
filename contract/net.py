"""Name lookups and connects that keep to a deadline: the station's bundle downloads (agent/update.py) and the
rollout's manifest reads (central/rollout/remote.py). Standard library only.

``socket.create_connection`` asks the resolver with no bound (a dead DNS server holds the caller for as long as
the lookup takes) and gives each address the whole timeout. Here the lookup runs in a daemon thread joined for
the time left (it cannot be interrupted: left behind, it ends when the resolver gives up) and each address is
tried within what is left. The caller keeps the URL's name for the Host header, the TLS server name and the
certificate check; only the connect goes to the address found.
"""

from __future__ import annotations

import socket
import threading
from typing import Any, Callable


class LookupTimeout(Exception):
    """The resolver gave no answer within the time given."""


class LookupBacklog(Exception):
    """``Lookups.limit`` lookups left behind still have no answer: a name is not looked up again meanwhile."""


class Lookups:
    """The lookups left running past their deadline (a thread each); at most ``limit`` (None: no bound)."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self.pending = 0
        self.lock = threading.Lock()


def resolve_within(host: str, port: int, seconds: float, lookups: Lookups | None = None) -> list[tuple[Any, ...]]:
    """``socket.getaddrinfo(host, port, 0, SOCK_STREAM)`` within ``seconds``: ``LookupTimeout`` when the resolver has
    not answered by then, ``LookupBacklog`` when ``lookups`` is at its limit; the lookup's own errors (gaierror, a
    UnicodeError for a label too long) are raised as getaddrinfo raises them. An IP address is read as one, without
    a thread or a resolver."""
    try:
        return socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
    except (socket.gaierror, UnicodeError):
        pass        # a name (or no valid one: the lookup below says so as urllib would)
    lookups = lookups or Lookups()
    with lookups.lock:
        if lookups.limit is not None and lookups.pending >= lookups.limit:
            raise LookupBacklog(f"{lookups.pending} earlier lookups still have no answer from the name resolver")
    box: dict[str, Any] = {}

    def lookup() -> None:
        try:
            found: Any = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
        except BaseException as exc:        # gaierror, UnicodeError for a label too long, ...
            found = exc
        with lookups.lock:
            box["found"] = found
            if box.get("left behind"):
                lookups.pending -= 1

    thread = threading.Thread(target=lookup, name=f"resolve {host[:60]}", daemon=True)
    thread.start()
    thread.join(max(0.0, seconds))
    with lookups.lock:
        if "found" not in box:          # still looking: the thread is left to end when the resolver gives up
            box["left behind"] = True
            lookups.pending += 1
    if box.get("left behind"):
        raise LookupTimeout(f"no answer from the name resolver within {seconds:g} s")
    if isinstance(box["found"], BaseException):
        raise box["found"]
    return box["found"]


def connect_within(host: str, addresses: list[tuple[Any, ...]], left: Callable[[], float], timeout: Any,
                   source_address: Any, watch: Callable[[socket.socket], None]) -> socket.socket:
    """The first of ``addresses`` (getaddrinfo's) that accepts a connection, each tried for at most what ``left()``
    says is left (and ``timeout``), as ``socket.create_connection`` does; ``left()`` raises when nothing is left.
    ``watch`` gets the connected socket before it is returned (to cut it off at the deadline whatever it then
    reads: a TLS handshake, a proxy's answer). The read timeout is ``timeout`` again once connected."""
    error: OSError | None = None
    for family, kind, proto, _, addr in addresses:
        wait = left()
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(min(wait, timeout) if isinstance(timeout, (int, float)) else wait)
            if source_address:
                sock.bind(source_address)
            sock.connect(addr)
            sock.settimeout(timeout if isinstance(timeout, (int, float)) else socket.getdefaulttimeout())
            watch(sock)
            return sock
        except OSError as exc:      # the next address (an IPv6 one that is unreachable, then IPv4)
            error = exc
            sock.close()
        except BaseException:
            sock.close()
            raise
    raise error or OSError(f"{host}: the name resolved to no address")
