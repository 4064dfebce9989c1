"""Rollout and rollback: ``cmd/model`` to a canary, wait for its status and watch its stats, then the rest;
back to an earlier version on request. Every step is a ``rollout-event.v1`` event."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from central.rollout.canary import Verdict, WatchPolicy, judge_canary
from central.rollout.history import RolloutHistory
from central.rollout.link import StationLink, StationView
from central.rollout.remote import RemoteBundle, resolve_bundle, sibling_location
from contract.events import EventSink, RolloutError, make_event

log = logging.getLogger(__name__)


@dataclass
class StationOutcome:
    station: str
    before: str | None
    after: str | None
    ok: bool
    reason: str | None
    role: str = "rest"     # canary | rest


@dataclass
class Summary:
    action: str
    bundle: RemoteBundle
    outcomes: list[StationOutcome] = field(default_factory=list)
    halted: str | None = None
    canary: Verdict | None = None
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.halted is None and all(o.ok for o in self.outcomes)

    def table(self) -> str:
        rows = [("station", "role", "before", "now", "outcome")]
        for o in self.outcomes:
            rows.append((o.station, o.role, o.before or "-", o.after or "-",
                         "ok" if o.ok else f"FAILED: {o.reason}"))
        for station, why in sorted(self.skipped.items()):
            rows.append((station, "-", "-", "-", f"skipped: {why}"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
        head = f"{self.action} {self.bundle.name} {self.bundle.version}: " + (
            f"HALTED: {self.halted}" if self.halted else ("done" if self.ok else "finished with failures"))
        return "\n".join([head, *lines])


@dataclass(frozen=True)
class RolloutPlan:
    bundle: RemoteBundle
    stations: list[str]
    canary: str | None
    policy: WatchPolicy | None           # None: no watch (a rollback by default)
    update_timeout_s: float = 300.0
    rollback_canary: bool = True
    action: str = "rollout"              # rollout | rollback


def select_stations(link: StationLink, *, stations: Sequence[str] = (), group: Path | None = None,
                    all_stations: bool = False) -> tuple[list[str], dict[str, str]]:
    """The stations named, listed in a group file (one <site>/<station> a line, # comments), or every
    station with a retained status (online ones; offline ones are returned as skipped)."""
    chosen: list[str] = list(stations)
    if group is not None:
        try:
            lines = Path(group).read_text().splitlines()
        except OSError as exc:
            raise RolloutError(f"{group}: cannot read the station group ({exc.strerror or exc})") from exc
        for n, line in enumerate(lines, 1):
            line = line.split("#", 1)[0].strip()
            if line:
                if line.count("/") != 1:
                    raise RolloutError(f"{group}:{n}: expected <site>/<station>, got {line!r}")
                chosen.append(line)
    skipped: dict[str, str] = {}
    if all_stations:
        for station in link.known_stations():
            if link.snapshot(station).online:
                chosen.append(station)
            else:
                skipped[station] = "offline (its retained status says so); it gets no command"
    for station in chosen:
        if station.count("/") != 1 or not all(station.split("/")):
            raise RolloutError(f"station {station!r}: expected <site>/<station>")
    seen: dict[str, None] = dict.fromkeys(chosen)
    if not seen:
        raise RolloutError("no stations: name them (--stations), list them (--group FILE) or use --all")
    return list(seen), skipped


class Rollout:
    """Runs a plan over a StationLink; emits events and writes the history as it goes."""

    def __init__(self, link: StationLink, plan: RolloutPlan, history: RolloutHistory, events: EventSink) -> None:
        self.link, self.plan, self.history, self.events = link, plan, history, events
        self.summary = Summary(plan.action, plan.bundle)

    def _emit(self, action: str, ok: bool, reason: str | None, stations: Sequence[str], figures=None,
              model: dict[str, str] | None = None) -> None:
        self.events.emit(make_event(action, model or self.plan.bundle.model, ok=ok, reason=reason,
                                    stations=stations, figures=figures))

    def run(self) -> Summary:
        plan = self.plan
        if plan.policy is not None and plan.canary:
            self.link.follow_stats([plan.canary])
            self._baseline = self._gather_baseline(plan.canary, plan.policy.baseline_s)
        rest = [s for s in plan.stations if s != plan.canary]
        if plan.canary:
            if not self._canary(plan.canary):
                return self.summary
        outcomes = self._switch(rest, "rest")
        failed = [o for o in outcomes if not o.ok]
        all_done = [o.station for o in self.summary.outcomes]
        figures = {"versions": {o.station: o.after for o in self.summary.outcomes},
                   "failed": {o.station: o.reason for o in failed}}
        reason = (f"{len(all_done) - len(failed)} of {len(all_done)} station(s) run {plan.bundle.version}"
                  + (f"; failed: {', '.join(o.station for o in failed)}" if failed else ""))
        self._emit(plan.action, not failed, reason, all_done, figures)
        return self.summary

    def _gather_baseline(self, canary: str, seconds: float) -> list[dict[str, Any]]:
        if seconds > 0:
            log.info("gathering %.0f s of %s stats before the update", seconds, canary)
            time.sleep(seconds)
        return [s for _, s in self.link.snapshot(canary).stats]

    def _canary(self, canary: str) -> bool:
        plan = self.plan
        sent_at = self.link.clock()
        [outcome] = self._switch([canary], "canary")
        if not outcome.ok:
            self._halt(f"canary {canary}: {outcome.reason}", [canary])
            return False
        if plan.policy is not None and outcome.before == plan.bundle.version:
            # already on it (an earlier run reached it): its stats judge the version against itself, and a
            # failed watch would "roll back" to the same version
            self._halt(f"canary {canary} already runs {plan.bundle.version}: its stats are no baseline for it; "
                       f"name another canary, or roll it back first ('python -m central rollback')", [canary])
            return False
        self._emit("canary", True, f"{canary} runs {plan.bundle.version}"
                   + (f"; watching it for {plan.policy.watch_s:.0f} s" if plan.policy else ""), [canary],
                   {"before": outcome.before, "after": outcome.after})
        if plan.policy is None:
            return True
        verdict = self._watch(canary, sent_at)
        self.summary.canary = verdict
        if not verdict.ok:
            reason = f"canary {canary}: {verdict.reason}"
            rolled = self._rollback_canary(canary, outcome.before) if plan.rollback_canary else None
            self._halt(reason + (f"; {rolled}" if rolled else ""), [canary], verdict.figures)
            return False
        self._emit("canary", True, f"{canary} passed the watch: {verdict.reason}", [canary], verdict.figures)
        return True

    def _watch(self, canary: str, sent_at: float) -> Verdict:
        policy = self.plan.policy
        assert policy is not None
        deadline = self.link.clock() + policy.watch_s
        while self.link.clock() < deadline:
            view = self.link.snapshot(canary)
            if not view.online:
                return Verdict(False, "went offline during the watch", {"watch_s": policy.watch_s})
            if view.version != self.plan.bundle.version:
                return Verdict(False, f"reports version {view.version} during the watch", {})
            after = [s for t, s in view.stats if t >= sent_at]
            early = judge_canary(self._baseline, after, self.plan.bundle.version,
                                 WatchPolicy(policy.watch_s, None, 1.0, policy.max_errors, 0))
            if not early.ok:              # too many errors: no need to wait for the end
                return early
            time.sleep(min(0.25, max(0.0, deadline - self.link.clock())))
        after = [s for t, s in self.link.snapshot(canary).stats if t >= sent_at]
        return judge_canary(self._baseline, after, self.plan.bundle.version, policy)

    def _rollback_canary(self, canary: str, before: str | None) -> str:
        if before is None or before == self.plan.bundle.version:
            return "its previous version is unknown: roll it back with 'python -m central rollback'"
        try:
            location = self.history.location_of(before, canary) or sibling_location(self.plan.bundle.location, before)
            previous = resolve_bundle(location)
            if previous.version != before:
                raise RolloutError(f"{location} holds {previous.version}, not {before}")
        except RolloutError as exc:
            return f"could not roll it back to {before} ({exc}); use 'python -m central rollback --to {before}'"
        back = _SwitchTo(self, previous, "rollback").run([canary], "canary")[0]
        self._emit("rollback", back.ok, f"canary {canary} back on {before}" if back.ok else back.reason, [canary],
                   {"before": back.before, "after": back.after}, model=previous.model)
        return f"rolled back to {before}" if back.ok else f"rollback to {before} failed: {back.reason}"

    def _halt(self, reason: str, stations: Sequence[str], figures: dict[str, Any] | None = None) -> None:
        self.summary.halted = reason
        untouched = [s for s in self.plan.stations if s not in stations]
        self._emit("halt", False, reason + (f"; not sent to {', '.join(untouched)}" if untouched else ""),
                   stations, {**(figures or {}), "not_sent": untouched})

    def _switch(self, stations: Sequence[str], role: str) -> list[StationOutcome]:
        outcomes = _SwitchTo(self, self.plan.bundle, self.plan.action).run(stations, role)
        self.summary.outcomes.extend(outcomes)
        return outcomes


class _SwitchTo:
    """Send one bundle to some stations at once, then wait for each to report it (or refuse it)."""

    def __init__(self, rollout: Rollout, bundle: RemoteBundle, action: str) -> None:
        self.r, self.bundle, self.action = rollout, bundle, action

    def run(self, stations: Sequence[str], role: str) -> list[StationOutcome]:
        link, version = self.r.link, self.bundle.version
        before = {s: link.snapshot(s) for s in stations}
        outcomes: dict[str, StationOutcome] = {}
        for s in stations:
            view = before[s]
            if view.status is None:
                outcomes[s] = StationOutcome(s, None, None, False, "no retained status: unknown or never connected", role)
            elif view.version == version:
                outcomes[s] = StationOutcome(s, view.version, view.version, True, None, role)
        pending = [s for s in stations if s not in outcomes]
        for s in pending:
            link.send_model(s, self.bundle)
            log.info("cmd/model %s -> %s", version, s)
        deadline = link.clock() + self.r.plan.update_timeout_s
        for s in pending:
            answer = link.wait_until(lambda s=s: self._answer(s, before[s]), max(0.0, deadline - link.clock()))
            view = link.snapshot(s)
            if answer is None:
                outcomes[s] = StationOutcome(s, before[s].version, view.version, False,
                                             f"no status reporting {version} within {self.r.plan.update_timeout_s:.0f} s "
                                             f"(state {(view.status or {}).get('state')}, version {view.version})", role)
            else:
                ok, reason = answer
                outcomes[s] = StationOutcome(s, before[s].version, view.version, ok, reason, role)
            o = outcomes[s]
            self.r.history.record(s, action=self.action, bundle=self.bundle, from_version=o.before, ok=o.ok,
                                  reason=o.reason)
        return [outcomes[s] for s in stations]

    def _answer(self, station: str, before: StationView) -> tuple[bool, str | None] | None:
        view = self.r.link.views.get(station)       # called under the link's lock
        if view is None or view.status is None:
            return None
        if view.online and view.version == self.bundle.version:
            return True, None
        update = view.last_update
        if update and update != before.last_update and update.get("ok") is False:
            return False, f"the station refused {self.bundle.version}: {update.get('reason')}"
        return None


def run_rollout(link: StationLink, plan: RolloutPlan, history: RolloutHistory, events: EventSink) -> Summary:
    return Rollout(link, plan, history, events).run()


def rollback_targets(link: StationLink, history: RolloutHistory, stations: Sequence[str], to: str,
                     bundle_location: str | None) -> tuple[dict[str, RemoteBundle], dict[str, str]]:
    """Per station, the published bundle to go back to: ``to`` a version, or ``previous`` from the history."""
    targets: dict[str, RemoteBundle] = {}
    problems: dict[str, str] = {}
    resolved: dict[str, RemoteBundle] = {}
    for s in stations:
        current = link.snapshot(s).version
        version = history.previous_version(s, current) if to == "previous" else to
        if version is None:
            problems[s] = (f"the history {history.path} has no version before {current} for this station; "
                           "name one with --to VERSION")
            continue
        location = bundle_location or history.location_of(version, s)
        if location is None:
            problems[s] = f"no published location of {version} in {history.path}; pass --bundle-url"
            continue
        try:
            bundle = resolved.get(location) or resolve_bundle(location)
        except RolloutError as exc:
            problems[s] = str(exc)
            continue
        resolved[location] = bundle
        if bundle.version != version:
            problems[s] = f"{location} holds version {bundle.version}, not {version}"
            continue
        targets[s] = bundle
    return targets, problems


def run_rollback(link: StationLink, history: RolloutHistory, events: EventSink, stations: Sequence[str], to: str,
                 *, bundle_location: str | None = None, update_timeout_s: float = 300.0) -> list[Summary]:
    """Send stations back to an earlier version, one group per target bundle.

    A station whose target cannot be found (no history, not published) gets no command: a halt
    event says why, and it is listed as failed in the last summary.
    """
    targets, problems = rollback_targets(link, history, stations, to, bundle_location)
    groups: dict[str, list[str]] = {}
    for station, bundle in targets.items():
        groups.setdefault(bundle.location, []).append(station)
    summaries = []
    for members in groups.values():
        plan = RolloutPlan(targets[members[0]], members, None, None, update_timeout_s, action="rollback")
        summaries.append(Rollout(link, plan, history, events).run())
    if problems:
        model = {"name": next(iter(targets.values())).name if targets else "unknown", "version": to}
        events.emit(make_event("halt", model, ok=False, stations=sorted(problems), figures={"problems": problems},
                               reason="rollback not sent to " + "; ".join(f"{s}: {why}" for s, why in problems.items())))
        failed = summaries[-1] if summaries else Summary("rollback", RemoteBundle("", model["name"], to, "", {}))
        failed.outcomes.extend(StationOutcome(s, link.snapshot(s).version, link.snapshot(s).version, False, why)
                               for s, why in problems.items())
        if not summaries:
            summaries.append(failed)
    return summaries
