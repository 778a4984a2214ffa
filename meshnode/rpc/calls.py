"""The table of calls waiting for answers: id → Deferred, with timeouts swept in slots."""

from twisted.internet import defer


class Call:
    __slots__ = ("deferred", "peer_id", "answer", "source", "datagram")

    def __init__(self, deferred, peer_id, answer, source, datagram):
        self.deferred = deferred
        self.peer_id = peer_id
        self.answer = answer
        self.source = source
        self.datagram = datagram


class _Deadlines:
    """Call timeouts in slots of TICK seconds, swept by one timer.

    A DelayedCall per call (Deferred.addTimeout) means a heap entry, a cancellation and its
    bookkeeping for every call; slots make a timeout a list append. A call times out up to
    one TICK late, never early. The timer runs only while something is pending.
    """

    TICK = 0.1

    def __init__(self, clock, expire):
        self._clock = clock
        self._expire = expire
        self._slots = {}
        self._timer = None
        self._timer_slot = None

    def add(self, key, timeout):
        slot = int((self._clock.seconds() + timeout) / self.TICK) + 1
        keys = self._slots.get(slot)
        if keys is not None:
            keys.append(key)
            return
        self._slots[slot] = [key]
        if self._timer_slot is None or slot < self._timer_slot:
            self._schedule(slot)

    def _schedule(self, slot):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer_slot = slot
        self._timer = self._clock.callLater(max(0.0, slot * self.TICK - self._clock.seconds()),
                                            self._sweep)

    def _sweep(self):
        self._timer = self._timer_slot = None
        # the small allowance absorbs float rounding of slot * TICK against the clock
        due = int(self._clock.seconds() / self.TICK + 1e-6)
        for slot in sorted(s for s in self._slots if s <= due):
            for key in self._slots.pop(slot):
                self._expire(key)
        if self._slots:
            self._schedule(min(self._slots))

    def stop(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self._timer_slot = None
        self._slots.clear()


class PendingCalls:
    """Calls by message id (names/dns.py's liveMessages); each fails with `timed_out(call)` (an
    exception) unless answered or cancelled first."""

    def __init__(self, clock, timed_out):
        self._calls = {}
        self._timed_out = timed_out
        self._deadlines = _Deadlines(clock, self._expire)

    def track(self, message_id, peer_id, answer, address, datagram, timeout):
        """A new call → its Deferred (cancelling it forgets the call)."""
        d = defer.Deferred(lambda d: self._calls.pop(message_id, None))
        self._calls[message_id] = Call(d, peer_id, answer, address, datagram)
        self._deadlines.add(message_id, timeout)
        return d

    def __len__(self):
        return len(self._calls)

    def __iter__(self):
        """The message ids of the calls pending."""
        return iter(list(self._calls))

    def get(self, message_id):
        return self._calls.get(message_id)

    def pop(self, message_id):
        return self._calls.pop(message_id, None)

    def _expire(self, message_id):
        call = self._calls.pop(message_id, None)
        if call is not None:
            call.deferred.errback(self._timed_out(call))

    def fail_all(self, error):
        """Fail every pending call with `error` (the RPC stopped)."""
        calls, self._calls = self._calls, {}
        self._deadlines.stop()
        for call in calls.values():
            call.deferred.errback(error)
