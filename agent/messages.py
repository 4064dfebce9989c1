"""Versioned JSON Schemas of the MQTT payloads (agent/schemas/mqtt/<name>.v<N>.json)."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

SCHEMAS = ("result.v1", "decision.v1", "alert.v1", "frame.v1", "stats.v1", "status.v1", "frame-envelope.v1",
           "cmd-model.v1", "cmd-thresholds.v1", "cmd-capture-empty.v1")


@lru_cache(maxsize=None)
def mqtt_schema(name: str) -> dict[str, Any]:
    """The schema for a payload's ``schema`` field value, e.g. ``result.v1``."""
    if name not in SCHEMAS:
        raise KeyError(f"no MQTT schema {name!r}; known: {', '.join(SCHEMAS)}")
    return json.loads(resources.files("agent").joinpath(f"schemas/mqtt/{name}.json").read_text())
