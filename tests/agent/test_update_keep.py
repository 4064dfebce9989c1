"""Which installed bundles a station keeps after cmd/model swaps: the running one, the one before it (a rollback
is instant and works offline) and the configured one (what a start falls back to), even when the configured bundle
lies inside model.download_dir or the running bundle is sent again.

Real parts: the station (agent.app.Agent, ONNX Runtime), bundles downloaded over HTTP from a local server and
installed under model.download_dir, as a bundle server would serve them.
"""

from __future__ import annotations

from test_reload import bundle_version
from test_station_state import config, restarted, serve_folder, update


def test_the_configured_bundle_inside_the_download_folder_survives_swaps(tiny_bundle, fmnist_video, tmp_path):
    configured = bundle_version(tiny_bundle, tmp_path / "downloads" / "tiny" / "tiny-1", "tiny-1")
    www = tmp_path / "www"
    server, url = serve_folder(www)
    try:
        agent = restarted(config(tmp_path, configured, fmnist_video))
        for n in (2, 3, 4):
            served = bundle_version(tiny_bundle, www / "tiny" / f"tiny-{n}", f"tiny-{n}")
            assert update(agent, served, f"tiny-{n}", f"{url}/tiny/tiny-{n}/")
    finally:
        server.shutdown()
    assert (configured / "manifest.json").exists()
    assert sorted(p.name for p in (tmp_path / "downloads" / "tiny").iterdir()) == ["tiny-1", "tiny-3", "tiny-4"]


def test_sending_the_running_bundle_again_keeps_the_one_before_it(tiny_bundle, fmnist_video, tmp_path):
    www = tmp_path / "www"
    server, url = serve_folder(www)
    try:
        agent = restarted(config(tmp_path, tiny_bundle, fmnist_video))
        for n in (2, 3, 3):
            served = www / "tiny" / f"tiny-{n}"
            if not served.exists():
                bundle_version(tiny_bundle, served, f"tiny-{n}")
            assert update(agent, served, f"tiny-{n}", f"{url}/tiny/tiny-{n}/")
    finally:
        server.shutdown()
    assert agent.model.current.bundle.version == "tiny-3"
    assert sorted(p.name for p in (tmp_path / "downloads" / "tiny").iterdir()) == ["tiny-2", "tiny-3"]
