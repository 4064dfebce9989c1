"""The rollout against what goes wrong in a real fleet: two models sharing a version string, a broker that refuses
a publish, figures typed wrong, a canary with no stats before its update, repeated rollbacks, offline stations,
names the contract does not allow, two rollouts sharing one history, a lost publish event, damaged files.

Stations here are stand-ins that switch the moment they get ``cmd/model``: in process (``InstantLink``, a
StationLink whose commands change the station's status at once), or over a real mosquitto (``MqttStations``,
retained statuses and a new status per command, as an agent reports a switch). The bundles are real, published
into a real served tree and read back by ``resolve_bundle``. Real agents: test_rollout.py.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from agent_support import MOSQUITTO, Broker
from rollout_support import (
    Recorder,
    cli,
    promote,
    tiny_versions,
    wait_until,
)

from central import rollout as ro
from central.rollout import (
    EventSink,
    RolloutError,
    RolloutHistory,
    RolloutPlan,
    StationLink,
    WatchPolicy,
    judge_canary,
    publish_bundle,
    resolve_bundle,
    run_rollback,
    run_rollout,
    select_stations,
    split_by_model,
)
from contract.events import mqtt_publish

# ---------------------------------------------------------------- stand-ins


def status(station: str, name: str | None, version: str | None, state: str = "online") -> dict:
    site, st = station.split("/")
    model = None if name is None else {"name": name, "version": version, "backend": "onnxruntime",
                                       "precision": "fp32"}
    return {"schema": "status.v1", "id": str(uuid.uuid4()), "seq": 1, "ts": time.time(), "site": site,
            "station": st, "state": state, "model": model, "last_model_update": None}


def stats(version: str, classified: int, low: int, errors: int = 0) -> dict:
    return {"model_version": version, "frames_classified": classified, "frames_low_confidence": low,
            "inference_errors": errors, "low_confidence_rate": low / classified if classified else 0.0}


class InstantLink(StationLink):
    """Stations that switch the moment ``cmd/model`` is sent; ``after_stats``: what the canary reports on a version."""

    def __init__(self, stations: dict[str, tuple[str | None, str | None]], after_stats: dict | None = None) -> None:
        super().__init__(options=None)
        self.sent: list[tuple[str, str, str]] = []
        self.after_stats = after_stats or {}
        for key, (name, version) in stations.items():
            self.views[key] = ro.StationView(status=status(key, name, version))

    def set_state(self, station: str, state: str) -> None:
        self.views[station].status = {**self.views[station].status, "state": state}

    def follow_stats(self, stations) -> None:
        pass

    def send_model(self, station, bundle) -> None:
        self.sent.append((station, bundle.name, bundle.version))
        with self._cond:
            view = self.views[station]
            view.status = status(station, bundle.name, bundle.version)
            view.stats.extend((self.clock(), s) for s in self.after_stats.get(bundle.version, []))
            self._cond.notify_all()

    def runs(self, station: str) -> tuple[str, str]:
        return self.views[station].model


def remote(name: str, version: str) -> ro.RemoteBundle:
    return ro.RemoteBundle(f"http://c:8070/{name}/{version}/", name, version, "a" * 64, {})


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> dict:
    """A served tree holding tiny v1 (baseline), v2, v3 and another model, shelf, with a version v1 too."""
    root = tmp_path_factory.mktemp("tree")
    served = root / "served"
    tiny = tiny_versions(root / "models", ["v1", "v2", "v3"])
    publish_bundle(tiny["v1"], served, baseline=True)
    for version in ("v2", "v3"):
        promote(tiny[version])
        publish_bundle(tiny[version], served)
    shelf_v1 = root / "other" / "shelf" / "v1"
    shutil.copytree(tiny["v1"], shelf_v1)
    manifest = json.loads((shelf_v1 / "manifest.json").read_text())
    manifest["name"] = "shelf"
    (shelf_v1 / "manifest.json").write_text(json.dumps(manifest, indent=2))
    publish_bundle(shelf_v1, served, baseline=True)
    return {"served": served, "models": root / "models",
            "url": lambda name, version: str(served / name / version)}


# ---------------------------------------------------------------- 1. a rollback never switches the model

def test_rollback_to_a_version_goes_to_that_version_of_the_model_the_station_runs(tree, tmp_path):
    """The history knows one bundle of version v1, of another model (shelf, sent to s/x). 'rollback --to v1' for
    s/a, which runs tiny v2, must send tiny v1, never shelf v1."""
    history = RolloutHistory(tmp_path / "h.json")
    history.record("s/x", action="rollout", bundle=resolve_bundle(tree["url"]("shelf", "v1")), from_version="v0",
                   from_name="shelf", ok=True, reason=None)
    history.record("s/a", action="rollout", bundle=resolve_bundle(tree["url"]("tiny", "v2")), from_version=None,
                   ok=True, reason=None)
    link = InstantLink({"s/a": ("tiny", "v2"), "s/x": ("shelf", "v1")})
    [summary] = run_rollback(link, history, EventSink(), ["s/a"], "v1", update_timeout_s=5)
    assert summary.ok, summary.table()
    assert link.sent == [("s/a", "tiny", "v1")] and link.runs("s/a") == ("tiny", "v1")
    # a --bundle-url of another model is refused by name: no command
    link = InstantLink({"s/a": ("tiny", "v2")})
    [summary] = run_rollback(link, history, EventSink(), ["s/a"], "v1", bundle_location=tree["url"]("shelf", "v1"),
                             update_timeout_s=5)
    assert not summary.ok and link.sent == []
    assert "holds shelf v1, not tiny v1 (a rollback never switches a station to another model" in \
        summary.outcomes[0].reason


def _failed_canary(tree, tmp_path, **plan_options) -> tuple[InstantLink, ro.Summary]:
    """A canary on tiny v1 whose low-confidence rate jumps from 10 % to 60 % on tiny v2; the history holds shelf v1
    (sent to another station), the only v1 it knows."""
    history = RolloutHistory(tmp_path / "h.json")
    history.record("s/x", action="rollout", bundle=resolve_bundle(tree["url"]("shelf", "v1")), from_version="v0",
                   from_name="shelf", ok=True, reason=None)
    link = InstantLink({"s/a": ("tiny", "v1"), "s/b": ("tiny", "v1"), "s/x": ("shelf", "v1")},
                       after_stats={"v2": [stats("v2", 100, 10), stats("v2", 200, 70)]})
    link.views["s/a"].stats = [(link.clock() - 5, stats("v1", 50, 5)), (link.clock() - 1, stats("v1", 100, 10))]
    plan = RolloutPlan(resolve_bundle(tree["url"]("tiny", "v2")), ["s/a", "s/b"], "s/a",
                       WatchPolicy(watch_s=0.5, min_frames=20, baseline_s=0), 5.0, **plan_options)
    return link, run_rollout(link, plan, history, EventSink())


def test_a_canary_that_fails_its_watch_goes_back_to_its_own_model_not_another_of_the_same_version(tree, tmp_path):
    link, summary = _failed_canary(tree, tmp_path)
    assert summary.halted and "rolled back to v1" in summary.halted
    assert link.sent == [("s/a", "tiny", "v2"), ("s/a", "tiny", "v1")] and link.runs("s/a") == ("tiny", "v1")


# ---------------------------------------------------------------- 2. the model's name counts, not the version alone

def test_a_station_of_another_model_with_the_same_version_is_not_taken_as_already_switched(tmp_path):
    link = InstantLink({"s/a": ("fmnist", "v1"), "s/b": ("shelf", "v2")})
    summary = run_rollout(link, RolloutPlan(remote("fmnist", "v2"), ["s/a", "s/b"], None, None, 5.0),
                          RolloutHistory(tmp_path / "h.json"), EventSink())
    assert summary.ok, summary.table()
    assert sorted(link.sent) == [("s/a", "fmnist", "v2"), ("s/b", "fmnist", "v2")]      # named: switched
    assert link.runs("s/b") == ("fmnist", "v2")
    row = next(line for line in summary.table().splitlines() if line.startswith("s/b "))
    assert row.split() == ["s/b", "rest", "shelf", "v2", "v2", "ok"]
    history = RolloutHistory(tmp_path / "h.json")
    assert history.entries("s/b")[-1]["from_name"] == "shelf"
    assert history.previous_model("s/b", ("fmnist", "v2")) == ("shelf", "v2")


def test_all_sends_a_model_only_to_the_stations_running_it_and_lists_the_others(tmp_path):
    link = InstantLink({"s/a": ("tiny", "v1"), "s/b": ("shelf", "v2"), "s/c": (None, None)})
    stations, skipped = select_stations(link, all_stations=True)
    same, others = split_by_model(link, stations, "tiny")
    assert same == ["s/a"] and skipped == {} and sorted(others) == ["s/b", "s/c"]
    assert others["s/b"].startswith("runs shelf v2, not tiny: --all sends tiny only to stations running it")
    sink = EventSink()
    summary = run_rollout(link, RolloutPlan(remote("tiny", "v2"), same, None, None, 5.0, other_model=others),
                          RolloutHistory(tmp_path / "h.json"), sink)
    assert summary.ok and link.sent == [("s/a", "tiny", "v2")] and link.runs("s/b") == ("shelf", "v2")
    assert "not sent: runs shelf v2, not tiny" in summary.table()
    assert sink.sent[-1]["ok"] and sorted(sink.sent[-1]["figures"]["other_model"]) == ["s/b", "s/c"]


def test_a_canary_reporting_another_model_of_the_version_is_not_taken_as_switched(tmp_path):
    class SwitchesToShelf(InstantLink):
        def send_model(self, station, bundle):
            super().send_model(station, bundle)
            self.views[station].status = status(station, "shelf", bundle.version)    # what it really loaded

    link = SwitchesToShelf({"s/a": ("tiny", "v1")})
    link.views["s/a"].stats = [(link.clock() - 1, stats("v1", 100, 10))]
    plan = RolloutPlan(remote("tiny", "v2"), ["s/a"], "s/a", WatchPolicy(watch_s=0.5, baseline_s=0), 0.5,
                       rollback_canary=False)
    summary = run_rollout(link, plan, RolloutHistory(tmp_path / "h.json"), EventSink())
    assert summary.halted and "no status reporting tiny v2" in summary.halted and "shelf v2" in summary.halted


# ---------------------------------------------------------------- 3. a publish the broker refuses

ACL_USERS = {"rollout": "rollout-pw", "s/a": "station-pw"}


@pytest.fixture
def acl_broker(tmp_path):
    """A broker where user 'rollout' reads everything and writes only the rollout events (no cmd/), and each
    station writes its own topics: the deploy recipe's ACL, less the right to command stations."""
    if not Path(MOSQUITTO).exists():
        pytest.skip("mosquitto is not installed; this test needs a real broker")
    folder = tmp_path / "acl-broker"
    folder.mkdir()
    passwd = folder / "passwd"
    for n, (user, password) in enumerate(ACL_USERS.items()):
        subprocess.run(["mosquitto_passwd", "-b", *(["-c"] if n == 0 else []), str(passwd), user, password],
                       check=True, capture_output=True)
    acl = folder / "acl"
    acl.write_text("user rollout\ntopic read inventory/#\ntopic write inventory/_central/rollout\n\n"
                   "pattern readwrite inventory/%u/#\n")
    b = Broker(folder, extra_conf=f"allow_anonymous false\npassword_file {passwd}\nacl_file {acl}").start()
    yield b
    b.stop()


def _paho(port: int, user: str | None = None, password: str | None = None):
    import paho.mqtt.client as paho

    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"test-{uuid.uuid4().hex[:8]}",
                         protocol=paho.MQTTv5)
    if user:
        client.username_pw_set(user, password)
    connected = threading.Event()
    client.on_connect = lambda *_: connected.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    assert connected.wait(10), "no CONNACK"
    return client


@pytest.mark.mqtt
def test_a_publish_the_broker_refuses_raises_naming_the_topic_and_the_reason(acl_broker):
    client = _paho(acl_broker.port, "rollout", ACL_USERS["rollout"])
    try:
        mqtt_publish(client, "inventory/_central/rollout", {"allowed": True})          # its own topic: fine
        with pytest.raises(RolloutError, match=r"inventory/s/a/cmd/model: the broker refused the publish "
                                               r"\(Not authorized, reason code 0x87\)"):
            mqtt_publish(client, "inventory/s/a/cmd/model", {"bundle": "x"})
    finally:
        client.disconnect()
        client.loop_stop()


class MqttStations:
    """Stand-in stations on a real broker: a retained status each; on ``cmd/model``, a retained status naming the
    commanded model (its name from the bundle path, <root>/<name>/<version>) and a good ``last_model_update``."""

    def __init__(self, port: int, stations: dict[str, tuple[str, str, str]], user: str | None = None,
                 password: str | None = None) -> None:
        self.client = _paho(port, user, password)
        self.commands: list[tuple[str, dict]] = []
        self.client.on_message = self._on_command
        for key, (name, version, state) in stations.items():
            self._publish(key, status(key, name, version, state))
        done = threading.Event()
        self.client.on_subscribe = lambda *_: done.set()
        self.client.subscribe("inventory/+/+/cmd/model", qos=1)
        assert done.wait(10), "no SUBACK"

    def _publish(self, key: str, body: dict) -> None:
        self.client.publish(f"inventory/{key}/status", json.dumps(body), qos=1, retain=True).wait_for_publish(10)

    def _on_command(self, _c, _u, msg) -> None:
        key = "/".join(msg.topic.split("/")[1:3])
        command = json.loads(msg.payload)
        self.commands.append((key, command))
        body = status(key, Path(command["bundle"]).parent.name, command["version"])
        body["last_model_update"] = {"ok": True, "reason": None, "ts": time.time(), "running": body["model"]}
        self.client.publish(f"inventory/{key}/status", json.dumps(body), qos=1, retain=True)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.mqtt
def test_a_rollout_whose_command_the_broker_refuses_says_so_instead_of_blaming_the_station(tree, tmp_path,
                                                                                         acl_broker):
    """Without the check the command counted as sent, the rollout waited --update-timeout-s and reported 'no
    status reporting v2' for a station that never got it."""
    stations = MqttStations(acl_broker.port, {"s/a": ("tiny", "v1", "online")}, "s/a", ACL_USERS["s/a"])
    (tmp_path / "rollout.pw").write_text(ACL_USERS["rollout"] + "\n")
    try:
        done = cli("rollout", "--bundle-url", tree["url"]("tiny", "v2"), "--stations", "s/a", "--no-canary",
                   "--update-timeout-s", "120", "--history", str(tmp_path / "h.json"), "--mqtt-host", "127.0.0.1",
                   "--mqtt-port", str(acl_broker.port), "--username", "rollout",
                   "--password-file", str(tmp_path / "rollout.pw"))
    finally:
        stations.close()
    assert done.returncode == 1, done.stdout + done.stderr
    assert ("not sent: inventory/s/a/cmd/model: the broker refused the publish (Not authorized, reason code "
            "0x87); check that this MQTT user may write the topic") in done.stdout
    assert "no status reporting" not in done.stdout and stations.commands == []


# ---------------------------------------------------------------- 4. figures typed wrong stop the command at once

@pytest.mark.parametrize("flag, value", [
    ("--watch-s", "nan"), ("--watch-s", "inf"), ("--watch-s", "-1"), ("--watch-s", "1e9"), ("--baseline-s", "nan"),
    ("--update-timeout-s", "0"), ("--update-timeout-s", "nan"), ("--max-low-conf-rate", "nan"),
    ("--max-low-conf-rate", "30"), ("--max-low-conf-increase", "nan"), ("--max-low-conf-increase", "5"),
    ("--max-low-conf-increase", "-0.1"), ("--max-errors", "-1"), ("--max-errors", "1.5"), ("--min-frames", "-5")])
def test_a_rollout_flag_out_of_range_is_refused_by_the_parser_naming_it(flag, value, capsys):
    from central.cli import get_args_parser

    with pytest.raises(SystemExit) as exit_:
        get_args_parser().parse_args(["rollout", "--bundle-url", "http://c/x/2/", "--all", "--mqtt-host", "h",
                                      flag, value])
    assert exit_.value.code == 2
    assert f"argument {flag}: expected" in capsys.readouterr().err


def test_the_watch_policy_and_the_plan_refuse_what_would_switch_a_check_off_or_hang():
    for field, value in (("watch_s", float("nan")), ("baseline_s", -1.0), ("max_low_conf_rate", float("nan")),
                         ("max_low_conf_increase", 5.0), ("max_errors", -1), ("min_frames", 2.5)):
        with pytest.raises(RolloutError, match=f"watch policy field {field} "):
            WatchPolicy(**{field: value})
    for timeout in (float("nan"), float("inf"), 0, -3):
        with pytest.raises(RolloutError, match="update_timeout_s"):
            RolloutPlan(remote("tiny", "v2"), ["s/a"], None, None, timeout)


# ---------------------------------------------------------------- 5. no stats before the update

def test_a_canary_with_no_stats_before_its_update_halts_before_the_command(tmp_path):
    """Stats are QoS 0 and come every 10 s by default: a short --baseline-s may see none. The rise rule then had
    nothing to compare with and was skipped without a word: a canary at 60 % passed."""
    link = InstantLink({"s/a": ("tiny", "v1"), "s/b": ("tiny", "v1")},
                       after_stats={"v2": [stats("v2", 1000, 100), stats("v2", 1100, 160)]})
    plan = RolloutPlan(remote("tiny", "v2"), ["s/a", "s/b"], "s/a",
                       WatchPolicy(watch_s=0.5, min_frames=20, baseline_s=0.1), 1.0)
    summary = run_rollout(link, plan, RolloutHistory(tmp_path / "h.json"), EventSink())
    # it waited on past --baseline-s for as long as a station is given to answer (--update-timeout-s), then halted
    assert summary.halted and summary.halted.startswith("no baseline stats from s/a in 1.1 s")
    assert "lengthen --baseline-s" in summary.halted and link.sent == []
    # stats that come after --baseline-s but within that time are the baseline (a busy station, a short window)
    late = InstantLink({"s/a": ("tiny", "v1"), "s/b": ("tiny", "v1")},
                       after_stats={"v2": [stats("v2", 1000, 100), stats("v2", 1100, 110)]})

    def stats_arrive() -> None:
        with late._cond:
            late.views["s/a"].stats.extend([(late.clock(), stats("v1", 500, 50)), (late.clock(), stats("v1", 600, 60))])
            late._cond.notify_all()
    timer = threading.Timer(0.5, stats_arrive)
    timer.start()
    try:
        summary = run_rollout(late, RolloutPlan(remote("tiny", "v2"), ["s/a", "s/b"], "s/a",
                                                WatchPolicy(watch_s=0.5, min_frames=20, baseline_s=0.1), 60.0),
                              RolloutHistory(tmp_path / "late.json"), EventSink())
    finally:
        timer.join()
    assert summary.halted is None and summary.ok and ("s/a", "tiny", "v2") in late.sent
    # the rule itself (pure): no "before" is no pass, unless the rise rule is off (an allowance of 1)
    after = [stats("v2", 1000, 100), stats("v2", 1100, 160)]
    verdict = judge_canary([], after, "v2", WatchPolicy(60, min_frames=20))
    assert not verdict.ok and "no stats before the command" in verdict.reason
    assert judge_canary([], after, "v2", WatchPolicy(60, max_low_conf_increase=1.0, min_frames=20)).ok


# ---------------------------------------------------------------- 6. "previous" walks back

def test_rollback_to_previous_again_walks_further_back_never_forward(tree, tmp_path):
    history = RolloutHistory(tmp_path / "h.json")
    link = InstantLink({"s/a": ("tiny", "v1")})
    for version in ("v2", "v3"):
        run_rollout(link, RolloutPlan(resolve_bundle(tree["url"]("tiny", version)), ["s/a"], None, None, 5.0),
                    history, EventSink())
    seen = []
    for _ in range(3):
        [summary] = run_rollback(link, history, EventSink(), ["s/a"], "previous", update_timeout_s=5)
        seen.append((summary.ok, link.runs("s/a")[1]))
    assert seen == [(True, "v2"), (True, "v1"), (False, "v1")]
    assert "has no version before v1" in summary.outcomes[-1].reason


def test_after_a_canary_was_sent_back_previous_does_not_return_to_the_failed_version(tmp_path):
    history = RolloutHistory(tmp_path / "h.json")
    history.record("s/a", action="rollout", bundle=remote("tiny", "v2"), from_name="tiny", from_version="v1",
                   ok=True, reason=None)
    history.record("s/a", action="rollback", bundle=remote("tiny", "v1"), from_name="tiny", from_version="v2",
                   ok=True, reason=None)
    assert history.ran_before("s/a") == [("tiny", "v1")]
    assert history.previous_model("s/a", ("tiny", "v1")) is None


# ---------------------------------------------------------------- 7. the summary after a halt

def test_the_summary_after_a_canary_rollback_shows_where_each_station_is(tree, tmp_path):
    link, summary = _failed_canary(tree, tmp_path)
    rows = {line.split()[0]: line for line in summary.table().splitlines()[2:]}
    assert rows["s/a"].split()[1:5] == ["canary", "v1", "v1", "FAILED:"] and "rolled back to v1" in rows["s/a"]
    assert rows["s/b"].split()[1:4] == ["rest", "v1", "v1"] and "not sent: the rollout halted" in rows["s/b"]
    # left on the new version (--no-rollback-canary): it says so
    _, kept = _failed_canary(tree, tmp_path / "kept", rollback_canary=False)
    assert kept.table().splitlines()[2].split()[1:5] == ["canary", "v1", "v2", "FAILED:"]


# ---------------------------------------------------------------- 8. skipped stations are not "every station"

def test_a_station_skipped_by_all_makes_the_rollout_not_ok_and_is_named_in_the_event(tmp_path):
    link = InstantLink({"s/a": ("tiny", "v1"), "s/b": ("tiny", "v1"), "s/c": ("tiny", "v1")})
    link.set_state("s/c", "offline")
    stations, skipped = select_stations(link, all_stations=True)
    sink = EventSink()
    summary = run_rollout(link, RolloutPlan(remote("tiny", "v2"), stations, None, None, 5.0, skipped=skipped),
                          RolloutHistory(tmp_path / "h.json"), sink)
    assert not summary.ok and summary.table().startswith("rollout tiny v2: done, but 1 station(s) skipped")
    event = sink.sent[-1]
    assert event["action"] == "rollout" and not event["ok"] and "skipped (offline, no command): s/c" in event["reason"]
    assert list(event["figures"]["skipped"]) == ["s/c"]


@pytest.mark.mqtt
def test_rollout_all_through_the_cli_exits_1_for_an_offline_station_and_0_past_other_models(tree, tmp_path,
                                                                                           broker):
    stations = MqttStations(broker.port, {"s/a": ("tiny", "v1", "online"), "s/c": ("shelf", "v1", "online"),
                                          "s/d": ("shelf", "v1", "offline")})
    recorder = Recorder(broker.port, ["inventory/_central/rollout"])
    common = ["--bundle-url", tree["url"]("tiny", "v2"), "--all", "--no-canary", "--update-timeout-s", "60",
              "--history", str(tmp_path / "h.json"), "--mqtt-host", "127.0.0.1", "--mqtt-port", str(broker.port)]
    try:
        first = cli("rollout", *common)
        assert first.returncode == 0, first.stdout + first.stderr
        assert [key for key, _ in stations.commands] == ["s/a"]
        assert "not sent: runs shelf v1, not tiny" in first.stdout
        stations._publish("s/b", status("s/b", "tiny", "v1", "offline"))
        second = cli("rollout", *common)
        assert second.returncode == 1, second.stdout + second.stderr
        assert "skipped: offline" in second.stdout
        last = wait_until(lambda: [e for e in (m.json() for m in recorder.of("rollout"))
                                   if "s/b" in e["figures"].get("skipped", {})], 30, "the event naming s/b")[-1]
        assert not last["ok"] and sorted(last["figures"]["other_model"]) == ["s/c", "s/d"]
    finally:
        stations.close()
        recorder.close()


# ---------------------------------------------------------------- 9. names the contract does not allow

def test_station_names_are_checked_before_any_command(tmp_path):
    link = InstantLink({"s/a": ("tiny", "v1")})
    with pytest.raises(RolloutError, match=r"--stations 's/b.x': expected <site>/<station>"):
        select_stations(link, stations=["s/a", "s/b.x"])
    with pytest.raises(RolloutError, match=r"canary \(--canary\): expected <site>/<station>.*got 'st-a'"):
        RolloutPlan(remote("tiny", "v2"), ["st-a", "s/a"], "st-a", None, 5.0)
    assert link.sent == []
    done = cli("rollout", "--bundle-url", "http://c/tiny/v2/", "--stations", "s/a", "--canary", "st-a",
               "--history", str(tmp_path / "h.json"), "--mqtt-host", "127.0.0.1", "--mqtt-port", "9")
    assert done.returncode == 2 and "--canary: expected <site>/<station>" in done.stderr, done.stderr


# ---------------------------------------------------------------- 10. one history, two rollouts

def test_two_rollouts_sharing_a_history_keep_each_others_records(tmp_path):
    path = tmp_path / "rollout-history.json"
    a, b = RolloutHistory(path), RolloutHistory(path)       # both loaded the file before either wrote
    a.record("g1/st1", action="rollout", bundle=remote("tiny", "v2"), from_version="v1", ok=True, reason=None)
    b.record("g2/st1", action="rollout", bundle=remote("shelf", "v5"), from_version="v4", ok=True, reason=None)
    a.record("g1/st2", action="rollout", bundle=remote("tiny", "v2"), from_version="v1", ok=True, reason=None)
    final = RolloutHistory(path)
    assert sorted(final.data["stations"]) == ["g1/st1", "g1/st2", "g2/st1"]
    assert final.previous_model("g2/st1", ("shelf", "v5")) == ("shelf", "v4")


def _record_many(path: str, station: str, count: int) -> None:
    history = RolloutHistory(path)
    for n in range(count):
        history.record(station, action="rollout", bundle=remote("tiny", f"v{n + 1}"), from_version=f"v{n}", ok=True,
                       reason=None)


def test_two_processes_recording_at_once_lose_nothing(tmp_path):
    path = str(tmp_path / "rollout-history.json")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_record_many, args=(path, f"g{n}/st", 30)) for n in (1, 2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
        assert proc.exitcode == 0
    final = RolloutHistory(path)
    assert [len(final.entries(f"g{n}/st")) for n in (1, 2)] == [30, 30]


# ---------------------------------------------------------------- 11. a publish event is never lost for good

@pytest.mark.mqtt
def test_publishing_an_already_published_bundle_sends_its_event(tmp_path, broker):
    """A first publish whose broker was down copied the bundle and lost its event; running it again used to print
    'already published' and send nothing, so the dashboard never heard of the version."""
    served = tmp_path / "served"
    bundle = tiny_versions(tmp_path / "models", ["v1"])["v1"]
    publish_bundle(bundle, served, baseline=True)                # the first run: its event never left
    recorder = Recorder(broker.port, ["inventory/_central/rollout"])
    try:
        again = cli("publish", str(bundle), "--root", str(served), "--baseline", "--mqtt-host", "127.0.0.1",
                    "--mqtt-port", str(broker.port))
        assert again.returncode == 0 and "already published" in again.stdout, again.stdout + again.stderr
        [event] = wait_until(lambda: [m.json() for m in recorder.of("rollout")], 30, "the publish event")
    finally:
        recorder.close()
    assert event["action"] == "publish" and event["model"] == {"name": "tiny", "version": "v1"}
    assert event["reason"].startswith("already published (baseline)") and event["figures"]["already"] is True


# ---------------------------------------------------------------- 12. damaged input: named, never a traceback

def test_publish_into_a_root_that_is_a_file_or_under_one_names_root(tree, tmp_path):
    bundle = tree["models"] / "tiny" / "v1"
    (tmp_path / "served.txt").write_text("not a folder")
    with pytest.raises(RolloutError, match=r"--root .*served.txt: not a folder"):
        publish_bundle(bundle, tmp_path / "served.txt", baseline=True)
    with pytest.raises(RolloutError, match=r"--root .*served.txt/inner: cannot publish .*Not a directory"):
        publish_bundle(bundle, tmp_path / "served.txt" / "inner", baseline=True)
    done = cli("publish", str(bundle), "--root", str(tmp_path / "served.txt"), "--baseline")
    assert done.returncode == 2 and "not a folder" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("content, why", [
    (b'{"schema": "rollout-history.v1"}', "field stations: expected an object of lists of entries"),
    (b'{"schema": "rollout-history.v1", "stations": {"s/a": 3}, "bundles": {}}', "field stations"),
    (b'{"schema": "rollout-history.v1", "stations": {}}', "field bundles"),
    (b'{"schema": "rollout-history.v1", "x": "\xff"}', r"not UTF-8 \(byte 39"),
])
def test_a_damaged_history_is_refused_naming_the_file(tmp_path, content, why):
    path = tmp_path / "history.json"
    path.write_bytes(content)
    with pytest.raises(RolloutError, match=f"history.json: .*{why}"):
        RolloutHistory(path)


def test_a_relative_bundle_path_is_sent_to_stations_as_an_absolute_one(tree, monkeypatch):
    """`--bundle-url served/tiny/v2` was sent as it is: each station looked for it in its own working folder."""
    monkeypatch.chdir(tree["served"].parent)
    bundle = resolve_bundle("served/tiny/v2")
    assert bundle.location == str(tree["served"] / "tiny" / "v2") and (bundle.name, bundle.version) == ("tiny", "v2")


# ---------------------------------------------------------------- reading a bundle's location

class TricklingServer:
    """A bundle server on a real localhost port that sends what it sends one byte every ``every_s`` seconds (each
    read of the client's comes in time; the whole never does): in the answer's head, in its body, or in the TLS
    handshake (a record header that promises 16 kB, then its bytes one at a time)."""

    def __init__(self, where: str, every_s: float = 0.2) -> None:
        import socket

        self.where, self.every_s = where, every_s
        self.stop = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn) -> None:
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\n"
        try:
            if self.where == "tls-handshake":
                conn.recv(65536)                        # the ClientHello
                conn.sendall(b"\x16\x03\x03\x40\x00")      # a handshake record of 16 kB ...
            else:
                conn.recv(65536)
                if self.where == "body":
                    conn.sendall(head)
            drip = head if self.where == "head" else b"\x00" * 200000
            for byte in drip:                               # ... that never comes
                if self.stop.wait(self.every_s):
                    break
                conn.sendall(bytes([byte]))
        except OSError:                                     # the client gave up: what this test wants
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


def resolve_in_thread(location: str, within_s: float) -> dict:
    """resolve_bundle(location) in a thread: {"error": ...} or {"bundle": ...}, or {} when it is still reading
    after ``within_s`` (the test then fails instead of hanging)."""
    result: dict = {}

    def run() -> None:
        try:
            result["bundle"] = resolve_bundle(location)
        except Exception as exc:            # noqa: BLE001 - what it raised is what the test checks
            result["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(within_s)
    return result


@pytest.mark.parametrize("where", ["head", "body", "tls-handshake"])
def test_a_bundle_server_that_trickles_its_answer_is_given_up_at_the_deadline_naming_the_url(where, monkeypatch):
    """Given a server that sends a byte every 0.2 s (within the per-read timeout, 5 s here) and never the whole, when
    a rollout reads a bundle's manifest from it with a 1 s deadline, then it fails with a RolloutError naming the URL
    and the deadline, well within 60 s (before: it read for as long as the server went on, and a rollout, or a
    canary's rollback in the middle of one, hung)."""
    from central.rollout import remote as remote_module

    monkeypatch.setattr(remote_module, "FETCH_TIMEOUT_S", 5)
    monkeypatch.setattr(remote_module, "FETCH_DEADLINE_S", 1.0, raising=False)
    server = TricklingServer(where)
    scheme = "https" if where == "tls-handshake" else "http"
    url = f"{scheme}://127.0.0.1:{server.port}/tiny/v2/"
    try:
        result = resolve_in_thread(url, within_s=60)
    finally:
        server.close()
    assert result, "still reading after 60 s"
    assert isinstance(result.get("error"), RolloutError), result
    assert f"{url}manifest.json: not read in full within 1 s" in str(result["error"])


def test_a_bundle_is_read_over_http_and_https_as_before(tree, tmp_path, monkeypatch):
    """The deadline's connections are urllib's own: a published bundle still resolves over HTTP and over HTTPS
    (verified against the CA the host trusts), and a certificate the host does not trust is still refused."""
    import sys

    from central.rollout import BundleServer

    sys.path.append(str(Path(__file__).resolve().parents[2] / "deploy"))
    from deploy_support import make_pki

    pki = make_pki(tmp_path / "pki")
    for tls in (False, True):
        server = BundleServer(tree["served"], tls_cert=pki.server_cert if tls else None,
                              tls_key=pki.server_key if tls else None).start()
        try:
            if tls:
                with pytest.raises(RolloutError, match="CERTIFICATE_VERIFY_FAILED"):
                    resolve_bundle(server.url + "tiny/v2/")
                monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_cert))
            bundle = resolve_bundle(server.url + "tiny/v2/")
            assert (bundle.name, bundle.version, bundle.location) == ("tiny", "v2", server.url + "tiny/v2/")
            assert bundle.sha256 == resolve_bundle(str(tree["served"] / "tiny" / "v2")).sha256
        finally:
            server.stop()


def test_a_location_that_is_no_bundle_server_or_holds_no_readable_manifest_is_a_rollout_error(tmp_path):
    """Before: a server that answers something other than HTTP raised http.client.BadStatusLine, a manifest.json
    that is a folder IsADirectoryError, and a body cut short read as a broken manifest: a traceback from the CLI,
    and a canary rollback (which catches RolloutError) that crashed the rollout. Now each names the URL or file."""
    import socket

    answers = {"ssh": b"SSH-2.0-OpenSSH_9.6\r\n",
               "short": b'HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n{"name": "tiny"'}
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        for kind in ("ssh", "short"):
            conn, _ = listener.accept()
            conn.recv(65536)
            conn.sendall(answers[kind])
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        with pytest.raises(RolloutError, match=rf"127.0.0.1:{port}/a/1/manifest.json: cannot fetch \(not an HTTP "
                                               r"answer: BadStatusLine"):
            resolve_bundle(f"http://127.0.0.1:{port}/a/1/")
        with pytest.raises(RolloutError, match=r"/a/1/manifest.json: the answer ended after 15 bytes, 4985 short"):
            resolve_bundle(f"http://127.0.0.1:{port}/a/1/")
    finally:
        listener.close()
    (tmp_path / "b" / "manifest.json").mkdir(parents=True)
    with pytest.raises(RolloutError, match=r"b/manifest.json: not a regular file"):
        resolve_bundle(str(tmp_path / "b"))
