"""Fixed-size time buckets for the fleet overview: counts per minute, per five minutes and per clock hour.

Every bucket array has a fixed number of slots; a count lands in slot ``period % slots`` and a slot that
still holds an older period is cleared first, so adding is O(1) and memory never grows with time. A count
for a period older than what the slot now holds (a backlog older than the window) is refused (``add``
returns False) and the caller counts it as late, as is one older than the window ending now. Keys (lanes,
labels) are capped per table: past the cap new keys are counted under ``OTHER``, so a station inventing lane
names cannot grow the dashboard; keys whose counts have left every slot no longer count towards the cap.
"""

from __future__ import annotations

import datetime as dt
from typing import Iterable

OTHER = "(other)"


class _Ring:
    """``slots`` consecutive periods of ``width_s`` seconds; subclasses say what a slot counts and how it clears."""

    __slots__ = ("width_s", "slots", "period", "counts")

    def __init__(self, slots: int, width_s: float, counts: list) -> None:
        self.width_s = width_s
        self.slots = slots
        self.period = [-1] * slots
        self.counts = counts

    def _slot(self, t: float, now: float | None = None) -> int | None:
        """The slot of ``t``'s period, cleared first when it still holds an older one; None when it holds a newer
        one, or (with ``now``) when ``t`` is before the window ending now: either way late, shown nowhere."""
        period = int(t // self.width_s)
        if now is not None and period <= int(now // self.width_s) - self.slots:
            return None
        slot = period % self.slots
        if self.period[slot] != period:
            if self.period[slot] > period:
                return None
            self.period[slot] = period
            self._clear(slot)
        return slot

    def _clear(self, slot: int) -> None:
        raise NotImplementedError


class Buckets(_Ring):
    """``slots`` consecutive periods of ``width_s`` seconds, each a fixed list of ``fields`` integer counts."""

    __slots__ = ()

    def __init__(self, slots: int, width_s: float, fields: int) -> None:
        super().__init__(slots, width_s, [[0] * fields for _ in range(slots)])

    def _clear(self, slot: int) -> None:
        counts = self.counts[slot]
        for i in range(len(counts)):
            counts[i] = 0

    def add(self, t: float, field: int, n: int = 1, now: float | None = None) -> bool:
        slot = self._slot(t, now)
        if slot is None:
            return False
        self.counts[slot][field] += n
        return True

    def total(self, now: float, periods: int, *, ago: int = 0) -> list[int]:
        """Sum per field over ``periods`` periods ending ``ago`` periods before the one holding ``now``."""
        last = int(now // self.width_s) - ago
        first = last - periods + 1
        out = [0] * len(self.counts[0])
        for period, counts in zip(self.period, self.counts):
            if first <= period <= last:
                for i, n in enumerate(counts):
                    out[i] += n
        return out

    def series(self, now: float, periods: int) -> list[list[int]]:
        """The last ``periods`` periods, oldest first (zeros where nothing was counted)."""
        last = int(now // self.width_s)
        by_period = {p: c for p, c in zip(self.period, self.counts)}
        empty = [0] * len(self.counts[0])
        return [list(by_period.get(p, empty)) for p in range(last - periods + 1, last + 1)]


class KeyedBuckets(_Ring):
    """Like ``Buckets``, but each slot counts per key (a lane, a label); at most ``max_keys`` distinct keys."""

    __slots__ = ("keys", "max_keys")

    def __init__(self, slots: int, width_s: float, max_keys: int) -> None:
        super().__init__(slots, width_s, [{} for _ in range(slots)])
        self.keys: set[str] = set()
        self.max_keys = max_keys

    def _clear(self, slot: int) -> None:
        self.counts[slot] = {}

    def add(self, t: float, key: str, n: int = 1, now: float | None = None) -> bool:
        slot = self._slot(t, now)
        if slot is None:
            return False
        if key not in self.keys:
            if len(self.keys) >= self.max_keys:      # the cap counts keys still in the window, not every one seen
                newest = max(self.period)
                self.keys = {k for p, counts in zip(self.period, self.counts) if p > newest - self.slots
                             for k in counts if k != OTHER}
            if len(self.keys) >= self.max_keys:
                key = OTHER
            else:
                self.keys.add(key)
        counts = self.counts[slot]
        counts[key] = counts.get(key, 0) + n
        return True

    def total(self, now: float, periods: int) -> dict[str, int]:
        last = int(now // self.width_s)
        out: dict[str, int] = {}
        for period, counts in zip(self.period, self.counts):
            if last - periods < period <= last:
                for key, n in counts.items():
                    out[key] = out.get(key, 0) + n
        return out

    def by_period(self, now: float, periods: int) -> dict[int, dict[str, int]]:
        """{period start (epoch s): counts} for the last ``periods`` periods that hold counts."""
        last = int(now // self.width_s)
        return {int(p * self.width_s): dict(c) for p, c in zip(self.period, self.counts)
                if last - periods < p <= last and c}


class DayCounts:
    """Counts per key since the start of the current day; a count for an earlier day is refused."""

    __slots__ = ("day", "counts", "max_keys")

    def __init__(self, max_keys: int) -> None:
        self.day = -1.0
        self.counts: dict[str, int] = {}
        self.max_keys = max_keys

    def add(self, day_start: float, key: str, n: int = 1) -> bool:
        if day_start < self.day:
            return False
        if day_start > self.day:
            self.day, self.counts = day_start, {}
        if key not in self.counts and len(self.counts) >= self.max_keys:
            key = OTHER
        self.counts[key] = self.counts.get(key, 0) + n
        return True

    def today(self, day_start: float) -> dict[str, int]:
        return dict(self.counts) if self.day == day_start else {}


def day_start(t: float, tz: dt.tzinfo | None) -> float:
    """Midnight of ``t``'s day in ``tz`` (None: the dashboard's local time zone), as epoch seconds."""
    local = dt.datetime.fromtimestamp(t, tz).astimezone(tz) if tz else dt.datetime.fromtimestamp(t).astimezone()
    return local.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()


def add_into(total: dict[str, int], counts: dict[str, int]) -> dict[str, int]:
    for key, n in counts.items():
        total[key] = total.get(key, 0) + n
    return total


def ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def summed(rows: Iterable[list[int]], fields: int) -> list[int]:
    out = [0] * fields
    for row in rows:
        for i, n in enumerate(row):
            out[i] += n
    return out
