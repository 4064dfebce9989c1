"""Rollout: ``cmd/model`` to a canary, wait for its status and watch its stats, then the rest. Every step is a
``rollout-event.v1`` event. (Back to an earlier version on request: ``central.rollout.rollback``.)

A station "runs" a bundle when its status names the bundle's model name and version: two models may share
a version string, and a station of another model is never taken as already switched.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from central.rollout.canary import Verdict, WatchPolicy, judge_canary, rate_over, seconds_problem
from central.rollout.history import RolloutHistory
from central.rollout.link import CommandPending, StationLink, StationView
from central.rollout.remote import RemoteBundle, resolve_bundle, sibling_location
from central.rollout.stations import check_station, select_stations, split_by_model
from contract.events import EventSink, RolloutError, make_event

log = logging.getLogger(__name__)

__all__ = ["Rollout", "RolloutPlan", "StationOutcome", "Summary", "run_rollout", "select_stations", "split_by_model"]


@dataclass
class StationOutcome:
    station: str
    before: str | None
    after: str | None
    ok: bool
    reason: str | None
    role: str = "rest"     # canary | rest
    before_name: str | None = None       # the model names, where the station reported them
    after_name: str | None = None
    sent: bool = True      # False: the command never went out (the rollout halted first, or the broker refused it)


@dataclass
class Summary:
    action: str
    bundle: RemoteBundle
    outcomes: list[StationOutcome] = field(default_factory=list)
    halted: str | None = None
    canary: Verdict | None = None
    skipped: dict[str, str] = field(default_factory=dict)        # chosen but left out (offline): not on the version
    other_model: dict[str, str] = field(default_factory=dict)    # --all stations running another model: not sent
    undelivered: list[str] = field(default_factory=list)   # events the broker did not take (listed, not a failure)
    unrecorded: str | None = None        # why records are missing from --history at the end (a failure: exit 1)

    @property
    def ok(self) -> bool:
        """Every chosen station runs the target: no halt, no failure, none skipped (a station of another model
        that ``--all`` left alone is not one of the stations chosen)."""
        return (self.halted is None and all(o.ok for o in self.outcomes) and not self.skipped
                and self.unrecorded is None)

    def _label(self, name: str | None, version: str | None) -> str:
        if version is None:
            return "-"
        return version if name in (None, self.bundle.name) else f"{name} {version}"

    def table(self) -> str:
        rows = [("station", "role", "before", "now", "outcome")]
        for o in self.outcomes:
            outcome = "ok" if o.ok else (f"not sent: {o.reason}" if not o.sent else f"FAILED: {o.reason}")
            rows.append((o.station, o.role, self._label(o.before_name, o.before), self._label(o.after_name, o.after),
                         outcome))
        for station, why in sorted(self.skipped.items()):
            rows.append((station, "-", "-", "-", f"skipped: {why}"))
        for station, why in sorted(self.other_model.items()):
            rows.append((station, "-", "-", "-", f"not sent: {why}"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
        state = ("done" if self.ok else "finished with failures" if not all(o.ok for o in self.outcomes)
                 else f"done, but {len(self.skipped)} station(s) skipped" if self.skipped
                 else "done, but the history is incomplete")
        head = f"{self.action} {self.bundle.name} {self.bundle.version}: " + (
            f"HALTED: {self.halted}" if self.halted else state)
        notes = [f"NOT RECORDED: {why}" for why in self.undelivered]
        if self.unrecorded:
            notes.append(f"NOT RECORDED: {self.unrecorded}; a later 'rollback --to previous' cannot see these "
                         "switches (name the version with --to)")
        return "\n".join([head, *lines, *notes])


@dataclass(frozen=True)
class RolloutPlan:
    """What to send where; checked on construction, so a bad figure or name stops it before any command."""

    bundle: RemoteBundle
    stations: list[str]
    canary: str | None
    policy: WatchPolicy | None           # None: no watch (a rollback by default)
    update_timeout_s: float = 300.0
    rollback_canary: bool = True
    action: str = "rollout"              # rollout | rollback
    skipped: dict[str, str] = field(default_factory=dict)        # chosen (--all) but offline: reported, a failure
    other_model: dict[str, str] = field(default_factory=dict)    # --all stations of another model: reported

    def __post_init__(self) -> None:
        problem = seconds_problem(self.update_timeout_s, positive=True)
        if problem:
            raise RolloutError(f"update_timeout_s (--update-timeout-s): {problem}")
        if self.canary is not None:
            check_station(self.canary, "canary (--canary)")
        for station in self.stations:
            check_station(station, f"{self.action} station")


class Rollout:
    """Runs a plan over a StationLink; emits events and writes the history as it goes."""

    def __init__(self, link: StationLink, plan: RolloutPlan, history: RolloutHistory, events: EventSink) -> None:
        self.link, self.plan, self.history, self.events = link, plan, history, events
        self.summary = Summary(plan.action, plan.bundle, skipped=dict(plan.skipped),
                               other_model=dict(plan.other_model))
        self._baseline: list[dict[str, Any]] = []

    def _emit(self, action: str, ok: bool, reason: str | None, stations: Sequence[str], figures=None,
              model: dict[str, str] | None = None) -> None:
        """Publish an event; one the broker does not take (the connection dropped) is listed in the summary and the
        rollout goes on: what the stations were sent and run matters more than the dashboard's copy of it."""
        event = make_event(action, model or self.plan.bundle.model, ok=ok, reason=reason, stations=stations,
                           figures=figures)
        try:
            self.events.emit(event)
        except RolloutError as exc:
            log.warning("event %s not delivered: %s", action, exc)
            self.summary.undelivered.append(f"the {action} event did not reach the dashboard ({exc})")

    def run(self) -> Summary:
        plan = self.plan
        if plan.canary and not self._canary(plan.canary):
            return self.summary
        outcomes = self._switch([s for s in plan.stations if s != plan.canary], "rest")
        failed = [o for o in outcomes if not o.ok]
        all_done = [o.station for o in self.summary.outcomes]
        figures = {"versions": {o.station: o.after for o in self.summary.outcomes},
                   "failed": {o.station: o.reason for o in failed},
                   "skipped": dict(plan.skipped), "other_model": dict(plan.other_model)}
        reason = (f"{len(all_done) - len(failed)} of {len(all_done)} station(s) run {plan.bundle.version}"
                  + (f"; failed: {', '.join(o.station for o in failed)}" if failed else "")
                  + (f"; skipped (offline, no command): {', '.join(sorted(plan.skipped))}" if plan.skipped else "")
                  + (f"; left alone (another model): {', '.join(sorted(plan.other_model))}"
                     if plan.other_model else "")
                  + (f"; not in the rollout history: {self.summary.unrecorded}" if self.summary.unrecorded else ""))
        if self.summary.unrecorded:         # a later "rollback --to previous" cannot see these switches
            figures["unrecorded"] = self.summary.unrecorded
        self._emit(plan.action, not failed and not plan.skipped and not self.summary.unrecorded, reason, all_done,
                   figures)
        return self.summary

    # -- the canary
    def _canary(self, canary: str) -> bool:
        plan = self.plan
        if plan.policy is not None and not self._ready_to_judge(canary, plan.policy):
            return False
        sent_at = self.link.clock()
        [outcome] = self._switch([canary], "canary")
        if not outcome.ok:
            self._halt(f"canary {canary}: {outcome.reason}", [canary])
            return False
        self._emit("canary", True, f"{canary} runs {plan.bundle.version}"
                   + (f"; watching it for {plan.policy.watch_s:.0f} s" if plan.policy else ""), [canary],
                   {"before": outcome.before, "after": outcome.after})
        if plan.policy is None:
            return True
        verdict = self._watch(canary, sent_at)
        self.summary.canary = verdict
        if not verdict.ok:
            rolled = self._rollback_canary(canary, outcome) if plan.rollback_canary else None
            why = verdict.reason + (f"; {rolled}" if rolled else "")
            outcome.ok, outcome.reason = False, f"failed its watch: {why}"
            self._halt(f"canary {canary}: {why}", [canary], verdict.figures)
            return False
        self._emit("canary", True, f"{canary} passed the watch: {verdict.reason}", [canary], verdict.figures)
        return True

    def _ready_to_judge(self, canary: str, policy: WatchPolicy) -> bool:
        """The canary can be judged: it does not run the version yet (its stats would judge the version against
        itself, and a failed watch would "roll back" to it), and stats arrived for the "before" rate."""
        bundle = self.plan.bundle
        view = self.link.snapshot(canary)
        if view.runs(bundle):
            self._halt_unsent(canary, view, f"canary {canary} already runs {bundle.version}: its stats are no "
                              f"baseline for {bundle.name} {bundle.version}; name another canary, or roll it back "
                              "first ('python -m central rollback')")
            return False
        if not view.online:       # cmd/model is not kept for a station that is not connected: it would never come
            why = ("has no retained status: unknown or never connected" if view.status is None
                   else "is offline (its retained status says so)")
            self._halt_unsent(canary, view, f"canary {canary} {why}: it would neither send stats nor get the "
                              "command; name an online canary")
            return False
        self.link.follow_stats([canary])
        self._baseline = self._gather_baseline(canary, policy)
        if policy.needs_baseline and rate_over(self._baseline)[0] is None:
            view = self.link.snapshot(canary)
            state = ("it has no retained status: unknown or never connected" if view.status is None
                     else f"its status says {view.status.get('state')}" if not view.online
                     else "online, but no stats message arrived; stats come every health.stats_interval_s, "
                          "10 s by default")
            waited = policy.baseline_s + self.plan.update_timeout_s
            self._halt_unsent(canary, view, f"no baseline stats from {canary} in {waited:g} s ({state}): "
                              "lengthen --baseline-s; without a rate before the update a rise cannot be judged")
            return False
        return True

    def _gather_baseline(self, canary: str, policy: WatchPolicy) -> list[dict[str, Any]]:
        """The canary's stats over ``baseline_s``. Where the rise rule needs a "before" and none came in that
        time (stats are QoS 0, one every health.stats_interval_s), it waits on for the first that gives a rate,
        for as long as a station is given to answer a command (``update_timeout_s``): a short --baseline-s on a
        busy station is not a halt, a canary that sends no stats at all is."""
        if policy.baseline_s > 0:
            log.info("gathering %.0f s of %s stats before the update", policy.baseline_s, canary)
            time.sleep(policy.baseline_s)
        stats = [s for _, s in self.link.snapshot(canary).stats]
        if policy.needs_baseline and rate_over(stats)[0] is None:
            log.info("no stats from %s yet; waiting up to %.0f s more for one", canary, self.plan.update_timeout_s)
            deadline = self.link.clock() + self.plan.update_timeout_s
            while rate_over(stats)[0] is None and self.link.clock() < deadline:
                time.sleep(min(0.25, max(0.0, deadline - self.link.clock())))
                stats = [s for _, s in self.link.snapshot(canary).stats]
        return stats

    def _watch(self, canary: str, sent_at: float) -> Verdict:
        policy = self.plan.policy
        assert policy is not None
        lost_before = self.link.disconnects
        verdict = self._judge_watch(canary, sent_at, policy)
        if self.link.disconnects != lost_before and not verdict.ok:
            return Verdict(False, f"{verdict.reason}; the connection to the MQTT broker was lost during the watch "
                                  "(stats are QoS 0: those sent meanwhile never came)", verdict.figures)
        return verdict

    def _judge_watch(self, canary: str, sent_at: float, policy: WatchPolicy) -> Verdict:
        deadline = self.link.clock() + policy.watch_s
        while self.link.clock() < deadline:
            view = self.link.snapshot(canary)
            if not view.online:
                return Verdict(False, "went offline during the watch", {"watch_s": policy.watch_s})
            if not view.runs(self.plan.bundle):
                return Verdict(False, f"reports {view.describe()} during the watch", {"watch_s": policy.watch_s})
            after = [s for t, s in view.stats if t >= sent_at]
            early = judge_canary(self._baseline, after, self.plan.bundle.version,
                                 WatchPolicy(policy.watch_s, None, 1.0, policy.max_errors, 0))
            if not early.ok:              # too many errors: no need to wait for the end
                return early
            time.sleep(min(0.25, max(0.0, deadline - self.link.clock())))
        after = [s for t, s in self.link.snapshot(canary).stats if t >= sent_at]
        return judge_canary(self._baseline, after, self.plan.bundle.version, policy)

    def _rollback_canary(self, canary: str, outcome: StationOutcome) -> str:
        """Send a canary that failed its watch back to the model it ran: that name and that version, found
        where it got it (the history) or beside the new version when it is the same model."""
        name, version, plan = outcome.before_name, outcome.before, self.plan
        if name is None or version is None or (name, version) == (plan.bundle.name, plan.bundle.version):
            return "its previous model is unknown: roll it back with 'python -m central rollback --to VERSION'"
        label = version if name == plan.bundle.name else f"{name} {version}"
        try:
            location = self.history.location_of(name, version, canary) or (
                sibling_location(plan.bundle.location, version) if name == plan.bundle.name else None)
            if location is None:
                raise RolloutError(f"no published location of {name} {version} in {self.history.path}")
            previous = resolve_bundle(location)
            if (previous.name, previous.version) != (name, version):
                raise RolloutError(f"{location} holds {previous.name} {previous.version}, not {name} {version}")
        except RolloutError as exc:
            return f"could not roll it back to {label} ({exc}); use 'python -m central rollback --to {version}'"
        back = _SwitchTo(self, previous, "rollback").run([canary], "canary")[0]
        outcome.after, outcome.after_name = back.after, back.after_name
        self._emit("rollback", back.ok, f"canary {canary} back on {label}" if back.ok else back.reason, [canary],
                   {"before": back.before, "after": back.after}, model=previous.model)
        return f"rolled back to {label}" if back.ok else f"rollback to {label} failed: {back.reason}"

    # -- halts
    def _halt_unsent(self, canary: str, view: StationView, reason: str) -> None:
        """Halt before the canary's command: it is listed as not sent, with why."""
        self.summary.outcomes.append(StationOutcome(canary, view.version, view.version, False, reason, "canary",
                                                    view.model_name, view.model_name, sent=False))
        self._halt(reason, [canary])

    def _halt(self, reason: str, stations: Sequence[str], figures: dict[str, Any] | None = None) -> None:
        self.summary.halted = reason
        untouched = [s for s in self.plan.stations if s not in stations]
        listed = {o.station for o in self.summary.outcomes}
        for s in untouched:
            if s not in listed:
                view = self.link.snapshot(s)
                self.summary.outcomes.append(StationOutcome(s, view.version, view.version, False,
                                                            "the rollout halted before its command", "rest",
                                                            view.model_name, view.model_name, sent=False))
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
        self.command = bundle.command()
        self._ignored: set[tuple[str, Any]] = set()     # (station, ts) of answers to other commands, logged once

    def _outcome(self, s: str, before: StationView, after: StationView, ok: bool, reason: str | None, role: str,
                 sent: bool = True) -> StationOutcome:
        return StationOutcome(s, before.version, after.version, ok, reason, role, before.model_name,
                              after.model_name, sent)

    def run(self, stations: Sequence[str], role: str) -> list[StationOutcome]:
        link, version = self.r.link, self.bundle.version
        before = {s: link.snapshot(s) for s in stations}
        outcomes: dict[str, StationOutcome] = {}
        for s in stations:
            view = before[s]
            if view.status is None:
                outcomes[s] = self._outcome(s, view, view, False, "no retained status: unknown or never connected",
                                            role, sent=False)
            elif view.runs(self.bundle):
                outcomes[s] = self._outcome(s, view, view, True, None, role)
            elif not view.online:     # the agent's session ends with its connection: a command now is lost
                outcomes[s] = self._outcome(s, view, view, False, "offline (its retained status says so): "
                                            "cmd/model is not kept for a station that is not connected", role,
                                            sent=False)
            elif view.model_name != self.bundle.name:
                log.warning("%s runs %s: it is switched to %s %s as named", s, view.describe(), self.bundle.name,
                            version)
        sent: list[str] = []
        pending: dict[str, str] = {}         # handed to the client, no PUBACK: it may still reach the station
        for s in [s for s in stations if s not in outcomes]:
            try:
                link.send_model(s, self.bundle)
            except CommandPending as exc:    # the connection dropped: paho sends it again once it is back
                log.warning("%s; waiting for %s as for a station that got it", exc, s)
                pending[s] = str(exc)
            except RolloutError as exc:      # the broker refused it (its ACL), or no connection to send it on
                outcomes[s] = self._outcome(s, before[s], before[s], False, str(exc), role, sent=False)
                continue
            else:
                log.info("cmd/model %s %s -> %s", self.bundle.name, version, s)
            sent.append(s)
        deadline = link.clock() + self.r.plan.update_timeout_s
        for s in sent:
            answer = link.wait_until(lambda s=s: self._answer(s, before[s]), max(0.0, deadline - link.clock()))
            view = link.snapshot(s)
            if answer is None:
                outcomes[s] = self._outcome(s, before[s], view, False, f"no status reporting {self.bundle.name} "
                                            f"{version} within {self.r.plan.update_timeout_s:g} s (state "
                                            f"{(view.status or {}).get('state')}, {view.describe()})"
                                            + (f"; the command may not have reached the broker: {pending[s]}"
                                               if s in pending else "")
                                            + ("; the connection to the MQTT broker is down: that state is the "
                                               "last one received" if link.lost else ""), role)
            else:
                outcomes[s] = self._outcome(s, before[s], view, *answer, role)
            o = outcomes[s]
            self._record(s, o)
        return [outcomes[s] for s in stations]

    def _record(self, station: str, o: StationOutcome) -> None:
        """The switch into the history; a history that cannot be written (a full disk) stops nothing: the summary
        says what is missing, and the records are written with the next one that can be."""
        history, summary = self.r.history, self.r.summary
        try:
            history.record(station, action=self.action, bundle=self.bundle, from_version=o.before,
                           from_name=o.before_name, ok=o.ok, reason=o.reason)
        except RolloutError as exc:
            log.error("%s", exc)
            summary.unrecorded = str(exc)
        else:
            summary.unrecorded = None

    def _answer(self, station: str, before: StationView) -> tuple[bool, str | None] | None:
        """The station's answer to this command: it reports the bundle, or a new ``last_model_update`` refuses it.
        A refusal whose ``request`` names another command (one queued before this, a QoS 1 redelivery, another
        rollout's) is no answer: waited past, logged once. One with no ``request`` (a station before 2026-12-07)
        is taken as the answer, as it always was."""
        view = self.r.link.views.get(station)       # called under the link's lock
        if view is None or view.status is None:
            return None
        if view.online and view.runs(self.bundle):
            return True, None
        update = view.last_update
        if update and update != before.last_update and update.get("ok") is False:
            if view.update_answers(self.command) is False:
                self._log_other_answer(station, update)
                return None
            return False, f"the station refused {self.bundle.version}: {update.get('reason')}"
        return None

    def _log_other_answer(self, station: str, update: dict[str, Any]) -> None:
        key = (station, update.get("ts"))
        if key in self._ignored:
            return
        self._ignored.add(key)
        request = update.get("request")
        other = ("one it could not read" if not isinstance(request, dict) else
                 f"{str(request.get('bundle'))[:300]}, version {request.get('version')}, sha256 "
                 f"{request.get('sha256')}")
        log.info("%s: last_model_update answers another cmd/model (%s), not %s %s sent by this %s: not taken as its "
                 "answer (refused: %s); still waiting", station, other, self.bundle.name, self.bundle.version,
                 self.action, str(update.get("reason"))[:300])


def run_rollout(link: StationLink, plan: RolloutPlan, history: RolloutHistory, events: EventSink) -> Summary:
    return Rollout(link, plan, history, events).run()
