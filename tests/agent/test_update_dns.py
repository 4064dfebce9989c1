"""cmd/model downloads and the host's name resolver: the one download deadline covers the name lookup too.

Real parts: real HTTP and HTTPS servers on this machine (``http.server``, TLS with a throw-away CA from
``deploy_support.make_pki``), real ONNX bundles, urllib and ssl as the station runs them, real TCP proxies (one that
passes the server's bytes on a few at a time, an HTTPS proxy that answers CONNECT slowly). The one fake is the
resolver: no DNS server can be reached (or be made to hang) here, so ``socket.getaddrinfo`` is replaced by one
that answers for the names a test lists (with loopback addresses, as /etc/hosts would), never answers for a "dead" name
until the test ends (a resolver with no server to ask), answers a "slow" name only after its delay, and hands IP
addresses and ``localhost`` to the real one.
"""

from __future__ import annotations

import functools
import hashlib
import socket
import ssl
import sys
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import pytest
from agent_support import make_onnx_bundle
from test_update_downloads import Recorded, command, manifest_sha

import agent.update as update
from agent.update import RESOLVE_MAX_PENDING, fetch_verified, verify_command_bundle
from contract.bundle import MANIFEST, BundleError, load_bundle

SITE = "bundles.site.test"      # a name only the fake resolver knows (.test is never a real domain)
DEAD = "bundles.dead.test"      # a name the fake resolver never answers for


class Resolver:
    """The host's resolver as a test sets it up (see the module docstring)."""

    def __init__(self) -> None:
        self.real = socket.getaddrinfo
        self.names: dict[str, list[str]] = {SITE: ["127.0.0.1"]}     # a name and its addresses, in order
        self.dead = {DEAD}
        self.slow: dict[str, float] = {}   # a name of ``names`` answered only after these seconds
        self.answer = threading.Event()     # set: the dead names fail at last (EAI_AGAIN), as a resolver gives up
        self.asked: list[str] = []          # the names looked up (not IP addresses)

    def getaddrinfo(self, host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0,
                    flags: int = 0) -> list:
        if flags & socket.AI_NUMERICHOST or host == "localhost" or _is_ip(host):
            return self.real(host, port, family, type, proto, flags)
        self.asked.append(host)
        if host in self.slow:
            self.answer.wait(self.slow[host])
        if host in self.names:
            return [found for address in self.names[host]
                    for found in self.real(address, port, family, type, proto, flags | socket.AI_NUMERICHOST)]
        if host in self.dead:
            self.answer.wait()
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")


def _is_ip(host: Any) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in str(host) else socket.AF_INET, str(host).split("%")[0])
        return True
    except OSError:
        return False


@pytest.fixture
def resolver(monkeypatch):
    fake = Resolver()
    monkeypatch.setattr(socket, "getaddrinfo", fake.getaddrinfo)
    yield fake
    fake.answer.set()       # the lookups left behind end; the next test starts with none pending
    until = time.monotonic() + 30
    while update._LOOKUPS.pending and time.monotonic() < until:
        time.sleep(0.05)
    assert update._LOOKUPS.pending == 0, "lookups still pending after the resolver answered"


@pytest.fixture
def http_site():
    """``serve`` for a test: the base URL (by IP address) and the paths asked for; stopped at the end."""
    servers = []

    def start(folder: Path) -> tuple[str, list[str]]:
        servers.append(serve(folder)[0])
        return f"http://127.0.0.1:{servers[-1].server_address[1]}", servers[-1].asked     # type: ignore[attr-defined]

    yield start
    for server in servers:
        close(server)


def within(seconds: float, fetch: Callable[[], Any]) -> tuple[str, Any] | None:
    """``fetch()`` run in a thread: ("done", its value) or ("refused", its exception), None if it still runs after
    ``seconds`` (a fetch held by the resolver, that the test ends by making the resolver answer)."""
    outcome: list[tuple[str, Any]] = []

    def run() -> None:
        try:
            outcome.append(("done", fetch()))
        except BaseException as exc:        # noqa: BLE001 (the test looks at it)
            outcome.append(("refused", exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    return outcome[0] if outcome else None


def installed_state(downloads: Path) -> dict[str, str]:
    return {str(p.relative_to(downloads)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(downloads.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- a resolver that does not answer

def test_a_resolver_that_never_answers_refuses_the_download_at_its_deadline(tmp_path, http_site, resolver):
    # given: a station with a bundle installed, and a bundle server whose name the resolver never answers for
    # (before: the command thread waited in getaddrinfo for as long as the resolver took, past the deadline)
    make_onnx_bundle(tmp_path / "www", version="v1")
    make_onnx_bundle(tmp_path / "www", version="v2")
    base, _ = http_site(tmp_path / "www")
    downloads = tmp_path / "downloads"
    verify_command_bundle(command(f"{base}/onnx-tiny/v1/"), downloads, None, deadline_s=30)
    before = installed_state(downloads)
    url = f"http://{DEAD}:{base.rsplit(':', 1)[1]}/onnx-tiny/v2/"
    # when: a cmd/model names a bundle on that host, with a 1 s deadline
    outcome = within(30, lambda: fetch_verified(command(url), downloads, None, deadline_s=1.0))
    # then: it is refused, naming the URL and that the name did not resolve in time; nothing installed changed
    assert outcome is not None, "still waiting for the resolver 30 s after a 1 s deadline"
    kind, refused = outcome
    assert kind == "refused" and isinstance(refused, BundleError), refused
    assert str(refused).startswith(f"{url}{MANIFEST}: host '{DEAD}' did not resolve in time: no answer from the "
                                   "name resolver within the download's 1 s deadline"), str(refused)
    assert installed_state(downloads) == before
    assert load_bundle(downloads / "onnx-tiny" / "v1").version == "v1"


def test_each_file_is_looked_up_within_what_is_left_of_the_deadline(tmp_path, http_site, resolver, monkeypatch):
    # given: a served bundle whose name resolves for the manifest and its signature, then no longer does
    make_onnx_bundle(tmp_path / "www", version="v2")
    base, asked = http_site(tmp_path / "www")
    url = f"http://{SITE}:{base.rsplit(':', 1)[1]}/onnx-tiny/v2/"
    real_lookup = resolver.getaddrinfo

    def dies_after_two(host: Any, *args: Any) -> list:
        if host == SITE and resolver.asked.count(SITE) >= 2:
            resolver.dead.add(SITE)
            resolver.names.pop(SITE, None)
        return real_lookup(host, *args)

    monkeypatch.setattr(socket, "getaddrinfo", dies_after_two)
    # when
    outcome = within(30, lambda: fetch_verified(command(url), tmp_path / "downloads", None, deadline_s=2.0))
    # then: the model file's lookup is refused at the deadline, naming the model's URL
    assert outcome is not None, "still waiting for the resolver 30 s after a 2 s deadline"
    kind, refused = outcome
    assert kind == "refused" and isinstance(refused, BundleError), refused
    assert str(refused).startswith(f"{url}model.fp32.onnx: host '{SITE}' did not resolve in time"), str(refused)
    assert asked == ["/onnx-tiny/v2/manifest.json", "/onnx-tiny/v2/manifest.json.sig"]
    assert list((tmp_path / "downloads").iterdir()) == []


def test_lookups_left_behind_are_bounded_and_ip_addresses_need_none(tmp_path, http_site, resolver):
    # given: as many downloads refused at their deadline as lookups may be left running in the background
    make_onnx_bundle(tmp_path / "www", version="v2")
    base, _ = http_site(tmp_path / "www")
    port = base.rsplit(":", 1)[1]
    downloads = tmp_path / "downloads"
    dead_url = f"http://{DEAD}:{port}/onnx-tiny/v2/"
    for _ in range(RESOLVE_MAX_PENDING):
        outcome = within(30, lambda: fetch_verified(command(dead_url), downloads, None, deadline_s=0.3))
        assert outcome is not None and "did not resolve in time" in str(outcome[1]), outcome
    # when: another named host is asked for while they still wait for the resolver
    outcome = within(30, lambda: fetch_verified(command(f"http://{SITE}:{port}/onnx-tiny/v2/"), downloads, None,
                                                deadline_s=30))
    # then: it is refused at once, saying why, without one more thread waiting on the resolver
    assert outcome is not None and isinstance(outcome[1], BundleError), outcome
    assert str(outcome[1]).startswith(f"http://{SITE}:{port}/onnx-tiny/v2/{MANIFEST}: host '{SITE}' not looked up: "
                                      f"{RESOLVE_MAX_PENDING} earlier lookups still have no answer"), str(outcome[1])
    assert update._LOOKUPS.pending == RESOLVE_MAX_PENDING
    # and: a bundle named by an IP address needs no lookup and installs
    bundle = verify_command_bundle(command(f"{base}/onnx-tiny/v2/"), downloads, None, deadline_s=30)
    assert bundle.version == "v2"
    # and: once the resolver answers (and gives up on the dead name), named hosts are looked up again
    resolver.answer.set()
    until = time.monotonic() + 30
    while update._LOOKUPS.pending and time.monotonic() < until:
        time.sleep(0.05)
    incoming = fetch_verified(command(f"http://{SITE}:{port}/onnx-tiny/v2/"), downloads, None, deadline_s=30)
    incoming.discard()


def test_each_address_of_a_name_is_tried_within_the_deadline(tmp_path, http_site, resolver):
    # given: a name whose first address refuses connections, and a name whose 10 addresses never answer a connect
    # (a listener whose queue is full: its SYNs are dropped, as a firewall that drops packets does)
    make_onnx_bundle(tmp_path / "www", version="v2")
    base, _ = http_site(tmp_path / "www")
    port = int(base.rsplit(":", 1)[1])
    resolver.names["two.site.test"] = ["127.0.0.2", "127.0.0.1"]      # nothing listens on 127.0.0.2
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    queued = socket.create_connection(full.getsockname(), timeout=5)     # the one connection its queue takes
    resolver.names["drops.site.test"] = ["127.0.0.1"] * 10
    try:
        # when / then: the next address is tried after a refused one
        incoming = fetch_verified(command(f"http://two.site.test:{port}/onnx-tiny/v2/"), tmp_path / "downloads",
                                  None, deadline_s=30)
        assert incoming.bundle.version == "v2"
        incoming.discard()
        # when / then: addresses that never answer are given up at the deadline, not after one read timeout each
        # (before: min(60 s, what was left of the deadline) for each address, 10 s here)
        url = f"http://drops.site.test:{full.getsockname()[1]}/onnx-tiny/v2/"
        started = time.monotonic()
        outcome = within(60, lambda: fetch_verified(command(url), tmp_path / "downloads", None, deadline_s=1.0))
        took = time.monotonic() - started
    finally:
        queued.close()
        full.close()
    assert outcome is not None and isinstance(outcome[1], BundleError), outcome
    assert str(outcome[1]) == f"{url}{MANIFEST}: bundle download not finished within its 1 s deadline"
    assert took < 5, f"{took:.1f} s for a 1 s deadline"


# ---------------------------------------------------------------- what the connection keeps of the name

def test_a_named_host_is_asked_with_its_name_in_the_host_header(tmp_path, resolver):
    make_onnx_bundle(tmp_path / "www", version="v2")
    server, seen = serve(tmp_path / "www")
    try:
        port = server.server_address[1]
        bundle = verify_command_bundle(command(f"http://{SITE}:{port}/onnx-tiny/v2/"), tmp_path / "downloads",
                                       None, deadline_s=30)
    finally:
        close(server)
    assert bundle.version == "v2"
    assert set(seen["host"]) == {f"{SITE}:{port}"} and resolver.asked == [SITE] * 3


def test_https_checks_the_certificate_against_the_urls_name_not_the_address(tmp_path, resolver, monkeypatch):
    """The address a name resolved to is not what the certificate is checked against (nor what the server is told
    in SNI): a certificate for 127.0.0.1 and localhost does not pass for another name that resolves to 127.0.0.1."""
    sys.path.append(str(Path(__file__).resolve().parents[1] / "deploy"))
    from deploy_support import make_pki

    pki = make_pki(tmp_path / "pki")        # localhost and 127.0.0.1
    folder = make_onnx_bundle(tmp_path / "www", version="v2")
    server, seen = serve(tmp_path / "www", pki)
    port = server.server_address[1]
    downloads = tmp_path / "downloads"
    try:
        # a CA the host does not trust: refused, as before
        with pytest.raises(BundleError, match="CERTIFICATE_VERIFY_FAILED"):
            fetch_verified(command(f"https://localhost:{port}/onnx-tiny/v2/"), downloads, None, deadline_s=30)
        monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_cert))
        # the certificate's names: installed, SNI and Host on the URL's name
        for host in ("localhost", "127.0.0.1"):
            seen["sni"].clear()
            seen["host"].clear()
            bundle = verify_command_bundle(command(f"https://{host}:{port}/onnx-tiny/v2/", manifest_sha(folder)),
                                           downloads, None, deadline_s=30)
            assert bundle.version == "v2"
            assert set(seen["sni"]) == ({"localhost"} if host == "localhost" else {None})   # no SNI for an IP
            assert set(seen["host"]) == {f"{host}:{port}"}
        before = installed_state(downloads)
        # another name that resolves to 127.0.0.1: the certificate does not name it, refused
        seen["sni"].clear()
        with pytest.raises(BundleError, match=rf"https://{SITE}:{port}/onnx-tiny/v2/{MANIFEST}: download failed "
                                              r"\(.*CERTIFICATE_VERIFY_FAILED.*Hostname mismatch"):
            fetch_verified(command(f"https://{SITE}:{port}/onnx-tiny/v2/"), downloads, None, deadline_s=30)
        assert seen["sni"] == [SITE] and resolver.asked == [SITE]
        assert installed_state(downloads) == before
    finally:
        close(server)


# ---------------------------------------------------------------- IP addresses and localhost

def test_ipv6_literal_and_localhost_urls_install(tmp_path, resolver):
    make_onnx_bundle(tmp_path / "www", version="v2")
    try:
        v6 = socket.create_server(("::1", 0), family=socket.AF_INET6)
        v6.close()
    except OSError:
        pytest.skip("this host has no IPv6 loopback")
    for host, bind in (("[::1]", "::1"), ("localhost", "127.0.0.1"), ("127.0.0.1", "127.0.0.1")):
        server, seen = serve(tmp_path / "www", bind=bind)
        try:
            url = f"http://{host}:{server.server_address[1]}/onnx-tiny/v2/"
            incoming = fetch_verified(command(url), tmp_path / "downloads", None, deadline_s=30)
        finally:
            close(server)
        assert incoming.bundle.version == "v2" and len(seen["host"]) == 3, host
        incoming.discard()
    assert resolver.asked == []         # the resolver's DNS was never asked: IP addresses, localhost from the host


# ---------------------------------------------------------------- what is read before the connection is handed over

def test_a_tls_handshake_sent_a_few_bytes_at_a_time_is_cut_at_the_deadline(tmp_path, resolver, monkeypatch):
    """The TLS handshake is read on the socket ``wrap_socket`` makes of the connected one, before http.client hands
    it over: it is watched from the connect on. ssl bounds a handshake by the socket's timeout, but from the
    handshake's start: after a lookup that took most of the deadline it ran on for a whole timeout more (before:
    refused at ~15 s here, 8 s past the deadline; at most FETCH_TIMEOUT_S, 60 s, past the 600 s deadline)."""
    sys.path.append(str(Path(__file__).resolve().parents[1] / "deploy"))
    from deploy_support import make_pki

    # given: an HTTPS bundle server behind a TCP proxy, whose CA the host trusts
    pki = make_pki(tmp_path / "pki")
    make_onnx_bundle(tmp_path / "www", version="v2")
    server, _ = serve(tmp_path / "www", pki)
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_cert))
    passing, dripping = DripProxy(server.server_address), DripProxy(server.server_address, chunk=8, every_s=0.2)
    resolver.names["slow.site.test"] = ["127.0.0.1"]
    resolver.slow["slow.site.test"] = 7.0
    downloads = tmp_path / "downloads"
    try:
        # the proxy passing bytes on as they come: the bundle installs through it
        incoming = fetch_verified(command(f"https://localhost:{passing.port}/onnx-tiny/v2/"), downloads, None,
                                  deadline_s=30)
        assert incoming.bundle.version == "v2"
        incoming.discard()
        # when: a name that resolves after 7 s of an 8 s deadline, then the server's handshake 8 bytes every 0.2 s
        # (each read in time; the server's part of the handshake, some 730 bytes, would take over 15 s)
        url = f"https://slow.site.test:{dripping.port}/onnx-tiny/v2/"
        started = time.monotonic()
        outcome = within(60, lambda: fetch_verified(command(url), downloads, None, deadline_s=8.0))
        took = time.monotonic() - started
    finally:
        passing.close()
        dripping.close()
        close(server)
    # then: refused at the deadline, naming the URL; nothing left in the download folder
    assert outcome is not None and isinstance(outcome[1], BundleError), outcome
    assert str(outcome[1]) == f"{url}{MANIFEST}: bundle download not finished within its 8 s deadline"
    assert took < 12, f"{took:.1f} s for an 8 s deadline"
    assert dripping.handed > 0          # the handshake had begun
    assert list(downloads.iterdir()) == []


def test_an_https_proxy_that_answers_connect_slowly_is_cut_at_the_deadline(tmp_path, resolver, monkeypatch):
    """Through an HTTPS proxy (https_proxy), http.client reads the proxy's answer to CONNECT, a header line at a
    time, before it hands the connection over. Before: a proxy (or a middlebox posing as one) that sent a byte every
    0.2 s held the command thread for as long as it went on (20 s here, the test's proxy then gives up)."""
    sys.path.append(str(Path(__file__).resolve().parents[1] / "deploy"))
    from deploy_support import make_pki

    make_onnx_bundle(tmp_path / "www", version="v2")
    server, _ = serve(tmp_path / "www", make_pki(tmp_path / "pki"))
    proxy = SlowConnectProxy(drip_s=20.0)
    monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    port = server.server_address[1]
    url = f"https://localhost:{port}/onnx-tiny/v2/"
    try:
        started = time.monotonic()
        outcome = within(60, lambda: fetch_verified(command(url), tmp_path / "downloads", None, deadline_s=1.5))
        took = time.monotonic() - started
    finally:
        proxy.close()
        close(server)
    assert proxy.asked == [f"CONNECT localhost:{port} HTTP/1.0"], proxy.asked      # the proxy was the way
    assert outcome is not None and isinstance(outcome[1], BundleError), outcome
    assert str(outcome[1]) == f"{url}{MANIFEST}: bundle download not finished within its 1.5 s deadline"
    assert took < 1.5 + 10, f"{took:.1f} s for a 1.5 s deadline"
    assert list((tmp_path / "downloads").iterdir()) == []


# ---------------------------------------------------------------- helpers

class DripProxy:
    """A TCP proxy to ``upstream``: what the client sends goes on at once; what the server sends is handed on
    ``chunk`` bytes every ``every_s`` (all at once when 0), for ``drip_s`` at most, then both sides are closed (so a
    client that never gives up ends the test anyway). ``handed``: the bytes handed on so far, to all clients."""

    def __init__(self, upstream: tuple[str, int], *, chunk: int = 65536, every_s: float = 0.0,
                 drip_s: float = 30.0) -> None:
        self.upstream, self.chunk, self.every_s, self.drip_s = upstream, chunk, every_s, drip_s
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stop = threading.Event()
        self.handed = 0
        self.open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
                server = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                return
            self.open += [client, server]
            threading.Thread(target=self._up, args=(client, server), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client), daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket) -> None:
        try:
            while data := client.recv(65536):
                server.sendall(data)
        except OSError:
            pass
        _close(client, server)

    def _down(self, server: socket.socket, client: socket.socket) -> None:
        until, pending = time.monotonic() + self.drip_s, b""
        server.settimeout(0.05)
        try:
            while time.monotonic() < until and not self.stop.is_set():
                try:
                    data = server.recv(65536)
                    if not data and not pending:
                        break
                    pending += data
                except TimeoutError:
                    continue
                if pending:
                    client.sendall(pending[:self.chunk])
                    self.handed += len(pending[:self.chunk])
                    pending = pending[self.chunk:]
                    self.stop.wait(self.every_s)
        except OSError:
            pass
        _close(client, server)

    def close(self) -> None:
        self.stop.set()
        self.listener.close()
        _close(*self.open)


class SlowConnectProxy:
    """An HTTP proxy that answers CONNECT with 200 and then header lines a byte every ``every_s``, for ``drip_s``
    (then it closes). ``asked``: the request line of each CONNECT."""

    def __init__(self, *, every_s: float = 0.2, drip_s: float = 20.0) -> None:
        self.every_s, self.drip_s = every_s, drip_s
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stop = threading.Event()
        self.asked: list[str] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        until, line = time.monotonic() + self.drip_s, b"X-Slow: 1\r\n"
        try:
            self.asked.append(conn.recv(65536).split(b"\r\n", 1)[0].decode())
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n")
            sent = 0
            while time.monotonic() < until and not self.stop.wait(self.every_s):
                conn.sendall(line[sent % len(line):][:1])
                sent += 1
        except OSError:         # the client gave up: what the test wants
            pass
        conn.close()

    def close(self) -> None:
        self.stop.set()
        self.listener.close()


def _close(*socks: socket.socket) -> None:
    for sock in socks:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()


class _Seen(Recorded):
    """Records each request's Host header too."""

    def do_GET(self) -> None:      # noqa: N802 (http.server's name)
        self.server.seen["host"].append(self.headers.get("Host"))       # type: ignore[attr-defined]
        super().do_GET()


def serve(folder: Path, pki: Any = None, *, bind: str = "127.0.0.1") -> tuple[ThreadingHTTPServer, dict]:
    """A real HTTP (or, with ``pki``, HTTPS) file server on ``bind``; what it saw: Host headers, TLS server names."""
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    server_class = type("Server", (ThreadingHTTPServer,), {"address_family": family})
    server = server_class((bind, 0), functools.partial(_Seen, directory=str(folder)))
    server.asked, server.seen = [], {"host": [], "sni": []}        # type: ignore[attr-defined]
    server.daemon_threads = True
    if pki is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(pki.server_cert), str(pki.server_key))
        context.sni_callback = lambda _sock, name, _ctx: server.seen["sni"].append(name)  # type: ignore
        server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.seen      # type: ignore[attr-defined]


def close(server: ThreadingHTTPServer) -> None:
    server.shutdown()
    server.server_close()
