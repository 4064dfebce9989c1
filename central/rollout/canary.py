"""The canary watch (pure): did the low-confidence rate or the error rate get worse after the switch?"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

from contract.events import RolloutError

log = logging.getLogger(__name__)

MAX_SECONDS = 7 * 24 * 3600.0     # a week: longer than any watch or update; a typo (1e9) is refused, not waited out


def seconds_problem(value: Any, *, positive: bool = False) -> str | None:
    """What is wrong with ``value`` as seconds (None: nothing). Finite and at most a week: NaN compares false
    with everything, so a NaN watch or timeout ends at once or never; a negative one ends before it starts."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or value > MAX_SECONDS or (positive and value == 0):
        return (f"expected seconds, {'above 0' if positive else '0 or more'} and at most {MAX_SECONDS:.0f} "
                f"(a week), got {value!r}")
    return None


def rate_problem(value: Any) -> str | None:
    """What is wrong with ``value`` as a rate (None: nothing): NaN switches a rate rule off (every comparison
    with it is false), and 30 typed for 30 % can never be crossed."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        return f"expected a rate from 0 to 1 (0.05 = 5 %), got {value!r}"
    return None


def count_problem(value: Any) -> str | None:
    """What is wrong with ``value`` as a count (None: nothing): a negative --min-frames accepts an idle canary."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return f"expected a whole number 0 or more, got {value!r}"
    return None


@dataclass(frozen=True)
class WatchPolicy:
    """What the canary must show on the new version before the rest get it. Every field is checked on
    construction (the CLI checks its flags the same way, before anything is sent)."""

    watch_s: float = 120.0
    max_low_conf_rate: float | None = None       # absolute cap on the new model's rate, 0..1
    max_low_conf_increase: float = 0.05          # allowed rise over the rate before the update, 0..1
    max_errors: int = 0                          # inference errors after the command was sent
    min_frames: int = 20                         # frames the new model must classify to be judged
    baseline_s: float = 30.0                     # stats gathered before the command, for the "before" rate

    def __post_init__(self) -> None:
        problems = {"watch_s": seconds_problem(self.watch_s), "baseline_s": seconds_problem(self.baseline_s),
                    "max_low_conf_rate": None if self.max_low_conf_rate is None
                    else rate_problem(self.max_low_conf_rate),
                    "max_low_conf_increase": rate_problem(self.max_low_conf_increase),
                    "max_errors": count_problem(self.max_errors), "min_frames": count_problem(self.min_frames)}
        for name, problem in problems.items():
            if problem:
                raise RolloutError(f"watch policy field {name} (--{name.replace('_', '-')}): {problem}")

    @property
    def needs_baseline(self) -> bool:
        """Whether the rise rule can fire: an allowance of 1 (100 points) never can, so it needs no "before"."""
        return self.max_low_conf_increase < 1.0


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str | None
    figures: dict[str, Any]


def _counts(stats: dict[str, Any]) -> tuple[int, int, int] | None:
    keys = ("frames_classified", "frames_low_confidence", "inference_errors")
    if not all(isinstance(stats.get(k), int) and not isinstance(stats.get(k), bool) for k in keys):
        return None
    return stats["frames_classified"], stats["frames_low_confidence"], stats["inference_errors"]


def _counter_break(a: tuple[int, int, int] | None, b: tuple[int, int, int]) -> str | None:
    """Why ``b`` cannot follow ``a`` as the same agent's cumulative counters (None: it can). A rate from such a
    pair would be negative or above 100 %, or a difference of errors would hide errors: never judged on."""
    frames, low, errors = b
    if low > frames:
        return f"frames_low_confidence {low} is more than frames_classified {frames}"
    if a is None:
        return None
    if frames < a[0]:
        return f"frames_classified went back from {a[0]} to {frames}"
    for key, was, now in (("frames_low_confidence", a[1], low), ("inference_errors", a[2], errors)):
        if now < was:
            return (f"{key} went back from {was} to {now} while frames_classified rose from {a[0]} to {frames} "
                    "(cumulative counters never go back)")
    if low - a[1] > frames - a[0]:
        return (f"frames_low_confidence rose by {low - a[1]}, more than the {frames - a[0]} frames classified "
                "meanwhile")
    return None


def _consistent_tail(stats: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stats from the last break in the counters on (a restart, a message no agent sends): the rate before
    the update is taken over the stretch one running agent counted."""
    tail: list[dict[str, Any]] = []
    previous = None
    for s in stats:
        counts = _counts(s)
        if counts is None:
            tail.append(s)
            continue
        if _counter_break(previous, counts) is not None:
            tail = [] if counts[1] > counts[0] else [s]
        else:
            tail.append(s)
        previous = counts if counts[1] <= counts[0] else None
    return tail


def rate_over(stats: Sequence[dict[str, Any]]) -> tuple[float | None, int]:
    """Low-confidence rate and frames between the first and last stats message (cumulative counters).

    With one message (or an agent without the counters) it is the rate since the agent started.
    """
    stats = _consistent_tail(stats)
    if not stats:
        return None, 0
    first, last = _counts(stats[0]), _counts(stats[-1])
    if first is not None and last is not None and len(stats) > 1 and last[0] - first[0] > 0:
        frames = last[0] - first[0]
        return (last[1] - first[1]) / frames, frames
    if last is not None and last[0] > 0:
        return last[1] / last[0], last[0]
    rate = stats[-1].get("low_confidence_rate")
    return (float(rate) if isinstance(rate, (int, float)) else None), 0


def judge_canary(before: Sequence[dict[str, Any]], after: Sequence[dict[str, Any]], version: str,
                 policy: WatchPolicy) -> Verdict:
    """Does the canary's stats show the new version behaving? ``before``: stats up to the command;
    ``after``: stats received since. Counters are cumulative since the agent started."""
    new = [s for s in after if s.get("model_version") == version]
    counted = [c for c in map(_counts, new) if c is not None]
    # From the last stats before the command through every one since (any version): one agent's cumulative
    # counters. A restart (counters from 0) or a message no agent sends would make a negative rate, a rate above
    # 100 % or a negative count of errors: the canary is not judged on them, it fails.
    previous = None
    for s in [*before[-1:], *after]:
        counts = _counts(s)
        if counts is None:
            continue
        why = _counter_break(previous, counts)
        if why is not None:
            restarted = why.startswith("frames_classified went back")
            return Verdict(False, ("the canary's counters went back during the watch (the agent restarted): "
                                   if restarted else "the canary's stats do not add up during the watch: ") + why,
                           {"stats_messages": len(new)})
        previous = counts
    rate_before, frames_before = rate_over(before)
    if len(counted) >= 2:
        frames = counted[-1][0] - counted[0][0]
        rate_after = (counted[-1][1] - counted[0][1]) / frames if frames else None
    else:
        frames, rate_after = 0, None
    # Errors count from the last stats before the command (else the first on the new version): every
    # failure after the command is the new model's, including those before its first stats message.
    base = (_counts(before[-1]) if before else None) or (counted[0] if counted else None)
    last = counted[-1] if counted else None
    errors = max(0, last[2] - base[2]) if last and base else 0
    figures = {"low_confidence_rate_before": _round(rate_before), "frames_before": frames_before,
               "low_confidence_rate_after": _round(rate_after), "frames_after": frames,
               "inference_errors": errors, "stats_messages": len(new), "watch_s": policy.watch_s}
    if errors > policy.max_errors:
        return Verdict(False, f"{errors} inference error(s) on the canary since the command "
                              f"(at most {policy.max_errors} allowed)", figures)
    if frames < policy.min_frames or rate_after is None:
        return Verdict(False, f"the canary classified {frames} frame(s) with {version} during the watch "
                              f"({len(new)} stats message(s)); at least {policy.min_frames} are needed to judge it "
                              "(a longer --watch-s, or --min-frames 0 to accept an idle canary)", figures) \
            if policy.min_frames > 0 else Verdict(True, "idle canary accepted (--min-frames 0)", figures)
    if policy.max_low_conf_rate is not None and rate_after > policy.max_low_conf_rate:
        return Verdict(False, f"low-confidence rate {rate_after:.1%} on {version} is above --max-low-conf-rate "
                              f"{policy.max_low_conf_rate:.1%}", figures)
    if rate_before is None and policy.needs_baseline:
        # without a "before" the rise rule cannot be judged; passing would let any rate through unnoticed
        return Verdict(False, f"no stats before the command, so the rise of the low-confidence rate on {version} "
                              f"({rate_after:.1%}) cannot be judged: lengthen --baseline-s (or "
                              "--max-low-conf-increase 1 to judge by --max-low-conf-rate alone)", figures)
    if rate_before is not None and rate_after > rate_before + policy.max_low_conf_increase + 1e-12:
        return Verdict(False, f"low-confidence rate rose from {rate_before:.1%} to {rate_after:.1%} on {version} "
                              f"(+{(rate_after - rate_before) * 100:.1f} points; at most "
                              f"{policy.max_low_conf_increase * 100:.1f} allowed)", figures)
    before_txt = f"{rate_before:.1%} before" if rate_before is not None else "no rate before"
    return Verdict(True, f"{frames} frames on {version}: low-confidence rate {rate_after:.1%} ({before_txt}), "
                         f"{errors} inference errors", figures)


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)
