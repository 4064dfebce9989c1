"""The canary watch (pure): did the low-confidence rate or the error rate get worse after the switch?"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WatchPolicy:
    """What the canary must show on the new version before the rest get it."""

    watch_s: float = 120.0
    max_low_conf_rate: float | None = None       # absolute cap on the new model's rate, 0..1
    max_low_conf_increase: float = 0.05          # allowed rise over the rate before the update, 0..1
    max_errors: int = 0                          # inference errors after the command was sent
    min_frames: int = 20                         # frames the new model must classify to be judged
    baseline_s: float = 30.0                     # stats gathered before the command, for the "before" rate


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str | None
    figures: dict[str, Any]


def _counts(stats: dict[str, Any]) -> tuple[int, int, int] | None:
    keys = ("frames_classified", "frames_low_confidence", "inference_errors")
    if not all(isinstance(stats.get(k), int) for k in keys):
        return None
    return stats["frames_classified"], stats["frames_low_confidence"], stats["inference_errors"]


def rate_over(stats: Sequence[dict[str, Any]]) -> tuple[float | None, int]:
    """Low-confidence rate and frames between the first and last stats message (cumulative counters).

    With one message (or an agent without the counters) it is the rate since the agent started.
    """
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
    if len(counted) >= 2 and any(b[0] < a[0] for a, b in zip(counted, counted[1:])):
        return Verdict(False, "the canary's counters went back during the watch (the agent restarted)",
                       {"stats_messages": len(new)})
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
    if rate_before is not None and rate_after > rate_before + policy.max_low_conf_increase + 1e-12:
        return Verdict(False, f"low-confidence rate rose from {rate_before:.1%} to {rate_after:.1%} on {version} "
                              f"(+{(rate_after - rate_before) * 100:.1f} points; at most "
                              f"{policy.max_low_conf_increase * 100:.1f} allowed)", figures)
    before_txt = f"{rate_before:.1%} before" if rate_before is not None else "no rate before"
    return Verdict(True, f"{frames} frames on {version}: low-confidence rate {rate_after:.1%} ({before_txt}), "
                         f"{errors} inference errors", figures)


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)
