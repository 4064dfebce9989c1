"""A TCP proxy that cuts every connection through it at random moments and sometimes refuses new ones.

The link-cut idea of paho's connection-loss tests (eclipse/paho.mqtt.testing, interoperability): the
client talks to the broker through a proxy that forwards bytes both ways and, every ``cut_every_s``
seconds (drawn from a seeded RNG), aborts every open connection on both sides at once, wherever the
byte stream is (mid-packet included). After a cut, with probability ``refuse_chance`` the proxy also
stops listening for ``refuse_for_s`` seconds, so reconnect attempts meet a refused connection.
Every chunk is held ``delay_s`` before it is passed on (a WAN's one-way delay): on localhost a message
would otherwise cross in microseconds and a cut would almost never find one on the way, so neither a
lost PUBACK (a duplicate) nor a lost PUBLISH would ever be exercised. A cut drops what is on the way.

Nothing here knows MQTT. What it records (``LinkStats``) is measured at the proxy: a connection counts
as *answered* from the first byte the server sent back (for MQTT: the CONNACK), and an *outage* is the
time from the end of one answered connection to the first answer on the next one.

    proxy = CuttingProxy("127.0.0.1", broker_port, CutPlan(seed=1)).start()
    ...  # point the client at 127.0.0.1:proxy.port
    stats = proxy.stop()
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class CutPlan:
    """When to cut and refuse; every draw comes from ``random.Random(seed)``."""

    cut_every_s: tuple[float, float] = (1.0, 4.0)
    refuse_chance: float = 0.25
    refuse_for_s: tuple[float, float] = (0.2, 2.0)
    delay_s: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("cut_every_s", "refuse_for_s"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(f"CutPlan.{name}: want 0 < low <= high seconds, got ({low}, {high})")
        if not 0.0 <= self.delay_s < 10.0:
            raise ValueError(f"CutPlan.delay_s: want 0 <= seconds < 10, got {self.delay_s}")
        if not 0.0 <= self.refuse_chance <= 1.0:
            raise ValueError(f"CutPlan.refuse_chance: want a probability in [0, 1], got {self.refuse_chance}")


@dataclass
class LinkStats:
    accepted: int = 0                 # connections the proxy accepted
    upstream_failures: int = 0        # accepted, but the server could not be reached (closed at once)
    cuts: int = 0                     # cut moments at which at least one connection was open
    idle_cuts: int = 0                # cut moments with nothing to cut (the client was between connections)
    connections_cut: int = 0
    refusals: int = 0                 # times the proxy stopped listening
    refused_s: float = 0.0            # total time not listening
    bytes_up: int = 0                 # client -> server
    bytes_down: int = 0               # server -> client
    answered: list[tuple[float, float]] = field(default_factory=list)   # (first server byte, close), monotonic

    def outages(self) -> list[float]:
        """Seconds from the end of each answered connection to the first answer on the next one."""
        spans = sorted(self.answered)
        gaps, end = [], None
        for start, stop in spans:
            if end is not None and start > end:
                gaps.append(start - end)
            end = stop if end is None else max(end, stop)
        return gaps


class _Link:
    """One client connection and its server connection."""

    def __init__(self, client: asyncio.StreamWriter, server: asyncio.StreamWriter) -> None:
        self.client = client
        self.server = server
        self.answered_at: float | None = None
        self.closed = False

    def abort(self) -> None:
        self.closed = True
        self.client.transport.abort()
        self.server.transport.abort()


class CuttingProxy:
    """Forward ``listen_host:port`` to ``target_host:target_port`` on its own thread and event loop."""

    def __init__(self, target_host: str, target_port: int, plan: CutPlan, *, listen_host: str = "127.0.0.1",
                 listen_port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.plan = plan
        self.listen_host = listen_host
        self.port = listen_port
        self._rng = random.Random(plan.seed)
        self._stats = LinkStats()
        self._lock = threading.Lock()
        self._links: set[_Link] = set()
        self._server: asyncio.AbstractServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="cutting-proxy", daemon=True)

    # ------------------------------------------------------------ API

    def start(self) -> "CuttingProxy":
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"cutting proxy did not start listening on {self.listen_host}:{self.port}")
        if self._error is not None:
            raise RuntimeError(f"cutting proxy on {self.listen_host}:{self.port}: {self._error}") from self._error
        return self

    def stats(self) -> LinkStats:
        """A copy of the counters so far."""
        with self._lock:
            return replace(self._stats, answered=list(self._stats.answered))

    def stop(self) -> LinkStats:
        """Stop cutting, close every connection; the final counters. Raises when the proxy failed on the way."""
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)
        if self._error is not None:
            raise RuntimeError(f"cutting proxy on {self.listen_host}:{self.port} failed: {self._error}")
        return self.stats()

    # ------------------------------------------------------------ event loop

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:      # reported by start(); the thread must not die silently
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        await self._listen()
        self._ready.set()
        cutter = asyncio.create_task(self._cut_loop())
        await self._stop.wait()
        cutter.cancel()
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.abort()
        await asyncio.sleep(0)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.listen_host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _cut_loop(self) -> None:
        plan = self.plan
        try:
            while True:
                await asyncio.sleep(self._rng.uniform(*plan.cut_every_s))
                self._cut_all()
                if self._rng.random() < plan.refuse_chance:
                    await self._refuse(self._rng.uniform(*plan.refuse_for_s))
        except OSError as exc:            # e.g. the port was taken while not listening: stop() reports it
            self._error = exc
            self._stop.set()

    def _cut_all(self) -> None:
        links = list(self._links)
        with self._lock:
            if links:
                self._stats.cuts += 1
                self._stats.connections_cut += len(links)
            else:
                self._stats.idle_cuts += 1
        for link in links:
            link.abort()

    async def _refuse(self, seconds: float) -> None:
        """Stop listening (connects get ECONNREFUSED), then listen on the same port again."""
        assert self._server is not None
        self._server.close()
        started = time.monotonic()
        await asyncio.sleep(seconds)
        await self._listen()
        with self._lock:
            self._stats.refusals += 1
            self._stats.refused_s += time.monotonic() - started

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        with self._lock:
            self._stats.accepted += 1
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            with self._lock:
                self._stats.upstream_failures += 1
            client_writer.transport.abort()
            return
        link = _Link(client_writer, server_writer)
        self._links.add(link)
        try:
            await asyncio.gather(self._pipe(client_reader, server_writer, link, up=True),
                                 self._pipe(server_reader, client_writer, link, up=False))
        except asyncio.CancelledError:
            pass       # the proxy is stopping; on Python 3.11 a cancelled handler is logged as an error by asyncio
        finally:
            self._links.discard(link)
            link.abort()
            if link.answered_at is not None:
                with self._lock:
                    self._stats.answered.append((link.answered_at, time.monotonic()))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link, *, up: bool) -> None:
        """Copy one direction, each chunk ``delay_s`` late, until EOF or an error; then close both sides
        (MQTT never half-closes). On EOF what is on the way is delivered first; on a cut it is dropped."""
        on_the_way: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        sender = asyncio.create_task(self._deliver(on_the_way, writer, link, up=up))
        try:
            while data := await reader.read(65536):
                on_the_way.put_nowait((time.monotonic() + self.plan.delay_s, data))
        except (ConnectionError, OSError):
            pass
        finally:
            on_the_way.put_nowait(None)
            await sender
            link.abort()

    async def _deliver(self, on_the_way: asyncio.Queue, writer: asyncio.StreamWriter, link: _Link, *, up: bool) -> None:
        try:
            while (item := await on_the_way.get()) is not None:
                due, data = item
                if (wait := due - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                if link.closed:
                    return
                if not up and link.answered_at is None:
                    link.answered_at = time.monotonic()
                with self._lock:
                    if up:
                        self._stats.bytes_up += len(data)
                    else:
                        self._stats.bytes_down += len(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            link.abort()
