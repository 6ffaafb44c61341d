"""The one retry policy of outbound work (completion callbacks, results to PACS destinations): the
wait doubles from a first wait the kind of work sets, and never exceeds ten minutes."""

from __future__ import annotations

MAX_WAIT_S = 600.0


def delay(first_s: float, attempt: int) -> float:
    """Seconds to wait after failed attempt ``attempt`` (0-based) before the next one."""
    return min(MAX_WAIT_S, float(first_s) * 2 ** max(0, int(attempt)))
