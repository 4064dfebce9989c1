"""``python -m central publish | serve-bundles | rollout | rollback``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urljoin

from central.rollout.canary import WatchPolicy, count_problem, rate_problem, seconds_problem
from central.rollout.history import RolloutHistory
from central.rollout.link import StationLink
from central.rollout.publish import BundleServer, publish_bundle
from central.rollout.remote import resolve_bundle
from central.rollout.rollback import run_rollback
from central.rollout.run import RolloutPlan, run_rollout
from central.rollout.stations import check_station, read_group, select_stations, split_by_model
from contract.broker import add_broker_args, settings_from_args
from contract.events import EventSink, RolloutError, make_event, publish_event_once
from contract.messages import rollout_topic

log = logging.getLogger(__name__)


def add_mqtt_args(p: argparse.ArgumentParser, *, required: bool) -> None:
    add_broker_args(p, required=required, default_host=None,
                    title="broker" + ("" if required else " (events are published when --mqtt-host is given)"))


def _checked(convert: Callable[[str], Any], problem: Callable[[Any], str | None], kind: str) -> Callable[[str], Any]:
    """An argparse type: ``convert`` the text, then refuse what ``problem`` names; argparse prefixes the flag, so a
    NaN, a negative or a percent typed as 30 stops the command before it connects or sends anything."""
    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
        why = problem(value)
        if why:
            raise argparse.ArgumentTypeError(why)
        return value
    parse.__name__ = kind          # argparse names the type in some of its messages
    return parse


SECONDS = _checked(float, seconds_problem, "seconds")
POSITIVE_SECONDS = _checked(float, lambda v: seconds_problem(v, positive=True), "seconds")
RATE = _checked(float, rate_problem, "a rate from 0 to 1")
COUNT = _checked(int, count_problem, "a whole number")


def _version_problem(text: str) -> str | None:
    from contract.bundle import NAME_PATTERN

    if text == "previous" or NAME_PATTERN.fullmatch(text):
        return None
    return (f"expected 'previous' or a bundle version (letters, digits, '.', '_', '-'; first a letter or digit; "
            f"at most 128), got {text[:140]!r}")


def _base_url_problem(text: str) -> str | None:
    from urllib.parse import urlparse

    try:
        parsed = urlparse(text)
        parsed.port                 # noqa: B018 (a port that is not a number raises here)
    except ValueError as exc:
        return f"{text[:200]!r} is not a URL ({exc})"
    if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.query or parsed.fragment:
        return (f"expected the served root's http(s)://HOST[:PORT][/PATH] (what serve-bundles serves), "
                f"got {text[:200]!r}")
    return None


VERSION = _checked(str, _version_problem, "a version")
BASE_URL = _checked(str, _base_url_problem, "a URL")


def add_rollout_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("publish", help="copy a promoted bundle into the served tree stations fetch from")
    p.add_argument("bundle", type=Path, help="models/<name>/<version>")
    p.add_argument("--root", type=Path, required=True, help="the served tree (what serve-bundles serves)")
    p.add_argument("--baseline", action="store_true",
                   help="the first version of a model, exported by 'trainer export' (never gated)")
    p.add_argument("--public-key", type=Path, default=None, help="check the bundle's signature with this key")
    p.add_argument("--base-url", type=BASE_URL, default=None,
                   help="URL of the served root, to print the bundle's URL")
    add_mqtt_args(p, required=False)

    p = sub.add_parser("serve-bundles", help="serve the published tree over HTTP for cmd/model")
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--host", default="0.0.0.0", help="address to bind")
    p.add_argument("--port", type=int, default=8070)
    p.add_argument("--tls-cert", type=Path, default=None, help="serve HTTPS with this certificate (PEM)")
    p.add_argument("--tls-key", type=Path, default=None)

    for verb in ("rollout", "rollback"):
        p = sub.add_parser(verb, help="send cmd/model to a canary, watch it, then the rest" if verb == "rollout"
                           else "send stations back to an earlier published version")
        who = p.add_mutually_exclusive_group(required=True)
        who.add_argument("--stations", default=None, help="comma-separated <site>/<station>")
        who.add_argument("--group", type=Path, default=None, help="file: one <site>/<station> a line")
        who.add_argument("--all", dest="all_stations", action="store_true",
                         help="every station with an online retained status" + (
                             " running the bundle's model (others are listed, not sent)" if verb == "rollout"
                             else ""))
        if verb == "rollout":
            p.add_argument("--bundle-url", required=True,
                           help="published bundle: http(s)://.../<name>/<version>/ or path")
            p.add_argument("--canary", default=None, help="<site>/<station> first (default: the first station)")
            p.add_argument("--no-canary", action="store_true", help="send to every station at once, no watch")
            p.add_argument("--watch-s", type=SECONDS, default=120.0, help="how long the canary is watched")
            p.add_argument("--baseline-s", type=SECONDS, default=30.0,
                           help="stats gathered before the command for the 'before' low-confidence rate; the "
                                "rollout halts, sending nothing, when none arrive")
            p.add_argument("--max-low-conf-rate", type=RATE, default=None, help="halt above this rate (0..1)")
            p.add_argument("--max-low-conf-increase", type=RATE, default=0.05,
                           help="halt when the rate rises more than this over the rate before (0..1; 1 turns "
                                "the rule off, and with it the need for a baseline)")
            p.add_argument("--max-errors", type=COUNT, default=0, help="inference errors the canary may have")
            p.add_argument("--min-frames", type=COUNT, default=20,
                           help="frames the canary must classify to be judged")
            p.add_argument("--rollback-canary", action=argparse.BooleanOptionalAction, default=True,
                           help="send a canary that failed its watch back to its previous version")
        else:
            p.add_argument("--to", type=VERSION, default="previous",
                           help="VERSION, or 'previous' (per station, from the history)")
            p.add_argument("--bundle-url", default=None, help="where that version is published (default: history)")
        p.add_argument("--update-timeout-s", type=POSITIVE_SECONDS, default=300.0,
                       help="how long a station may take to fetch, verify and switch")
        p.add_argument("--history", type=Path, default=Path("rollout-history.json"),
                       help="per-station record of versions and bundle URLs")
        add_mqtt_args(p, required=True)


def cmd_publish(args: argparse.Namespace) -> int:
    result = publish_bundle(args.bundle, args.root, baseline=args.baseline, public_key=args.public_key)
    url = urljoin(args.base_url if args.base_url.endswith("/") else args.base_url + "/", result.url_path) \
        if args.base_url else result.url_path
    print(f"{'already published' if result.already else 'published'} {result.name} {result.version} "
          f"({result.decision}) at {result.path}")
    print(f"bundle URL  {url}\nsha256      {result.sha256}  (of manifest.json)")
    # Sent again for a version already published: a first run whose broker was down copied the bundle and lost
    # its event; the run that repeats it is the one that tells the dashboard (an event is idempotent by content).
    publish_event_once(settings_from_args(args), make_event(
        "publish", {"name": result.name, "version": result.version}, ok=True,
        reason=f"{'already published' if result.already else 'published'} ({result.decision}) as {url}",
        figures={"manifest_sha256": result.sha256, "decision": result.decision, "already": result.already}))
    return 0


def cmd_serve_bundles(args: argparse.Namespace) -> int:
    try:
        server = BundleServer(args.root, args.host, args.port, tls_cert=args.tls_cert, tls_key=args.tls_key)
    except OSError as exc:
        raise RolloutError(f"--host {args.host} --port {args.port}: cannot listen ({exc.strerror or exc})") from None
    print(f"serving {args.root} at {server.url} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.stop()
    return 0


def _connect_link(args) -> tuple[StationLink, EventSink]:
    options = settings_from_args(args)
    assert options is not None
    link = StationLink(options).connect()
    link.settle()
    return link, EventSink(link.client, rollout_topic(options.topic_root))


def cmd_rollout(args: argparse.Namespace) -> int:
    named = [check_station(s, "--stations") for s in _split(args.stations)]
    if args.canary is not None:
        check_station(args.canary, "--canary")
    policy = None if args.no_canary else WatchPolicy(args.watch_s, args.max_low_conf_rate,
                                                     args.max_low_conf_increase, args.max_errors,
                                                     args.min_frames, args.baseline_s)
    named += read_group(args.group) if args.group is not None else []     # a bad file is named before connecting
    history = RolloutHistory(args.history)          # a damaged history is named before anything is sent
    bundle = resolve_bundle(args.bundle_url)
    link, events = _connect_link(args)
    try:
        stations, skipped = select_stations(link, stations=named, all_stations=args.all_stations)
        others: dict[str, str] = {}
        if args.all_stations:
            stations, others = split_by_model(link, stations, bundle.name)
            _, offline_others = split_by_model(link, list(skipped), bundle.name)
            for station, why in offline_others.items():     # not this model's: never counted as skipped
                others[station] = f"{skipped.pop(station)}; {why}"
        canary = None if args.no_canary else (args.canary or (stations[0] if stations else None))
        if canary is not None and canary not in stations:
            stations.insert(0, canary)
            others.pop(canary, None)          # named as the canary: chosen, whatever --all made of it
            skipped.pop(canary, None)
        if not stations:
            raise RolloutError(f"--all: no online station runs {bundle.name} ({len(others)} run another model); "
                               "name the stations to switch with --stations")
        plan = RolloutPlan(bundle, stations, canary, policy, args.update_timeout_s, args.rollback_canary,
                           skipped=skipped, other_model=others)
        summary = run_rollout(link, plan, history, events)
    finally:
        link.close()
    print(summary.table())
    return 0 if summary.ok else 1


def cmd_rollback(args: argparse.Namespace) -> int:
    named = [check_station(s, "--stations") for s in _split(args.stations)]
    named += read_group(args.group) if args.group is not None else []     # a bad file is named before connecting
    history = RolloutHistory(args.history)
    link, events = _connect_link(args)
    try:
        stations, skipped = select_stations(link, stations=named, all_stations=args.all_stations)
        summaries = run_rollback(link, history, events, stations, args.to, bundle_location=args.bundle_url,
                                 update_timeout_s=args.update_timeout_s, skipped=skipped)
    finally:
        link.close()
    for summary in summaries:
        print(summary.table())
    return 0 if summaries and all(s.ok for s in summaries) else 1


def _split(value: str | None) -> list[str]:
    return [s.strip() for s in value.split(",") if s.strip()] if value else []
