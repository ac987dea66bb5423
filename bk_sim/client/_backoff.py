"""The reconnect wait rule shared by the AMQP and WebSocket consumers (PROTOCOL.md 4a)."""

from __future__ import annotations


def reconnect_delay(attempt: int, factor: float, max_delay: float) -> float:
    """Seconds to wait before reconnect ``attempt`` (1-based): 2, 4, 8, ... capped."""
    try:
        return float(min(factor**attempt, max_delay))
    except OverflowError:
        return float(max_delay)


def attempts_left(attempt: int, max_attempts: int) -> bool:
    """Whether reconnect ``attempt`` may be made; ``max_attempts`` 0 means no limit."""
    return max_attempts == 0 or attempt <= max_attempts
