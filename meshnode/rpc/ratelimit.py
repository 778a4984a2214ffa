"""A token bucket per source address, with a bounded number of sources."""


class RateLimiter:
    """Allows `rate` datagrams per second per source, bursts up to `burst`.

    At most `max_sources` buckets are kept; the source seen first is forgotten first.
    """

    def __init__(self, clock, rate, burst, max_sources=65536):
        self._clock = clock
        self._rate = float(rate)
        self._burst = float(burst)
        self._max_sources = max_sources
        self._buckets = {}

    def allow(self, source):
        now = self._clock.seconds()
        bucket = self._buckets.get(source)
        if bucket is None:
            if len(self._buckets) >= self._max_sources:
                del self._buckets[next(iter(self._buckets))]
            tokens = self._burst
        else:
            tokens = min(self._burst, bucket[0] + (now - bucket[1]) * self._rate)
        if tokens < 1.0:
            self._buckets[source] = (tokens, now)
            return False
        self._buckets[source] = (tokens - 1.0, now)
        return True
