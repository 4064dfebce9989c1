"""While a shipment is open, cmd/model refuses a bundle whose labels lack one of its expected lines (receiving could
never match that line): on the manifest, before any artifact is fetched, as a lane's label is checked; the status's
last_model_update names the shipment, the labels and the URL, and nothing installed changes. A shipment opened while
an update is under way is checked again before the new model is installed and before it is swapped in.

Real parts: mosquitto, the station (agent.app.Agent, ONNX Runtime, the SQLite outbox, station-state.json), bundles
served over HTTP from a local server. The stand-in: the engine cache (TensorRT cannot run here), used as the moment
an engine builds (minutes on a Jetson) to open a shipment meanwhile.
"""

from __future__ import annotations

import functools
import json
import threading
from http.server import ThreadingHTTPServer

import pytest
from agent_support import EndedCamera, Operator, as_config, station_config, validate_message
from test_reload import Recorded, RecordingEnginePolicy, renamed_class, sha

from agent import update as agent_update
from agent.app import Agent
from agent.demo import Subscriber
from agent.state import STATE_FILE
from contract.messages import loads_finite

pytestmark = pytest.mark.mqtt
ROOT = "inventory/test/st-01"
REFUSED = ("open shipment 'PO-31' expects 1 label(s) the bundle lacks: 'Trouser'; receiving could never match "
           "those lines: close the shipment (cmd/expect close) first, or send a bundle with those labels")


@pytest.fixture
def served(tmp_path):
    """(folder served over HTTP, its URL, the file names asked for)."""
    www = tmp_path / "www"
    www.mkdir()
    asked: list[str] = []
    handler = type("RecordedHere", (Recorded,), {"asked": asked})
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(www)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}", asked
    server.shutdown()
    server.server_close()


def station(tmp_path, broker, tiny_bundle, fmnist_video):
    return as_config(station_config(
        tmp_path, tiny_bundle, str(fmnist_video), broker.port, frames={"enabled": False},
        model={"download_dir": str(tmp_path / "downloads")},
        decisions={"presence": {"mode": "empty_class", "empty_class": "Bag", "min_frames": 1, "max_frames": 1,
                                "gap_frames": 1}}))


def start(cfg, dash: Subscriber, engine_cache=None) -> Agent:
    """A station whose camera ends at once, online (subscribed to cmd/# before its "online" status)."""
    agent = Agent(cfg, source_factory=lambda cam: EndedCamera(), engine_cache=engine_cache)
    agent.start()
    assert dash.wait_for(lambda d: any(loads_finite(m.payload).get("state") == "online" for m in d.of("status")),
                         60), "the station never came online"
    return agent


def statuses(d: Subscriber) -> list[dict]:
    return [loads_finite(m.payload) for m in d.of("status")]


def model_update_for(d: Subscriber, url: str) -> dict:
    """The last last_model_update that answers a cmd/model of ``url`` ({} if none yet)."""
    found = [s["last_model_update"] for s in statuses(d)
             if ((s.get("last_model_update") or {}).get("request") or {}).get("bundle") == url]
    return found[-1] if found else {}


def saved_model(tmp_path):
    """The model station-state.json names (None: the configured bundle, or no state saved yet)."""
    path = tmp_path / STATE_FILE
    return json.loads(path.read_text()).get("model") if path.exists() else None


def test_an_update_lacking_a_line_of_the_open_shipment_is_refused_on_its_manifest(broker, tiny_bundle, fmnist_video,
                                                                                  tmp_path, served):
    # given: a station with shipment PO-31 open (Trouser and Dress expected), and a served bundle that renamed Trouser
    www, base, asked = served
    v2 = renamed_class(tiny_bundle, www / "tiny-2", "tiny-2")
    url = f"{base}/tiny-2/"
    dash = Subscriber(broker.host, broker.port, ROOT)
    operator = Operator(broker, ROOT)
    agent = start(station(tmp_path, broker, tiny_bundle, fmnist_video), dash)
    try:
        operator.send("expect", {"shipment": "PO-31", "lines": {"Trouser": 4, "Dress": 2}})
        assert dash.wait_for(lambda d: (statuses(d)[-1].get("last_expect_update") or {}).get("ok") is True, 20)
        state_before = saved_model(tmp_path)
        # when: cmd/model sends it over MQTT
        operator.send("model", {"bundle": url, "sha256": sha(v2), "version": "tiny-2"})
        assert dash.wait_for(lambda d: model_update_for(d, url).get("ok") is False, 30), statuses(dash)[-1:]
        # then: the status says why, naming the manifest's URL, the shipment and the missing label
        answer = model_update_for(dash, url)
        assert answer["reason"] == f"{url}manifest.json: {REFUSED}"
        assert answer["running"] == {"name": "tiny", "version": "tiny-1"}
        validate_message("status.v1", statuses(dash)[-1])
        # and no artifact was fetched, nothing was installed, the state still names what ran before
        assert [name for name in asked if name.endswith(".onnx")] == []
        assert list((tmp_path / "downloads").iterdir()) == []
        assert agent.model.current.bundle.version == "tiny-1" and saved_model(tmp_path) == state_before
        # when: the shipment is closed, the same update goes through
        operator.send("expect", {"shipment": "PO-31", "close": True})
        assert dash.wait_for(lambda d: ((statuses(d)[-1].get("last_expect_update") or {}).get("shipment") or {})
                             .get("state") == "closed", 20)
        operator.send("model", {"bundle": url, "sha256": sha(v2), "version": "tiny-2"})
        assert dash.wait_for(lambda d: model_update_for(d, url).get("ok") is True, 30), statuses(dash)[-1:]
        assert agent.model.current.bundle.version == "tiny-2"
    finally:
        agent.shutdown(5)
        operator.close()
        dash.close()


class OpensAShipment(RecordingEnginePolicy):
    """The engine cache, while it 'builds' the new bundle's engine: the operator opens a shipment meanwhile."""

    def __init__(self, cache_dir, agent_box: list) -> None:
        super().__init__(cache_dir)
        self.agent_box = agent_box

    def engine_for(self, cfg, bundle):
        if bundle.version == "tiny-2":
            assert self.agent_box[0].expect(json.dumps({"shipment": "PO-31", "lines": {"Trouser": 1}}).encode())
        return super().engine_for(cfg, bundle)


def test_a_shipment_opened_while_the_update_builds_refuses_it_before_it_is_installed(broker, tiny_bundle,
                                                                                   fmnist_video, tmp_path, served):
    # given: a station with no shipment open, and the renamed bundle served
    www, base, _ = served
    v2 = renamed_class(tiny_bundle, www / "tiny-2", "tiny-2")
    url = f"{base}/tiny-2/"
    dash = Subscriber(broker.host, broker.port, ROOT)
    box: list = []
    policy = OpensAShipment(tmp_path / "engines", box)
    agent = start(station(tmp_path, broker, tiny_bundle, fmnist_video), dash, policy)
    box.append(agent)
    try:
        state_before = saved_model(tmp_path)
        # when: the update passes its manifest check, and a shipment expecting Trouser opens while its engine builds
        ok = agent.reload_model(json.dumps({"bundle": url, "sha256": sha(v2), "version": "tiny-2"}).encode())
        # then: refused before it is installed; the station runs tiny-1 and the shipment stays open
        assert policy.asked == ["tiny-2"]
        assert not ok and agent.last_update["reason"] == f"{url}manifest.json: {REFUSED}"
        assert list((tmp_path / "downloads").iterdir()) == []
        assert agent.model.current.bundle.version == "tiny-1" and saved_model(tmp_path) == state_before
        assert agent.inference.receiving.shipment.id == "PO-31"
    finally:
        agent.shutdown(5)
        dash.close()


def test_a_shipment_opened_while_the_update_is_installed_refuses_the_swap(broker, tiny_bundle, fmnist_video,
                                                                         tmp_path, served, monkeypatch):
    # given: a station with no shipment open, and the renamed bundle served
    www, base, _ = served
    v2 = renamed_class(tiny_bundle, www / "tiny-2", "tiny-2")
    url = f"{base}/tiny-2/"
    dash = Subscriber(broker.host, broker.port, ROOT)
    agent = start(station(tmp_path, broker, tiny_bundle, fmnist_video), dash)
    real_install = agent_update.Incoming.install

    def install_then_open(self, download_dir, public_key):
        installed = real_install(self, download_dir, public_key)
        assert agent.expect(json.dumps({"shipment": "PO-31", "lines": {"Trouser": 1}}).encode())
        return installed

    monkeypatch.setattr(agent_update.Incoming, "install", install_then_open)
    try:
        state_before = saved_model(tmp_path)
        # when: a shipment expecting Trouser opens between the install and the swap
        ok = agent.reload_model(json.dumps({"bundle": url, "sha256": sha(v2), "version": "tiny-2"}).encode())
        # then: the swap is refused; the station runs tiny-1, its state unchanged, and the copy installed is one
        # cmd/model marked (the next update's clean-up removes it)
        assert not ok and agent.last_update["reason"] == f"{url}manifest.json: {REFUSED}"
        assert agent.model.current.bundle.version == "tiny-1" and saved_model(tmp_path) == state_before
        assert agent_update.installed_by_cmd_model(tmp_path / "downloads" / "tiny" / "tiny-2")
    finally:
        agent.shutdown(5)
        dash.close()
