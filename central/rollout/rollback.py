"""Rollback: send stations back to an earlier published version of the model each runs.

The target is always a model (name and version), never a version string alone: ``--to 1`` for a station
running shelf 2 means shelf 1, and ``previous`` is the model the history says the station ran before its
current one. A bundle found for a target must hold exactly that model; a rollback never switches a
station to another model because its version string matched (that is a rollout).
"""

from __future__ import annotations

from typing import Sequence

from central.rollout.history import RolloutHistory
from central.rollout.link import StationLink
from central.rollout.remote import RemoteBundle, resolve_bundle
from central.rollout.run import Rollout, RolloutPlan, StationOutcome, Summary
from contract.events import EventSink, RolloutError, make_event


def _target_model(link: StationLink, history: RolloutHistory, station: str, to: str) -> tuple[str, str] | str:
    """The (name, version) to go back to, or why there is none."""
    view = link.snapshot(station)
    current = view.model
    if current is None:
        return ("no retained status naming its model: what it runs is unknown" if view.status is None
                else "its status names no model: what it runs is unknown")
    if to != "previous":
        return current[0], to
    previous = history.previous_model(station, current)
    if previous is None:
        return (f"the history {history.path} has no version before {current[1]} for this station (model "
                f"{current[0]}); name one with --to VERSION")
    return previous


def rollback_targets(link: StationLink, history: RolloutHistory, stations: Sequence[str], to: str,
                     bundle_location: str | None) -> tuple[dict[str, RemoteBundle], dict[str, str]]:
    """Per station, the published bundle to go back to: the model it runs at version ``to``, or ``previous``
    (from the history); and per station without one, why."""
    targets: dict[str, RemoteBundle] = {}
    problems: dict[str, str] = {}
    resolved: dict[str, RemoteBundle] = {}
    for s in stations:
        wanted = _target_model(link, history, s, to)
        if isinstance(wanted, str):
            problems[s] = wanted
            continue
        name, version = wanted
        location = bundle_location or history.location_of(name, version, s)
        if location is None:
            problems[s] = f"no published location of {name} {version} in {history.path}; pass --bundle-url"
            continue
        try:
            bundle = resolved.get(location) or resolve_bundle(location)
        except RolloutError as exc:
            problems[s] = str(exc)
            continue
        resolved[location] = bundle
        if (bundle.name, bundle.version) != (name, version):
            problems[s] = (f"{location} holds {bundle.name} {bundle.version}, not {name} {version}"
                           + (" (a rollback never switches a station to another model: that is a rollout)"
                              if bundle.name != name else ""))
            continue
        targets[s] = bundle
    return targets, problems


def run_rollback(link: StationLink, history: RolloutHistory, events: EventSink, stations: Sequence[str], to: str,
                 *, bundle_location: str | None = None, update_timeout_s: float = 300.0,
                 skipped: dict[str, str] | None = None) -> list[Summary]:
    """Send stations back to an earlier version, one group per target bundle.

    A station whose target cannot be found (no history, not published, another model) gets no command: a
    halt event says why, and it is listed as failed in the last summary. ``skipped``: stations chosen but
    left out (offline under ``--all``); each summary lists them and is not ok.
    """
    targets, problems = rollback_targets(link, history, stations, to, bundle_location)
    groups: dict[str, list[str]] = {}
    for station, bundle in targets.items():
        groups.setdefault(bundle.location, []).append(station)
    summaries = []
    for members in groups.values():
        plan = RolloutPlan(targets[members[0]], members, None, None, update_timeout_s, action="rollback",
                           skipped=dict(skipped or {}))
        summaries.append(Rollout(link, plan, history, events).run())
    if problems:
        model = {"name": next(iter(targets.values())).name if targets else "unknown", "version": to}
        reason = "rollback not sent to " + "; ".join(f"{s}: {why}" for s, why in problems.items())
        failed = summaries[-1] if summaries else Summary("rollback", RemoteBundle("", model["name"], to, "", {}),
                                                         skipped=dict(skipped or {}))
        try:
            events.emit(make_event("halt", model, ok=False, stations=sorted(problems),
                                   figures={"problems": problems}, reason=reason))
        except RolloutError as exc:      # the broker connection dropped: the summary still says who got nothing
            failed.undelivered.append(f"the halt event did not reach the dashboard ({exc})")
        for s, why in problems.items():
            view = link.snapshot(s)
            failed.outcomes.append(StationOutcome(s, view.version, view.version, False, why, "rest", view.model_name,
                                                  view.model_name, sent=False))
        if not summaries:
            summaries.append(failed)
    return summaries
