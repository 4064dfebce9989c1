"""Which stations a rollout or rollback addresses: named, listed in a group file, or every online station.

Every name is checked against the contract's ``<site>/<station>`` form before any command goes out: a
command to ``st-a`` or ``ber1/st.a`` reaches no station, and an event naming it breaks ``rollout-event.v1``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from central.rollout.link import StationLink
from contract.events import RolloutError

# site and station as the MQTT schemas (status.v1, stats.v1) and rollout-event.v1 allow them
STATION_RE = re.compile(r"[A-Za-z0-9_-]{1,64}/[A-Za-z0-9_-]{1,64}")


def check_station(station: str, where: str) -> str:
    """``station`` when it is a ``<site>/<station>`` name, else RolloutError naming ``where`` (a flag, a file line)."""
    if not isinstance(station, str) or not STATION_RE.fullmatch(station):
        raise RolloutError(f"{where}: expected <site>/<station> (letters, digits, '_' and '-', at most 64 each), "
                           f"got {station!r}")
    return station


GROUP_MAX_BYTES = 1 << 20     # a station a line: far more than any fleet; a larger file is not a group


def _group_lines(group: Path) -> list[str]:
    """The group file's lines: UTF-8, a byte order mark (Windows editors write one) dropped; RolloutError naming
    the file when it is not a regular file (a FIFO would block the read for good) or not text of a sane size."""
    try:
        if group.exists() and not group.is_file():
            raise RolloutError(f"{group}: cannot read the station group (not a regular file)")
        with open(group, "rb") as fh:
            data = fh.read(GROUP_MAX_BYTES + 1)
        if len(data) > GROUP_MAX_BYTES:
            raise RolloutError(f"{group}: more than {GROUP_MAX_BYTES} bytes, not a station group (one "
                               "<site>/<station> a line)")
        return data.decode("utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise RolloutError(f"{group}: cannot read the station group ({why})") from exc


def read_group(group: Path) -> list[str]:
    """The stations a group file lists (one <site>/<station> a line, # comments), each checked; RolloutError naming
    the file (and the line) when it cannot be read, a line is no station name, or it lists none. The CLI reads it
    before connecting to the broker: a mistyped --group is refused without touching the fleet."""
    chosen = []
    for n, line in enumerate(_group_lines(Path(group)), 1):
        line = line.split("#", 1)[0].strip()
        if line:
            chosen.append(check_station(line, f"{group}:{n}"))
    if not chosen:
        raise RolloutError(f"{group}: lists no stations (one <site>/<station> a line, '#' starts a comment)")
    return chosen


def select_stations(link: StationLink, *, stations: Sequence[str] = (), group: Path | None = None,
                    all_stations: bool = False) -> tuple[list[str], dict[str, str]]:
    """The stations named (``--stations``), listed in a group file (``read_group``), or every station with a
    retained status (online ones; offline ones are returned as skipped, with why)."""
    chosen = [check_station(s, f"--stations {s!r}") for s in stations]
    if group is not None:
        chosen.extend(read_group(Path(group)))
    skipped: dict[str, str] = {}
    if all_stations:
        for station in link.known_stations():
            if not STATION_RE.fullmatch(station):
                skipped[station] = "not a <site>/<station> name the contract allows; it gets no command"
            elif link.snapshot(station).online:
                chosen.append(station)
            else:
                skipped[station] = "offline (its retained status says so); it gets no command"
    seen: dict[str, None] = dict.fromkeys(chosen)
    if not seen:
        raise RolloutError("no stations: name them (--stations), list them (--group FILE) or use --all")
    return list(seen), skipped


def split_by_model(link: StationLink, stations: Sequence[str], name: str) -> tuple[list[str], dict[str, str]]:
    """The stations running model ``name``, and the others with what they run. ``--all`` sends a model only to
    the stations that run it: a station of another model is switched only when it is named (``--stations``)."""
    same: list[str] = []
    others: dict[str, str] = {}
    for station in stations:
        view = link.snapshot(station)
        if view.model_name == name:
            same.append(station)
        else:
            others[station] = (f"runs {view.describe()}, not {name}: --all sends {name} only to stations running it "
                               "(name it with --stations to switch its model)")
    return same, others
