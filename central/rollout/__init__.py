"""Publish promoted bundles, serve them to stations, and roll them out: canary, the rest, rollback.

- ``publish``: ``publish_bundle`` copies a bundle into the served tree after the agent's own verification
  and the gate record ``python -m trainer retrain`` wrote (a rejected version is refused, always);
  ``BundleServer`` serves that tree over HTTP, which is what ``cmd/model`` URLs name.
- ``remote``: the bundle a rollout sends (``resolve_bundle``: its manifest and hashes, from a URL or a folder).
- ``link``: ``StationLink``, one MQTT connection: every station's retained status, the chosen stations'
  stats, ``cmd/model`` out.
- ``canary``: the canary watch (pure): ``judge_canary`` compares the stats before and after the switch.
- ``history``: ``RolloutHistory``, per-station versions and bundle URLs (what a rollback goes back to).
- ``stations``: ``select_stations`` (named, a group file, or every online station; names checked against the
  contract) and ``split_by_model`` (``--all`` sends a model only to the stations running it).
- ``run``: ``run_rollout`` (canary, wait for its status, watch, then the rest).
- ``rollback``: ``run_rollback``, back to an earlier version of the model each station runs.
- ``cli``: ``python -m central publish | serve-bundles | rollout | rollback``.

Every step publishes a ``rollout-event.v1`` event (``contract.events``) on ``<topic root>/_central/rollout``
(retained, QoS 1) for the dashboard. Stations verify hashes and signatures themselves; the rollout only
reads what they report.
"""

from central.rollout.canary import Verdict, WatchPolicy, judge_canary, rate_over
from central.rollout.history import RolloutHistory
from central.rollout.link import StationLink, StationView
from central.rollout.publish import BundleServer, PublishResult, publish_bundle
from central.rollout.remote import RemoteBundle, resolve_bundle, sibling_location
from central.rollout.rollback import rollback_targets, run_rollback
from central.rollout.run import RolloutPlan, StationOutcome, Summary, run_rollout
from central.rollout.stations import select_stations, split_by_model
from contract.events import (
                             EventSink,
                             RolloutError,
                             make_event,
                             manifest_sha256,
                             publish_event_once,
                             read_gate,
                             validate_event,
                             write_gate,
)

__all__ = ["BundleServer", "EventSink", "PublishResult", "RemoteBundle", "RolloutError", "RolloutHistory",
           "RolloutPlan", "StationLink", "StationOutcome", "StationView", "Summary", "Verdict", "WatchPolicy",
           "judge_canary", "make_event", "manifest_sha256", "publish_bundle", "publish_event_once", "rate_over",
           "read_gate", "resolve_bundle", "rollback_targets", "run_rollback", "run_rollout", "select_stations",
           "sibling_location", "split_by_model", "validate_event", "write_gate"]
