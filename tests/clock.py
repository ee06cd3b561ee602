"""A deterministic stand-in for the ``time`` module used by SGLang's radix cache."""

import time


class CounterClock:
    """``monotonic()`` counts up by one per call, so LRU orders never tie or depend on speed."""

    def __init__(self):
        self.now = 0.0

    def monotonic(self) -> float:
        self.now += 1.0
        return self.now

    def __getattr__(self, name):
        return getattr(time, name)
