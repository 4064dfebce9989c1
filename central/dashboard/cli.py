"""``python -m central dashboard``: subscribe to the warehouse's MQTT topics and serve the live page.

A thin CLI over ``central.dashboard.server.Dashboard``; docs/dashboard.md shows how to run it.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from contract.broker import add_broker_args, settings_from_args
from contract.secrets import SecretFileError, first_line

DESCRIPTION = ("Central dashboard: every station's status, results, decisions, stats and QC alerts, and the "
               "rollout events, live from MQTT")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m central dashboard", description=DESCRIPTION)
    add_dashboard_args(parser)
    return parser


def add_dashboard_args(parser: argparse.ArgumentParser) -> None:
    add_broker_args(parser, client_id_help="MQTT client id (default dashboard-<host>-<pid>)")
    web = parser.add_argument_group("web page")
    web.add_argument("--host", default="127.0.0.1", help="address the page is served on (default 127.0.0.1)")
    web.add_argument("--port", type=int, default=8090, help="port of the page (default 8090; 0: any free port)")
    web.add_argument("--web-user", default="viewer", help="user name the page asks for (default viewer)")
    auth = web.add_mutually_exclusive_group()
    auth.add_argument("--web-password-file", type=Path, default=None,
                      help="file whose first line is the page's password: HTTP Basic authentication on every path "
                           "but /healthz (default: a random password, made at start and written to "
                           "--web-password-out)")
    auth.add_argument("--no-auth", action="store_true",
                      help="serve the page to anyone who can reach it, without a password (local development only)")
    web.add_argument("--web-password-out", type=Path, default=None,
                     help="where the password made at start is written, mode 0600 (default "
                          "$XDG_STATE_HOME/inventory/dashboard-web.password, else ~/.local/state/inventory/...)")
    web.add_argument("--web-tls-cert", type=Path, default=None, help="serve the page over HTTPS with this certificate")
    web.add_argument("--web-tls-key", type=Path, default=None, help="its private key")
    web.add_argument("--push-interval", type=float, default=0.25,
                     help="seconds between pushes to the page; changes in between are merged (default 0.25)")
    keep = parser.add_argument_group("what is kept")
    keep.add_argument("--recent", type=int, default=20, help="results and decisions kept per station (default 20)")
    keep.add_argument("--history", type=int, default=120, help="stats points per station for the chart (default 120)")
    keep.add_argument("--stale-factor", type=float, default=3.0,
                      help="an online station is stale after this many stats intervals without stats (default 3)")
    keep.add_argument("--stale-min-s", type=float, default=5.0, help="... and never sooner than this (default 5 s)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def build(args: argparse.Namespace) -> Any:
    from central.dashboard.server import Dashboard
    from central.dashboard.state import StateLimits

    for flag, value in (("--recent", args.recent), ("--history", args.history)):
        if value < 1:
            raise ValueError(f"{flag}: must be at least 1, got {value}")
    for flag, value, ok, want in (("--push-interval", args.push_interval, 0 < args.push_interval <= 60, "(0, 60]"),
                                  ("--stale-factor", args.stale_factor, 0 < args.stale_factor <= 1000, "(0, 1000]"),
                                  ("--stale-min-s", args.stale_min_s, 0 <= args.stale_min_s <= 86400, "[0, 86400]")):
        if not (math.isfinite(value) and ok):     # NaN passed "<= 0": a busy push loop, no station ever stale
            raise ValueError(f"{flag}: expected a finite number in {want}, got {value}")
    settings = settings_from_args(args)
    limits = StateLimits(recent=args.recent, history=args.history, stale_factor=args.stale_factor,
                         stale_min_s=args.stale_min_s)
    web_auth = None
    if args.web_password_file is not None:
        try:
            web_auth = (args.web_user, first_line(args.web_password_file))
        except SecretFileError as exc:
            raise ValueError(f"--web-password-file: {exc}") from None
    elif not args.no_auth:
        web_auth = (args.web_user, made_password(args.web_password_out or default_password_out(), args.web_user))
    return Dashboard(settings, host=args.host, port=args.port, limits=limits, push_interval_s=args.push_interval,
                     web_auth=web_auth, no_auth=args.no_auth, tls_cert=args.web_tls_cert, tls_key=args.web_tls_key)


def default_password_out() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state) / "inventory" / "dashboard-web.password"


def made_password(path: Path, user: str) -> str:
    """A random page password, written to ``path`` (0600) for the operator to read; ValueError naming the file."""
    from central.http import generated_secret

    try:
        password = generated_secret(path)
    except OSError as exc:
        raise ValueError(f"--web-password-out {path}: cannot write the page's password ({exc.strerror or exc}); "
                         "give one with --web-password-file") from None
    logging.getLogger(__name__).warning("dashboard: the page asks for user %r and the password written to %s "
                                        "(mode 0600)", user, path)
    return password


def main(argv: list[str] | None = None) -> int:
    return cmd_dashboard(get_args_parser().parse_args(argv))


def cmd_dashboard(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        dashboard = build(args)
    except OSError as exc:
        print(f"dashboard: cannot serve on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except ValueError as exc:          # BrokerSettingsError included: names the flag and the file
        print(f"dashboard: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        logging.getLogger(__name__).info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    dashboard.start()
    who = f"user {dashboard.web_auth[0]!r}" if dashboard.web_auth else "NO AUTHENTICATION"
    print(f"dashboard: {dashboard.url} ({who}; MQTT {dashboard.feed.settings.where()})", flush=True)
    stop.wait()
    dashboard.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
