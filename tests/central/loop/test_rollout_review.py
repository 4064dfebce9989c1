"""The rollout against what a review found it misread: counters that do not add up (a canary restarted between
its baseline and the watch, a station bug), a broker that goes away mid-rollout, a history whose disk is full,
offline stations named, a group file with a byte order mark, two publishes of one bundle at once.

Real parts: mosquitto (``Broker``), stand-in stations on it (``MqttStations`` of test_rollout_hostile.py: a
retained status each, a new one per command), real published bundles, the CLI as a user runs it. A full disk is a
real one for the process: ``RLIMIT_FSIZE`` makes write(2) fail with EFBIG, as ENOSPC would.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from agent_support import Broker
from rollout_support import REPO, cli, promote, tiny_versions, wait_until
from test_rollout_hostile import MqttStations, remote, stats

from central.rollout import (
    RolloutError,
    RolloutHistory,
    StationLink,
    WatchPolicy,
    judge_canary,
    publish_bundle,
    rate_over,
    select_stations,
)
from contract.broker import BrokerSettings
from contract.events import mqtt_publish

POLICY = WatchPolicy(watch_s=60, max_low_conf_increase=0.05, max_errors=0, min_frames=20, baseline_s=0)


# ---------------------------------------------------------------- 1. counters that do not add up (pure)

@pytest.mark.parametrize("before, after, policy, why", [
    # restarted after the baseline (counters from 0): 3 errors on v2, 5 on v1 before: 3 - 5 hid them
    ([stats("1", 9000, 900, 5), stats("1", 9100, 910, 5)], [stats("2", 50, 5, 2), stats("2", 150, 15, 3)], POLICY,
     "counters went back during the watch (the agent restarted): frames_classified went back from 9100 to 50"),
    # the low-confidence counter goes back while frames go on: a rate of -50 % passed any cap
    ([stats("1", 100, 10), stats("1", 200, 20)], [stats("2", 300, 80), stats("2", 400, 30)],
     WatchPolicy(60, max_low_conf_rate=0.3, min_frames=20), "frames_low_confidence went back from 80 to 30"),
    # a baseline with more low-confidence frames than frames (290 %): the rise rule could never fire
    ([stats("1", 100, 10), stats("1", 200, 300)], [stats("2", 300, 30), stats("2", 400, 120)], POLICY,
     "frames_low_confidence 300 is more than frames_classified 200"),
    # inference errors counted 9, then 0, while frames go on: the 9 were hidden
    ([stats("1", 100, 10, 0)], [stats("2", 150, 15, 9), stats("2", 250, 25, 0)], POLICY,
     "inference_errors went back from 9 to 0"),
])
def test_a_canary_whose_counters_do_not_add_up_fails_its_watch_naming_them(before, after, policy, why):
    """Given stats.v1 messages each valid by the schema, when their cumulative counters go back or the
    low-confidence frames outrun the frames, then the canary fails, naming the counters (before: each passed)."""
    verdict = judge_canary(before, after, "2", policy)
    assert not verdict.ok and why in verdict.reason, verdict.reason


def test_the_rate_before_is_taken_after_a_restart_in_the_baseline():
    """An agent restarted during --baseline-s: the rate is the restarted agent's, never a negative difference."""
    assert rate_over([stats("1", 5000, 500), stats("1", 100, 30), stats("1", 300, 70)]) == (0.2, 200)
    assert rate_over([stats("1", 100, 10), stats("1", 200, 300)]) == (None, 0)


# ---------------------------------------------------------------- 2. a broker that goes away mid-rollout

@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("served-tree")
    tiny = tiny_versions(root / "models", ["v1", "v2"])
    publish_bundle(tiny["v1"], root / "served", baseline=True)
    promote(tiny["v2"])
    publish_bundle(tiny["v2"], root / "served")
    return root / "served"


class AnswersOnly(MqttStations):
    """Stand-in stations where only ``answering`` switch on cmd/model; the others get it and never answer."""

    answering = ("s/a",)

    def _on_command(self, c, u, msg) -> None:
        key = "/".join(msg.topic.split("/")[1:3])
        if key in self.answering:
            super()._on_command(c, u, msg)
        else:
            self.commands.append((key, json.loads(msg.payload)))


@pytest.mark.mqtt
def test_a_broker_that_goes_away_mid_rollout_still_leaves_the_summary(served, tmp_path, broker):
    """Given s/a that switches and s/b that never answers, when the broker stops while the rollout waits for s/b
    and is still down at its end, then the rollout prints who runs what and exits 1, listing the event it could not
    send (before: the event's publish raised, the CLI printed only 'publish failed' and exited 2, no summary)."""
    stations = AnswersOnly(broker.port, {"s/a": ("tiny", "v1", "online"), "s/b": ("tiny", "v1", "online")})

    def stop_once_sent() -> None:
        wait_until(lambda: [k for k, _ in stations.commands] == ["s/a", "s/b"], 60, "both commands")
        broker.stop()

    stopper = threading.Thread(target=stop_once_sent)
    stopper.start()
    try:
        done = cli("rollout", "--bundle-url", str(served / "tiny" / "v2"), "--stations", "s/a,s/b", "--no-canary",
                   "--update-timeout-s", "20", "--history", str(tmp_path / "h.json"), "--mqtt-host", "127.0.0.1",
                   "--mqtt-port", str(broker.port), timeout=300)
    finally:
        stopper.join()
        stations.close()
    assert done.returncode == 1, done.stdout + done.stderr
    rows = {line.split()[0]: line for line in done.stdout.splitlines()[2:4]}
    assert rows["s/a"].split()[1:5] == ["rest", "v1", "v2", "ok"]
    assert "FAILED: no status reporting tiny v2" in rows["s/b"]
    assert "the connection to the MQTT broker is down: that state is the last one received" in rows["s/b"]
    assert "NOT RECORDED: the rollout event did not reach the dashboard" in done.stdout
    history = RolloutHistory(tmp_path / "h.json")
    assert [e["ok"] for e in history.entries("s/a")] == [True] and [e["ok"] for e in history.entries("s/b")] == [False]


@pytest.mark.mqtt
def test_a_command_reported_not_sent_during_an_outage_is_never_sent_later(tmp_path):
    """Given a link whose broker went away, when cmd/model cannot be sent, then it is reported not sent and it is
    not queued either: after the broker is back, a later publish on the same connection arrives and the command
    never does (before: paho kept it and sent it on reconnecting, so a station reported 'not sent' switched)."""
    (tmp_path / "b").mkdir()
    broker = Broker(tmp_path / "b").start()
    link = StationLink(BrokerSettings("127.0.0.1", broker.port)).connect()
    try:
        link.settle()
        broker.stop()
        wait_until(lambda: link.lost, 30, "the link to notice the broker is gone")
        with pytest.raises(RolloutError) as refused:
            link.send_model("s/b", remote("tiny", "v2"), reconnect_wait_s=0.5)
        broker.start()
        assert link.wait_connected(60), "the link did not reconnect"
        mqtt_publish(link.client, "inventory/s/b/marker", {"after": "the outage"})     # same connection, after it
        wait_until(lambda: "inventory/s/b/marker" in broker.log(), 30, "the marker in the broker's log")
        assert "inventory/s/b/cmd/model" not in broker.log()
        assert str(refused.value).startswith("inventory/s/b/cmd/model: not sent: no connection to the MQTT broker")
        assert "not back within 0.5 s" in str(refused.value)
    finally:
        link.close()
        broker.stop()


# ---------------------------------------------------------------- 3. a history that cannot be written

def test_a_history_on_a_full_disk_stops_nothing_and_the_summary_says_what_is_missing(served, tmp_path, broker):
    """Given a history file the process cannot grow (RLIMIT_FSIZE: a real EFBIG from write(2)), when a rollout
    switches two stations, then both are switched and listed, the summary says the history misses them, the exit
    code is 1, and no half-written file is left beside it (before: a traceback after the first station, no summary,
    and a .tmp file left)."""
    path = tmp_path / "h.json"
    history = RolloutHistory(path)
    for n in range(20):
        history.record(f"old/st{n}", action="rollout", bundle=remote("tiny", "v1"), from_version="v0", ok=True,
                       reason=None)
    limit = path.stat().st_size + 200
    stations = MqttStations(broker.port, {"s/a": ("tiny", "v1", "online"), "s/b": ("tiny", "v1", "online")})
    full_disk = ("import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                 f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
                 "sys.argv = ['central', *sys.argv[1:]]; runpy.run_module('central', run_name='__main__')")
    try:
        done = subprocess.run([sys.executable, "-c", full_disk, "rollout", "--bundle-url",
                               str(served / "tiny" / "v2"), "--stations", "s/a,s/b", "--no-canary",
                               "--update-timeout-s", "60", "--history", str(path), "--mqtt-host", "127.0.0.1",
                               "--mqtt-port", str(broker.port)], cwd=REPO, capture_output=True, text=True,
                              timeout=300)
    finally:
        stations.close()
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stdout + done.stderr
    assert done.stdout.startswith("rollout tiny v2: done, but the history is incomplete")
    assert [k for k, _ in stations.commands] == ["s/a", "s/b"]
    assert "NOT RECORDED: " in done.stdout and "cannot write the rollout history (File too large); 2 record(s)" \
        in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".h.json")) == [".h.json.lock"]
    assert RolloutHistory(path).entries("s/a") == []        # the file is as it was: nothing half-written


def test_records_a_failed_write_held_are_written_with_the_next_one(tmp_path):
    """A short failure (a damaged file another program wrote, then put right) loses no record."""
    path = tmp_path / "h.json"
    history = RolloutHistory(path)          # no file yet
    path.write_text("{not json")
    with pytest.raises(RolloutError, match=r"h.json: rollout history is not valid JSON .*; 1 record\(s\) not in it"):
        history.record("s/a", action="rollout", bundle=remote("tiny", "v2"), from_version="v1", ok=True, reason=None)
    path.unlink()                           # put right
    history.record("s/b", action="rollout", bundle=remote("tiny", "v2"), from_version="v1", ok=True, reason=None)
    again = RolloutHistory(path)
    assert [len(again.entries(s)) for s in ("s/a", "s/b")] == [1, 1] and history.unwritten == []


# ---------------------------------------------------------------- 4. offline stations named

@pytest.mark.mqtt
def test_an_offline_canary_halts_at_once_and_an_offline_station_is_not_sent_a_lost_command(served, tmp_path,
                                                                                          broker):
    """An agent's MQTT session ends with its connection, so a cmd/model sent to an offline station is lost.
    Given a canary whose retained status says offline, the rollout halts before gathering stats (before: it
    waited --baseline-s plus --update-timeout-s, 330 s by default, for stats that could not come); given an offline
    station named without a canary, it is listed 'not sent: offline' and gets no command."""
    stations = AnswersOnly(broker.port, {"s/a": ("tiny", "v1", "offline"), "s/b": ("tiny", "v1", "online"),
                                              "s/c": ("tiny", "v1", "offline")})
    stations.answering = ("s/a", "s/b", "s/c")
    common = ["--bundle-url", str(served / "tiny" / "v2"), "--update-timeout-s", "600", "--history",
              str(tmp_path / "h.json"), "--mqtt-host", "127.0.0.1", "--mqtt-port", str(broker.port)]
    try:
        canary = cli("rollout", *common, "--stations", "s/a,s/b", "--canary", "s/a", "--baseline-s", "600",
                     timeout=300)
        rest = cli("rollout", *common, "--stations", "s/b,s/c", "--no-canary", timeout=300)
    finally:
        stations.close()
    assert canary.returncode == 1, canary.stdout + canary.stderr
    assert canary.stdout.startswith("rollout tiny v2: HALTED: canary s/a is offline (its retained status says so)")
    assert rest.returncode == 1, rest.stdout + rest.stderr
    assert "not sent: offline (its retained status says so)" in rest.stdout
    assert [k for k, _ in stations.commands] == ["s/b"]


# ---------------------------------------------------------------- 5. a group file with a byte order mark

def test_a_group_file_with_a_byte_order_mark_is_read_and_a_fifo_is_refused(tmp_path):
    """Windows editors save UTF-8 with a BOM: its first station was refused as '\\ufeffber1/receiving-01'."""
    import os

    group = tmp_path / "receiving.txt"
    group.write_text("ber1/receiving-01\r\nber1/receiving-02\r\n", encoding="utf-8-sig")
    assert select_stations(None, group=group) == (["ber1/receiving-01", "ber1/receiving-02"], {})
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(RolloutError, match=r"fifo: cannot read the station group \(not a regular file\)"):
        select_stations(None, group=tmp_path / "fifo")


# ---------------------------------------------------------------- 6. two publishes of one bundle at once

def test_two_publishes_of_one_bundle_at_once_both_succeed(tmp_path, monkeypatch):
    """Given a publish that has checked the served tree and is copying, when a second publish of the same bundle
    (a real 'python -m central publish' process) runs meanwhile, then both succeed, one as 'already published'
    (before: the first to rename won and the other failed with 'Directory not empty' on its partial folder)."""
    import contract.bundle as bundle_module

    bundle = tiny_versions(tmp_path / "models", ["v2"])["v2"]
    promote(bundle)
    root = tmp_path / "served"
    sweep = bundle_module.sweep_partials
    other: dict = {}

    def sweep_then_let_another_publish_run(parent):      # called after the target was found free
        proc = subprocess.Popen([sys.executable, "-m", "central", "publish", str(bundle), "--root", str(root)],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for line in proc.stderr:               # it finishes first (no lock), or says it waits for this one
            other.setdefault("stderr", []).append(line)
            if "another publish of tiny is under way" in line:
                break
        other["proc"] = proc
        return sweep(parent)

    monkeypatch.setattr(bundle_module, "sweep_partials", sweep_then_let_another_publish_run)
    first = publish_bundle(bundle, root)
    out, err = other["proc"].communicate(timeout=300)
    assert first.already is False and (root / "tiny" / "v2" / "manifest.json").exists()
    assert other["proc"].returncode == 0, "".join(other.get("stderr", [])) + err
    assert out.startswith("already published tiny v2")
    assert json.loads((root / "tiny" / "index.json").read_text())["versions"].keys() == {"v2"}
    assert not [p for p in (root / "tiny").iterdir() if ".partial" in p.name]


# ---------------------------------------------------------------- 7. a history that grows for ever

def test_the_history_stays_bounded_and_previous_still_walks_back(tmp_path):
    """Every record rewrites the whole file: without a bound, a station's thousandth rollout rewrote a thousand
    entries (and every bundle ever sent) each time."""
    from central.rollout.history import MAX_BUNDLES, MAX_ENTRIES

    path = tmp_path / "h.json"
    history = RolloutHistory(path)
    for n in range(1, MAX_ENTRIES + 51):
        history.record("s/a", action="rollout", bundle=remote("tiny", f"v{n}"), from_version=f"v{n - 1}",
                       from_name="tiny", ok=True, reason=None)
    history.record("s/b", action="rollout", bundle=remote("tiny", "v1"), from_version="v0", ok=True, reason=None)
    again = RolloutHistory(path)
    assert len(again.entries("s/a")) == MAX_ENTRIES and again.entries("s/a")[-1]["version"] == f"v{MAX_ENTRIES + 50}"
    assert len(again.entries("s/b")) == 1 and len(again.data["bundles"]) <= MAX_BUNDLES
    assert list(again.data["bundles"])[-1] == "tiny/v1"          # sent again last: kept as the most recent
    assert again.previous_model("s/a", ("tiny", f"v{MAX_ENTRIES + 50}")) == ("tiny", f"v{MAX_ENTRIES + 49}")


def test_a_history_record_without_a_bundle_url_is_passed_over_not_a_crash(tmp_path):
    """A hand-edited record passes the file's shape check; looking up a rollback target raised KeyError 'bundle'."""
    path = tmp_path / "h.json"
    no_url = {"ok": True, "action": "rollout", "name": "tiny", "version": "v1"}
    path.write_text(json.dumps({"schema": "rollout-history.v1",
                                "bundles": {"tiny/v1": {"name": "tiny", "version": "v1"}},
                                "stations": {"s/a": [no_url], "s/b": [{"ok": True, "name": "tiny", "version": "v3",
                                                                       "bundle": "http://c:8070/tiny/v3/"}]}}))
    history = RolloutHistory(path)
    assert history.location_of("tiny", "v1", "s/a") == "http://c:8070/tiny/v1/"     # beside s/b's, as documented
    assert history.location_of("shelf", "v1", "s/a") is None


# ---------------------------------------------------------------- 8. a stats message the broker kept

@pytest.mark.mqtt
def test_a_retained_stats_message_is_refused_as_stale(broker):
    """Stats are never retained (stats.v1). One a broker kept (an old tool, a bridge) was delivered on subscribing
    and again after every reconnect with a time of now: old counters read as the newest, in the middle of a watch a
    'restart'. Given such a message, when the rollout follows the station's stats, then it is refused and counted,
    and the live stats are taken."""
    import paho.mqtt.client as paho

    stale = {"schema": "stats.v1", "id": "00000000-0000-4000-8000-000000000001", "seq": 1, "ts": 1.0, "site": "s",
             "station": "a", "fps": {}, "frames_dropped": {}, "latency": {}, "queue_depths": {},
             "outbox": {"depth": 0, "bytes": 0, "dropped": {}}, "low_confidence_rate": 0.5, "model_version": "v1",
             "frames_classified": 10, "frames_low_confidence": 5, "inference_errors": 0}
    live = {**stale, "id": "00000000-0000-4000-8000-000000000002", "seq": 2, "frames_classified": 5000,
            "frames_low_confidence": 500, "low_confidence_rate": 0.1}
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="stale-stats", protocol=paho.MQTTv5)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    link = StationLink(BrokerSettings("127.0.0.1", broker.port)).connect()
    try:
        client.publish("inventory/s/a/stats", json.dumps(stale), qos=1, retain=True).wait_for_publish(10)
        link.settle()
        link.follow_stats(["s/a"])

        def live_seen():
            client.publish("inventory/s/a/stats", json.dumps(live), qos=0)
            return link.snapshot("s/a").stats
        wait_until(live_seen, 30, "a live stats message", interval=0.3)
        wait_until(lambda: link.refused == 1, 30, "the retained stats message refused")
        assert {s["frames_classified"] for _, s in link.snapshot("s/a").stats} == {5000}
    finally:
        link.close()
        client.disconnect()
        client.loop_stop()
