"""Dashboard fixtures: a real mosquitto per test, a real small bundle, and messages recorded from the real agent.

The agent's and the deployment's test helpers are reused from tests/agent/agent_support.py and
tests/deploy/deploy_support.py (put on sys.path here, as their own folders' tests import them by name);
the fixtures live in dashboard_fixtures.py, shared with tests/browser.
"""

from __future__ import annotations

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[2]
for folder in (TESTS / "agent", TESTS / "deploy", TESTS / "central" / "dashboard"):
    if str(folder) not in sys.path:
        sys.path.append(str(folder))

from dashboard_fixtures import (  # noqa: E402,F401
    broker,
    models,
    mosquitto_bin,
    recorded,
    tiny_bundle,
    video,
)
