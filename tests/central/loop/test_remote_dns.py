"""A rollout's read of a bundle from a URL (``resolve_bundle``) and the host's name resolver: the one fetch deadline
(``FETCH_DEADLINE_S``) covers the name lookup, and the connection is watched from the moment it is made.

Real parts: a real bundle published into a served tree, read over real HTTP (``http.server``) and HTTPS
(``BundleServer`` with a throw-away CA from ``deploy_support.make_pki``), urllib and ssl as the rollout runs them, a
real HTTPS proxy that answers CONNECT slowly. The one fake is the resolver: no DNS server can be reached, or be made
to hang, here, so ``socket.getaddrinfo`` is replaced by one that answers for the names a test lists (with loopback
addresses, as /etc/hosts would), never answers for a "dead" name until the test ends (a resolver with no server to
ask), and hands IP addresses (and any numeric-only lookup) and ``localhost`` to the real one.
"""

from __future__ import annotations

import functools
import socket
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import pytest
from rollout_support import promote, tiny_versions
from test_update_dns import DEAD, SITE, Resolver, SlowConnectProxy

from central.rollout import BundleServer, RolloutError, publish_bundle, resolve_bundle
from central.rollout import remote as remote_module


@pytest.fixture
def resolver(monkeypatch):
    fake = Resolver()
    monkeypatch.setattr(socket, "getaddrinfo", fake.getaddrinfo)
    yield fake
    fake.answer.set()       # the lookups left behind end


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Path:
    """A served tree holding tiny v2, published as ``central publish`` does."""
    root = tmp_path_factory.mktemp("tree")
    bundle = tiny_versions(root / "models", ["v2"])["v2"]
    promote(bundle)
    publish_bundle(bundle, root / "served")
    return root / "served"


def within(seconds: float, read: Callable[[], Any]) -> tuple[str, Any] | None:
    """``read()`` in a thread: ("done", its value) or ("refused", its exception), None while it still runs after
    ``seconds`` (a read held by the resolver: the test then fails instead of hanging)."""
    outcome: list[tuple[str, Any]] = []

    def run() -> None:
        try:
            outcome.append(("done", read()))
        except BaseException as exc:        # noqa: BLE001 (the test looks at it)
            outcome.append(("refused", exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    return outcome[0] if outcome else None


def test_a_resolver_that_never_answers_fails_the_read_at_its_deadline_naming_the_url(served, resolver,
                                                                                        monkeypatch):
    """Before: ``python -m central rollout`` (and a canary's rollback, which reads the previous bundle) waited in
    getaddrinfo for as long as the resolver took, past FETCH_DEADLINE_S."""
    # given: a bundle server whose name the resolver never answers for, and a 1 s fetch deadline
    monkeypatch.setattr(remote_module, "FETCH_DEADLINE_S", 1.0)
    server = BundleServer(served).start()
    url = f"http://{DEAD}:{server.port}/tiny/v2/"
    try:
        # when
        started = time.monotonic()
        outcome = within(30, lambda: resolve_bundle(url))
        took = time.monotonic() - started
    finally:
        server.stop()
    # then: a RolloutError naming the manifest's URL and why, at about the deadline
    assert outcome is not None, "still waiting for the resolver 30 s after a 1 s deadline"
    kind, refused = outcome
    assert kind == "refused" and isinstance(refused, RolloutError), refused
    assert str(refused) == (f"{url}manifest.json: host '{DEAD}' did not resolve in time: no answer from the name "
                            "resolver within 1 s")
    assert took < 1 + 10, f"{took:.1f} s for a 1 s deadline"
    assert resolver.asked == [DEAD]


def test_a_resolver_that_fails_is_a_rollout_error_naming_the_url(served, resolver):
    server = BundleServer(served).start()
    try:
        with pytest.raises(RolloutError, match=rf"http://nowhere.test:{server.port}/tiny/v2/manifest.json: cannot "
                                               r"fetch \(.*Temporary failure in name resolution"):
            resolve_bundle(f"http://nowhere.test:{server.port}/tiny/v2/")
    finally:
        server.stop()


def test_a_named_host_is_read_with_its_name_in_the_host_header(served, resolver):
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_HostSeen, directory=str(served)))
    server.hosts = []       # type: ignore[attr-defined]
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        bundle = resolve_bundle(f"http://{SITE}:{port}/tiny/v2/")
    finally:
        server.shutdown()
        server.server_close()
    assert (bundle.name, bundle.version, bundle.location) == ("tiny", "v2", f"http://{SITE}:{port}/tiny/v2/")
    assert server.hosts == [f"{SITE}:{port}"] * 2       # type: ignore[attr-defined]     # manifest, gate record
    assert resolver.asked == [SITE] * 2


def test_https_checks_the_certificate_against_the_urls_name_not_the_address(served, resolver, tmp_path,
                                                                             monkeypatch):
    """A certificate for 127.0.0.1 and localhost passes for those names, not for another name that resolves to
    127.0.0.1 (the address found is only where the connection goes)."""
    sys.path.append(str(Path(__file__).resolve().parents[2] / "deploy"))
    from deploy_support import make_pki

    pki = make_pki(tmp_path / "pki")
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_cert))
    server = BundleServer(served, tls_cert=pki.server_cert, tls_key=pki.server_key).start()
    try:
        for host in ("localhost", "127.0.0.1"):
            assert resolve_bundle(f"https://{host}:{server.port}/tiny/v2/").version == "v2"
        with pytest.raises(RolloutError, match=rf"https://{SITE}:{server.port}/tiny/v2/manifest.json: cannot fetch "
                                               r"\(.*CERTIFICATE_VERIFY_FAILED.*Hostname mismatch"):
            resolve_bundle(f"https://{SITE}:{server.port}/tiny/v2/")
    finally:
        server.stop()
    assert resolver.asked == [SITE]


def test_an_https_proxy_that_answers_connect_slowly_is_cut_at_the_deadline(served, resolver, tmp_path, monkeypatch):
    """Through an HTTPS proxy (https_proxy), http.client reads the proxy's answer to CONNECT before it hands the
    connection over; the connection is watched from the moment it is made. Before: a proxy (or a middlebox posing
    as one) sending a byte every 0.2 s, each read in time, held the rollout for as long as it went on (20 s here,
    the test's proxy then gives up)."""
    sys.path.append(str(Path(__file__).resolve().parents[2] / "deploy"))
    from deploy_support import make_pki

    pki = make_pki(tmp_path / "pki")
    monkeypatch.setattr(remote_module, "FETCH_DEADLINE_S", 1.0)
    monkeypatch.setattr(remote_module, "FETCH_TIMEOUT_S", 5)
    server = BundleServer(served, tls_cert=pki.server_cert, tls_key=pki.server_key).start()
    proxy = SlowConnectProxy(drip_s=20.0)
    monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    port = server.port
    url = f"https://localhost:{port}/tiny/v2/"
    try:
        started = time.monotonic()
        outcome = within(60, lambda: resolve_bundle(url))
        took = time.monotonic() - started
    finally:
        proxy.close()
        server.stop()
    assert proxy.asked == [f"CONNECT localhost:{port} HTTP/1.0"], proxy.asked      # the proxy was the way
    assert outcome is not None and isinstance(outcome[1], RolloutError), outcome
    assert str(outcome[1]).startswith(f"{url}manifest.json: not read in full within 1 s"), str(outcome[1])
    assert took < 1 + 10, f"{took:.1f} s for a 1 s deadline"


class _HostSeen(SimpleHTTPRequestHandler):
    """http.server's file handler that records each request's Host header."""

    def do_GET(self) -> None:      # noqa: N802 (http.server's name)
        self.server.hosts.append(self.headers.get("Host"))      # type: ignore[attr-defined]
        super().do_GET()

    def log_message(self, *args: Any) -> None:
        pass
