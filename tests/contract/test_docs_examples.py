"""The MQTT messages the docs show follow their schemas, and the docs name every field a schema requires.

Examples are found without markers, by what a reader sees:

- a fenced ```json block holds one or more JSON values; its schema is the one the value names (``"schema":
  "result.v1"``, ``"envelope": "frame.v1"``), else the topic named on the line just above the block (``Publish to
  `<root>/cmd/model`:``). A block with neither (a bundle manifest) is no MQTT message;
- a ``mosquitto_pub -t TOPIC ... -m 'JSON'`` line in any fenced block: the schema of TOPIC.

Each example is read with ``loads_finite`` and checked with ``contract.messages.checker``, by both engines, as the
station, ingest and the dashboard check what they receive. The field tables: the MQTT table in docs/agent.md names,
for each topic, every field its schema requires (the fields every message carries, in the paragraph below it), and
a command's template names exactly the fields its schema has.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from contract.messages import ENGINES, ROLLOUT_SCHEMA, SCHEMAS, checker, loads_finite, schema

REPO = Path(__file__).resolve().parents[2]
DOCS = sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md"]
LEAF_SCHEMA = {"status": "status.v1", "result": "result.v1", "decision": "decision.v1", "alert": "alert.v1",
               "stats": "stats.v1", "frames": "frame.v1", "receipt": "receipt.v1"}
COMMON = ("schema", "id", "seq", "ts", "site", "station")     # every station message: said once, under the table
FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass(frozen=True)
class Example:
    where: str          # docs/agent.md:534
    schema: str
    body: Any


def topic_schema(text: str) -> str | None:
    """The schema of the first MQTT topic ``text`` names: ``.../cmd/<verb>`` or ``<root>/<leaf>``."""
    found = re.search(r"(?:^|[/`\s])cmd/([a-z-]+)", text)
    if found:
        return f"cmd-{found.group(1)}.v1"
    found = re.search(r"(?:<root>|[A-Za-z0-9_+-]+/[A-Za-z0-9_+-]+)/(" + "|".join(LEAF_SCHEMA) + r")\b", text)
    if found:
        return LEAF_SCHEMA[found.group(1)]
    if "_central/rollout" in text:
        return ROLLOUT_SCHEMA
    return None


def json_values(text: str) -> list[Any]:
    """The JSON values one after another in ``text`` (one per line, or one over many lines); ValueError naming
    the character where one does not parse."""
    values, at = [], 0
    while True:
        while at < len(text) and text[at].isspace():
            at += 1
        if at == len(text):
            return values
        end = _value_end(text, at)
        values.append(loads_finite(text[at:end]))
        at = end


def _value_end(text: str, start: int) -> int:
    """Where the JSON value at ``start`` ends (``json.JSONDecoder.raw_decode``, refusing what loads_finite would)."""
    import json

    try:
        return json.JSONDecoder().raw_decode(text, start)[1]
    except json.JSONDecodeError as exc:
        raise ValueError(f"character {start}: not JSON ({exc.msg} at {exc.pos})") from None


def named_schema(value: Any) -> str | None:
    if isinstance(value, dict):
        if value.get("schema") in SCHEMAS + (ROLLOUT_SCHEMA,):
            return value["schema"]
        if value.get("envelope") == "frame.v1":
            return "frame-envelope.v1"
    return None


def fenced_blocks(path: Path) -> list[tuple[int, str, str, str]]:
    """(line of the block's first line, language, text above the fence, body) of each fenced block."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        above = next((line for line in reversed(lines[:i]) if line.strip()), "")
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), len(lines))
        blocks.append((i + 2, opening.group(1), above, "\n".join(lines[i + 1:end])))
        i = end + 1
    return blocks


def examples() -> list[Example]:
    found: list[Example] = []
    for path in DOCS:
        rel = path.relative_to(REPO).as_posix()
        for first, language, above, body in fenced_blocks(path):
            if language == "json":
                try:
                    values = json_values(body)
                except ValueError:
                    values = None        # a fragment ("open_set": {...}) is no message; one that is must parse
                if values is None or not all(isinstance(v, dict) for v in values):
                    assert topic_schema(above) is None, f"{rel}:{first}: the MQTT example is not JSON objects"
                    continue
                for value in values:
                    name = named_schema(value) or topic_schema(above)
                    if name is not None:
                        found.append(Example(f"{rel}:{first}", name, value))
            for n, line in enumerate(body.splitlines()):
                if line.lstrip().startswith("mosquitto_pub"):
                    args = shlex.split(line, comments=True)
                    topic, message = args[args.index("-t") + 1], args[args.index("-m") + 1]
                    name = topic_schema(topic)
                    assert name is not None, f"{rel}:{first + n}: no schema for topic {topic}"
                    found.append(Example(f"{rel}:{first + n}", name, loads_finite(message)))
    return found


EXAMPLES = examples()


def test_the_docs_examples_are_found():
    """What the docs show today (so that a change to the docs or to this reader that loses them is seen)."""
    shown = {e.schema for e in EXAMPLES}
    assert {"cmd-expect.v1", "cmd-model.v1", "cmd-capture-empty.v1", ROLLOUT_SCHEMA} <= shown, EXAMPLES
    assert sum(e.schema == "cmd-expect.v1" for e in EXAMPLES) >= 2     # open and close


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: f"{e.where}:{e.schema}")
def test_each_documented_mqtt_message_follows_its_schema(example: Example, engine: str):
    problem = checker(example.schema, engine).error(example.body)
    assert problem is None, f"{example.where}: {example.schema}: field {problem[0]}: {problem[1]}"


def mqtt_table() -> dict[str, tuple[str, str]]:
    """docs/agent.md's MQTT table: topic below ``<root>/`` -> (schema names cell, payload cell)."""
    rows = {}
    for line in (REPO / "docs" / "agent.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].startswith("`<root>/"):
            rows[cells[0].strip("`").removeprefix("<root>/")] = (cells[3], cells[4])
    return rows


def test_the_mqtt_table_lists_every_topic_with_its_schema():
    table = mqtt_table()
    assert set(LEAF_SCHEMA) <= set(table), sorted(table)
    for leaf, name in LEAF_SCHEMA.items():
        assert f"`{name}`" in table[leaf][0], (leaf, table[leaf][0])
    commands = {f"cmd-{topic.removeprefix('cmd/')}.v1" for topic in table if topic.startswith("cmd/")}
    assert commands == {s for s in SCHEMAS if s.startswith("cmd-")}


@pytest.mark.parametrize("leaf", sorted(LEAF_SCHEMA))
def test_the_mqtt_table_names_every_field_a_station_message_requires(leaf: str):
    payload = mqtt_table()[leaf][1]
    words = set(re.findall(r"[A-Za-z_]+", payload))
    missing = [f for f in schema(LEAF_SCHEMA[leaf])["required"] if f not in COMMON and f not in words]
    assert not missing, f"docs/agent.md, MQTT table, <root>/{leaf}: required fields not named: {missing}"


def test_the_fields_every_station_message_carries_are_said_under_the_table():
    text = (REPO / "docs" / "agent.md").read_text()
    paragraph = text[text.index("Schemas: `contract/schemas/mqtt/<name>.json`"):][:1500]
    for field in COMMON:
        assert f"`{field}`" in paragraph, field
    for name in LEAF_SCHEMA.values():
        assert set(COMMON) <= set(schema(name)["required"]), name


@pytest.mark.parametrize("topic", ["cmd/model", "cmd/capture-empty", "cmd/expect", "cmd/thresholds"])
def test_a_command_template_names_exactly_its_schema_fields(topic: str):
    payload = mqtt_table()[topic][1]
    named = set(re.findall(r'"([a-z0-9_]+)":', payload))
    fields = set(schema(f"cmd-{topic.removeprefix('cmd/')}.v1")["properties"])
    assert named == fields, f"docs/agent.md, MQTT table, <root>/{topic}: template {sorted(named)}, " \
                            f"schema {sorted(fields)}"
