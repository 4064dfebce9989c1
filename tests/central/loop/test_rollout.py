"""Publish, serve, roll out (canary, watch, rest) and roll back, against a real mosquitto and real agents.

Stations are real ``python -m agent run`` processes on a looping folder of real Fashion-MNIST
images; bundles are served by the real ``BundleServer`` over HTTP and verified by the agents
themselves. The bundles are small random-weight models (agent_support.make_tiny_bundle): the
rollout does not depend on what a model learnt, and the gate that normally promotes them is
tested with real trained models in test_retrain.py (here ``promote`` writes its record).
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rollout_support import (  # noqa: F401
    Recorder,
    Station,
    cli,
    image_folder,
    promote,
    tiny_versions,
    wait_online,
    wait_until,
)

from central import rollout as ro
from central.rollout import (
    BundleServer,
    EventSink,
    RolloutError,
    RolloutHistory,
    RolloutPlan,
    StationLink,
    WatchPolicy,
    judge_canary,
    make_event,
    publish_bundle,
    resolve_bundle,
    run_rollback,
    run_rollout,
    validate_event,
    write_gate,
)
from contract.broker import BrokerSettings
from contract.messages import checker, loads_finite

pytestmark = pytest.mark.mqtt


def stats(version: str, classified: int, low: int, errors: int = 0) -> dict:
    return {"model_version": version, "frames_classified": classified, "frames_low_confidence": low,
            "inference_errors": errors, "low_confidence_rate": low / classified if classified else 0.0}


# ---------------------------------------------------------------- the canary rule (pure)

POLICY = WatchPolicy(watch_s=60, max_low_conf_increase=0.05, max_errors=0, min_frames=20, baseline_s=0)


def test_canary_passes_when_the_rate_holds_and_there_are_no_errors():
    before = [stats("1", 100, 30), stats("1", 200, 50)]            # 20 % over the baseline window
    after = [stats("1", 210, 52), stats("2", 250, 60), stats("2", 350, 80)]   # 20 % on version 2
    verdict = judge_canary(before, after, "2", POLICY)
    assert verdict.ok, verdict.reason
    assert verdict.figures["low_confidence_rate_before"] == 0.2
    assert verdict.figures["low_confidence_rate_after"] == 0.2 and verdict.figures["frames_after"] == 100


def test_canary_halts_on_a_rate_rise_beyond_the_allowance():
    verdict = judge_canary([stats("1", 100, 10), stats("1", 200, 20)], [stats("2", 300, 30), stats("2", 400, 46)],
                           "2", POLICY)
    assert not verdict.ok and "rose from 10.0% to 16.0%" in verdict.reason and "+6.0 points" in verdict.reason


def test_canary_halts_above_the_absolute_cap_even_without_a_baseline():
    policy = WatchPolicy(60, max_low_conf_rate=0.3, min_frames=20)
    verdict = judge_canary([], [stats("2", 100, 10), stats("2", 200, 50)], "2", policy)
    assert not verdict.ok and "above --max-low-conf-rate 30.0%" in verdict.reason
    assert verdict.figures["low_confidence_rate_before"] is None


def test_canary_halts_on_inference_errors_counted_from_the_command():
    before = [stats("1", 100, 10, errors=4)]                  # old errors do not count
    verdict = judge_canary(before, [stats("2", 150, 15, errors=4), stats("2", 250, 25, errors=5)], "2", POLICY)
    assert not verdict.ok and verdict.reason.startswith("1 inference error(s)")
    allowed = judge_canary(before, [stats("2", 150, 15, errors=4), stats("2", 250, 25, errors=5)], "2",
                           WatchPolicy(60, max_errors=1, min_frames=20))
    assert allowed.ok, allowed.reason


def test_canary_needs_frames_to_be_judged_unless_told_otherwise():
    idle = [stats("2", 100, 10), stats("2", 105, 10)]
    verdict = judge_canary([stats("1", 100, 10)], idle, "2", POLICY)
    assert not verdict.ok and "classified 5 frame(s)" in verdict.reason
    assert judge_canary([], [stats("2", 100, 10)], "2", WatchPolicy(60, min_frames=0)).ok


def test_canary_restart_during_the_watch_halts():
    verdict = judge_canary([], [stats("2", 500, 10), stats("2", 20, 1)], "2", POLICY)
    assert not verdict.ok and "restarted" in verdict.reason


# ---------------------------------------------------------------- events

def test_events_follow_the_schema_and_the_dashboards_contract():
    from central.dashboard.state import validate_rollout_event

    event = make_event("halt", {"name": "fmnist", "version": "2"}, ok=False, reason="canary test/st-a: tampered",
                       stations=["test/st-a"], figures={"not_sent": ["test/st-b"]})
    validate_event(event)
    validate_rollout_event("inventory/_central/rollout", event)
    assert event["ts"].endswith("+00:00") and event["stations"] == ["test/st-a"]
    with pytest.raises(RolloutError, match="field action"):
        make_event("deploy", {"name": "fmnist", "version": "2"}, ok=True)
    with pytest.raises(RolloutError, match="field stations/0"):
        make_event("rollout", {"name": "fmnist", "version": "2"}, ok=True, stations=["st-a"])


# ---------------------------------------------------------------- publish and serve

@pytest.fixture
def bundles(tmp_path):
    return tiny_versions(tmp_path / "models", ["v1", "v2"])


def test_publish_refuses_a_rejected_bundle_even_when_its_record_is_removed(bundles, tmp_path):
    served = tmp_path / "served"
    publish_bundle(bundles["v1"], served, baseline=True)
    write_gate(bundles["v2"], {"decision": "rejected", "manifest_sha256": ro.manifest_sha256(bundles["v2"]),
                               "reason": "reviewed frames top-1 40.00% vs 45.00%: not better"})
    with pytest.raises(RolloutError, match="rejected by the retrain gate .*not better"):
        publish_bundle(bundles["v2"], served)
    (bundles["v2"] / "gate.json").unlink()            # the log beside the model still knows
    with pytest.raises(RolloutError, match="rejected by the retrain gate"):
        publish_bundle(bundles["v2"], served, baseline=True)
    assert not (served / "tiny" / "v2").exists()


def test_publish_removes_what_a_killed_publish_left_and_spares_live_ones(bundles, tmp_path):
    """A publish killed by ``kill -9`` or a power cut never reaches its clean-up: its partial copy stayed beside
    the published versions for good. The next publish removes those of processes of this host that are gone;
    a live process's copy, another host's (a shared folder) and folders of another form stay."""
    import subprocess
    import sys

    from contract.bundle import partial_dir

    served = tmp_path / "served"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        dead_copy = partial_dir(served / "tiny" / "v0")
        tag = dead_copy.name.split(".partial-", 1)[1].split("-")[0]
        dead_copy = dead_copy.with_name(f".v0.partial-{tag}-{int(gone.stdout)}-0a1b2c3d")
        live_copy = dead_copy.with_name(f".v0.partial-{tag}-{live.pid}-0a1b2c3d")
        elsewhere = dead_copy.with_name(f".v0.partial-another_host-{int(gone.stdout)}-0a1b2c3d")
        other_form = dead_copy.with_name(".v0.partial")
        for folder in (dead_copy, live_copy, elsewhere, other_form):
            (folder / "model").mkdir(parents=True)
            (folder / "model" / "model.fp32.onnx").write_bytes(b"half-copied")
        publish_bundle(bundles["v1"], served, baseline=True)
        assert sorted(p.name for p in (served / "tiny").iterdir() if p.name != ".index.lock") == sorted(
            ["v1", "index.json", live_copy.name, elsewhere.name, other_form.name])
    finally:
        live.kill()
        live.wait()


def test_a_torn_gate_log_line_still_refuses_the_rejection_after_it_and_the_same_baseline_republishes(bundles,
                                                                                                   tmp_path):
    """A crash mid-append left half a line in gate-log.jsonl; the next record was glued to it and the reader
    skipped the whole line, so a rejected version published once its gate.json was gone. The writer starts a
    record on a line of its own now, and the reader still finds a rejection in a torn line."""
    served = tmp_path / "served"
    log = bundles["v2"].parent / "gate-log.jsonl"
    log.write_text('{"decision": "promoted", "manifest_sha25')              # torn by a crash
    write_gate(bundles["v2"], {"decision": "rejected", "manifest_sha256": ro.manifest_sha256(bundles["v2"]),
                               "reason": "worse"})
    assert log.read_text().splitlines()[1].startswith('{"decision": "rejected"')
    (bundles["v2"] / "gate.json").unlink()
    with pytest.raises(RolloutError, match="rejected by the retrain gate"):
        publish_bundle(bundles["v2"], served, baseline=True)
    # an older writer's glued line: still a rejection of this manifest
    log.write_text('{"decision": "promoted", "manifest_sha25{"decision": "rejected", "manifest_sha256": "'
                   + ro.manifest_sha256(bundles["v2"]) + '", "reason": "worse"}\n')
    with pytest.raises(RolloutError, match="rejected by the retrain gate"):
        publish_bundle(bundles["v2"], served, baseline=True)
    # the first version published as a baseline, again: a no-op that also repairs a missing index entry
    first = publish_bundle(bundles["v1"], served, baseline=True)
    (served / "tiny" / "index.json").unlink()
    again = publish_bundle(bundles["v1"], served, baseline=True)
    assert again.already and again.sha256 == first.sha256
    assert list(json.loads((served / "tiny" / "index.json").read_text())["versions"]) == ["v1"]
    (served / "tiny" / "index.json").write_text('{"versions": {')
    with pytest.raises(RolloutError, match="index.json: not a published index"):
        publish_bundle(bundles["v1"], served, baseline=True)


def test_an_event_with_a_figure_that_is_not_finite_is_refused_by_name():
    with pytest.raises(RolloutError, match="a figure is not finite"):
        make_event("gate", {"name": "tiny", "version": "2"}, ok=True, figures={"top1": float("nan")})


def test_publish_refuses_unverifiable_ungated_and_changed_bundles(bundles, tmp_path):
    served = tmp_path / "served"
    onnx = bundles["v1"] / "model.fp32.onnx"
    good = onnx.read_bytes()
    onnx.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(RolloutError, match=r"unverifiable bundle: .*model.fp32.onnx: sha256 .* \(tampered\)"):
        publish_bundle(bundles["v1"], served, baseline=True)
    onnx.write_bytes(good)
    with pytest.raises(RolloutError, match="no gate.json"):
        publish_bundle(bundles["v1"], served)
    publish_bundle(bundles["v1"], served, baseline=True)
    with pytest.raises(RolloutError, match="--baseline is only for the first version"):
        publish_bundle(bundles["v2"], served, baseline=True)
    promote(bundles["v2"])
    manifest = json.loads((bundles["v2"] / "manifest.json").read_text())
    manifest["quality"]["thresholds"]["min_confidence"] = 0.9        # changed after the gate decided
    (bundles["v2"] / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RolloutError, match="field manifest_sha256: .* the bundle changed after the gate"):
        publish_bundle(bundles["v2"], served)


def test_publish_copies_a_promoted_bundle_once_and_the_server_serves_only_published_files(bundles, tmp_path):
    from agent.update import ModelCommand, verify_command_bundle

    served = tmp_path / "served"
    promote(bundles["v2"])
    first = publish_bundle(bundles["v2"], served, baseline=False)
    again = publish_bundle(bundles["v2"], served)
    assert not first.already and again.already and first.sha256 == again.sha256 == ro.manifest_sha256(bundles["v2"])
    index = json.loads((served / "tiny" / "index.json").read_text())
    assert index["versions"]["v2"]["decision"] == "promoted"
    (served / "tiny" / ".v3.partial-x").mkdir()
    (served / "tiny" / ".v3.partial-x" / "manifest.json").write_text("{}")
    server = BundleServer(served).start()
    try:
        url = server.url + first.url_path
        remote = resolve_bundle(url)
        assert (remote.name, remote.version, remote.sha256) == ("tiny", "v2", first.sha256)
        for path, why in (("tiny/", "listing"), ("tiny/.v3.partial-x/manifest.json", "hidden"),
                          ("tiny/v2/../../", "traversal"), ("tiny/v9/manifest.json", "absent")):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(server.url + path, timeout=10)
            assert err.value.code == 404, why
        # the agent's own fetch and verification, as a station does it
        bundle = verify_command_bundle(ModelCommand(url, first.sha256, "v2"), tmp_path / "station-downloads", None)
        assert bundle.version == "v2"
        assert (tmp_path / "station-downloads" / bundle.name / "v2" / "model.fp32.onnx").exists()
    finally:
        server.stop()


def test_resolve_refuses_what_the_gate_rejected_or_never_saw(bundles, tmp_path):
    with pytest.raises(RolloutError, match="no gate.json; roll out only bundles published"):
        resolve_bundle(str(bundles["v1"]))
    write_gate(bundles["v1"], {"decision": "rejected", "manifest_sha256": ro.manifest_sha256(bundles["v1"]),
                               "reason": "overall top-1 worse"})
    with pytest.raises(RolloutError, match="was rejected by the retrain gate .*never rolled out"):
        resolve_bundle(str(bundles["v1"]))
    # a gate record that is not an object, and a manifest a station would refuse: named, never a traceback
    (bundles["v1"] / "gate.json").write_text("[1, 2]")
    with pytest.raises(RolloutError, match="gate.json: expected a JSON object, got list"):
        resolve_bundle(str(bundles["v1"]))
    manifest = (bundles["v2"] / "manifest.json").read_text()
    for bad in (manifest.replace('"version": "v2"', '"version": NaN'),
                manifest.replace('"version": "v2"', '"version": "../../x"')):
        assert bad != manifest
        (bundles["v2"] / "manifest.json").write_text(bad)
        with pytest.raises(RolloutError, match="manifest.json"):
            resolve_bundle(str(bundles["v2"]))


def test_history_knows_each_stations_previous_version_and_where_it_lives(tmp_path):
    history = RolloutHistory(tmp_path / "h.json")
    v2 = ro.RemoteBundle("http://c:8070/tiny/v2/", "tiny", "v2", "a" * 64, {})
    history.record("s/a", action="rollout", bundle=v2, from_version="v1", ok=True, reason=None)
    history.record("s/b", action="rollout", bundle=v2, from_version="v0", ok=False, reason="refused")
    reloaded = RolloutHistory(tmp_path / "h.json")
    assert reloaded.previous_model("s/a", ("tiny", "v2")) == ("tiny", "v1")
    assert reloaded.previous_model("s/b", ("tiny", "v2")) is None         # its switch failed: it never ran v2
    assert reloaded.location_of("tiny", "v2") == "http://c:8070/tiny/v2/"
    assert reloaded.location_of("tiny", "v1", "s/a") == "http://c:8070/tiny/v1/"   # same served tree
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(RolloutError, match="bad.json: rollout history is not valid JSON"):
        RolloutHistory(tmp_path / "bad.json")
    # two models with a version of the same name: each is found by its name, never the other's
    shelf = ro.RemoteBundle("http://c:8070/shelf/v2/", "shelf", "v2", "b" * 64, {})
    history.record("s/c", action="rollout", bundle=shelf, from_version="v1", from_name="shelf", ok=True, reason=None)
    assert history.location_of("shelf", "v2", "s/a") == "http://c:8070/shelf/v2/"
    assert history.location_of("tiny", "v2", "s/c") == "http://c:8070/tiny/v2/"
    assert history.location_of("shelf", "v1", "s/new") == "http://c:8070/shelf/v1/"     # beside shelf v2
    assert history.location_of("other", "v2") is None


def test_a_rerun_whose_canary_already_runs_the_version_halts_instead_of_judging_it_against_itself(tmp_path):
    """Central restarted during a watch and the rollout is run again: the canary reports the new version already.
    Its stats are that version's own, no baseline; and a failed watch would "roll back" to the same version.
    The rollout halts, sends nothing, and says what to do. (A fake link: the real one is tested below.)"""
    class Link(StationLink):
        def __init__(self):
            super().__init__(options=None)
            self.sent = []

        def follow_stats(self, stations):
            pass

        def send_model(self, station, bundle):
            self.sent.append((station, bundle.version))

    link = Link()
    for station, version in (("s/a", "v2"), ("s/b", "v1")):
        link.views[station] = ro.StationView(status={"state": "online", "site": "s", "station": station[2:],
                                                          "model": {"name": "tiny", "version": version}})
    v2 = ro.RemoteBundle(str(tmp_path / "tiny" / "v2"), "tiny", "v2", "a" * 64, {})
    history = RolloutHistory(tmp_path / "h.json")
    history.record("s/a", action="rollout", bundle=v2, from_version="v1", ok=True, reason=None)
    plan = RolloutPlan(v2, ["s/a", "s/b"], "s/a", WatchPolicy(watch_s=0.2, min_frames=1, baseline_s=0), 2.0)
    summary = run_rollout(link, plan, history, EventSink())
    assert summary.halted and "canary s/a already runs v2: its stats are no baseline" in summary.halted
    assert link.sent == []


# ---------------------------------------------------------------- against real stations

class Fleet:
    """Broker, served tree + HTTP server, two real stations on v1, and a recorder of everything."""

    def __init__(self, tmp_path: Path, broker, versions: dict[str, Path]) -> None:
        self.served = tmp_path / "served"
        publish_bundle(versions["v1"], self.served, baseline=True)
        for version in [v for v in versions if v != "v1"]:
            promote(versions[version])
            publish_bundle(versions[version], self.served)
        self.server = BundleServer(self.served).start()
        self.url = {v: f"{self.server.url}tiny/{v}/" for v in versions}
        self.broker = broker
        self.recorder = Recorder(broker.port, ["inventory/#"])
        images = image_folder(tmp_path / "camera")
        sections = {"health": {"stats_interval_s": 0.5}}
        self.stations = [Station(tmp_path / "stations", versions["v1"], images, broker.port, station=name, **sections)
                         for name in ("st-a", "st-b")]
        for station in self.stations:
            wait_online(self.recorder, station, "v1")
        self.history = tmp_path / "history.json"

    @property
    def keys(self) -> list[str]:
        return [s.key for s in self.stations]

    def link(self) -> StationLink:
        link = StationLink(BrokerSettings("127.0.0.1", self.broker.port)).connect()
        link.settle()
        return link

    def commands_to(self, key: str) -> list:
        return self.recorder.of(f"/{key}/cmd/model")

    def close(self) -> None:
        for station in self.stations:
            station.stop()
        self.recorder.close()
        self.server.stop()


@pytest.fixture
def fleet_factory(tmp_path, broker):
    made = []

    def make(versions):
        made.append(Fleet(tmp_path, broker, versions))
        return made[-1]
    yield make
    for fleet in made:
        fleet.close()


def test_rollout_canary_then_rest_then_rollback_through_the_cli(fleet_factory, bundles, broker):
    fleet = fleet_factory(bundles)
    canary, rest = fleet.keys
    common = ["--mqtt-host", "127.0.0.1", "--mqtt-port", str(broker.port), "--history", str(fleet.history)]
    done = cli("rollout", "--bundle-url", fleet.url["v2"], "--stations", ",".join(fleet.keys),
                       "--canary", canary, "--watch-s", "3", "--baseline-s", "1", "--min-frames", "5",
                       "--update-timeout-s", "60", *common)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "rollout tiny v2: done" in done.stdout and f"{rest}" in done.stdout
    assert fleet.recorder.version(canary) == fleet.recorder.version(rest) == "v2"

    from central.dashboard.state import validate_rollout_event

    events = fleet.recorder.events()
    for event in events:
        validate_event(event)
        validate_rollout_event("inventory/_central/rollout", event)     # what the dashboard accepts
    actions = [(e["action"], e["ok"]) for e in events]
    assert actions == [("canary", True), ("canary", True), ("rollout", True)], events
    passed = [m for m in fleet.recorder.of("/_central/rollout") if "passed the watch" in m.json()["reason"]][0]
    figures = passed.json()["figures"]
    assert figures["frames_after"] >= 5 and figures["inference_errors"] == 0
    # the rest got its command only after the canary passed its watch
    [to_rest] = fleet.commands_to(rest)
    [to_canary] = fleet.commands_to(canary)
    assert to_canary.at + 3 <= passed.at <= to_rest.at
    assert to_rest.json() == {"bundle": fleet.url["v2"], "sha256": resolve_bundle(fleet.url["v2"]).sha256,
                              "version": "v2"}

    back = cli("rollback", "--to", "previous", "--all", "--update-timeout-s", "60", *common)
    assert back.returncode == 0, back.stdout + back.stderr
    assert fleet.recorder.version(canary) == fleet.recorder.version(rest) == "v1"
    assert fleet.commands_to(rest)[-1].json()["bundle"] == fleet.url["v1"]     # found beside v2 in the tree
    last = fleet.recorder.events()[-1]
    assert last["action"] == "rollback" and last["ok"] and last["model"]["version"] == "v1"
    assert sorted(last["stations"]) == sorted(fleet.keys)
    history = json.loads(fleet.history.read_text())
    assert [e["version"] for e in history["stations"][rest]] == ["v2", "v1"]


def test_a_bad_hash_halts_the_rollout_and_changes_nothing(fleet_factory, bundles, tmp_path):
    fleet = fleet_factory(bundles)
    canary, rest = fleet.keys
    served_onnx = fleet.served / "tiny" / "v2" / "model.fp32.onnx"
    data = bytearray(served_onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF                                   # tampered on the server after publishing
    served_onnx.write_bytes(bytes(data))
    link = fleet.link()
    events = EventSink(link.client, "inventory/_central/rollout")
    try:
        plan = RolloutPlan(resolve_bundle(fleet.url["v2"]), fleet.keys, canary,
                           WatchPolicy(watch_s=3, min_frames=5, baseline_s=0.5), update_timeout_s=60)
        summary = run_rollout(link, plan, RolloutHistory(fleet.history), events)
    finally:
        link.close()
    assert not summary.ok and "refused v2" in summary.halted and "model.fp32.onnx: sha256" in summary.halted
    assert "(tampered)" in summary.halted and f"not sent to {rest}" in events.sent[-1]["reason"]
    # nothing changed: both stations on v1, the rest never got a command, the canary kept no copy of v2
    status = fleet.recorder.status(canary)
    assert status["model"]["version"] == "v1" and status["last_model_update"]["ok"] is False
    assert fleet.recorder.version(rest) == "v1" and fleet.commands_to(rest) == []
    assert not list((fleet.stations[0].folder / "downloads").glob("*/v2"))
    halt = wait_until(lambda: [e for e in fleet.recorder.events() if e["action"] == "halt"], 10, "the halt event")[0]
    assert not halt["ok"] and "tampered" in halt["reason"] and halt["figures"]["not_sent"] == [rest]
    assert RolloutHistory(fleet.history).entries(canary)[-1]["ok"] is False


def test_a_rollout_whose_history_cannot_be_written_is_not_reported_ok_to_the_dashboard(fleet_factory, bundles):
    """Given a history that refuses every record (a full disk), when both stations switch, then the summary says the
    history is incomplete and so does the final event: ok false, the reason and figures naming what is missing
    (before: the event said ok while a later "rollback --to previous" could not see these switches)."""

    class FullDisk(RolloutHistory):
        def record(self, *args, **kwargs):
            raise RolloutError(f"{self.path}: cannot write the rollout history (No space left on device)")

    fleet = fleet_factory(bundles)
    link = fleet.link()
    events = EventSink(link.client, "inventory/_central/rollout")
    try:
        plan = RolloutPlan(resolve_bundle(fleet.url["v2"]), fleet.keys, None, None, update_timeout_s=60)
        summary = run_rollout(link, plan, FullDisk(fleet.history), events)
    finally:
        link.close()
    assert all(o.ok for o in summary.outcomes) and not summary.ok
    assert summary.table().startswith("rollout tiny v2: done, but the history is incomplete")
    final = events.sent[-1]
    assert final["action"] == "rollout" and final["ok"] is False
    assert "not in the rollout history" in final["reason"] and "No space left" in final["figures"]["unrecorded"]


def test_a_canary_whose_low_confidence_rate_rises_is_halted_and_rolled_back(fleet_factory, tmp_path):
    never = {"min_confidence": 0.0, "min_margin": 0.0, "max_entropy": 100.0}
    always = {"min_confidence": 1.0, "min_margin": 0.0, "max_entropy": 100.0}
    fleet = fleet_factory(tiny_versions(tmp_path / "models", ["v1", "v2"], {"v1": never, "v2": always}))
    canary, rest = fleet.keys
    link = fleet.link()
    events = EventSink(link.client, "inventory/_central/rollout")
    try:
        plan = RolloutPlan(resolve_bundle(fleet.url["v2"]), fleet.keys, canary,
                           WatchPolicy(watch_s=3, min_frames=5, baseline_s=1.5), update_timeout_s=60)
        summary = run_rollout(link, plan, RolloutHistory(fleet.history), events)
    finally:
        link.close()
    assert summary.halted and "low-confidence rate rose from 0.0% to 100.0%" in summary.halted
    assert "rolled back to v1" in summary.halted
    assert summary.canary.figures["frames_after"] >= 5
    wait_until(lambda: fleet.recorder.version(canary) == "v1", 30, "the canary back on v1")
    assert fleet.recorder.version(rest) == "v1" and fleet.commands_to(rest) == []
    assert [(e["action"], e["ok"]) for e in events.sent] == [("canary", True), ("rollback", True), ("halt", False)]
    assert [m.json()["version"] for m in fleet.commands_to(canary)] == ["v2", "v1"]


def test_rollback_without_a_known_previous_version_says_so(fleet_factory, bundles):
    fleet = fleet_factory(bundles)
    link = fleet.link()
    events = EventSink(link.client, "inventory/_central/rollout")
    try:
        [summary] = run_rollback(link, RolloutHistory(fleet.history), events, fleet.keys[:1], "previous",
                                 update_timeout_s=30)
    finally:
        link.close()
    assert not summary.ok
    assert "has no version before v1 for this station" in summary.outcomes[0].reason
    assert events.sent[-1]["action"] == "halt" and fleet.commands_to(fleet.keys[0]) == []


def test_the_server_speaks_https_with_the_given_certificate(bundles, tmp_path):
    import ssl

    sys.path.append(str(Path(__file__).resolve().parents[2] / "deploy"))
    from deploy_support import make_pki

    pki = make_pki(tmp_path / "pki")
    served = tmp_path / "served"
    publish_bundle(bundles["v1"], served, baseline=True)
    server = BundleServer(served, tls_cert=pki.server_cert, tls_key=pki.server_key).start()
    try:
        assert server.url.startswith("https://127.0.0.1:")
        trusted = ssl.create_default_context(cafile=str(pki.ca_cert))
        body = urllib.request.urlopen(server.url + "tiny/v1/manifest.json", context=trusted, timeout=10).read()
        assert json.loads(body)["version"] == "v1"
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            urllib.request.urlopen(server.url + "tiny/v1/manifest.json", context=ssl.create_default_context(),
                                   timeout=10)
    finally:
        server.stop()


def test_station_groups_are_read_from_a_file_and_bad_lines_are_named(tmp_path):
    from central.rollout import select_stations

    link = StationLink(BrokerSettings("127.0.0.1"))        # not connected: a group file needs no broker
    group = tmp_path / "dock-stations.txt"
    group.write_text("# receiving docks\nber1/receiving-01\nber1/receiving-02  # spare\n\nber1/receiving-01\n")
    stations, skipped = select_stations(link, stations=["ber1/qc-01"], group=group)
    assert stations == ["ber1/qc-01", "ber1/receiving-01", "ber1/receiving-02"] and skipped == {}
    group.write_text("ber1/receiving-01\nreceiving-02\n")
    with pytest.raises(RolloutError, match=r"dock-stations.txt:2: expected <site>/<station> .*got 'receiving-02'"):
        select_stations(link, group=group)
    with pytest.raises(RolloutError, match="no stations"):
        select_stations(link)


def test_a_bundle_whose_model_outputs_nan_is_never_published(tmp_path):
    """publish runs the same model check as verify and the station: a NaN model never reaches a station."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "agent"))
    from agent_support import make_onnx_bundle

    bundle = make_onnx_bundle(tmp_path / "nan-bundle", nan="always")
    with pytest.raises(RolloutError, match="unverifiable bundle: .*manifest.json.*(NaN|finite)"):
        ro.publish_bundle(bundle, tmp_path / "published", baseline=True)
    assert not (tmp_path / "published").exists() or not any((tmp_path / "published").rglob("manifest.json"))


def _status(site: str = "s1", station: str = "st1", **over) -> dict:
    body = {"schema": "status.v1", "id": "0" * 8 + "-0000-0000-0000-" + "0" * 12, "seq": 1, "ts": 1.0,
            "site": site, "station": station, "state": "online", "model": None, "last_model_update": None}
    return {**body, **over}


@given(payload=st.one_of(
    st.binary(min_size=1, max_size=64),          # (an empty payload is a cleared retained status: ignored)
    st.sampled_from([b'{"state": NaN}', b"[1e999]", b'"online"', b"\xff\xfe{}",
                     json.dumps(_status(seq=float("nan"))).encode(),          # NaN in a field the schema types
                     json.dumps(_status(ts=10.0**300)).encode(),              # far past the schema's bound
                     json.dumps(_status(site="other")).encode(),              # names another station
                     json.dumps(_status(model={"version": 7})).encode()]),     # wrong type where the canary reads
    st.builds(lambda k, v: json.dumps(_status(**{k: v})).encode(),
              st.sampled_from(["seq", "ts", "state", "model", "last_model_update", "uptime_s"]),
              st.one_of(st.text(max_size=8), st.integers(), st.floats(), st.lists(st.integers(), max_size=2),
                        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)))))
@settings(max_examples=150)
def test_the_rollout_link_refuses_a_hostile_status_and_keeps_serving(payload):
    """A station message the canary would choke on (not strict JSON, off-schema, misaddressed) is refused and
    counted; the views keep what they had, and the next good status is taken."""
    from types import SimpleNamespace

    link = StationLink(BrokerSettings("127.0.0.1", 1))
    link._on_message(None, None, SimpleNamespace(topic="inventory/s1/st1/status",
                                                  payload=json.dumps(_status(seq=1)).encode()))
    before = link.views["s1/st1"].status
    try:
        body = loads_finite(payload)
        good = checker("status.v1").error(body) is None and body.get("site") == "s1" and body.get("station") == "st1"
    except ValueError:
        good = False
    link._on_message(None, None, SimpleNamespace(topic="inventory/s1/st1/status", payload=payload))
    if good:                         # hypothesis may build a valid status too: then it is taken
        assert link.refused == 0
    else:
        assert link.refused == 1 and link.views["s1/st1"].status is before
    link._on_message(None, None, SimpleNamespace(topic="inventory/s1/st1/status",
                                                  payload=json.dumps(_status(seq=2, state="offline")).encode()))
    assert link.views["s1/st1"].status["seq"] == 2 and not link.views["s1/st1"].online
