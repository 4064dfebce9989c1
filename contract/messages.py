"""The MQTT contract: topics (spelled here once) and the JSON Schemas of every payload.

Topics (ARCHITECTURE.md section 4): a station publishes under ``<root>/<site>/<station>/`` (``root``
is ``inventory`` unless a deployment says otherwise): ``status``, ``result``, ``decision``, ``alert``,
``stats``, ``frames``, ``receipt`` (against a shipment opened by ``cmd/expect``), and listens on ``cmd/#``; central rollout events go to
``<root>/_central/rollout``.

Schemas live in ``contract/schemas``: ``mqtt/<name>.json`` for station payloads and commands,
``rollout-event.v1.json`` for the central events, ``bundle/manifest.v1.json`` for bundles.
``SchemaCheck`` checks a body against one of them with fastjsonschema (the default: it compiles the
schema to Python, 7-8x faster than jsonschema on these payloads, benchmarks/dashboard_ingest.py)
or jsonschema; the schemas use only keywords that draft 7 (fastjsonschema's newest) and 2020-12 read
alike, and tests check that both engines accept and refuse the same messages.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

SCHEMAS = ("result.v1", "decision.v1", "alert.v1", "frame.v1", "stats.v1", "status.v1", "frame-envelope.v1",
           "cmd-model.v1", "cmd-thresholds.v1", "cmd-capture-empty.v1", "cmd-expect.v1", "receipt.v1")
ROLLOUT_SCHEMA = "rollout-event.v1"
ENGINES = ("fastjsonschema", "jsonschema")

# ---------------------------------------------------------------- topics

TOPIC_ROOT = "inventory"
CENTRAL_SITE = "_central"                 # the "site" of central publishers (rollout events)
STATION_LEAVES = ("status", "result", "decision", "alert", "stats", "frames", "receipt")
DASHBOARD_KINDS = ("status", "result", "decision", "alert", "stats")   # what a dashboard follows
KIND_TOPIC = {"result": "result", "decision": "decision", "alert": "alert", "frame": "frames",   # outbox kind -> leaf
              "receipt": "receipt"}


def station_root(site: str, station: str, root: str = TOPIC_ROOT) -> str:
    return f"{root.rstrip('/')}/{site}/{station}"


def station_topic(station: str, leaf: str, root: str = TOPIC_ROOT) -> str:
    """``<root>/<site>/<station>/<leaf>``; ``station`` is ``site/station`` (or ``+/+`` to match all)."""
    return f"{root.rstrip('/')}/{station}/{leaf}"


def rollout_topic(root: str = TOPIC_ROOT) -> str:
    return f"{root.rstrip('/')}/{CENTRAL_SITE}/rollout"


def fleet_subscription(leaf: str, root: str = TOPIC_ROOT) -> str:
    """One leaf of every station, e.g. ``inventory/+/+/frames`` for ingest."""
    return station_topic("+/+", leaf, root)


def split_station_topic(topic: str) -> tuple[str, str, str]:
    """(site, station, leaf) of ``<root...>/<site>/<station>/<leaf>``; ValueError for fewer levels."""
    parts = topic.split("/")
    if len(parts) < 4:
        raise ValueError(f"{topic}: not a station topic (<root>/<site>/<station>/<leaf>)")
    return parts[-3], parts[-2], parts[-1]


@dataclass(frozen=True)
class Topics:
    """One station's topics under its root (``station_root``)."""

    root: str

    def __getattr__(self, name: str) -> str:
        if name in STATION_LEAVES:
            return f"{self.root}/{name}"
        raise AttributeError(name)

    def for_kind(self, kind: str) -> str:
        return f"{self.root}/{KIND_TOPIC[kind]}"

    def cmd(self, verb: str = "#") -> str:
        return f"{self.root}/cmd/{verb}"


# ---------------------------------------------------------------- strict JSON

class NonFiniteError(ValueError):
    """A JSON text or body carrying NaN or an infinity, which no payload, file or page may hold."""


class NestingError(ValueError):
    """A JSON text nested deeper than the parser goes (its RecursionError, as bad input)."""


class DuplicateKeyError(ValueError):
    """A JSON object that gives one key twice: ``json.loads`` keeps the last silently, where the writer may have
    meant the first, or both (``{"bundle": "a", "bundle": "b"}``, ``{"Dress": 3, "Dress": 5}``)."""


class NotTextError(ValueError):
    """A JSON string holding a lone UTF-16 surrogate (``"\\ud800"``, or its raw UTF-8 bytes): valid JSON syntax, but
    no Unicode text, so every UTF-8 writer downstream (a page, a database, a log file) fails on it."""


_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")


def _lone_surrogate_at(value: Any, where: str = "") -> str | None:
    """The path (``top_k/0/label``) of the first string or key in ``value`` holding a lone surrogate, or None."""
    if isinstance(value, str):
        return (where or "(top level)") if _SURROGATE.search(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            path = f"{where}/{key[:40]}" if where else key[:40]
            found = (f"{path} (its key)" if _SURROGATE.search(key) else None) or _lone_surrogate_at(item, path)
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _lone_surrogate_at(item, f"{where}/{i}" if where else str(i))
            if found:
                return found
    return None


def _keys_once(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKeyError(f"key {key[:40]!r} given twice in one object")
            seen.add(key)
    return obj


def _refuse_constant(name: str) -> Any:
    raise NonFiniteError(f"{name} is not a JSON number (non-finite numbers are refused)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise NonFiniteError(f"{text[:40]} is outside the range of a finite number")
    return value


def _decoded(data: bytes | bytearray) -> tuple[str, bool]:
    """JSON bytes as ``json.loads`` decodes them (UTF-8, -16 or -32 by their first bytes; ``surrogatepass``), and
    whether the text may hold a raw surrogate (text that strict UTF-8 decoding gave holds none)."""
    encoding = json.detect_encoding(data)
    if encoding == "utf-8":
        try:
            return data.decode("utf-8"), False
        except UnicodeDecodeError:
            pass
    return data.decode(encoding, "surrogatepass"), True


def loads_finite(data: str | bytes | bytearray) -> Any:
    """``json.loads`` that refuses ``NaN``, ``Infinity``, numbers that overflow to infinity (``1e999``), an
    object giving a key twice and a string holding a lone UTF-16 surrogate (escaped, ``"\\ud800"``, or as raw
    bytes, which ``json.loads`` decodes with ``surrogatepass``).

    Raises ValueError (NonFiniteError for the numbers, DuplicateKeyError for a key given twice, NotTextError for
    a lone surrogate, json.JSONDecodeError for the syntax, UnicodeDecodeError for bytes that are not UTF-8,
    NestingError for arrays or objects nested deeper than the parser goes): every caller already treats
    ValueError as "refuse this input".
    """
    if isinstance(data, (bytes, bytearray)):
        text, may_hold_raw = _decoded(data)
    else:
        text, may_hold_raw = data, isinstance(data, str) and not data.isascii()
    if may_hold_raw:
        raw = _SURROGATE.search(text)
        if raw:
            raise NotTextError(f"character {raw.start()}: a lone UTF-16 surrogate (U+{ord(raw.group()):04X}), "
                               "not text")
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float,
                           object_pairs_hook=_keys_once)
    except RecursionError:      # "[[[[..." in a few dozen kB: refused like any other bad input, not a crash
        raise NestingError("arrays or objects nested deeper than the JSON parser goes") from None
    if isinstance(text, str) and "\\u" in text and _SURROGATE_ESCAPE.search(text):   # escaped: pairs are fine
        try:
            where = _lone_surrogate_at(value)
        except RecursionError:
            raise NestingError("arrays or objects nested deeper than the JSON parser goes") from None
        if where is not None:       # the path may hold the surrogate itself (a key): written as its escape
            where = where.encode("utf-8", "backslashreplace").decode("utf-8")
            where = where if len(where) <= 160 else f"...{where[-150:]}"
            raise NotTextError(f"field {where}: a lone UTF-16 surrogate (\\udXXX) in a string, not text")
    return value


def dumps_finite(body: Any, **kwargs: Any) -> str:
    """``json.dumps`` that refuses to write NaN or an infinity (ValueError) instead of emitting invalid JSON."""
    return json.dumps(body, allow_nan=False, **kwargs)


# ---------------------------------------------------------------- schemas

@lru_cache(maxsize=None)
def _strict_patterns() -> Any:
    """jsonschema's Draft 2020-12 validator whose ``pattern`` does not let ``$`` match before a final newline
    (Python's ``re`` does; fastjsonschema does not): both engines refuse ``"PO-4711\\n"`` for ``^[A-Za-z0-9_.:-]+$``."""
    import re

    import jsonschema

    def pattern(validator: Any, value: str, instance: Any, schema: dict[str, Any]) -> Any:
        if validator.is_type(instance, "string"):
            strict = value[:-1] + r"\Z" if value.endswith("$") and not value.endswith("\\$") else value
            if not re.search(strict, instance):
                yield jsonschema.ValidationError(f"{instance!r} does not match {value!r}")

    return jsonschema.validators.extend(jsonschema.Draft202012Validator, {"pattern": pattern})


class SchemaError(ValueError):
    """A body that breaks its schema; the text names where it came from and the field."""


@lru_cache(maxsize=None)
def schema(name: str) -> dict[str, Any]:
    """A schema by the name payloads carry: ``result.v1`` ... (MQTT), ``rollout-event.v1``."""
    if name == ROLLOUT_SCHEMA:
        path = f"schemas/{name}.json"
    elif name in SCHEMAS:
        path = f"schemas/mqtt/{name}.json"
    else:
        raise KeyError(f"no schema {name!r}; known: {', '.join(SCHEMAS + (ROLLOUT_SCHEMA,))}")
    return json.loads(resources.files("contract").joinpath(path).read_text())


def mqtt_schema(name: str) -> dict[str, Any]:
    """The schema for a station payload's ``schema`` field value, e.g. ``result.v1``."""
    if name not in SCHEMAS:
        raise KeyError(f"no MQTT schema {name!r}; known: {', '.join(SCHEMAS)}")
    return schema(name)


class SchemaCheck:
    """One JSON Schema, checked by fastjsonschema or by jsonschema (see the module docstring)."""

    def __init__(self, body_schema: dict[str, Any], engine: str = "fastjsonschema") -> None:
        if engine not in ENGINES:
            raise ValueError(f"schema engine {engine!r} is not one of {', '.join(ENGINES)}")
        self.engine = engine
        if engine == "fastjsonschema":
            import fastjsonschema

            # use_default=False: a check never changes the body (fastjsonschema fills defaults in otherwise)
            self._compiled = fastjsonschema.compile(body_schema, use_formats=False, use_default=False)
            self._error_type = fastjsonschema.JsonSchemaValueException
        else:
            self._validator = _strict_patterns()(body_schema)

    def error(self, body: Any) -> tuple[str, str] | None:
        """(field path, message) of the first problem, or None when ``body`` follows the schema."""
        if self.engine == "fastjsonschema":
            try:
                self._compiled(body)
            except self._error_type as exc:
                where = "/".join(str(p) for p in (exc.path or [])[1:]) or "(message)"
                text = exc.message
                if exc.name and text.startswith(exc.name):
                    text = text[len(exc.name):].lstrip()
                return where, text
            return None
        import jsonschema

        found = jsonschema.exceptions.best_match(self._validator.iter_errors(body))
        if found is None:
            return None
        return "/".join(str(p) for p in found.absolute_path) or "(message)", found.message

    def check(self, source: str, body: Any, error: type[Exception] = SchemaError) -> None:
        """Raise ``error`` naming ``source`` (a topic, a file) and the field when ``body`` breaks the schema."""
        problem = self.error(body)
        if problem is not None:
            raise error(f"{source}: field {problem[0]}: {problem[1]}")


@lru_cache(maxsize=None)
def checker(name: str, engine: str = "fastjsonschema") -> SchemaCheck:
    """The (compiled once) check of the schema ``name``."""
    return SchemaCheck(schema(name), engine)
