"""K-redundant directory queries: waves of K, doubling after a wave without an answer."""

import collections
import random

import attrs
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from meshnode.directory import FanOut, Replica
from meshnode.rpc.service import CallTimeout


@attrs.frozen
class _Record:
    created: int


def replicas(count):
    return [Replica(bytes([i]) * 32, ("127.0.0.1", 7000 + i)) for i in range(count)]


class FanOutTests(SynchronousTestCase):
    def setUp(self):
        self.asked = []
        self.pending = {}

    def ask(self, replica):
        self.asked.append(replica)
        d = self.pending[replica] = defer.Deferred()
        return d

    def test_first_wave_asks_k_and_newest_wins(self):
        """K replicas are asked at first; the newest of their valid answers wins."""
        group = replicas(6)
        result = FanOut(k=3, rng=random.Random(1)).query(group, self.ask)
        self.assertEqual(len(self.asked), 3)
        for replica, created in zip(list(self.asked), (5, 9, 7)):
            self.pending[replica].callback(_Record(created))
        best, answered = self.successResultOf(result)
        self.assertEqual(best, _Record(9))
        self.assertEqual(len(answered), 3)
        self.assertEqual(len(self.asked), 3)

    def test_fan_out_doubles_after_a_silent_wave(self):
        """A wave with no valid answer is followed by one twice as wide (2, 4, 8 …)."""
        group = replicas(15)
        result = FanOut(k=2, rng=random.Random(2)).query(group, self.ask)
        widths = []
        while not result.called:
            wave = [r for r in self.asked if not self.pending[r].called]
            widths.append(len(wave))
            for replica in wave:
                self.pending[replica].errback(CallTimeout("no answer"))
        self.assertEqual(widths, [2, 4, 8, 1])
        self.assertEqual(self.successResultOf(result), (None, []))

    def test_invalid_answers_do_not_win(self):
        """A replica answering nothing valid (None) does not stop the search."""
        group = replicas(4)
        result = FanOut(k=1, rng=random.Random(3)).query(group, self.ask)
        self.pending[self.asked[0]].callback(None)
        self.assertEqual(len(self.asked), 3)  # the next wave: two more
        self.pending[self.asked[1]].callback(_Record(4))
        self.pending[self.asked[2]].errback(CallTimeout("no answer"))
        best, answered = self.successResultOf(result)
        self.assertEqual((best, answered), (_Record(4), [self.asked[1]]))

    def test_replica_that_failed_is_asked_last(self):
        """A replica that did not answer is asked last until it answers again."""
        group = replicas(3)
        fan_out = FanOut(k=1, rng=random.Random(4))
        result = fan_out.query(group, self.ask)
        silent = self.asked[0]
        self.pending[silent].errback(CallTimeout("no answer"))
        for replica in self.asked[1:]:  # the second wave: the two others
            self.pending[replica].callback(_Record(1))
        self.successResultOf(result)
        for _ in range(20):
            self.asked.clear()
            result = fan_out.query(group, self.ask)
            self.assertNotEqual(self.asked[0], silent)
            self.pending[self.asked[0]].callback(_Record(1))
            self.successResultOf(result)

    def test_load_of_a_dead_replica_spreads_evenly(self):
        """When one replica dies, the queries it would have answered spread over all the
        others: none takes more than twice its fair share (no chain reaction)."""
        group = replicas(10)
        dead = group[0]
        fan_out = FanOut(k=1, rng=random.Random(5))
        load = collections.Counter()

        def ask(replica):
            if replica == dead:
                return defer.fail(CallTimeout("no answer"))
            load[replica] += 1
            return defer.succeed(_Record(1))

        for _ in range(2000):
            self.successResultOf(fan_out.query(group, ask))
        fair = sum(load.values()) / 9
        self.assertEqual(len(load), 9)
        self.assertLessEqual(max(load.values()), 2 * fair)
