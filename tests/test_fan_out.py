"""K-redundant directory queries: waves of K, doubling after a wave without an answer."""

import collections
import random

import attrs
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from meshnode.core.directory import FORGED, FanOut, Replica
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
        others: none takes more than 1.3 times its fair share, none less than 0.7 (no chain
        reaction: a ring order would give the dead one's successor 1.8 times)."""
        group = replicas(10)
        dead = group[0]
        fan_out = FanOut(k=1, rng=random.Random(5))
        load = collections.Counter()

        def ask(replica):
            if replica == dead:
                return defer.fail(CallTimeout("no answer"))
            load[replica] += 1
            return defer.succeed(_Record(1))

        # 4,000 queries: a survivor's count is binomial(4000, 1/9), about 444 ± 20, so the
        # bounds lie over 6 standard deviations out, whatever the seed.
        for _ in range(4000):
            self.successResultOf(fan_out.query(group, ask))
        fair = sum(load.values()) / 9
        self.assertEqual(len(load), 9)
        self.assertLessEqual(max(load.values()), 1.3 * fair, sorted(load.values()))
        self.assertGreaterEqual(min(load.values()), 0.7 * fair, sorted(load.values()))


class LieTests(SynchronousTestCase):
    """Forged, withheld and stale answers are counted against whoever gave them, never
    win, and a replica that keeps lying is asked last."""

    def test_each_lie_counted_against_its_replica(self):
        group = replicas(4)
        fan_out = FanOut(k=4, rng=random.Random(7))
        told = dict(zip(group, (_Record(9), FORGED, None, _Record(3))))
        best, answered = self.successResultOf(fan_out.query(
            group, lambda replica: defer.succeed(told[replica])))
        self.assertEqual(best, _Record(9))
        self.assertEqual(set(answered), {group[0], group[3]})
        self.assertEqual(fan_out.lies, {"forged": 1, "withheld": 1, "stale": 1})
        self.assertEqual({node_id: dict(kinds) for node_id, kinds in fan_out.lies_by.items()},
                         {group[1].node_id: {"forged": 1}, group[2].node_id: {"withheld": 1},
                          group[3].node_id: {"stale": 1}})
        self.assertEqual(fan_out.status()["suspects"],
                         sorted(r.node_id.hex()[:16] for r in group[1:]))

    def test_nothing_anywhere_is_no_lie(self):
        """Nobody holding the record: "nothing" is the truth, not withholding."""
        fan_out = FanOut(k=3, rng=random.Random(8))
        self.assertEqual(self.successResultOf(fan_out.query(
            replicas(3), lambda replica: defer.succeed(None))), (None, []))
        self.assertEqual(fan_out.lies, {})

    def test_forged_only_answers_find_nothing(self):
        """Forged answers alone are no result: the next wave is asked, and nothing used."""
        group = replicas(3)
        fan_out = FanOut(k=1, rng=random.Random(9))
        self.assertEqual(self.successResultOf(fan_out.query(
            group, lambda replica: defer.succeed(FORGED))), (None, []))
        self.assertEqual(fan_out.lies, {"forged": 3})

    def test_liar_is_asked_last_and_agreeing_clears_suspicion(self):
        group = replicas(4)
        liar = group[2]
        fan_out = FanOut(k=1, rng=random.Random(10))
        asked_first = collections.Counter()

        def ask(replica):
            return defer.succeed(FORGED if replica == liar else _Record(1))

        fan_out.caught(liar, "forged")  # found out once already
        for _ in range(200):
            order = fan_out.order(group)
            asked_first[order[0]] += 1
            self.assertEqual(order[-1], liar)
            self.successResultOf(fan_out.query(group, ask))
        self.assertNotIn(liar, asked_first)
        self.assertEqual(set(asked_first), set(group) - {liar})
        # Turned honest: each agreeing answer takes one lie off.
        fan_out = FanOut(k=4, rng=random.Random(11))
        fan_out.caught(liar, "stale")
        self.successResultOf(fan_out.query(group, lambda replica: defer.succeed(_Record(1))))
        self.assertEqual(fan_out.suspicion[liar.node_id], 0)


class GraceTests(SynchronousTestCase):
    """With a clock, a wave ends `grace` seconds after its first valid answer."""

    def setUp(self):
        self.asked = []
        self.pending = {}
        self.clock = Clock()

    def ask(self, replica):
        self.asked.append(replica)
        d = self.pending[replica] = defer.Deferred()
        return d

    def fan_out(self, k=3, seed=11, clock=True):
        return FanOut(k=k, rng=random.Random(seed), clock=self.clock if clock else None,
                      grace=0.5)

    def test_first_answer_wins_after_the_grace(self):
        """One answer in and the others silent: the result is that answer, `grace` later."""
        result = self.fan_out().query(replicas(3), self.ask)
        first = self.asked[0]
        self.pending[first].callback(_Record(3))
        self.clock.advance(0.49)
        self.assertNoResult(result)
        self.clock.advance(0.01)
        self.assertEqual(self.successResultOf(result), (_Record(3), [first]))
        self.assertEqual(len(self.asked), 3)  # the wave answered: no second wave

    def test_newer_answer_within_the_grace_wins(self):
        """An answer newer than the first, in within the grace, wins; an older one does not."""
        result = self.fan_out().query(replicas(3), self.ask)
        first, second, third = self.asked
        self.pending[first].callback(_Record(5))
        self.clock.advance(0.2)
        self.pending[second].callback(_Record(9))
        self.clock.advance(0.2)
        self.pending[third].callback(_Record(7))
        best, answered = self.successResultOf(result)
        self.assertEqual((best, answered), (_Record(9), [first, second, third]))

    def test_grace_counts_from_the_first_answer(self):
        """A second answer does not restart the grace: the wave ends `grace` after the first."""
        result = self.fan_out().query(replicas(3), self.ask)
        first, second, third = self.asked
        self.pending[first].callback(_Record(5))
        self.clock.advance(0.4)
        self.pending[second].callback(_Record(9))
        self.assertNoResult(result)
        self.clock.advance(0.1)
        found = []
        result.addCallback(found.append)
        self.pending[third].callback(_Record(99))  # too late to count
        self.assertEqual(found, [(_Record(9), [first, second])])

    def test_answer_after_the_grace_is_ignored(self):
        """The newest answer in before the grace ran out wins, not a newer one after it."""
        result = self.fan_out().query(replicas(2), self.ask)
        first, late = self.asked
        self.pending[first].callback(_Record(1))
        self.clock.advance(0.5)
        self.pending[late].callback(_Record(2))
        self.assertEqual(self.successResultOf(result), (_Record(1), [first]))

    def test_invalid_answer_does_not_start_the_grace(self):
        """An answer with nothing valid (None) does not start the grace; the first valid one
        does."""
        result = self.fan_out().query(replicas(3), self.ask)
        first, second, third = self.asked
        self.pending[first].callback(None)
        self.clock.advance(10)
        self.assertNoResult(result)
        self.pending[second].callback(_Record(4))
        self.clock.advance(0.5)
        self.assertEqual(self.successResultOf(result), (_Record(4), [second]))

    def test_whole_wave_in_before_the_grace(self):
        """When every replica has answered or failed, the result is there at once and no
        timer is left behind."""
        result = self.fan_out().query(replicas(3), self.ask)
        first, second, third = self.asked
        self.pending[first].callback(_Record(2))
        self.pending[second].errback(CallTimeout("no answer"))
        self.pending[third].callback(_Record(1))
        self.assertEqual(self.successResultOf(result), (_Record(2), [first, third]))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_grace_in_a_later_wave(self):
        """After a silent first wave, the grace holds for the second wave as well."""
        result = self.fan_out(k=1).query(replicas(3), self.ask)
        self.pending[self.asked[0]].errback(CallTimeout("no answer"))
        self.assertEqual(len(self.asked), 3)
        self.pending[self.asked[2]].callback(_Record(6))
        self.assertNoResult(result)
        self.clock.advance(0.5)
        self.assertEqual(self.successResultOf(result), (_Record(6), [self.asked[2]]))

    def test_without_a_clock_the_wave_waits_for_all(self):
        """Without a clock there is no grace: the result waits for every replica of the wave."""
        result = self.fan_out(clock=False).query(replicas(3), self.ask)
        first, second, third = self.asked
        self.pending[first].callback(_Record(5))
        self.clock.advance(1000)
        self.assertNoResult(result)
        self.pending[second].errback(CallTimeout("no answer"))
        self.assertNoResult(result)
        self.pending[third].callback(_Record(8))
        self.assertEqual(self.successResultOf(result), (_Record(8), [first, third]))

    def test_late_failure_puts_the_replica_last(self):
        """A replica still pending when the grace ended, that then fails, is asked last by the
        following queries."""
        group = replicas(3)
        fan_out = self.fan_out(k=1, seed=12)
        result = fan_out.query(group, self.ask)
        first = self.asked[0]
        self.pending[first].errback(CallTimeout("no answer"))
        slow, fast = self.asked[1:]  # the second wave
        self.pending[fast].callback(_Record(1))
        self.clock.advance(0.5)
        self.successResultOf(result)
        self.pending[slow].errback(CallTimeout("no answer"))
        for _ in range(20):
            self.asked.clear()
            result = fan_out.query(group, self.ask)
            self.assertEqual(self.asked, [fast])
            self.pending[fast].callback(_Record(1))
            self.successResultOf(result)

    def test_late_answer_takes_the_replica_off_the_failed_list(self):
        """A replica asked last since it failed, that answers after its wave ended by the
        grace, is no longer asked last: it comes first again in some following queries."""
        group = replicas(2)
        fan_out = self.fan_out(k=2, seed=13)
        result = fan_out.query(group, self.ask)
        silent, other = sorted(self.asked, key=group.index)
        self.pending[silent].errback(CallTimeout("no answer"))
        self.pending[other].callback(_Record(1))
        self.successResultOf(result)
        self.asked.clear()
        result = fan_out.query(group, self.ask)
        self.assertEqual(self.asked, [other, silent])
        self.pending[other].callback(_Record(1))
        self.clock.advance(0.5)
        self.successResultOf(result)
        self.pending[silent].callback(_Record(2))  # late, but an answer
        firsts = collections.Counter()
        for _ in range(40):
            self.asked.clear()
            result = fan_out.query(group, self.ask)
            firsts[self.asked[0]] += 1
            for replica in self.asked:
                self.pending[replica].callback(_Record(1))
            self.successResultOf(result)
        self.assertGreater(firsts[silent], 5)
