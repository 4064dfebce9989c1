"""tests/central: the station's helpers (tests/agent/agent_support.py: a real mosquitto, station configs) and
the loop's (tests/central/loop/*_support.py) are imported by name; put their folders on sys.path here, so any
one test file runs alone as well as in the suite. The real mosquitto fixtures (``broker``, ``mosquitto_bin``) are the
station's, imported here for every central test."""

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
for folder in (TESTS / "agent", TESTS / "central" / "loop"):
    if str(folder) not in sys.path:
        sys.path.append(str(folder))

from agent_support import broker, mosquitto_bin  # noqa: E402,F401
