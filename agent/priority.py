"""Thread priorities: on a small CPU the model thread goes first.

The cameras, the decide thread and the MQTT thread lower their own scheduling
priority (a higher nice value; any thread may do that without privileges), so
when every core is busy the kernel runs the model thread before them, and they
use what the model leaves. The bounded queues between the stages then decide
what waits: a camera blocks or drops its oldest frame, the outbox holds results.
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger(__name__)


def lower_this_thread(nice: int) -> bool:
    """Add ``nice`` to the calling thread's nice value (Linux: per thread). False where it cannot."""
    if nice <= 0:
        return False
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
        return True
    except (AttributeError, OSError) as exc:   # not Linux, or a sandbox that forbids it
        log.debug("cannot lower the priority of thread %s: %s", threading.current_thread().name, exc)
        return False
